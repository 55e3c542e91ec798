r"""Answers trace queries over HTTP, the store's encodings held on the devices.

  tracer serve --gin_file=configs/tiny.gin --workdir=W [--store=URL] \
      [--corpus=C] [--task_queries=T.jsonl] [--port=8000] [--host=127.0.0.1]

(also ``python -m tracer.launch.serve``). Loads the checkpoint (default: the
latest in W/checkpoints) and the complete store (default W/store; encode it
first with ``tracer trace`` or ``tracer encode``), reads the store's rows
onto the mesh's devices once (split over every device and host; when they
do not fit ``--resident_budget_mb`` per device, streamed from the store for
every batch of requests, in windows of half the budget) and serves:

  POST /trace   {"queries": [{"id", "prompt", "target", ...}], "top_k": K,
                 "task_r": true | false}
                -> {"results": [the records `tracer trace` writes], "batch": {...}}
  GET  /health  -> {"status": "ok", "rows": N, ...}

Each request's queries are encoded and their task-specific R fitted from
them alone, so an answer equals ``tracer trace``'s for the same queries
file. ``--task_queries=T.jsonl`` fits R once, at start, from a task's
queries and scores every request under it, as ``tracer trace
--task_queries`` does: a request of one query then gets the task's R, not
one fitted from itself alone (a query of T is answered as ``tracer trace
--queries=T`` answers it), and requests batched together share the R's
row norms (figures in WORKSPACE.md). A request with ``"task_r": false``
gets an R fitted from its own queries instead (``"task_r": true`` on a
server without a task R is a 400). Requests arriving together (within --batch_window_ms) share one
encoder call, one pass over the rows and one greedy decode. Bad requests get
a 4xx and a message naming the field. ``--corpus`` (default: the store's own,
from its manifest: the tokenized corpus its rows were read from, else its
source) maps rows to ids and texts.

``--sum_steps=200,400`` scores rows by TrackStar summed over those
checkpoints and this one, from the stores ``tracer trace --sum_steps`` made
(``<store>-step200``, ...): every step's params and rows stay on the devices
(S times the memory of one), and each request's queries are projected and
their R fitted once per step.

``--measure=Q.jsonl`` starts the server, measures its latency with queries
from that file (1 query; 64 queries in one request; 64 concurrent one-query
requests: medians over --measure_repeats warm runs; fewer, and it says so,
past --max_batch_queries or half of --max_connections), prints the table
and exits.

On several hosts run the same command on each (``--coordinator_address`` or
``TRACER_DISTRIBUTED=1``): process 0 serves HTTP and broadcasts each batch;
every process scans its own devices' rows.
"""

from __future__ import annotations

import concurrent.futures
import functools
import signal
import socket
import statistics
import threading
import time
from typing import Collection

from absl import flags
import jax
import numpy as np

from tracer.launch import common
from tracer.launch import config
from tracer.config import PreconditionerConfig
from tracer import data as data_lib
from tracer import partitioning
from tracer import pipeline
from tracer import scan
from tracer import serving
from tracer.errors import InputError

flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0, or :: for IPv6 too: every "
                    "interface; the server has no authentication).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port; the "
                     "'listening on' line names it).", lower_bound=0,
                     upper_bound=65535)
flags.DEFINE_integer("resident_budget_mb", -1, "Device memory per device the "
                     "store's rows may take; more and they are streamed from "
                     "the store for every batch of requests, in windows of "
                     "half of it. -1: 60% of an accelerator's "
                     "memory, or on CPU 40% of host memory over its devices "
                     "in the mesh (the least of any host's). 0: always "
                     "stream.", lower_bound=-1)
flags.DEFINE_float("batch_window_ms", 5.0, "How long the batcher waits for "
                   "more requests to answer with the first one.")
flags.DEFINE_integer("max_batch_queries", 256, "Queries per request and per "
                     "batch, at most.", lower_bound=1)
flags.DEFINE_integer("max_top_k", 100, "Largest top_k a request may ask for.",
                     lower_bound=1)
flags.DEFINE_float("max_body_mb", 16.0, "Largest request body.")
flags.DEFINE_float("max_bodies_mb", 64.0, "Request bodies held at once (being "
                   "read, parsed or waiting for their batch): past it a request "
                   "gets a 503 (one alone is always taken). A parsed body takes "
                   "up to ~30x its bytes.")
flags.DEFINE_integer("max_connections", 256, "Open connections at once (each "
                     "holds a thread); one more gets a 503.", lower_bound=1)
flags.DEFINE_float("idle_tick_s", 5.0, "Multi-host: while no request comes, "
                   "process 0 tells the others this often that none came.")
flags.DEFINE_bool("log_requests", False, "Log each HTTP request to stderr.")
flags.DEFINE_string("measure", None, "Queries JSONL: measure latency with its "
                    "queries, print the table and exit.")
flags.DEFINE_integer("measure_repeats", 10, "Warm runs per --measure case.",
                     lower_bound=1)
# (absl's bounds let NaN through: every comparison with it is False; inf
# killed the batcher thread, so that the first request hung.)
flags.register_validator("batch_window_ms", lambda v: 0 <= v <= 60_000,
                         "expected milliseconds in [0, 60000]")
for _name in ("max_body_mb", "max_bodies_mb", "idle_tick_s"):
  flags.register_validator(_name, lambda v: 0 < v < float("inf"),
                           "expected a finite value > 0")
del _name
FLAGS = flags.FLAGS


def budget_bytes(budget_mb: int, mesh) -> int:
  """``--resident_budget_mb`` in bytes, process 0's flag on every process of
  ``mesh``; -1: a share of a device of ``mesh`` (``scan.agreed_memory``:
  the least of any process's), since all must choose the same index."""
  if partitioning.spans_processes(mesh):
    # (a flag given differently would choose different indexes, and a -1
    # on one process alone would wait in agreed_memory's allgather)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    budget_mb = int(multihost_utils.broadcast_one_to_all(
        np.array([min(budget_mb, 2**31 - 1)], np.int32))[0])
  if budget_mb >= 0:
    return budget_mb << 20
  agreed = scan.agreed_memory(False, mesh)
  # The rest: the model, the encoder's and the scan's temporaries (and on
  # CPU, whose devices share the host's memory, the host's other uses).
  return int((0.4 if agreed.shared else 0.6) * agreed.device) >> 20 << 20


def _complete(location: str, run_, pcfg: PreconditionerConfig) -> tuple:
  """The store at ``location`` for ``run_`` (and ``pcfg``'s basis settings)
  and its basis; InputError unless it is complete."""
  store = common.stored(location, run_, pcfg)
  pending = pipeline.agreed_pending_chunks(store)
  if len(pending):
    raise InputError(f"{location}: store is incomplete: {len(pending)} of "
                     f"{store.num_chunks} chunks not written; finish encoding "
                     "first (tracer encode)")
  return store, pipeline.store_basis(store)


def build(workdir: str, store_path: str | None = None, corpus: str | None = None,
          checkpoint: str | None = None, budget_mb: int = -1,
          verify: bool = True, sum_steps=(), task_queries: str | None = None
          ) -> serving.Tracer:
  """The checkpoint, encoder, store (complete) and index, loaded once.
  ``sum_steps``: also those checkpoints of the run, each with its store
  (``<store>-step<N>``), held at once; rows are scored by the sum.
  ``task_queries``: a queries file whose R (fitted once, in each
  checkpoint's basis) every request is scored under."""
  pcfg = config.make(PreconditionerConfig)
  location = common.default_location(workdir, store_path, "store")
  run_, source = common.start_on_store(workdir, checkpoint, corpus, location)
  others = common.summed_checkpoints(sum_steps, run_.ckpt, stores_at=location)
  store, basis = _complete(location, run_, pcfg)
  stores, summed, steps = [store], [], []
  tasks = [common.task_metric(run_, basis, task_queries, pcfg)]
  for other, other_store, other_basis in common.summed_runs(
      others, workdir, source, location,
      functools.partial(_complete, pcfg=pcfg)):
    stores.append(other_store)
    summed.append((other.encoder, other_basis))  # its params stay on the devices
    steps.append(other.ckpt.step)
    tasks.append(common.task_metric(other, other_basis, task_queries, pcfg))
  start = time.perf_counter()
  index = serving.open_index(stores, run_.encoder.mesh,
                             budget_bytes(budget_mb, run_.encoder.mesh),
                             verify)
  common.say(f"checkpoint {run_.ckpt.path} (step {run_.ckpt.step}"
             + (f", summed with steps {steps}" if steps else "") + "); store "
             f"{location}: {store.num_rows} rows x d={store.dim}, "
             f"{index.describe()} ({time.perf_counter() - start:.1f} s); mesh "
             f"{dict(run_.encoder.mesh.shape)} over {jax.process_count()} "
             f"process(es); corpus {source}")
  return serving.Tracer(run_.ckpt, run_.encoder, basis, run_.corpus, index, pcfg,
                        summed, tasks if task_queries else None)


def limits(num_rows: int, top_k: int, max_top_k: int, max_queries: int,
           max_body_mb: float, max_bodies_mb: float = 64.0,
           given: Collection[str] = ()) -> serving.Limits:
  """A request's limits (the flags'); a request without ``top_k`` gets
  ``top_k``, within what any request may ask for. ``given``: the flags of
  ``top_k`` and ``max_top_k`` set on the command line, which are refused
  past the store's rows (or ``top_k`` past ``max_top_k``); their defaults
  are cut to them, and ``max_top_k``'s raised to a given ``top_k``."""
  for flag, k in (("top_k", top_k), ("max_top_k", max_top_k)):
    if flag in given:
      config.check_top_k(k, num_rows, flag=f"--{flag}")
  if top_k > max_top_k:
    if "max_top_k" in given:
      raise InputError(f"--top_k={top_k}: more than --max_top_k={max_top_k}, "
                       "the most a request may ask for; expected at most that")
    if "top_k" in given:  # (before 2026-12-07 cut to the default cap, silently)
      max_top_k = top_k
  return serving.Limits(
      num_rows=num_rows, max_top_k=max_top_k, max_queries=max_queries,
      default_top_k=min(top_k, max_top_k, num_rows),
      max_body_bytes=int(max_body_mb * 2**20),
      max_bodies_bytes=int(max_bodies_mb * 2**20))


def info(tracer: serving.Tracer, lim: serving.Limits,
         max_connections: int) -> dict:
  """What ``GET /health`` reports."""
  store = tracer.index.store
  return {"store": store.path, "rows": store.num_rows, "dim": store.dim,
          "dtype": store.manifest.dtype, "resident": tracer.index.resident,
          "checkpoint": str(tracer.ckpt.path), "step": int(tracer.ckpt.step),
          "sum_steps": [int(st.manifest.step) for st in tracer.index.stores[1:]],
          "task_queries": (tracer.tasks[0].num_eval
                           if tracer.tasks[0] is not None else 0),
          "devices": jax.device_count(), "processes": jax.process_count(),
          "max_top_k": min(lim.max_top_k, lim.num_rows),
          "max_queries": lim.max_queries, "default_top_k": lim.default_top_k,
          "max_connections": max_connections}


class Server:
  """Process 0's side, started: the batcher (and, multi-host, the channel
  to the others) and the HTTP server in a thread. ``url``; ``close()``."""

  def __init__(self, tracer: serving.Tracer, host: str = "127.0.0.1",
               port: int = 0, window_s: float = 0.005, log: bool = False,
               lim: serving.Limits | None = None, max_connections: int = 256):
    lim = lim or serving.Limits(tracer.index.store.num_rows)
    answer, extra = tracer.answer, {}
    self.stopped = threading.Event()  # a signal, or (multi-host) a failure
    self.failure: Exception | None = None
    if jax.process_count() > 1:
      channel = serving.Channel()

      def answer(requests):
        # After a failed batch the processes may be out of step (one host's
        # read failed while the others wait in the scan's collective): no
        # collective runs again, and the job ends with the error (main).
        if self.failure is not None:
          raise RuntimeError(f"the server is stopping: a batch failed "
                             f"({type(self.failure).__name__}: {self.failure})")
        try:  # (a failed send too: the followers may have missed the batch)
          channel.send(requests)
          return tracer.answer(requests)
        except Exception as e:
          self.failure = e
          self.stopped.set()
          raise

      def tell(requests):
        if self.failure is None:
          try:
            channel.send(requests)
          except Exception as e:  # the batcher's worker ends with it
            self.failure = e
            self.stopped.set()
            raise
      extra = dict(idle_s=FLAGS.idle_tick_s, on_idle=lambda: tell([]),
                   on_stop=lambda: tell(None))
    self.batcher = serving.Batcher(answer, window_s, lim.max_queries, **extra)
    service = serving.Service(lim, tracer.check, self.batcher,
                              info(tracer, lim, max_connections), log)
    try:
      self.http = serving.make_server(service, host, port, max_connections)
    except OSError as e:  # taken since check_address: say it as it would
      self.batcher.close()
      raise _cannot_listen(host, port, e) from None
    host, port = self.http.server_address[:2]
    self.url = f"http://{serving.url_host(host)}:{port}"
    self._thread = threading.Thread(target=self.http.serve_forever,
                                    name="tracer-http", daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops taking requests, answers those queued, stops the followers."""
    self.http.shutdown()
    self.http.server_close()
    self.batcher.close()


# --- latency ------------------------------------------------------------------

def _case(url: str, requests: list[list[dict]]) -> tuple[float, list[dict]]:
  """Sends ``requests`` at once; the wall time until the last answer and
  the responses."""
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    responses = list(pool.map(lambda q: serving.trace(url, q), requests))
  return time.perf_counter() - start, responses


def measure_sizes(max_queries: int, max_connections: int | None
                  ) -> tuple[int, int]:
  """The cases' 64 queries in one request and 64 requests at once, cut to
  what the server takes: ``max_queries`` per request, and half its
  ``max_connections`` (a connection's slot is given back only once its
  thread sees it close, which may be after the next run's requests come)."""
  at_once = 64 if max_connections is None else max(1, max_connections // 2)
  return min(64, max_queries), min(64, at_once)


def measure(url: str, queries: list[dict], repeats: int = 10) -> list[dict]:
  """Warm latency of three cases (module doc), sized to the limits the
  server's ``/health`` reports (``measure_sizes``): per case the median,
  min and max wall time over ``repeats`` runs (after two warm-up runs),
  and of each run's largest batch: its requests and its stages' seconds
  (medians)."""
  def take(n, offset):
    return [dict(queries[(offset + i) % len(queries)],
                 id=f"{queries[(offset + i) % len(queries)]['id']}#{offset + i}")
            for i in range(n)]
  limits = serving.health(url)
  together, at_once = measure_sizes(limits["max_queries"],
                                    limits.get("max_connections"))
  cases = {"1 query": lambda o: [take(1, o)],
           f"{together} queries, one request": lambda o: [take(together, o)],
           f"{at_once} one-query requests at once": lambda o: [
               take(1, o + i) for i in range(at_once)]}
  rows = []
  for name, make in cases.items():
    for warm in range(2):
      _case(url, make(warm))
    times, batches, stages = [], [], {}
    for r in range(repeats):
      took, responses = _case(url, make(64 * r))
      times.append(took)
      largest = max((resp["batch"] for resp in responses),
                    key=lambda b: b["requests"])
      batches.append(largest["requests"])
      for stage, s in largest["timing_s"].items():
        stages.setdefault(stage, []).append(s)
    rows.append({"case": name, "median_s": statistics.median(times),
                 "min_s": min(times), "max_s": max(times),
                 "requests_per_batch": statistics.median(batches),
                 **{f"{k}_s": statistics.median(v) for k, v in stages.items()}})
  return rows


def format_rows(rows: list[dict]) -> str:
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for row in rows:
    lines.append("| " + " | ".join(
        f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
  return "\n".join(lines)


# --- main -----------------------------------------------------------------------

def _wait_for_signal(stop: threading.Event) -> None:
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  while not stop.wait(0.5):
    pass


def _cannot_listen(host: str, port: int, error: OSError) -> InputError:
  why = error.strerror or str(error)
  return InputError(f"--host={host} --port={port}: cannot listen there ({why}); "
                    "expected an address of this machine and a free port "
                    "(--port=0 picks one)")


def check_address(host: str, port: int) -> None:
  """InputError unless a server could listen on ``host:port`` now: said
  before the checkpoint and store are loaded (minutes at scale), not after
  (a port in use, a host name that does not resolve were tracebacks then)."""
  try:
    with socket.socket(serving.address_family(host), socket.SOCK_STREAM) as s:  # as the server
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, port))
  except OSError as e:
    raise _cannot_listen(host, port, e) from None


def main(argv):
  del argv
  config.setup(required=("workdir",))
  if jax.process_index() == 0:
    check_address(FLAGS.host, FLAGS.port)
  measure_queries = data_lib.read_queries(FLAGS.measure) if FLAGS.measure else None
  tracer = build(FLAGS.workdir, FLAGS.store, FLAGS.corpus, FLAGS.checkpoint,
                 FLAGS.resident_budget_mb, FLAGS.check_chunks, FLAGS.sum_steps,
                 FLAGS.task_queries)
  if jax.process_index() != 0:
    serving.follow(tracer, serving.Channel())
    return
  lim = limits(tracer.index.store.num_rows, FLAGS.top_k, FLAGS.max_top_k,
               FLAGS.max_batch_queries, FLAGS.max_body_mb, FLAGS.max_bodies_mb,
               given=[n for n in ("top_k", "max_top_k") if FLAGS[n].present])
  server = Server(tracer, FLAGS.host, FLAGS.port, FLAGS.batch_window_ms / 1000,
                  FLAGS.log_requests, lim, FLAGS.max_connections)
  print(f"listening on {server.url} (POST /trace, GET /health)", flush=True)
  try:
    if measure_queries is not None:
      together, at_once = measure_sizes(lim.max_queries, FLAGS.max_connections)
      cut = ([f"{together} queries in one request, not 64 (at most "
              f"--max_batch_queries={lim.max_queries})"] if together < 64 else []
             ) + ([f"{at_once} one-query requests at once, not 64 (at most "
                   f"half of --max_connections={FLAGS.max_connections})"]
                  if at_once < 64 else [])
      if cut:
        print(f"measuring {'; '.join(cut)}", flush=True)
      print(format_rows(measure(server.url, measure_queries,
                                FLAGS.measure_repeats)), flush=True)
    else:
      _wait_for_signal(server.stopped)
  finally:
    server.close()
  if server.failure is not None:
    raise server.failure


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "checkpoint", "corpus", "store", "task_queries", "top_k",
        "sum_steps", "check_chunks", "tokenizer", "opt_state")


if __name__ == "__main__":
  config.run(main, uses=USES)
