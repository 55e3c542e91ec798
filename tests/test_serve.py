"""``tracer serve`` (issue 15): the store's rows held on the mesh, HTTP
requests answered with the records ``tracer trace`` writes.

The fixture builds a small corpus, checkpoints of two steps (tests/test_multihost's
model) and, with ``launch.trace`` itself, the store and the results of three
queries files. The server's answers are held to those files; the one-pass
search over many requests' metrics to ``scan.scan_store`` per request;
batching, bad requests, the CLI with ``tracer view --server``, and two
``jax.distributed`` processes are tried. Latency is measured and printed,
never asserted on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import http.server
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import sys
import time
import types
import urllib.parse
from pathlib import Path

from absl import flags
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracer.launch import common
from tracer.launch import scan as scan_script
from tracer.launch import serve
from tracer.launch import trace
from tracer import coordination
from tracer import corpus as corpus_lib
from tracer import hessian
from tracer import memory
from tracer import partitioning
from tracer import scan as scan_lib
from tracer import serving
from tracer import storage
from tracer import store as store_lib
from tracer.config import DataConfig
from tracer.errors import InputError

import multiprocess
# pytest puts tests/ on sys.path: the multi-host tests' tiny model.
from test_multihost import CONFIG, write_checkpoint

NUM_DOCS = 96
K = 4
BINDINGS = ("EncodeConfig.projection_dim=600", "EncodeConfig.model_axis=2",
            "EncodeConfig.microbatch_size=2", "EncodeConfig.batch_size=11",
            "EncodeConfig.chunk_rows=16",
            "PreconditionerConfig.train_examples=64", "PreconditionerConfig.rank=3")
TRACER = Path(sys.executable).parent / "tracer"  # the console script pip made
TIMEOUT_S = 300


def _write_jsonl(path, records) -> str:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  """The store, and ``tracer trace``'s results for three queries files:
  ``all`` (10 queries), ``three`` (top_k=2) and ``one``."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  gin.clear_config()
  gin.parse_config("\n".join(BINDINGS))
  root = tmp_path_factory.mktemp("serve")
  rng = np.random.default_rng(7)
  letters = list("abcdefghij")
  word = lambda lo, hi: "".join(rng.choice(letters, rng.integers(lo, hi)))
  source = _write_jsonl(root / "corpus.jsonl", [
      {"id": f"d{i}", "text": word(3, 8)} for i in range(NUM_DOCS)])
  corpus = str(root / "corpus")
  write_checkpoint(str(root / "checkpoints"),
                   corpus_lib.tokenize(source, corpus, DataConfig(), CONFIG.max_len),
                   steps=2)
  queries = [{"id": f"q{i}", "prompt": word(2, 5), "target": word(1, 3),
              "bucket": "x"} for i in range(10)]
  sets = {"all": (queries, K), "three": (queries[2:5], 2), "one": (queries[7:8], K)}
  results = {}
  for name, (qs, k) in sets.items():
    path = _write_jsonl(root / f"{name}.jsonl", qs)
    results[name] = trace.run(str(root), corpus, path, str(root / f"{name}.out"),
                              top_k=k, checkpoint=str(root / "checkpoints"), show=0)
  yield types.SimpleNamespace(root=root, corpus=corpus, sets=sets, results=results,
                              checkpoint=str(root / "checkpoints"))
  gin.clear_config()


@pytest.fixture(scope="module")
def tracer_(traced):
  """The loaded server side (in this process, 8 devices, a (4, 2) mesh)."""
  return serve.build(str(traced.root), corpus=traced.corpus,
                     checkpoint=traced.checkpoint)


def assert_same_records(got, want):
  """Equal records; scores and probabilities to float32 rounding (the
  server scores all of a batch's requests in one pass, in another order)."""
  assert [r["query_id"] for r in got] == [r["query_id"] for r in want]
  for a, b in zip(got, want):
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
      if key.endswith(("_scores", "probability", "confidence")):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{a['query_id']} {key}")
      else:
        assert a[key] == b[key], (a["query_id"], key)


# --- the one-pass search ----------------------------------------------------------

def _metric(rng, segments, widths) -> hessian.QueryMetric:
  """A random R^(-1) = diag(a) - sum_b C_b C_b^T, positive definite."""
  dim = segments[-1][1]
  lowrank = [0.3 * rng.standard_normal((hi - lo, w)) / np.sqrt(hi - lo)
             for (lo, hi), w in zip(segments, widths)]
  return hessian.QueryMetric(segments, rng.uniform(1, 2, dim), lowrank, 0.5,
                             0.1, 1, 1)


def _store(path, x, quarantined, dtype="bfloat16", column_scales=None):
  manifest = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=x.shape[1],
      basis_fingerprint=None, dtype=dtype, num_rows=len(x), chunk_rows=16)
  store = store_lib.create_or_open(path, manifest, column_scales=column_scales)
  for c in store.pending_chunks():
    lo, hi = store.chunk_bounds(c)
    store.write_chunk(c, x[lo:hi], {r: w for r, w in quarantined.items()
                                    if lo <= r < hi})
  return store


def test_a_query_alone_and_batched_scores_alike(tmp_path):
  """Row pairs with equal true scores (one row's columns permuted) under a
  constant query: before 2026-12-05 XLA:CPU summed one query's products in
  another order than two's: 156 of the 400 scores differed in their last
  bits between the request alone and batched with another, and the tie at
  the top went to the higher row alone. Query and metric counts are now
  padded to at least 2."""
  rng = np.random.default_rng(0)
  pairs, dim = 200, 32
  a = rng.standard_normal((pairs, dim)).astype(np.float32)
  x = np.empty((2 * pairs, dim), np.float32)
  x[0::2], x[1::2] = a, a[:, rng.permutation(dim)]
  index = serving.open_index([_store(tmp_path / "s", x, {}, "float32")],
                             partitioning.make_mesh(), 1 << 30)
  segments = ((0, dim),)
  flat = hessian.QueryMetric(segments, np.ones(dim), [np.zeros((dim, 0))], 0.5,
                             0.1, 1, 1)
  query = np.full((1, dim), 0.3, np.float32)
  other = rng.standard_normal((1, dim)).astype(np.float32)
  k = 2 * pairs
  alone = index.search([[query]], [[flat]], [k])[0]
  batched = index.search([[query], [other]], [[flat], [_metric(rng, segments, (2,))]],
                         [k, k])[0]
  for got, want in zip(alone, batched):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mesh,dtype", [("8x1", "bfloat16"), ("4x2", "bfloat16"),
                                        ("8x1", "int8")])
def test_one_pass_equals_a_scan_per_request(tmp_path, mesh, dtype):
  """Three requests (1, 3 and 2 queries, k 5, 2 and 7, each its own metric,
  low-rank widths 0..3 per segment) in one pass over resident rows = one
  ``scan_store`` each; quarantined rows and padding never come back. The
  same over two stores (a sum over checkpoints) = ``scan_stores``. int8
  stores (each with its own column scales) too."""
  rng = np.random.default_rng(0)
  num, dim = 203, 40
  bad = {3: "non-finite loss", 100: "non-finite gradient"}
  columns = lambda: (rng.uniform(0.5, 2, dim).astype(np.float32)
                     if dtype == "int8" else None)
  store = _store(tmp_path / "s", rng.standard_normal((num, dim)).astype(np.float32),
                 bad, dtype, columns())
  other = _store(tmp_path / "t", rng.standard_normal((num, dim)).astype(np.float32),
                 {150: "non-finite loss"}, dtype, columns())
  segments = ((0, 10), (10, 25), (25, 40))
  widths = ((1, 0, 1), (3, 2, 0), (0, 0, 0))
  metrics = [[_metric(rng, segments, w)] for w in widths]
  vectors = [[rng.standard_normal((n, dim)).astype(np.float32)] for n in (1, 3, 2)]
  ks = (5, 2, 7)
  the_mesh = (partitioning.make_mesh() if mesh == "8x1"
              else partitioning.make_mesh(4, 2))
  # A small block: several blocks per device, so the running top-k is merged.
  layout = serving.plan_layout(num, dim, 2, the_mesh.size, 16, block_bytes=16 * dim * 2)
  assert layout.block == 16 and layout.rows_per_device % 16 == 0
  assert layout.rows_per_device * the_mesh.size >= num

  def check(got, want):
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g.proponent_rows, w.proponent_rows)
      np.testing.assert_array_equal(g.opponent_rows, w.opponent_rows)
      np.testing.assert_allclose(g.proponent_scores, w.proponent_scores, rtol=1e-5)
      np.testing.assert_allclose(g.opponent_scores, w.opponent_scores, rtol=1e-5)

  spans = []  # the load reads a block at a time, not a device's rows at once
  read_into = store.read_into
  store.read_into = lambda lo, hi, out: spans.append(hi - lo) or read_into(lo, hi, out)
  index = serving.ResidentIndex([store], the_mesh, layout)
  del store.read_into
  assert max(spans) == layout.block and sum(spans) == num
  rows = np.asarray(index.xs[0]).view(store.dtype)  # held as bits
  np.testing.assert_array_equal(rows[:num], store.array.read().result())
  assert not rows[num:].any()
  got = index.search(vectors, metrics, ks)
  check(got, [scan_lib.scan_store(store, v[0], k, mesh=the_mesh,
                                  metric=m[0].row_metric())
              for v, m, k in zip(vectors, metrics, ks)])
  assert not np.isin(np.concatenate([g.proponent_rows.ravel() for g in got]),
                     list(bad)).any()
  # The fallback gives the same; a budget of 0 bytes chooses it.
  streamed = serving.open_index([store], the_mesh, budget_bytes=0)
  assert not streamed.resident
  check(got, streamed.search(vectors, metrics, ks))

  for j, w in enumerate(widths):  # a second part: its own vectors and metric
    metrics[j].append(_metric(rng, segments, w[::-1]))
    vectors[j].append(rng.standard_normal(vectors[j][0].shape).astype(np.float32))
  summed = serving.ResidentIndex([store, other], the_mesh, layout)
  got = summed.search(vectors, metrics, ks)
  want = [scan_lib.scan_stores([store, other], v, k, mesh=the_mesh,
                               metrics=[m.row_metric() for m in ms])
          for v, ms, k in zip(vectors, metrics, ks)]
  check(got, want)
  assert not np.isin(np.concatenate([g.proponent_rows.ravel() for g in got]),
                     [*bad, 150]).any()
  check(got, serving.open_index([store, other], the_mesh, 0).search(
      vectors, metrics, ks))
  # Not the first part's answer alone.
  assert any((g.proponent_rows != o.proponent_rows).any()
             for g, o in zip(got, serving.ResidentIndex(
                 [store], the_mesh, layout).search(
                     [v[:1] for v in vectors], [m[:1] for m in metrics], ks)))


def test_a_batch_holds_no_more_slots_than_rows(tmp_path, monkeypatch):
  """Requests for all 5 rows and for 3, batched: the pass's top-k has 5 slots
  (before 2026-12-07, 8: k's power of two, uncapped by the rows; a single
  request's was capped), resident and streamed, and each answer is its
  request's."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 8)).astype(np.float32)
  store = _store(tmp_path / "s", x, {}, "float32")
  slots = []
  init_topk = serving.topk_lib.init_topk
  monkeypatch.setattr(serving.topk_lib, "init_topk", lambda n, k, mesh: (
      slots.append(k) or init_topk(n, k, mesh)))
  metric = hessian.QueryMetric(((0, 8),), np.ones(8), [np.zeros((8, 0))], 0.5,
                               0.1, 1, 1)
  queries = rng.standard_normal((2, 8)).astype(np.float32)
  for budget in (1 << 30, 0):
    index = serving.open_index([store], partitioning.make_mesh(), budget)
    got = index.search([[queries[:1]], [queries[1:]]], [[metric], [metric]], [5, 3])
    for g, q, k in zip(got, queries, (5, 3)):
      cosines = x @ q / np.linalg.norm(x, axis=1)  # the rows' norms under R
      np.testing.assert_array_equal(g.proponent_rows[0], np.argsort(-cosines)[:k])
  assert slots == [5, 5]


@pytest.mark.parametrize("parts", [1, 2])
def test_a_streamed_batch_reads_the_stores_once(tmp_path, monkeypatch, parts):
  """The streamed fallback answers a batch of several requests with ONE read
  of its stores, window by window (one block of 16 rows per device: four
  windows of 128 rows, the last of 19), the running top-k carried from
  window to window: each answer equals its own ``scan_stores``; so does a
  batch of one request (one ``scan_stores``)."""
  monkeypatch.setattr(serving.scan_lib, "device_chunk_bytes", lambda _: 16 * 40 * 2)
  rng = np.random.default_rng(3)
  num, dim = 403, 40
  stores = [_store(tmp_path / str(p), rng.standard_normal((num, dim)).astype(
      np.float32), {7: "non-finite loss", 390 - p: "non-finite gradient"})
            for p in range(parts)]
  segments = ((0, 10), (10, 40))
  metrics = [[_metric(rng, segments, w) for _ in stores] for w in ((1, 2), (0, 3), (2, 0))]
  vectors = [[rng.standard_normal((n, dim)).astype(np.float32) for _ in stores]
             for n in (2, 1, 3)]
  ks = (4, 9, 2)
  mesh = partitioning.make_mesh()
  index = serving.open_index(stores, mesh, budget_bytes=0)
  assert not index.resident and index.layout == serving.Layout(16, 16)
  assert "(4 windows)" in index.describe()
  spans = []
  for st in stores:
    st.read_into = lambda lo, hi, out, f=st.read_into: spans.append(hi - lo) or f(lo, hi, out)
  got = index.search(vectors, metrics, ks)
  assert sorted(spans) == sorted([16] * 25 * parts + [3] * parts)  # every row once
  want = [scan_lib.scan_stores(stores, v, k, mesh=mesh,
                               metrics=[m.row_metric() for m in ms])
          for v, ms, k in zip(vectors, metrics, ks)]
  shapes = []
  scan_stores = scan_lib.scan_stores
  monkeypatch.setattr(serving.scan_lib, "scan_stores", lambda st, v, k, **kw: (
      shapes.append((len(v[0]), k)) or scan_stores(st, v, k, **kw)))
  alone = [index.search([v], [m], [k]) for v, m, k in zip(vectors, metrics, ks)]
  assert shapes == [(2, 4), (2, 16), (4, 2)]  # padded to powers of two, at least 2
  for g, w in zip(got + [a[0] for a in alone], want + want):
    np.testing.assert_array_equal(g.proponent_rows, w.proponent_rows)
    np.testing.assert_array_equal(g.opponent_rows, w.opponent_rows)
    np.testing.assert_allclose(g.proponent_scores, w.proponent_scores, rtol=1e-5)
    np.testing.assert_allclose(g.opponent_scores, w.opponent_scores, rtol=1e-5)
  assert {7, 389, 390}.isdisjoint(np.concatenate([g.proponent_rows.ravel()
                                                  for g in got]))


@pytest.mark.parametrize("tile_rows", [None, 5])
def test_bf16_rows_are_scored_widened_on_the_cpu(tmp_path, monkeypatch, request,
                                                 tile_rows):
  """A pass over bf16 rows on the CPU is bit for bit the pass over an f32
  store of the same values: rows widened to f32 (tile by tile; tiles of 5
  rows in blocks of 16: a partial last tile), not three bf16 products,
  which round otherwise."""
  if tile_rows:
    monkeypatch.setattr(serving.topk_lib, "score_tile_rows", lambda dim: tile_rows)
  # Passes are cached with their tile size.
  serving._search_fn.cache_clear()  # pylint: disable=protected-access
  request.addfinalizer(serving._search_fn.cache_clear)  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  num, dim = 203, 40
  x = rng.standard_normal((num, dim)).astype(jnp.bfloat16).astype(np.float32)
  segments = ((0, 10), (10, 40))
  metrics = [[_metric(rng, segments, w)] for w in ((2, 1), (0, 3))]
  vectors = [[rng.standard_normal((n, dim)).astype(np.float32)] for n in (3, 2)]
  mesh = partitioning.make_mesh()
  layout = serving.plan_layout(num, dim, 2, mesh.size, 16, block_bytes=16 * dim * 2)
  got, want = (serving.ResidentIndex([_store(tmp_path / dtype, x, {}, dtype)],
                                     mesh, layout).search(vectors, metrics, (7, 4))
               for dtype in ("bfloat16", "float32"))
  for g, w in zip(got, want):
    for a, b in zip(g, w):
      np.testing.assert_array_equal(a, b)


def test_the_default_resident_budget_is_a_share_of_a_device_of_the_mesh(
    monkeypatch):
  """-1: 40% of the host over the mesh's devices on this process (was over
  all of its devices, and process 0's figure on every process: more than
  another host's share where its devices in the mesh were fewer)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 << 30)
  half = partitioning.make_mesh(devices=jax.devices()[:4])
  assert serve.budget_bytes(-1, half) == int(0.4 * (2 << 30)) >> 20 << 20
  assert serve.budget_bytes(-1, partitioning.make_mesh()) == (
      int(0.4 * (1 << 30)) >> 20 << 20)
  assert serve.budget_bytes(0, half) == 0
  assert serve.budget_bytes(5, half) == 5 << 20


def test_resident_load_refuses_a_corrupt_chunk(tmp_path):
  x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
  manifest = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=8,
      basis_fingerprint=None, dtype="float32", num_rows=40, chunk_rows=16)
  store = store_lib.create_or_open(tmp_path / "s", manifest)
  for c in store.pending_chunks():
    lo, hi = store.chunk_bounds(c)
    store.write_chunk(c, x[lo:hi])
  store.array[20:21].write(np.full((1, 8), 7, np.float32)).result()
  with pytest.raises(InputError, match=r"chunk 1 \(rows 16..32\).*checksum"):
    serving.open_index([store], partitioning.make_mesh(), budget_bytes=1 << 30)


def test_resident_load_from_object_storage(object_store):
  """A store on an S3 server and on a GCS emulator: read block by block,
  several reads in flight, the rows held bit for bit and a quarantined row
  invalid."""
  rng = np.random.default_rng(2)
  num, dim = 150, 24
  x = rng.standard_normal((num, dim)).astype(np.float32)
  store = _store(f"{object_store('resident')}/s", x, {70: "non-finite loss"})
  assert not store.local
  mesh = partitioning.make_mesh(4, 2)
  layout = serving.plan_layout(num, dim, 2, mesh.size, 16, block_bytes=16 * dim * 2)
  assert layout.rows_per_device // layout.block > 1  # several blocks per device
  index = serving.ResidentIndex([store], mesh, layout)
  rows = np.asarray(index.xs[0]).view(store.dtype)
  np.testing.assert_array_equal(rows[:num], store.array.read().result())
  assert not rows[num:].any()
  valid = np.asarray(index.valid)
  assert not valid[70] and valid[:num].sum() == num - 1 and not valid[num:].any()


# --- batching -------------------------------------------------------------------

def test_batcher_gathers_requests_and_splits_at_the_limit():
  calls = []

  def answer(requests):
    calls.append([len(r.queries) for r in requests])
    if any(r.top_k == 0 for r in requests):
      raise RuntimeError("boom")
    return [serving.Answer([r.top_k], None) for r in requests], {}

  batcher = serving.Batcher(answer, window_s=0.5, max_queries=5)
  request = lambda n, k=1: serving.Request([{"id": str(i)} for i in range(n)], k)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(batcher.submit, request(2, k)) for k in (1, 2, 3)]
    out = [f.result() for f in futures]
  # The three arrive within the window; the third no longer fits the limit.
  assert sorted(calls) == [[2], [2, 2]]
  assert [a.records for a, _ in out] == [[1], [2], [3]]
  assert sorted(info["requests"] for _, info in out) == [1, 2, 2]
  with pytest.raises(RuntimeError, match="boom"):
    batcher.submit(request(1, 0))
  assert batcher.submit(request(1, 9))[0].records == [9]  # still serving
  batcher.close()
  # A request arriving after the worker ended (closed, or an error in
  # on_idle: a multi-host server's idle message) is refused with a 503; it
  # waited forever before 2026-12-04.
  with pytest.raises(serving.RequestError, match="the server is stopping") as e:
    batcher.submit(request(1, 9))
  assert e.value.status == 503

  def idle():
    raise RuntimeError("a follower is gone")

  broken = serving.Batcher(answer, idle_s=0.01, on_idle=idle)
  broken._thread.join(timeout=30)
  with pytest.raises(serving.RequestError, match="the server is stopping"):
    broken.submit(request(1, 9))


def test_the_channel_sends_what_followers_compute_from(monkeypatch):
  """Process 0's batch as the followers get it: each query's id, prompt and
  target (the records, with every other field, are process 0's to make:
  before 2026-12-04 every field went, and a batch past 2 GiB of them failed
  every request in it on its int32 length); lengths past 2^31 - 1 too."""
  wire = []

  def broadcast(x):  # process 0 sends what it has; a follower gets it back
    if x.any() or not wire:
      wire.append(x.copy())
      return x
    return wire.pop(0)

  monkeypatch.setattr(serving.Channel, "_broadcast", staticmethod(broadcast))
  channel = serving.Channel()
  query = {"id": "q", "prompt": "p", "target": "t", "extra": "x" * 1000,
           "fact_doc_ids": ["d"]}
  channel.send([serving.Request([query], 3, True)])
  assert sum(w.nbytes for w in wire) < 200
  assert channel.receive() == [serving.Request(
      [{"id": "q", "prompt": "p", "target": "t"}], 3, True)]
  channel.send(None)  # stop: -1 in two words
  assert channel.receive() is None and not wire


# --- the server, in this process ------------------------------------------------

def test_the_store_reopens_its_tokenized_corpus(traced, tmp_path, capsys):
  """A store encoded from a tokenized corpus records it: serve reopens that
  (read row by row, as a pod host must), not the source read whole."""
  location = str(traced.root / "store")
  m = store_lib.open_store(location).manifest
  assert m.corpus == str(traced.root / "corpus.jsonl")
  assert m.corpus_rows == storage.normalize(traced.corpus)
  assert common.corpus_source(location, None) == m.corpus_rows
  assert common.corpus_source(location, "other.jsonl") == "other.jsonl"
  # Gone, or written before the field existed: the source, said so if gone.
  copy = tmp_path / "store"
  shutil.copytree(location, copy)
  for rows, said in ((str(tmp_path / "gone"), "is gone; reading its source"),
                     (None, None)):
    d = json.loads((copy / store_lib.MANIFEST).read_text())
    if rows is None:
      del d["corpus_rows"]
    else:
      d["corpus_rows"] = rows
    (copy / store_lib.MANIFEST).write_text(json.dumps(d))
    capsys.readouterr()
    assert common.corpus_source(str(copy), None) == m.corpus
    out = capsys.readouterr().out
    assert (said in out) if said else not out


def test_answers_equal_trace_while_batched(traced, tracer_):
  """Three concurrent requests land in one batch (a long window), and each
  answer equals ``tracer trace``'s for the same queries file: each request's
  R comes from its own queries."""
  server = serve.Server(tracer_, window_s=1.0)
  try:
    health = serving.health(server.url)
    assert health["rows"] == NUM_DOCS and health["resident"] is True
    assert health["devices"] == 8 and health["processes"] == 1
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = {name: pool.submit(serving.trace, server.url, qs, k)
                 for name, (qs, k) in traced.sets.items()}
      responses = {name: f.result() for name, f in futures.items()}
    assert max(r["batch"]["requests"] for r in responses.values()) > 1, responses
    for name, response in responses.items():
      assert_same_records(response["results"], traced.results[name])
  finally:
    server.close()


def test_a_failed_broadcast_stops_a_multi_host_server(traced, tracer_, monkeypatch):
  """Multi-host (the process count patched to 2), process 0's send of a
  batch to the other processes fails: the batch's request fails and the
  server stops, as after a batch that failed to answer. Before 2026-12-07
  the send was outside that catch: the server went on answering, its next
  batch's collectives out of step with processes that missed this one."""
  sent = []

  class Channel:
    def send(self, requests):
      sent.append(requests)
      if requests:  # (not the idle ticks, [], nor the stop, None)
        raise RuntimeError("a follower is gone")

  monkeypatch.setattr(serving, "Channel", Channel)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  server = serve.Server(tracer_, window_s=0.01)
  try:
    qs, k = traced.sets["one"]
    with pytest.raises(InputError, match="HTTP 500: internal error: the batch "
                       "this request was in failed"):
      serving.trace(server.url, qs, k)
    assert server.stopped.is_set(), sent
    assert "a follower is gone" in str(server.failure)
    # (main ends the job on ``stopped``; until then no batch is sent on)
    with pytest.raises(InputError, match="HTTP 500"):
      serving.trace(server.url, qs, k)
    assert len([r for r in sent if r]) == 1, sent
  finally:
    server.close()


def test_a_server_past_half_its_map_limit_drops_its_programs_and_answers_alike(
    traced, tracer_, monkeypatch):
  """A server lives long, and jit keeps a program for every shape it meets,
  each in memory maps of its own (Linux allows 65,530): past half the limit
  a batch first drops every compiled program, then answers as before."""
  cleared = []
  clear = jax.clear_caches
  monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1) or clear())
  monkeypatch.setattr(memory, "map_limit", lambda: 2, raising=False)
  for name in ("one", "three"):
    qs, k = traced.sets[name]
    (answer,), _ = tracer_.answer([serving.Request(qs, k)])
    assert_same_records(answer.records, traced.results[name])
  assert len(cleared) == 2


def test_streamed_index_answers_the_same(traced, tracer_):
  streamed = serving.Tracer(tracer_.ckpt, tracer_.encoder, tracer_.basis,
                            tracer_.corpus,
                            serving.StreamedIndex(tracer_.index.stores,
                                                  tracer_.encoder.mesh),
                            tracer_.cfg)
  requests = [serving.Request(qs, k) for qs, k in traced.sets.values()]
  answers, timing = streamed.answer(requests)
  assert set(timing) == {"encode", "fit_r", "scan", "decode", "records"}
  for answer, name in zip(answers, traced.sets):
    assert_same_records(answer.records, traced.results[name])


def test_a_damaged_store_fails_each_request_of_its_batch_with_a_500(traced,
                                                                    tmp_path):
  """Streamed, one process: a chunk goes bad while the server runs. The
  requests batched together are well formed: each gets a 500 that names no
  server path (a CorruptStoreError is an InputError, which was a 400 before
  2026-12-04), and the server goes on answering /health."""
  store = tmp_path / "store"
  shutil.copytree(traced.root / "store", store)
  built = serve.build(str(traced.root), store_path=str(store), corpus=traced.corpus,
                      checkpoint=traced.checkpoint, budget_mb=0)
  server = serve.Server(built, window_s=0.5)
  try:
    queries = traced.sets["all"][0]
    assert serving.trace(server.url, queries[:1], K)["results"]
    written = store_lib.open_store(str(store))
    written.array[written.num_rows - 1:written.num_rows].write(
        np.full((1, written.dim), 7, written.array.dtype.numpy_dtype)).result()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      futures = [pool.submit(serving.trace, server.url, queries[i:i + 1], K)
                 for i in (1, 2)]
      for future in futures:
        with pytest.raises(InputError) as e:
          future.result()
        assert str(e.value) == (
            f"{server.url}/trace: HTTP 500: internal error: the batch this request "
            "was in failed (CorruptStoreError); the server's log says why")
    assert _raw(server.url, "GET", "/health")[0] == 200
  finally:
    server.close()


@pytest.fixture(scope="module")
def summed_want(traced, tmp_path_factory):
  """``tracer trace --sum_steps=1``'s results for the three queries files (it
  also writes step 1's store, ``<store>-step1``)."""
  out = tmp_path_factory.mktemp("summed")
  return {name: trace.run(str(traced.root), traced.corpus,
                          str(traced.root / f"{name}.jsonl"),
                          str(out / f"{name}.out"), top_k=k,
                          checkpoint=traced.checkpoint, show=0, sum_steps=["1"])
          for name, (_, k) in traced.sets.items()}


def test_summed_over_checkpoints_answers_equal_trace(traced, summed_want):
  """``--sum_steps=1``: step 1's params and store held beside step 2's; the
  answers (resident and streamed) equal ``tracer trace --sum_steps=1``'s."""
  want = summed_want
  assert any([r["proponent_ids"] for r in want[name]]
             != [r["proponent_ids"] for r in traced.results[name]] for name in want)
  summed = serve.build(str(traced.root), corpus=traced.corpus,
                       checkpoint=traced.checkpoint, sum_steps=["1"])
  assert [st.manifest.step for st in summed.index.stores] == [2, 1]
  server = serve.Server(summed, window_s=1.0)
  try:
    health = serving.health(server.url)
    assert (health["step"], health["sum_steps"], health["resident"]) == (2, [1], True)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = {name: pool.submit(serving.trace, server.url, qs, k)
                 for name, (qs, k) in traced.sets.items()}
      responses = {name: f.result() for name, f in futures.items()}
    for name, response in responses.items():
      assert_same_records(response["results"], want[name])
  finally:
    server.close()
  streamed = serving.Tracer(
      summed.ckpt, summed.encoder, summed.basis, summed.corpus,
      serving.StreamedIndex(summed.index.stores, summed.encoder.mesh), summed.cfg,
      summed.parts[1:])
  answers, _ = streamed.answer([serving.Request(qs, k)
                                for qs, k in traced.sets.values()])
  for answer, name in zip(answers, traced.sets):
    assert_same_records(answer.records, want[name])
  with pytest.raises(InputError, match="--sum_steps"):
    serve.build(str(traced.root), corpus=traced.corpus,
                checkpoint=traced.checkpoint, sum_steps=["2"])


def test_task_queries_give_each_request_the_task_r(traced, tmp_path):
  """``--task_queries=all.jsonl``: each query of ``all`` sent alone (in
  concurrent requests, batched, sharing the task R's row norms) is answered
  exactly as ``tracer trace --queries=all.jsonl`` answers it, and a query
  outside the task as ``tracer trace --task_queries`` answers it (and
  ``tracer scan --task_queries``); without the task, one query alone gets
  another R."""
  task_path = str(traced.root / "all.jsonl")
  queries = traced.sets["all"][0]
  new = [{"id": "new", "prompt": "bad", "target": "je"}]
  new_path = _write_jsonl(tmp_path / "new.jsonl", new)
  want_new = trace.run(str(traced.root), traced.corpus, new_path,
                       str(tmp_path / "new.out"), top_k=K,
                       checkpoint=traced.checkpoint, show=0,
                       task_queries=task_path)
  alone = trace.run(str(traced.root), traced.corpus, new_path,
                    str(tmp_path / "alone.out"), top_k=K,
                    checkpoint=traced.checkpoint, show=0)
  assert want_new[0]["proponent_scores"] != alone[0]["proponent_scores"]
  # A query of the task traced with it: its record in the task's own trace.
  one = trace.run(str(traced.root), traced.corpus, str(traced.root / "one.jsonl"),
                  str(tmp_path / "one.out"), top_k=K, checkpoint=traced.checkpoint,
                  show=0, task_queries=task_path)
  assert_same_records(one, traced.results["all"][7:8])
  assert one != traced.results["one"]
  # tracer scan, from the store trace left, gives the same record.
  scanned = scan_script.run(str(traced.root), traced.corpus,
                            str(traced.root / "one.jsonl"), str(tmp_path / "scan.out"),
                            top_k=K, checkpoint=traced.checkpoint,
                            task_queries=task_path)
  assert_same_records(scanned, one)
  tasked = serve.build(str(traced.root), corpus=traced.corpus,
                       checkpoint=traced.checkpoint, task_queries=task_path)
  assert tasked.index.held_metrics == tuple(tasked.tasks)

  def computed(*args):
    raise AssertionError("a batch computed the task R's row norms, not read them")
  tasked.index._metric_arrays = computed  # every batch below reads the held norms
  server = serve.Server(tasked, window_s=0.5)
  try:
    assert serving.health(server.url)["task_queries"] == len(queries)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futures = [pool.submit(serving.trace, server.url, [q], K)
                 for q in queries + new]
      responses = [f.result() for f in futures]
    assert max(r["batch"]["requests"] for r in responses) > 1
    got = [r["results"][0] for r in responses]
    assert_same_records(got, traced.results["all"] + want_new)
    # "task_r": false: an R fitted from the request's own queries, as with no
    # task (the batch then computes the norms).
    del tasked.index._metric_arrays
    own = serving.trace(server.url, new, K, task_r=False)["results"]
    assert_same_records(own, alone)
    assert_same_records(serving.trace(server.url, new, K, task_r=True)["results"],
                        want_new)
  finally:
    server.close()
  # Both kinds in one batch: each request keeps its own R.
  answers, _ = tasked.answer([serving.Request(new, K, False), serving.Request(new, K),
                              serving.Request(queries[2:5], 2, False)])
  assert_same_records(answers[0].records, alone)
  assert_same_records(answers[1].records, want_new)
  assert_same_records(answers[2].records, traced.results["three"])
  with pytest.raises(InputError, match=r"--task_queries=.*would change nothing"):
    common.task_metric(None, None, task_path, tasked.cfg)
  # Summed over checkpoints: each step's task R, in its own basis.
  want_summed = trace.run(str(traced.root), traced.corpus, new_path,
                          str(tmp_path / "summed.out"), top_k=K,
                          checkpoint=traced.checkpoint, show=0, sum_steps=["1"],
                          task_queries=task_path)
  summed = serve.build(str(traced.root), corpus=traced.corpus,
                       checkpoint=traced.checkpoint, sum_steps=["1"],
                       task_queries=task_path)
  answers, _ = summed.answer([serving.Request(new, K), serving.Request(queries, K)])
  assert_same_records(answers[0].records, want_summed)
  assert answers[0].records != want_new


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
  parts = urllib.parse.urlsplit(url)
  conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
  try:
    conn.putrequest(method, path)
    for name, value in (headers or {}).items():
      conn.putheader(name, value)
    if body is not None and "Content-Length" not in (headers or {}):
      conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    if body is not None:
      conn.send(body)
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    conn.close()


def _post(url, obj) -> tuple[int, dict]:
  body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
  return _raw(url, "POST", "/trace", body)


GOOD = {"id": "g", "prompt": "abc", "target": "de"}
BAD_REQUESTS = [
    (b"{not json", 400, r"^body: not valid JSON \(Expecting property name"),
    (b"\xff\xfe", 400, r"^body: not valid UTF-8"),
    ([GOOD], 400, r"^body: expected a JSON object, got array"),
    ({"query": [GOOD]}, 400, r"^body: unknown field 'query'"),
    ({"top_k": 2}, 400, r"^body: missing field 'queries'"),
    ({"queries": GOOD}, 400, r"^field 'queries' must be an array, got object"),
    ({"queries": []}, 400, r"^field 'queries' is empty"),
    ({"queries": [dict(GOOD, id=str(i)) for i in range(9)]}, 413,
     r"^field 'queries': 9 queries, more than the 8 this server takes"),
    ({"queries": ["abc"]}, 400, r"^queries\[0\]: expected an object .* got string"),
    ({"queries": [GOOD, {"id": "x", "prompt": "a"}]}, 400,
     r"^queries\[1\]: missing field 'target'"),
    ({"queries": [dict(GOOD, prompt=["a"])]}, 400,
     r"^queries\[0\]: field 'prompt' must be a string, got array"),
    ({"queries": [dict(GOOD, target="  ")]}, 400,
     r"^queries\[0\]: field 'target' is empty or only whitespace"),
    ({"queries": [dict(GOOD, prompt="\ud800")]}, 400,
     r"^queries\[0\]: field 'prompt' holds a lone surrogate"),
    ({"queries": [GOOD, GOOD]}, 400,
     r"^queries\[1\]: duplicate id 'g' \(first at queries\[0\]\)"),
    ({"queries": [dict(GOOD, fact_doc_ids="d1")]}, 400,
     r"^queries\[0\]: field 'fact_doc_ids' must be a list of strings"),
    ({"queries": [dict(GOOD, proponent_ids=[])]}, 400,
     r"^queries\[0\]: field 'proponent_ids' is a results field"),
    ({"queries": [dict(GOOD, target="abcdefghijk")]}, 400,
     r"^queries: query 'g': target of 11 tokens does not fit max_len 8"),
    ({"queries": [GOOD], "top_k": "3"}, 400,
     r"^field 'top_k' must be an integer, got string"),
    ({"queries": [GOOD], "top_k": True}, 400,
     r"^field 'top_k' must be an integer, got boolean"),
    ({"queries": [GOOD], "top_k": 0}, 400,
     r"^field 'top_k': 0 is out of range; expected 1\.\.50"),
    ({"queries": [GOOD], "task_r": "yes"}, 400,
     r"^field 'task_r' must be true or false, got string"),
    ({"queries": [GOOD], "task_r": True}, 400,
     r"^field 'task_r': true, but this server holds no task R \(start it with "
     r"--task_queries=T.jsonl\)"),
    ({"queries": [GOOD], "top_k": 51}, 400,
     r"^field 'top_k': 51 is out of range; expected 1\.\.50 \(the store has 96 "
     r"rows, this server answers at most 50\)"),
    (b"[" * 2000 + b"]" * 2000, 400,
     r"^body: not JSON this server reads \(RecursionError"),
    (b'{"queries": [{"id": "g", "prompt": "abc", "target": "de", "x": NaN}]}',
     400, r"^body: not JSON this server reads \(ValueError: NaN is not a JSON value"),
    # Refused as tracer trace's read_queries refuses them (before 2026-12-04:
    # a 200, whose answer held Infinity, which is not JSON).
    (b'{"queries": [{"id": "g", "prompt": "abc", "target": "de", "x": 1e400}]}',
     400, r"^queries\[0\]: field 'x' holds NaN or infinity; expected a JSON value"),
    ({"queries": [dict(GOOD, text=5)]}, 400,
     r"^queries\[0\]: field 'text' must be a string, got number"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(
    traced, tracer_):
  lim = serving.Limits(NUM_DOCS, max_top_k=50, max_queries=8, max_body_bytes=4096)
  server = serve.Server(tracer_, lim=lim)
  url = server.url
  try:
    for body, status, message in BAD_REQUESTS:
      got_status, got = _post(url, body)
      assert (got_status, bool(re.search(message, got["error"]))) == (status, True), (
          body, got_status, got)
    cases = [
        (("POST", "/trace", b"x" * 5000), 413, r"body of 5,000 bytes, more than the 4,096"),
        (("GET", "/nowhere"), 404, r"no such path '/nowhere'"),
        (("POST", "/nowhere", b"{}"), 404, r"expected POST /trace"),
        (("GET", "/trace"), 405, r"/trace takes POST"),
        (("POST", "/trace", b"{}", {"Content-Length": "x1"}), 400,
         r"Content-Length 'x1' is not a byte count"),
        (("POST", "/trace", b"{}", {"Content-Length": "\u00b2"}), 400,
         r"Content-Length '\u00b2' is not a byte count"),
        # (int() refuses 4,300 digits: no answer at all before 2026-12-04)
        (("POST", "/trace", b"{}", {"Content-Length": "9" * 5000}), 400,
         r"Content-Length '9{40}' is not a byte count"),
        (("PUT", "/trace", b"{}"), 405, r"PUT '/trace': expected GET /health or "
         r"POST /trace"),
    ]
    for args, status, message in cases:
      got_status, got = _raw(url, *args)
      assert got_status == status and re.search(message, got["error"]), (args, got)
    # A GET with a body closes the connection: the unread body was taken for
    # the next request before (a second answer, http.server's 501 page).
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/health", body=b"XYZ /x HTTP/1.1\r\n\r\n")
    response = conn.getresponse()
    assert (response.status, response.getheader("Connection")) == (200, "close")
    response.read()
    conn.close()
    # The default top_k within a store of fewer rows (refused before).
    assert serving.parse_request(json.dumps({"queries": [GOOD]}).encode(),
                                 serving.Limits(num_rows=3)).top_k == 3
    # No Content-Length: 411 (http.client adds none without a body).
    assert _raw(url, "POST", "/trace")[0] == 411
    # More queries than one request takes, and no task R: each part would get
    # its own R, so tracer view --server refuses before sending any.
    with pytest.raises(InputError, match=r"9 queries, more than the 8 it takes "
                       r"in one request, and it holds no task R"):
      serving.trace_all(url, [dict(GOOD, id=str(i)) for i in range(9)])
    # An integer Python will not read (past 4,300 digits; a body too large
    # for this server's 4,096 bytes, so asked of the parser).
    with pytest.raises(serving.RequestError, match=r"^body: not JSON this server "
                       r"reads \(ValueError: Exceeds the limit"):
      serving.parse_request(b'{"top_k": ' + b"1" * 4301 + b"}", lim)
    assert serve.limits(NUM_DOCS, top_k=10, max_top_k=5, max_queries=8,
                        max_body_mb=1).default_top_k == 5
    # Given on the command line, they are not cut silently (before
    # 2026-12-05 --top_k=500 served NUM_DOCS, and a request's 400 then
    # quoted the flags, not what it had asked).
    for given, kwargs, message in [
        (["top_k"], {"top_k": NUM_DOCS + 1, "max_top_k": 100},
         f"--top_k={NUM_DOCS + 1}: more than the corpus's {NUM_DOCS} rows; "
         f"expected 1..{NUM_DOCS}"),
        (["max_top_k"], {"top_k": 1, "max_top_k": NUM_DOCS + 1},
         f"--max_top_k={NUM_DOCS + 1}: more than"),
        (["top_k", "max_top_k"], {"top_k": 3, "max_top_k": 2},
         "--top_k=3: more than --max_top_k=2, the most a request may ask for")]:
      with pytest.raises(InputError, match=re.escape(message)):
        serve.limits(NUM_DOCS, max_queries=8, max_body_mb=1, given=given, **kwargs)
    assert serve.limits(NUM_DOCS, top_k=2, max_top_k=NUM_DOCS, max_queries=8,
                        max_body_mb=1, given=["top_k", "max_top_k"]).default_top_k == 2
    # A given --top_k past --max_top_k's default raises the cap (before
    # 2026-12-07 cut to it: requests without top_k got 5, not the 7 asked).
    raised = serve.limits(NUM_DOCS, top_k=7, max_top_k=5, max_queries=8,
                          max_body_mb=1, given=["top_k"])
    assert (raised.default_top_k, raised.max_top_k) == (7, 7)
    # Still serving, and answering right.
    status, got = _post(url, {"queries": traced.sets["one"][0], "top_k": K})
    assert status == 200
    assert_same_records(got["results"], traced.results["one"])
  finally:
    server.close()


def test_bodies_in_flight_are_bounded_together():
  """A stand-in batcher holds the first request's batch: a second body that
  would take the bodies held past ``max_bodies_bytes`` gets a 503 (16 MiB of
  tiny JSON values parsed took 444 MiB, and 256 connections could each hold
  one); once the first is answered, it is taken. A body sent with a
  Transfer-Encoding is refused, not read by its Content-Length."""
  import threading  # pylint: disable=g-import-not-at-top
  release = threading.Event()

  def answer(requests):
    release.wait(60)
    return [serving.Answer([{"query_id": q["id"]} for q in r.queries], None)
            for r in requests], {}

  query = lambda i: {"id": f"q{i}", "prompt": "p" * 200, "target": "t"}
  body = lambda i: json.dumps({"queries": [query(i)]}).encode()
  limits = serving.Limits(num_rows=10, max_bodies_bytes=len(body(0)) + 100)
  batcher = serving.Batcher(answer, window_s=0.0)
  service = serving.Service(limits, lambda r: None, batcher, {})
  # A slow give-back: a reply sent before it (before 2026-12-05) let the
  # client's next request find the bytes still held (a 503; CI hit it once).
  slow_give = lambda size: (time.sleep(0.3), serving.Service.give_body(service, size))
  service.give_body = slow_give
  http = serving.make_server(service)
  thread = threading.Thread(target=http.serve_forever, daemon=True)
  thread.start()
  url = "http://%s:%d" % http.server_address[:2]
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      first = pool.submit(_post, url, body(0))
      deadline = time.monotonic() + 30
      while not service.bodies_bytes and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first body is taken
      status, reply = _post(url, body(1))
      assert status == 503 and "bytes of requests at most" in reply["error"], reply
      release.set()
      assert first.result() == (200, {"results": [{"query_id": "q0"}],
                                      "batch": {"requests": 1, "queries": 1,
                                                "timing_s": {}}})
    assert _post(url, body(1))[0] == 200
    status, reply = _raw(url, "POST", "/trace", b"0\r\n\r\n",
                         {"Transfer-Encoding": "chunked", "Content-Length": "5"})
    assert status == 501 and "Transfer-Encoding" in reply["error"], reply
  finally:
    release.set()
    http.shutdown()
    batcher.close()


@contextlib.contextmanager
def _stand_in(max_connections: int = 256, host: str = "127.0.0.1", **limits):
  """``make_server``'s HTTP layer over a batcher whose answer echoes each
  query's id (no model): ``http``, ``service``, ``address``, ``url`` and
  ``answered`` (the ids)."""
  answered = []

  def answer(requests):
    answered.extend(q["id"] for r in requests for q in r.queries)
    return [serving.Answer([{"query_id": q["id"]} for q in r.queries], None)
            for r in requests], {}

  batcher = serving.Batcher(answer, window_s=0.0)
  lim = serving.Limits(num_rows=10, **limits)
  service = serving.Service(lim, lambda r: None, batcher,
                            {"max_queries": lim.max_queries,
                             "max_connections": max_connections})
  http_server = serving.make_server(service, host, max_connections=max_connections)
  threading.Thread(target=http_server.serve_forever, daemon=True).start()
  address = http_server.server_address[:2]
  try:
    yield types.SimpleNamespace(
        http=http_server, service=service, address=address, answered=answered,
        url=f"http://{serving.url_host(address[0])}:{address[1]}")
  finally:
    http_server.shutdown()
    http_server.server_close()
    batcher.close()


def _exchange(address, data: bytes) -> tuple[bytes, dict, bytes]:
  """Sends ``data`` on a new connection and reads until the server closes
  it: the status line, the first answer's headers (lower-case names) and
  all that follows them."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.create_connection(address, timeout=30) as sock:
    sock.sendall(data)
    reply = b""
    while chunk := sock.recv(1 << 16):
      reply += chunk
  head, _, rest = reply.partition(b"\r\n\r\n")
  status, *lines = head.split(b"\r\n")
  headers = {k.strip().lower().decode(): v.strip().decode()
             for k, _, v in (line.partition(b":") for line in lines)}
  return status, headers, rest


def test_content_length_frames_one_request_or_is_refused():
  """Two Content-Lengths that disagree are a 400 and the connection closes
  (RFC 9112 6.3; before 2026-12-07 the first was taken and the rest of the
  body answered as a second, smuggled, request); equal ones too (no client
  sends two). A length with whitespace around it is one (RFC 9110 5.5;
  a 400 before)."""
  body = json.dumps({"queries": [{"id": "seen", "prompt": "p",
                                  "target": "t"}]}).encode()
  inner = json.dumps({"queries": [{"id": "SMUGGLED", "prompt": "p",
                                   "target": "t"}]}).encode()
  smuggled = (b"POST /trace HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
              % len(inner)) + inner
  with _stand_in() as server:
    for second in (len(body) + len(smuggled), len(body)):
      status, headers, rest = _exchange(server.address, (
          b"POST /trace HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
          b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
          % (len(body), second)) + body + smuggled)
      assert (status, headers.get("connection")) == (
          b"HTTP/1.1 400 Bad Request", "close"), (status, headers, rest)
      assert json.loads(rest) == {"error": f"Content-Length given 2 times "
                                  f"('{len(body)}', '{second}'); expected one"}
    assert server.answered == []
    for length in (b"%d " % len(body), b"\t%d\t" % len(body)):
      status, _, rest = _exchange(server.address, (
          b"POST /trace HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
          b"Content-Length:" + length + b"\r\n\r\n" + body))
      assert status == b"HTTP/1.1 200 OK", (length, rest)
    assert server.answered == ["seen", "seen"]
    # Whatever the method (a 200 or 405 answered before 2026-12-07: the
    # framing is unknown, so the request is bad, not just its body).
    for request in (b"GET /health", b"HEAD /health", b"PUT /trace"):
      for lengths in (b"Content-Length: 3\r\nContent-Length: 3", b"Content-Length: x"):
        status, headers, rest = _exchange(server.address, (
            request + b" HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\n\r\nabc"))
        assert (status, headers.get("connection")) == (
            b"HTTP/1.1 400 Bad Request", "close"), (request, lengths, status)
        if request != b"HEAD /health":
          assert json.loads(rest)["error"].startswith("Content-Length "), rest


def test_a_refused_body_is_read_so_its_client_gets_the_answer():
  """A body refused before it is read (413 over --max_body_mb, 503 past
  --max_bodies_mb) is read and dropped after the answer: closed unread, the
  socket sent a reset, and a client that sends its whole body before it
  reads (this project's, urllib, curl) saw "Broken pipe" instead (5 of 5
  with a 20 MB body before 2026-12-07)."""
  import socket  # pylint: disable=g-import-not-at-top
  many = lambda n, size: [{"id": f"q{i}", "prompt": "p" * size, "target": "t"}
                          for i in range(n)]
  with _stand_in(max_body_bytes=16 << 20, max_bodies_bytes=16 << 20) as server:
    # (The bytes bound it here, not the time: a loaded machine reads slowly.)
    server.http.DRAIN_S = 120
    for _ in range(2):
      with pytest.raises(InputError, match=r"HTTP 413: body of 20,008,915 "
                         r"bytes, more than the 16,777,216 this server takes"):
        serving.trace(server.url, many(200, 100_000), 5, timeout=120)
    # A body in flight (sent in part) holds 8 MB of the 16 MiB.
    with socket.create_connection(server.address, timeout=30) as slow:
      slow.sendall(b"POST /trace HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   b"8000000\r\n\r\n{")
      deadline = time.monotonic() + 30
      while not server.service.bodies_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
      for _ in range(2):
        with pytest.raises(InputError, match=r"HTTP 503: the server holds "
                           r"16,777,216 bytes of requests at most"):
          serving.trace(server.url, many(200, 60_000), 5, timeout=120)
    assert serving.trace(server.url, many(2, 10), 5)["results"] == [
        {"query_id": "q0"}, {"query_id": "q1"}]


def test_an_ipv6_address_is_served():
  # Before, --host=::1 was refused ("Address family for hostname not
  # supported"): the server bound IPv4 sockets only.
  from tracer.launch import serve  # pylint: disable=g-import-not-at-top
  try:
    with socket.socket(socket.AF_INET6) as s:
      s.bind(("::1", 0))
  except OSError as e:
    pytest.skip(f"no IPv6 loopback here: {e}")
  serve.check_address("::1", 0)
  with _stand_in(host="::1") as server:
    assert server.url.startswith("http://[::1]:")
    assert serving.health(server.url)["status"] == "ok"
    got = serving.trace(server.url, [{"id": "a", "prompt": "p", "target": "t"}])
    assert [r["query_id"] for r in got["results"]] == ["a"]


def test_http_answers_are_json_with_status_lines_and_allow():
  """Every answer is JSON under an HTTP/1.1 status line: http.server's own
  refusals were HTML pages (a bad request line's, or HTTP/0.9's, with no
  status line at all); HEAD answers carry no body (before 2026-12-07 a 405
  with one, which a client read as the next answer); a 405 names what its
  path takes (POST /health had no Allow, PUT /trace said GET, POST)."""
  with _stand_in() as server:
    close = b"Host: x\r\nConnection: close\r\n"
    cases = [
        (b"HEAD /health HTTP/1.1\r\n" + close + b"\r\n", 200, None, None),
        (b"HEAD /trace HTTP/1.1\r\n" + close + b"\r\n", 405, "POST", None),
        (b"GET /trace HTTP/1.1\r\n" + close + b"\r\n", 405, "POST",
         r"/trace takes POST"),
        (b"POST /health HTTP/1.1\r\n" + close + b"Content-Length: 2\r\n\r\n{}",
         405, "GET, HEAD", r"expected POST /trace"),
        (b"PUT /trace HTTP/1.1\r\n" + close + b"Content-Length: 2\r\n\r\n{}",
         405, "POST", r"PUT '/trace': expected GET /health or POST /trace"),
        (b"DELETE /nowhere HTTP/1.1\r\n" + close + b"\r\n", 404, None,
         r"DELETE '/nowhere'"),
        # A target urlsplit refuses (before 2026-12-07: no answer, the
        # connection closed and a ValueError traceback on the server).
        (b"GET http://[ HTTP/1.1\r\n" + close + b"\r\n", 404, None,
         r"no such path 'http://\['"),
        (b"POST http://[abc]/trace HTTP/1.1\r\n" + close
         + b"Content-Length: 2\r\n\r\n{}", 404, None,
         r"POST 'http://\[abc\]/trace': expected POST /trace"),
        (b"BREW /trace HTTP/1.1\r\n" + close + b"\r\n", 501, None,
         r"Unsupported method \('BREW'\); expected GET /health or POST /trace"),
        (b"HELLO\r\n\r\n", 400, None,
         r"Bad request syntax \('HELLO'\); expected a request line "
         r"'METHOD /path HTTP/1.1'"),
        (b"GET /health\r\n\r\n", 400, None,
         r"request line 'GET /health' has no HTTP version"),
        (b"GET /health HTTP/2.0\r\n\r\n", 505, None,
         r"Invalid HTTP version \(2.0\); expected HTTP/1.1 or HTTP/1.0"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, None,
         r"expected a request line of at most 65,536 bytes"),
        (b"GET /health HTTP/1.1\r\n"
         + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431,
         None, r"Too many headers \(got more than 100 headers\); expected at "
         r"most 100"),
    ]
    for request, status, allow, message in cases:
      line, headers, rest = _exchange(server.address, request)
      what = (request[:40], line, headers, rest[:200])
      assert line.startswith(b"HTTP/1.1 %d " % status), what
      assert headers.get("content-type") == "application/json", what
      assert headers.get("allow") == allow, what
      if message is None:  # HEAD
        assert rest == b"" and int(headers["content-length"]) > 0, what
      else:
        assert re.search(message, json.loads(rest)["error"]), what


def test_measure_fits_the_servers_limits():
  """``--measure`` sized to the limits /health reports: with fewer than 64
  queries per request or connections it failed (a 413 or a 503, and no
  table, before 2026-12-07)."""
  queries = [{"id": f"q{i}", "prompt": "p", "target": "t"} for i in range(5)]
  with _stand_in(max_connections=8, max_queries=16) as server:
    rows = serve.measure(server.url, queries, repeats=1)
  assert [r["case"] for r in rows] == [
      "1 query", "16 queries, one request", "4 one-query requests at once"]
  assert len(server.answered) == 3 * (1 + 16 + 4)  # two warm-up runs and one


def test_a_stalled_connection_is_closed(traced, tracer_):
  """A client that stops sending mid-body, or sends a byte now and then,
  holds a thread only until the read timeout; past ``max_connections`` open
  at once a connection gets a 503; the server answers the next client."""
  import socket  # pylint: disable=g-import-not-at-top
  server = serve.Server(tracer_, max_connections=2)
  http_server = server.http
  http_server.RequestHandlerClass.timeout = 1.0
  head = b"POST /trace HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
  try:
    parts = urllib.parse.urlsplit(server.url)
    connect = lambda: socket.create_connection((parts.hostname, parts.port),
                                               timeout=30)

    def slots_free():
      """Waits for every connection above to end its thread (a slot is
      given back as its thread ends, after the client sees it close)."""
      deadline = time.monotonic() + 20
      while (http_server._slots._value < 2  # pylint: disable=protected-access
             and time.monotonic() < deadline):
        time.sleep(0.05)
    with connect() as sock:
      sock.sendall(head)
      start = time.monotonic()
      assert sock.recv(1024) == b""  # closed by the server
      assert time.monotonic() - start < 20
    # A byte every 0.3 s: each read within the timeout, the body not (before
    # 2026-12-04 it held its thread as long as it went on).
    with connect() as sock:
      sock.sendall(head)
      start, closed = time.monotonic(), False
      while not closed and time.monotonic() - start < 20:
        time.sleep(0.3)
        try:
          sock.sendall(b" ")
        except OSError:
          closed = True
      assert closed and time.monotonic() - start < 10
    # The same with the headers (before 2026-12-05 only the body had a
    # deadline in all).
    with connect() as sock:
      start, closed, slow = time.monotonic(), False, iter(b"X-Slow: " + b"a" * 200)
      sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
      while not closed and time.monotonic() - start < 20:
        time.sleep(0.3)
        try:
          sock.sendall(bytes([next(slow)]))
        except OSError:
          closed = True
      assert closed and time.monotonic() - start < 10
    slots_free()
    # Expect: 100-continue: a body too large is refused before it is sent
    # (before 2026-12-05: "100 Continue", then the 413), one within the
    # limit is asked for and answered.
    with connect() as sock:
      sock.sendall(b"POST /trace HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   b"999999999\r\nExpect: 100-continue\r\n\r\n")
      assert sock.recv(1024).startswith(b"HTTP/1.1 413")
    with connect() as sock:
      body = json.dumps({"queries": [traced.sets["one"][0][0]]}).encode()
      sock.sendall(b"POST /trace HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                   b"Expect: 100-continue\r\n\r\n" % len(body))
      assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
      sock.sendall(body)
      assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    slots_free()
    with connect() as a, connect() as b:
      a.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
      b.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
      assert a.recv(1024).startswith(b"HTTP/1.1 200")  # both held open
      assert b.recv(1024).startswith(b"HTTP/1.1 200")
      with connect() as c:
        reply = c.recv(1024)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
      # A client that sends its whole request before it reads (every HTTP
      # client) gets the 503 too: before 2026-12-04 the socket closed with
      # the request unread, and a reset ("Broken pipe") reached it instead.
      big = [{"id": f"q{i}", "prompt": "p" * 4000, "target": "t"} for i in range(200)]
      with pytest.raises(InputError, match="HTTP 503: too many connections"):
        serving.trace(server.url, big, K, timeout=60)
    deadline = time.monotonic() + 20  # their threads end as they close
    while time.monotonic() < deadline:
      try:
        assert serving.health(server.url)["status"] == "ok"
        break
      except InputError:
        time.sleep(0.1)
    assert serving.health(server.url)["status"] == "ok"
  finally:
    server.close()


def test_latency_is_measured(traced, tracer_):
  """Warm latency (printed, not asserted on): 1 query; 64 in one request;
  64 one-query requests at once."""
  server = serve.Server(tracer_)
  try:
    rows = serve.measure(server.url, traced.sets["all"][0], repeats=3)
  finally:
    server.close()
  print("\n" + serve.format_rows(rows))
  assert [r["case"] for r in rows] == ["1 query", "64 queries, one request",
                                       "64 one-query requests at once"]
  assert rows[2]["requests_per_batch"] > 1  # concurrent requests were batched


# --- the command line -------------------------------------------------------------

def _serve_command(traced, port: int, *extra: str, corpus: bool = True
                   ) -> list[str]:
  """``tracer serve`` of the traced store; without ``--corpus`` unless
  ``corpus`` (the store's manifest then names the tokenized corpus)."""
  return [sys.executable, "-m", "tracer.launch.serve", f"--workdir={traced.root}",
          f"--checkpoint={traced.checkpoint}",
          *([f"--corpus={traced.corpus}"] if corpus else []),
          f"--port={port}", *[f"--gin_bindings={b}" for b in BINDINGS], *extra]


def _wait_listening(procs, log: str, deadline: float) -> str:
  """The URL a server process prints once it listens."""
  while time.monotonic() < deadline:
    text = open(log, errors="replace").read()
    found = re.search(r"listening on (http://\S+)", text)
    if found:
      return found.group(1)
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
  pytest.fail(f"the server did not start:\n{open(log, errors='replace').read()[-5000:]}")


def test_tracer_serve_and_view_from_the_command_line(traced, tmp_path):
  """``tracer serve`` on 4 devices; ``tracer view --server`` writes a page
  from its answers; SIGTERM ends it cleanly."""
  env = multiprocess.env(devices=4)
  cmd = [str(TRACER), "serve", *_serve_command(traced, 0)[3:]]
  procs, logs = multiprocess.start([cmd], tmp_path, env)
  url = _wait_listening(procs, logs[0], time.monotonic() + TIMEOUT_S)
  try:
    assert url.startswith("http://127.0.0.1:")  # bound to localhost by default
    page = tmp_path / "page.html"
    queries = str(traced.root / "all.jsonl")
    view = subprocess.run(
        [str(TRACER), "view", f"--server={url}", f"--queries={queries}",
         f"--results={traced.root / 'all.out'}", f"--output={page}"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert view.returncode == 0, view.stderr
    html = page.read_text()
    assert all(f'"q{i}"' in html for i in range(10))
    assert '"server"' in html and '"all"' in html  # both runs, side by side
    assert_same_records(serving.trace(url, traced.sets["all"][0], K)["results"],
                        traced.results["all"])
    view = subprocess.run(
        [str(TRACER), "view", "--server=http://127.0.0.1:9", f"--queries={queries}",
         f"--output={tmp_path / 'x.html'}"], env=env, capture_output=True,
        text=True, timeout=TIMEOUT_S)
    assert view.returncode == 2
    assert view.stderr.startswith("error: http://127.0.0.1:9/health: cannot reach")
    # A second server on its port is refused before it loads anything
    # (before 2026-12-05: an OSError traceback once the store was loaded).
    port = int(url.rsplit(":", 1)[1])
    second = subprocess.run(_serve_command(traced, port), env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert second.returncode == 2, second.stderr
    assert second.stderr == (
        f"error: --host=127.0.0.1 --port={port}: cannot listen there (Address "
        "already in use); expected an address of this machine and a free port "
        "(--port=0 picks one)\n")
    assert "loading" not in second.stdout.lower(), second.stdout
    # Flag values that broke it are flag errors (before 2026-12-05: inf let
    # the batcher thread die, so that the first request hung; nan or inf
    # bodies were a traceback after loading; 0 repeats one after measuring).
    for flag, message in (("--batch_window_ms=inf", "expected milliseconds in [0, 60000]"),
                          ("--max_body_mb=nan", "expected a finite value > 0"),
                          ("--measure_repeats=0", "0 is not a positive integer")):
      bad = subprocess.run([*_serve_command(traced, 0), flag], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
      assert bad.returncode == 2 and bad.stderr.startswith(f"error: flag {flag}"), bad.stderr
      assert message in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
  finally:
    procs[0].send_signal(signal.SIGTERM)
  multiprocess.wait(procs, logs, time.monotonic() + TIMEOUT_S)


def test_serve_on_two_processes(traced, summed_want, tmp_path):
  """Process 0 serves HTTP and broadcasts each batch; both processes encode
  each query with both checkpoints' params (``--sum_steps=1``) and scan their
  devices' rows of both stores; answers equal one process's ``tracer trace
  --sum_steps=1``. (The device pass is the one-checkpoint pass with two
  parts; one checkpoint on several processes is the CLI test's code on more
  hosts.) No ``--corpus``: each process opens the tokenized corpus the
  store's manifest names (``corpus_rows``), not its source."""
  port = multiprocess.free_port()
  http_port = multiprocess.free_port()
  commands = [_serve_command(traced, http_port, "--idle_tick_s=1",
                             "--batch_window_ms=500", "--sum_steps=1",
                             *multiprocess.distributed_flags(port, i),
                             corpus=False)
              for i in range(2)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=4))
  url = _wait_listening(procs, logs[0], time.monotonic() + TIMEOUT_S)
  try:
    assert f"corpus {traced.corpus}\n" in open(logs[0]).read()
    health = serving.health(url)
    assert ((health["processes"], health["devices"], health["resident"],
             health["sum_steps"]) == (2, 8, True, [1]))
    time.sleep(2.5)  # idle ticks pass between the processes
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = {name: pool.submit(serving.trace, url, qs, k)
                 for name, (qs, k) in traced.sets.items()}
      responses = {name: f.result() for name, f in futures.items()}
    for name, response in responses.items():
      assert_same_records(response["results"], summed_want[name])
    status, got = _post(url, {"queries": [GOOD], "top_k": 0})
    assert status == 400  # refused on process 0; the followers never see it
    assert_same_records(serving.trace(url, traced.sets["one"][0], K)["results"],
                        summed_want["one"])
  finally:
    procs[0].send_signal(signal.SIGTERM)
  texts = multiprocess.wait(procs, logs, time.monotonic() + TIMEOUT_S)
  assert "listening on" in texts[0] and "listening on" not in texts[1]


def test_a_follower_that_dies_ends_the_server(traced, tmp_path):
  """A follower killed (SIGKILL: no word) while the server idles: process 0
  stops serving and ends, saying which process, with the rerun status."""
  port, http_port = multiprocess.free_port(), multiprocess.free_port()
  commands = [_serve_command(traced, http_port, "--idle_tick_s=1",
                             "--silent_process_timeout_s=4",
                             *multiprocess.distributed_flags(port, i))
              for i in range(2)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=4))
  url = _wait_listening(procs, logs[0], time.monotonic() + TIMEOUT_S)
  assert_same_records(serving.trace(url, traced.sets["one"][0], K)["results"],
                      traced.results["one"])
  procs[1].kill()
  start = time.monotonic()
  statuses, texts = multiprocess.ends(procs, logs, start + 60)
  print(f"process 0 ended {time.monotonic() - start:.1f} s after the kill, "
        f"status {statuses[0]}")
  assert statuses == [coordination.LOST_STATUS, -9], texts[0][-3000:]
  assert "process 1 of 2 failed: no word from it" in texts[0], texts[0][-3000:]


def test_a_batch_that_fails_on_one_process_ends_the_server(traced, tmp_path):
  """Streamed, on 2 processes: a chunk only process 1 reads goes bad while
  the server runs. Its batch fails there while process 0 waits in the
  scan's collective, so the processes are out of step: both end, naming
  the chunk, instead of serving nothing forever."""
  store = tmp_path / "store"
  shutil.copytree(traced.root / "store", store)
  port, http_port = multiprocess.free_port(), multiprocess.free_port()
  commands = [_serve_command(traced, http_port, f"--store={store}",
                             "--resident_budget_mb=0", "--idle_tick_s=1",
                             *multiprocess.distributed_flags(port, i))
              for i in range(2)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=4))
  url = _wait_listening(procs, logs[0], time.monotonic() + TIMEOUT_S)
  assert_same_records(serving.trace(url, traced.sets["one"][0], K)["results"],
                      traced.results["one"])
  written = store_lib.open_store(str(store))
  last = written.num_rows - 1  # on process 1's devices
  written.array[last:last + 1].write(
      np.full((1, written.dim), 7, written.array.dtype.numpy_dtype)).result()
  start = time.monotonic()
  with pytest.raises(InputError, match="the server closed the connection"):
    serving.trace(url, traced.sets["one"][0], K, timeout=120)
  statuses, texts = multiprocess.ends(procs, logs, time.monotonic() + 60)
  print(f"both ended {time.monotonic() - start:.1f} s after the request")
  assert statuses == [2, 2], (statuses, texts[0][-3000:], texts[1][-3000:])
  assert "process 1 of 2 failed" in texts[0] and "checksum" in texts[0], texts[0][-3000:]


class _FakeServer(http.server.BaseHTTPRequestHandler):
  """Answers every request with ``self.server.answer``: (status, content
  type, body bytes, seconds between bytes)."""

  def log_message(self, *args):
    pass

  def _answer(self):
    status, content_type, body, pause = self.server.answer
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    for i in range(0, len(body), 1 if pause else len(body) or 1):
      self.wfile.write(body[i:i + 1] if pause else body)
      self.wfile.flush()
      time.sleep(pause)

  def do_GET(self):
    self._answer()

  def do_POST(self):
    self.rfile.read(int(self.headers["Content-Length"]))
    self._answer()


def test_client_refuses_answers_not_from_a_tracer_server():
  """What `tracer view --server` reads: an answer that is not tracer serve's
  gets an InputError naming the URL (before 2026-12-05 a JSON, Key, Type or
  AttributeError), and the timeout bounds the whole answer, not each read (a
  server sending a byte each 0.2 s held health(timeout=1) for the body)."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  health = json.dumps({"max_queries": 2, "task_queries": 0}).encode()
  q = {"id": "q", "prompt": "p", "target": "t"}
  try:
    cases = [
        (serving.health, (200, "text/html", b"<html>login</html>", 0),
         r"/health: the answer is not JSON \(text/html, starting b'<html>login"),
        (serving.health, (200, "application/json", b"[1, 2]", 0),
         r"/health: the answer is JSON list"),
        (serving.health, (200, "application/json", b"{}", 0),
         r"/health: field 'max_queries' is missing; expected a positive integer"),
        (serving.health, (200, "application/json", b'{"max_queries": "8"}', 0),
         r"/health: field 'max_queries' is '8'"),
        (serving.health, (500, "application/json", b'["boom"]', 0),
         r"/health: HTTP 500: Internal Server Error$"),
        (serving.health, (503, "application/json", b'{"error": "busy"}', 0),
         r"/health: HTTP 503: busy$"),
        (lambda u: serving.trace(u, [q, q]), (200, "application/json", b"{}", 0),
         r"/trace: field 'results' is missing; expected a list of 2 JSON objects"),
        (lambda u: serving.trace(u, [q, q]),
         (200, "application/json", b'{"results": null}', 0),
         r"/trace: field 'results' is None"),
        (lambda u: serving.trace(u, [q, q]),
         (200, "application/json", b'{"results": [{"query_id": "q"}]}', 0),
         r"/trace: field 'results' is a list of 1; expected a list of 2"),
        (lambda u: serving.trace(u, [q, q]),
         (200, "application/json", b'{"results": [1, 2]}', 0),
         r"/trace: field 'results' is a list of 2; expected a list of 2 JSON"),
        (lambda u: serving.trace_all(u, [q] * 3),
         (200, "application/json", health, 0), r"3 queries, more than the 2"),
        (lambda u: serving._call(u, max_bytes=16),
         (200, "application/json", b'{"x": "' + b"y" * 64 + b'"}', 0),
         r"the answer is over 16 bytes"),
    ]
    for call, answer, message in cases:
      server.answer = answer
      with pytest.raises(InputError, match=message):
        call(url)
    server.answer = (200, "application/json", health, 0.2)
    with pytest.raises(InputError, match=r"/health: no answer within 1 s"):
      serving.health(url, timeout=1)  # before: the answer, after 7 s
    server.answer = (200, "application/json", health, 0)
    assert serving.health(url)["max_queries"] == 2
    with pytest.raises(InputError, match=r"cannot reach the server"):
      serving.health("http://127.0.0.1:9")
    with pytest.raises(InputError, match=r"expected an http:// or https:// URL"):
      serving.health("127.0.0.1:9")
    # A malformed URL is one error naming it (before, urllib's ValueError);
    # a path is kept and the endpoint added to it; a query or fragment is
    # refused (before, "/health" was added after it: a 404 from "/").
    for bad, why in (("http://[::1:9", "Invalid IPv6 URL"),
                     ("http://[127.0.0.1]:9", "An IPv4 address cannot be in brackets")):
      with pytest.raises(InputError, match=re.escape(
          f"{bad}: {why}; expected http://HOST:PORT")):
        serving.health(bad)
    assert serving.endpoint(url + "//", "health") == url + "/health"
    assert serving.endpoint("http://h:1/tracer/", "trace") == "http://h:1/tracer/trace"
    for bad in (url + "/?token=a", url + "#x"):
      with pytest.raises(InputError, match=re.escape(
          f"{bad}: a server URL with a query or fragment; expected")):
        serving.health(bad)
  finally:
    server.shutdown()
    server.server_close()
