"""Bad input (issue 11): a catalogue of mistakes, each run through the real
launch scripts (``python -m tracer.launch.X`` subprocesses).

Every case must end with exit status 2, exactly one line on stderr, starting
with ``error:`` and naming the file, line, field or flag at fault and what
was expected, no Python traceback anywhere, and no partial output: the
case's own directory (where its workdir, store and results would go) and the
shared inputs (corpus, checkpoint, complete store) are left exactly as they
were. WORKSPACE.md ("Bad input") lists the cases with their messages.

A UTF-8 byte order mark and CRLF line endings are not mistakes: the shared
corpus and queries files have both, the store is encoded from them, and they
read as the same records as the plain files.

Shared, built once: a small corpus and queries, a tiny checkpoint (and one of
the same model with other weights), and a complete store made by
``launch.encode``. Most cases fail while flags, gin or the inputs are read,
before any model is compiled; subprocesses share a JAX compilation cache.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import re
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest

from tracer import checkpoint as ckpt_lib
from tracer import data as data_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import store as store_lib
from tracer import train as train_lib
from tracer.config import DataConfig

import multiprocess  # tests/ is on sys.path

CONFIG = model_lib.ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               max_len=8)
NUM_DOCS = 24
NUM_QUERIES = 3
CHUNK_ROWS = 8           # 3 chunks
K = 3
GIN_BINDINGS = ("EncodeConfig.projection_dim=64", "EncodeConfig.microbatch_size=4",
                "EncodeConfig.batch_size=8", f"EncodeConfig.chunk_rows={CHUNK_ROWS}",
                "PreconditionerConfig.train_examples=0",
                "PreconditionerConfig.rank=2")
RUN_TIMEOUT_S = 240
BOM, CRLF = "\ufeff", "\r\n"


# ---------------------------------------------------------------------------
# Shared inputs.


@dataclasses.dataclass
class Shared:
  root: Path          # everything below must be left as it is by every case
  corpus: Path        # NUM_DOCS lines, with a BOM and CRLF line endings
  queries: Path       # NUM_QUERIES lines, with a BOM and CRLF line endings
  checkpoints: Path   # a CheckpointManager directory: step 1
  other_checkpoints: Path  # the same model, other weights
  store: Path         # complete, made by launch.encode from the above
  corpus_lines: list[str]  # the corpus lines, as plain JSON
  query_lines: list[str]
  cache: Path         # the subprocesses' JAX compilation cache (not watched)
  readonly: Path | None   # a read-only file system (None: mount failed)
  full: Path | None       # a file system with no space left
  mount_error: str = ""


def byte_tokens(text: str) -> list[int]:
  """seqio.ByteVocabulary's ids, without importing seqio here."""
  return [b + 3 for b in text.encode("utf-8")]


def write_checkpoint(path: Path, corpus_texts: list[str], seed: int) -> None:
  """The tiny model after one AdamW step (so V is not zero), as
  tests/test_multihost.py writes it; ``seed`` picks the initial weights."""
  opt_config = train_lib.OptimizerConfig(total_steps=1, warmup_steps=0)
  optimizer = train_lib.make_optimizer(opt_config)
  mesh = partitioning.make_mesh()
  params = jax.device_put(model_lib.init_params(CONFIG, seed=seed),
                          partitioning.replicated(mesh))
  opt_state = optimizer.init(params)
  step = train_lib.make_train_step(model_lib.make_loss_fn(CONFIG), optimizer, mesh, params)
  examples = data_lib.stack_examples([
      data_lib.corpus_example(np.array(byte_tokens(t) + [data_lib.EOS_ID],
                                       np.int32)[:CONFIG.max_len], CONFIG.max_len)
      for t in corpus_texts[:8]])
  batch = partitioning.to_global(examples, partitioning.all_devices_batch(mesh))
  params, opt_state, _ = step(params, opt_state, batch)
  mngr = ckpt_lib.manager(str(path))
  ckpt_lib.save(mngr, 1, params, opt_state, CONFIG, opt_config,
                {**DataConfig().to_dict(), "num_rows": len(corpus_texts)})
  mngr.close()


def mount_tmpfs(path: Path, options: str) -> str:
  """Mounts a small tmpfs at ``path``; returns "" or why it failed."""
  path.mkdir()
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return str(e)
  return "" if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


def fill(path: Path) -> None:
  """Writes a file under ``path`` until its file system is full."""
  fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    while True:
      os.write(fd, b"\0" * 4096)
  except OSError:
    pass
  finally:
    os.close(fd)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory, request) -> tuple[Path | None, Path | None, str]:
  """A read-only tmpfs and a full one (None where ``mount`` fails, with why)."""
  base = tmp_path_factory.mktemp("bad_input_mounts")
  made, errors = {}, []
  for name, options in (("readonly", "ro,size=64k"), ("full", "size=64k")):
    error = mount_tmpfs(base / name, options)
    if error:
      errors.append(f"mount -t tmpfs -o {options}: {error}")
    else:
      made[name] = base / name
      request.addfinalizer(lambda p=base / name: subprocess.run(
          ["umount", str(p)], check=False, timeout=60))
  if "full" in made:
    fill(made["full"])
  return made.get("readonly"), made.get("full"), "; ".join(errors)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, mounts) -> Shared:
  root = tmp_path_factory.mktemp("bad_input_shared")
  rng = np.random.default_rng(11)
  texts = set()
  while len(texts) < NUM_DOCS:
    texts.add("".join(rng.choice(list("abcdefghij"), rng.integers(3, 8))))
  texts = sorted(texts)
  corpus_lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
  query_lines = [json.dumps({"id": f"q{i}", "prompt": texts[i][:4], "target": "ab"})
                 for i in range(NUM_QUERIES)]
  (root / "corpus.jsonl").write_bytes((BOM + CRLF.join(corpus_lines) + CRLF)
                                      .encode("utf-8"))
  (root / "queries.jsonl").write_bytes((BOM + CRLF.join(query_lines) + CRLF)
                                       .encode("utf-8"))
  write_checkpoint(root / "checkpoints", texts, seed=0)
  write_checkpoint(root / "other_checkpoints", texts, seed=1)
  cache = tmp_path_factory.mktemp("bad_input_jax_cache")
  s = Shared(root, root / "corpus.jsonl", root / "queries.jsonl",
             root / "checkpoints", root / "other_checkpoints", root / "store",
             corpus_lines, query_lines, cache, None, None)
  cmd = [sys.executable, "-m", "tracer.launch.encode", f"--workdir={root / 'w'}",
         f"--checkpoint={s.checkpoints}", f"--corpus={s.corpus}",
         f"--store={s.store}", *[f"--gin_bindings={b}" for b in GIN_BINDINGS]]
  proc = subprocess.run(cmd, env=environ(s), cwd=multiprocess.ROOT,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert store_lib.open_store(str(s.store)).is_complete()
  s.readonly, s.full, s.mount_error = mounts
  return s


def environ(s: Shared) -> dict[str, str]:
  return multiprocess.env(
      devices=1, JAX_COMPILATION_CACHE_DIR=str(s.cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# ---------------------------------------------------------------------------
# Command builders: ``build(s, d)`` writes what the case needs under its own
# directory ``d`` and returns the script and its flags. Whatever the command
# would write goes under ``d / "out"``.


def gin(*extra: str) -> list[str]:
  return [f"--gin_bindings={b}" for b in (*GIN_BINDINGS, *extra)]


def scan(s: Shared, d: Path, *extra: str, queries=None, store=None, output=None,
         checkpoint=None, top_k=K, bindings=(), corpus=None) -> tuple[str, list[str]]:
  """launch.scan of the shared store; the results would go to d/out."""
  return "scan", [f"--workdir={d / 'out' / 'w'}",
                  f"--checkpoint={checkpoint or s.checkpoints}",
                  f"--corpus={corpus or s.corpus}", f"--queries={queries or s.queries}",
                  f"--store={store or s.store}",
                  f"--output={output or d / 'out' / 'results.jsonl'}",
                  f"--top_k={top_k}", *gin(*bindings), *extra]


def encode(s: Shared, d: Path, corpus=None, store=None, bindings=(),
           checkpoint=None) -> tuple[str, list[str]]:
  """launch.encode into a new store under d/out (or ``store``)."""
  return "encode", [f"--workdir={d / 'out' / 'w'}",
                    f"--checkpoint={checkpoint or s.checkpoints}",
                    f"--corpus={corpus or s.corpus}",
                    f"--store={store or d / 'out' / 'store'}", *gin(*bindings)]


def lines_file(d: Path, name: str, lines: list[str | bytes]) -> Path:
  path = d / name
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n"
                            for l in lines))
  return path


def bad_corpus(*lines: str | bytes, keep: int = 3):
  """encode of a corpus: the first ``keep`` good lines, then ``lines``."""
  def build(s: Shared, d: Path):
    return encode(s, d, corpus=lines_file(d, "corpus.jsonl",
                                          [*s.corpus_lines[:keep], *lines]))
  return build


def bad_queries(*lines: str, keep: int = 1):
  def build(s: Shared, d: Path):
    return scan(s, d, queries=lines_file(d, "queries.jsonl",
                                         [*s.query_lines[:keep], *lines]))
  return build


def packed_corpus(head: bytes, cut: bool = False):
  """encode of a compressed corpus: gzip of every good line (the first half
  of it if ``cut``), or ``head`` followed by junk (another format)."""
  def build(s: Shared, d: Path):
    path = d / "corpus.jsonl.gz"
    data = gzip.compress("".join(l + "\n" for l in s.corpus_lines).encode(), mtime=0)
    path.write_bytes(data[:len(data) // 2] if cut else head + data)
    return encode(s, d, corpus=path)
  return build


def parquet_corpus(cut: bool = False, text_column: str = "text", fields: str = ""):
  """encode of a Parquet corpus of every good line (cut in half if ``cut``;
  its text column named ``text_column``; ``fields`` after its path)."""
  def build(s: Shared, d: Path):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    lines = [json.loads(l) for l in s.corpus_lines]
    out = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [r["id"] for r in lines],
                             text_column: [r["text"] for r in lines]}), out)
    data = out.getvalue().to_pybytes()
    path = d / "corpus.parquet"
    path.write_bytes(data[:len(data) // 2] if cut else data)
    return encode(s, d, corpus=f"{path}{fields}")
  return build


def truncated_chunk(s: Shared, d: Path):
  """A copy of the store whose chunk 1 file lost its second half."""
  store = d / "store"
  shutil.copytree(s.store, store)
  chunk = store / store_lib.ARRAY_DIR / "c" / "1" / "0"
  data = chunk.read_bytes()
  chunk.write_bytes(data[:len(data) // 2])
  return scan(s, d, store=store)


def store_without_basis(s: Shared, d: Path):
  """A copy of the store whose basis file was deleted (before: "basis.npz does
  not match the manifest's basis_fingerprint", as if another basis were there)."""
  store = d / "store"
  shutil.copytree(s.store, store)
  (store / "basis.npz").unlink()
  return scan(s, d, store=store)


def edited_corpus(s: Shared, d: Path):
  """A copy of the store, and of its corpus then edited in place: the same
  lines in reverse order (as many rows, other ids at each row)."""
  store = d / "store"
  shutil.copytree(s.store, store)
  corpus = lines_file(d, "corpus.jsonl", s.corpus_lines[::-1])
  manifest = store / store_lib.MANIFEST
  manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                  "corpus": str(corpus)}))
  return scan(s, d, store=store, corpus=corpus)


def other_model_config(s: Shared, d: Path):
  """launch.train resuming the checkpoint with another ModelConfig."""
  shutil.copytree(s.checkpoints, d / "w" / "checkpoints")
  return "train", [f"--workdir={d / 'w'}", f"--corpus={s.corpus}",
                   "--gin_bindings=OptimizerConfig.warmup_steps=0",  # the checkpoint's
                   *[f"--gin_bindings=ModelConfig.{k}={v}" for k, v in
                     {**dataclasses.asdict(CONFIG), "d_model": 32}.items()
                     if k != "dtype"]]


def edited_checkpoint(section: str = "model", field: str = "d_model", value=32):
  """scan with a copy of the checkpoint whose config item's ``section``
  says ``field`` = ``value`` (default d_model=32: its arrays have 16)."""
  def build(s: Shared, d: Path):
    shutil.copytree(s.checkpoints, d / "checkpoints")
    metadata = d / "checkpoints" / "1" / "config" / "metadata"
    config = json.loads(metadata.read_text())
    config[section][field] = value
    metadata.write_text(json.dumps(config))
    return scan(s, d, checkpoint=d / "checkpoints")
  return build


def readonly_output(s: Shared, d: Path):
  if s.readonly is None:
    pytest.skip(f"cannot mount a read-only tmpfs: {s.mount_error}")
  return scan(s, d, output=s.readonly / "results.jsonl")


def full_disk(s: Shared, d: Path):
  if s.full is None:
    pytest.skip(f"cannot mount a small tmpfs: {s.mount_error}")
  return scan(s, d, output=s.full / "results.jsonl")


def gin_file(text: str):
  def build(s: Shared, d: Path):
    (d / "bad.gin").write_text(text)
    script, args = scan(s, d)
    return script, [*args, f"--gin_file={d / 'bad.gin'}"]
  return build


def self_including_gin(s: Shared, d: Path):
  (d / "loop.gin").write_text(f"include '{d / 'loop.gin'}'\n")
  script, args = scan(s, d)
  return script, [*args, f"--gin_file={d / 'loop.gin'}"]


def latin1_gin(s: Shared, d: Path):
  (d / "latin1.gin").write_bytes("# café\nEncodeConfig.seed = 1\n".encode("latin-1"))
  script, args = scan(s, d)
  return script, [*args, f"--gin_file={d / 'latin1.gin'}"]


def output_in_the_default_store(s: Shared, d: Path):
  """--workdir=ROOT without --store: the store read is ROOT/store."""
  script, args = scan(s, d, output=s.store / "manifest.json")
  assert s.store == s.root / "store"
  return script, [a for a in args if not a.startswith(("--workdir=", "--store="))
                  ] + [f"--workdir={s.root}"]


def gin_with_a_bom(s: Shared, d: Path):
  (d / "bom.gin").write_text(BOM + "EncodeConfig.seed = 1\n")
  script, args = scan(s, d)
  return script, [*args, f"--gin_file={d / 'bom.gin'}"]


def workdir_a_file(s: Shared, d: Path):
  (d / "afile").write_text("not a directory\n")
  script, args = encode(s, d)
  return script, [a for a in args if not a.startswith("--workdir=")] + [
      f"--workdir={d / 'afile'}"]


def store_not_empty(s: Shared, d: Path):
  """encode into a directory of other files: refused before the basis fit
  (before 2026-12-05, after it)."""
  (d / "notes").mkdir()
  (d / "notes" / "todo.txt").write_text("mine\n")
  return encode(s, d, store=d / "notes")


def checkpoint_in_part(lost: str):
  """scan with a copy of the checkpoint whose step lost ``lost`` (a glob
  under its step directory, files or directories): before 2026-12-05 its
  message came under 130 lines of Orbax's tracebacks ('Event loop is
  closed'), and lost data files were a traceback (Orbax's bare Exception),
  exit 1."""
  def build(s: Shared, d: Path):
    copy = d / "ckpt"
    shutil.copytree(s.checkpoints, copy)
    gone = list((copy / "1").glob(lost))
    assert gone, lost
    for path in gone:
      shutil.rmtree(path) if path.is_dir() else path.unlink()
    return scan(s, d, checkpoint=copy)
  return build


def basis_into_a_store(s: Shared, d: Path):
  """fit-preconditioner writing the store's own basis.npz (before
  2026-12-05 replaced, exit 0, and the store unreadable after)."""
  return "fit_preconditioner", [f"--workdir={d / 'out' / 'w'}",
                                f"--checkpoint={s.checkpoints}", f"--corpus={s.corpus}",
                                f"--basis={s.store / 'basis.npz'}",
                                *gin("PreconditionerConfig.sample_seed=3")]


def given_basis(bindings=(), **fitted):
  """encode into a new store with ``--basis`` a copy of the shared store's
  basis whose fit record says ``fitted`` (e.g. another checkpoint's
  fingerprint)."""
  def build(s: Shared, d: Path):
    from tracer import pipeline  # pylint: disable=g-import-not-at-top
    basis = pipeline.store_basis(store_lib.open_store(str(s.store)))
    basis.fit_key = {**basis.fit_key, **fitted}
    basis.save(str(d / "basis.npz"))
    script, args = encode(s, d, bindings=bindings)
    return script, [*args, f"--basis={d / 'basis.npz'}"]
  return build


GOOD = '{"id": "x1", "text": "abc"}'


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  build: Callable[[Shared, Path], tuple[str, list[str]]]
  expect: str          # a substring of the error line (after "error: ")


CASES = [
    # Flags and gin: refused before anything is read.
    Case("unknown flag", lambda s, d: scan(s, d, "--frobnicate=1"),
         "Unknown command line flag 'frobnicate'; expected one of the flags "
         "--helpfull lists"),
    Case("misspelt flag", lambda s, d: scan(s, d, "--top-k=3"),
         "Unknown command line flag 'top-k'. Did you mean: top_k ?"),
    Case("flag value of the wrong type", lambda s, d: scan(s, d, top_k="many"),
         "flag --top_k=many: invalid literal for int()"),
    Case("top_k 0", lambda s, d: scan(s, d, top_k=0),
         "flag --top_k=0: 0 is not a positive integer"),
    Case("top_k negative", lambda s, d: scan(s, d, top_k=-2),
         "flag --top_k=-2: -2 is not a positive integer"),
    Case("required flag missing",
         lambda s, d: ("scan", [a for a in scan(s, d)[1]
                                if not a.startswith("--queries")]),
         "--queries required"),
    Case("unknown gin binding",
         lambda s, d: scan(s, d, bindings=["ModelConfig.nonsense=1"]),
         "gin: Configurable 'ModelConfig' doesn't have a parameter named 'nonsense'"),
    Case("unknown gin configurable",
         lambda s, d: scan(s, d, bindings=["Encoder.dim=1"]),
         "gin: No configurable matching 'Encoder'"),
    Case("gin binding without a value",
         lambda s, d: scan(s, d, bindings=["EncodeConfig.seed="]),
         "gin: Unable to parse value. (--gin_bindings: 'EncodeConfig.seed=')"),
    Case("gin file syntax error", gin_file("EncodeConfig.seed = 1\nEncodeConfig.kernel = \n"),
         "bad.gin, line 2: 'EncodeConfig.kernel ='"),
    # Before 2026-12-07 tokenize.TokenError's traceback, naming no file.
    Case("gin file ending in an unclosed bracket",
         gin_file("EncodeConfig.seed = 1\nEncodeConfig.projection_dim = (64\n"),
         "bad.gin, line 2: 'EncodeConfig.projection_dim = (64')"),
    Case("gin binding ending in an unclosed string",
         lambda s, d: scan(s, d, bindings=['EncodeConfig.kernel = """exact']),
         "gin: a string opened with \"\"\" is never closed; expected a closing "
         "\"\"\" before the end (--gin_bindings: 'EncodeConfig.kernel = \"\"\"exact')"),
    Case("gin file missing",
         lambda s, d: ("scan", [*scan(s, d)[1], f"--gin_file={d / 'none.gin'}"]),
         "none.gin: no such file"),
    Case("gin value of the wrong type",
         lambda s, d: scan(s, d, bindings=["EncodeConfig.projection_dim='big'"]),
         "gin: EncodeConfig.projection_dim = 'big': expected int, got str"),
    # XLA's count once compiled, before the step runs (before 2026-12-06:
    # RESOURCE_EXHAUSTED, a traceback, exit 1).
    Case("encode step past the memory",
         lambda s, d: scan(s, d, bindings=["EncodeConfig.microbatch_size=4000000"]),
         "EncodeConfig.microbatch_size=4000000: an encode step (factored kernel) "
         "takes "),
    # The same for a new store: refused once the claim on it is taken,
    # which made its directory (left empty before stop 81).
    Case("encode step past the memory, into a new store",
         lambda s, d: encode(s, d, store=d / "out" / "new" / "store",
                             bindings=["EncodeConfig.microbatch_size=4000000"]),
         "EncodeConfig.microbatch_size=4000000: an encode step (factored kernel) "
         "takes "),
    Case("model axis not dividing the devices",
         lambda s, d: encode(s, d, bindings=["EncodeConfig.model_axis=2"]),
         "EncodeConfig.model_axis=2: expected a divisor of the device count 1: 1"),
    # Before 2026-12-07 an optional (`int | None`) field's type went
    # unchecked: a TypeError traceback, exit 1.
    Case("gin value of the wrong type, an optional field",
         lambda s, d: scan(s, d, bindings=["PreconditionerConfig.rank='ten'"]),
         "gin: PreconditionerConfig.rank = 'ten': expected int or None, got str"),
    Case("gin value not one of the choices",
         lambda s, d: scan(s, d, bindings=["EncodeConfig.kernel='fast'"]),
         "gin: EncodeConfig.kernel = 'fast': expected one of 'factored', 'exact'"),
    Case("output is the queries file",
         lambda s, d: scan(s, d, output=s.queries),
         "is the --queries file; expected another path (the output would replace it)"),
    Case("two query sets, one output",
         lambda s, d: scan(s, d, queries=f"{s.queries},{s.queries}"),
         "--output: 1 file for 2 files in --queries; expected one output per "
         "queries file, in order"),
    Case("two query sets, the second output the queries file",
         lambda s, d: scan(s, d, queries=f"{s.queries},{s.queries}",
                           output=f"{d / 'out' / 'a.jsonl'},{s.queries}"),
         "is the --queries file; expected another path (the output would replace it)"),
    Case("an argument that is not a flag",
         lambda s, d: ("scan", [*scan(s, d)[1], "--check_chunks", "false"]),
         "unexpected arguments ['false']; expected --flag=value pairs only"),
    Case("max_quarantined not a fraction",
         lambda s, d: ("encode", [*encode(s, d)[1], "--max_quarantined=nan"]),
         "flag --max_quarantined=nan: expected a fraction in [0, 1]"),
    Case("claim_timeout_s infinite",
         lambda s, d: ("encode", [*encode(s, d)[1], "--claim_timeout_s=inf"]),
         "flag --claim_timeout_s=inf: expected finite seconds > 0"),
    Case("gin include missing",
         gin_file("include 'nothere.gin'\n"),
         "gin: Unable to open file: nothere.gin."),
    Case("gin file a directory",
         lambda s, d: ("scan", [*scan(s, d)[1], f"--gin_file={d}"]),
         "is a directory; expected a gin file"),
    Case("unwritable output directory", readonly_output,
         "cannot be written, {readonly} is not writable (read-only file system)"),
    Case("output under a file",
         lambda s, d: scan(s, d, output=s.corpus / "results.jsonl"),
         "cannot be created, {corpus} is a file"),
    # Corpus lines (launch.encode reads the corpus before writing anything).
    Case("corpus file missing",
         lambda s, d: encode(s, d, corpus=d / "nowhere.jsonl"),
         "nowhere.jsonl: no such file"),
    Case("empty text", bad_corpus('{"id": "x1", "text": ""}'),
         "corpus.jsonl:4: field 'text' is empty or only whitespace; expected a "
         "non-blank string"),
    Case("whitespace-only text", bad_corpus('{"id": "x1", "text": " \\t\\n "}'),
         "corpus.jsonl:4: field 'text' is empty or only whitespace"),
    Case("missing id", bad_corpus('{"text": "abc"}'),
         "corpus.jsonl:4: missing field 'id'; expected an object with 'id', 'text'"),
    Case("non-string id", bad_corpus('{"id": 17, "text": "abc"}'),
         "corpus.jsonl:4: field 'id' must be a string, got int"),
    Case("duplicate ids", bad_corpus('{"id": "d1", "text": "abc"}'),
         "corpus.jsonl:4: duplicate id 'd1' (first at line 2); ids must be unique"),
    Case("invalid UTF-8", bad_corpus(b'{"id": "x1", "text": "caf\xe9"}'),
         "corpus.jsonl:4: not valid UTF-8 (invalid continuation byte at byte 25); "
         "expected UTF-8 text"),
    Case("10 MB line",
         bad_corpus(json.dumps({"id": "x1", "text": "a" * (10 << 20)})),
         "corpus.jsonl:4: line longer than 8,388,608 bytes"),
    Case("JSON array line", bad_corpus('["x1", "abc"]'),
         "corpus.jsonl:4: expected a JSON object, got list"),
    Case("truncated JSON line", bad_corpus('{"id": "x1", "text": "ab'),
         "corpus.jsonl:4: not valid JSON (Unterminated string starting at column "
         "22); expected one JSON object per line"),
    Case("lone surrogate", bad_corpus('{"id": "x1", "text": "a\\ud800b"}'),
         "corpus.jsonl:4: field 'text' holds a lone surrogate"),
    Case("gzip corpus cut short", packed_corpus(b"", cut=True),
         # (the line depends on where zlib's blocks end: test_data checks it)
         ": the gzip stream is damaged or cut short (Compressed "
         "file ended before the end-of-stream marker was reached); expected a "
         "whole gzip file"),
    Case("damaged zstd corpus", packed_corpus(b"\x28\xb5\x2f\xfd"),
         "corpus.jsonl.gz:1: the zstd stream is damaged or cut short ("),
    Case("Parquet corpus cut short", parquet_corpus(cut=True),
         "corpus.parquet: not a whole Parquet file (Parquet magic bytes not found "
         "in footer. Either the file is corrupted or this is not a parquet "
         "file.); expected a Parquet file written to its end"),
    Case("Parquet corpus without a text column", parquet_corpus(text_column="content"),
         "corpus.parquet:1: missing field 'text'; expected an object with 'id', "
         "'text' (other names go after '#': --corpus='FILES#text=<field>,id=<field>')"),
    Case("a field after '#' that a corpus has not",
         parquet_corpus(text_column="content", fields="#txt=content"),
         "corpus.parquet#txt=content: 'txt=content' after '#': expected "
         "text=<field> and/or id=<field>, separated by commas"),
    Case("an id in a file without ids",
         bad_corpus('{"text": "abc"}', '{"id": "x1", "text": "def"}', keep=0),
         "corpus.jsonl:2: has an 'id', but "),
    Case("empty corpus", bad_corpus("", "  ", keep=0),
         "corpus.jsonl: the corpus is empty"),
    # Queries (launch.scan reads them before scanning).
    Case("query with an empty target",
         bad_queries('{"id": "q9", "prompt": "abc", "target": ""}'),
         "queries.jsonl:2: field 'target' is empty or only whitespace"),
    Case("query target longer than max_len",
         bad_queries('{"id": "q9", "prompt": "abc", "target": "abcdefghij"}'),
         "queries.jsonl: query 'q9': target of 10 tokens does not fit max_len 8: "
         "expected at most 7"),
    Case("query prompt not a string",
         bad_queries('{"id": "q9", "prompt": ["abc"], "target": "ab"}'),
         "queries.jsonl:2: field 'prompt' must be a string, got list"),
    Case("top_k larger than the corpus", lambda s, d: scan(s, d, top_k=NUM_DOCS + 1),
         f"--top_k={NUM_DOCS + 1}: more than the corpus's {NUM_DOCS} rows"),
    # Checkpoints.
    Case("missing checkpoint step",
         lambda s, d: scan(s, d, checkpoint=s.checkpoints / "7"),
         "no step 7; it holds step(s) [1]"),
    Case("missing checkpoint directory",
         lambda s, d: scan(s, d, checkpoint=d / "nowhere"),
         "nowhere: no checkpoint directory"),
    # Before 2026-12-07 "not a tracer checkpoint, and model family
    # 'tracer_lm' reads no other format": as if something were there.
    Case("missing checkpoint directory with --family",
         lambda s, d: scan(s, d, "--family=tracer_lm", checkpoint=d / "nowhere"),
         "nowhere: no checkpoint directory"),
    # Before 2026-12-06 ignored with tracer's own checkpoint, even when missing.
    Case("--tokenizer with a tracer checkpoint",
         lambda s, d: scan(s, d, f"--tokenizer={d / 'sp.model'}"),
         "sp.model: only for released weights (--family with a --checkpoint in "
         "the family's own format); "),
    Case("--opt_state with a tracer checkpoint",
         lambda s, d: scan(s, d, f"--opt_state={d / 'state'}",
                           checkpoint=s.checkpoints / "1"),
         "checkpoints/1 is a tracer checkpoint, which has its own optimizer state"),
    Case("checkpoint of another model config", other_model_config,
         "cannot resume, the checkpoint's ModelConfig differ from this run's "
         "(ModelConfig.d_model: the checkpoint has 16, this run has 32)"),
    Case("gin ModelConfig not the checkpoint's (launch.scan)",
         lambda s, d: scan(s, d, bindings=("ModelConfig.d_model=32",)),
         "checkpoints/1: a checkpoint of another ModelConfig than the gin "
         "bindings name (ModelConfig.d_model: the checkpoint has 16, the gin "
         "bindings say 32)"),
    Case("gin DataConfig or OptimizerConfig not the checkpoint's",
         lambda s, d: scan(s, d, bindings=("DataConfig.overflow='split'",
                                           "OptimizerConfig.b2=0.5")),
         "checkpoints/1: a checkpoint of another DataConfig than the gin bindings "
         "name (DataConfig.overflow: the checkpoint has 'truncate', the gin "
         "bindings say 'split')"),
    Case("checkpoint arrays not of its own config", edited_checkpoint(),
         "checkpoints/1: params['embed']['embedding'] is (259, 16) in the "
         "checkpoint, but its model config (vocab_size=259, max_len=8, "
         "d_model=32, "),
    # Values gin refuses, in the config item: before 2026-12-07 a traceback
    # from the optimizer (ValueError) or the model's shapes (TypeError).
    Case("checkpoint config item with an unknown optimizer",
         edited_checkpoint("optimizer", "name", "sgd"),
         "checkpoints/1: its config item holds OptimizerConfig.name = 'sgd': "
         "expected one of 'adamw', 'adafactor'"),
    Case("checkpoint config item with a field of the wrong type",
         edited_checkpoint("model", "d_model", "16"),
         "checkpoints/1: its config item holds ModelConfig.d_model = '16': "
         "expected int, got str"),
    Case("projection_dim smaller than the block count",
         lambda s, d: encode(s, d, bindings=["EncodeConfig.projection_dim=3"]),
         "EncodeConfig.projection_dim=3 is smaller than the 9 blocks of the model "
         "(one per weight matrix, one for all vectors); expected at least 9"),
    # Stores.
    Case("store of another checkpoint",
         lambda s, d: scan(s, d, checkpoint=s.other_checkpoints),
         "encodings are not comparable: field 'params_fingerprint'"),
    Case("store of another projection seed",
         lambda s, d: encode(s, d, store=s.store, bindings=["EncodeConfig.seed=1"]),
         "store: a store encoded with another EncodeConfig than the gin bindings "
         "name (EncodeConfig.seed: the store has 0, the gin bindings say 1); "
         "expected the gin files it was encoded with, or another --store"),
    Case("store of another d",
         lambda s, d: scan(s, d, bindings=["EncodeConfig.projection_dim=200"]),
         "(EncodeConfig.projection_dim: the store has 64, the gin bindings say "
         "200)"),
    Case("store's basis of another PreconditionerConfig (launch.scan)",
         lambda s, d: scan(s, d, bindings=["PreconditionerConfig.kind='full'"]),
         "store: its basis was fitted with other PreconditionerConfig settings "
         "(kind: store has 'block', this run has 'full')"),
    Case("--basis of another checkpoint", given_basis(params_fingerprint="0" * 16),
         "basis.npz: a basis fitted for another checkpoint or settings than "
         "this run's (params_fingerprint: the basis has '0000000000000000', "
         "this run has '"),
    Case("--basis of another sample size",
         given_basis(bindings=["PreconditionerConfig.train_examples=7"]),
         "(train_examples: the basis has 0, this run has 7); expected one that "
         "tracer fit-preconditioner fitted with this run's checkpoint, gin "
         "files and PreconditionerConfig, or leave out --basis to fit one"),
    Case("--basis of another d",
         given_basis(bindings=["EncodeConfig.projection_dim=128"]),
         "(dim: the basis has 34, this run has 75)"),
    Case("no store", lambda s, d: scan(s, d, store=d / "nostore"),
         "nostore: no store; encode the corpus first"),
    Case("no store and no corpus",
         lambda s, d: ("trace", [a for a in scan(s, d, store=d / "nostore")[1]
                                 if not a.startswith("--corpus")]),
         "nostore: no store to take the corpus from; pass --corpus (tracer "
         "trace encodes it)"),
    # Before 2026-12-08 refused only after the checkpoint loaded (here: the
    # missing checkpoint's error instead).
    Case("--sum_steps with --streaming",
         lambda s, d: ("trace", [a for a in scan(s, d, checkpoint=d / "none")[1]
                                 if not a.startswith("--store")]
                       + ["--streaming", "--sum_steps=1"]),
         "--sum_steps needs a store per step; it does not go with --streaming"),
    Case("truncated zarr chunk", truncated_chunk, "chunk 1"),
    Case("store without its basis file", store_without_basis,
         "store/basis.npz: no such basis file; the store's rows are in "
         "R_train's eigenbasis it holds (the manifest's basis_fingerprint "),
    Case("corpus edited in place", edited_corpus,
         "encodings are not comparable: field 'corpus_fingerprint' (the "
         "corpus's rows (ids or tokens) are not those the store was encoded "
         "from: was the corpus edited in place?): store has '"),
    Case("output is a directory", lambda s, d: scan(s, d, output=d),
         "is a directory; expected a file (new, or one to replace)"),
    # Before 2026-12-05 each of these four was written as a relative path
    # ("./gcs:/bucket/..."), or over the store's or the corpus's files.
    Case("unknown URL scheme",
         lambda s, d: scan(s, d, output="gcs://bucket/results.jsonl"),
         "gcs://bucket/results.jsonl: unknown URL scheme 'gcs://'; expected a "
         "local path or a gs://, s3://, memory:// or file:// URL"),
    Case("output inside the store",
         lambda s, d: scan(s, d, output=s.store / "manifest.json"),
         "manifest.json: is inside the --store directory {store}; expected a "
         "path outside it"),
    Case("output inside the default store", output_in_the_default_store,
         "manifest.json: is inside the --store directory {store}; expected a "
         "path outside it"),
    Case("output is the corpus named with fields",
         lambda s, d: scan(s, d, output=s.corpus, corpus=f"{s.corpus}#text=text"),
         "is the --corpus file {corpus}; expected another path"),
    Case("checkpoint without its state's manifest",
         checkpoint_in_part("state/manifest.ocdbt"),
         "ckpt/1: its state cannot be read, a file of it is missing or damaged "
         "(NOT_FOUND: "),
    # A copy cut short before state/ (or config/): before 2026-12-07 "does
    # not match its model config" (or "not a tracer checkpoint's").
    Case("checkpoint without its state directory", checkpoint_in_part("state"),
         "ckpt/1: its state cannot be read, a file of it is missing or damaged "
         "(its state/ directory is missing); expected a checkpoint copied whole"),
    Case("checkpoint without its config directory", checkpoint_in_part("config"),
         "ckpt/1: its config cannot be read, a file of it is missing or damaged "
         "(its config/ directory is missing); expected a checkpoint copied whole"),
    Case("checkpoint without its state's data files",
         checkpoint_in_part("state/ocdbt.process_0/d/*"),
         "ckpt/1: its state cannot be read, a file of it is missing or damaged "
         "(FAILED_PRECONDITION: Error reading "),
    Case("basis written into a store", basis_into_a_store,
         "basis.npz: is inside the --store directory {store}; expected a path "
         "outside it"),
    Case("store directory holds other files", store_not_empty,
         "notes: not an encoding store (no manifest.json) and not empty: "
         "['todo.txt']"),
    Case("workdir is a file", workdir_a_file,
         "afile: is a file; expected a directory"),
    # Before 2026-12-05: gin's 1.2 KB message quoting the config, no file or
    # line; and a scoped binding silently ignored (exit 0).
    Case("gin macro bound nowhere",
         gin_file("# the seed\nEncodeConfig.seed = %SEED\n"),
         "bad.gin:2: macro %SEED is bound nowhere; expected a binding "
         "'SEED = VALUE' in a gin file or --gin_bindings"),
    Case("gin binding without its class name",
         lambda s, d: scan(s, d, bindings=["projection_dim=1024"]),
         "gin: --gin_bindings='projection_dim=1024': projection_dim = 1024 binds a "
         "macro no binding uses (%projection_dim), so it would change nothing; "
         "expected Class.field = value (EncodeConfig.projection_dim = 1024)"),
    Case("gin binding in a scope",
         gin_file("EncodeConfig.seed = 1\ntrain/EncodeConfig.seed = 3\n"),
         "bad.gin:2: train/EncodeConfig.seed is a scoped binding, which tracer "
         "never applies (its scripts enter no gin scope); expected "
         "EncodeConfig.seed = 3"),
    Case("gin file including itself", self_including_gin,
         "loop.gin: a file includes itself (or one that includes it)"),
    Case("gin file with a byte order mark", gin_with_a_bom,
         "bom.gin: starts with a byte order mark, which gin cannot parse; "
         "expected the file saved as UTF-8 without one"),
    Case("gin file not UTF-8", latin1_gin,
         "latin1.gin: not valid UTF-8 (invalid continuation byte at byte 5); "
         "expected a gin file"),
    Case("full disk", full_disk,
         "results.jsonl: cannot write: No space left on device"),
]


def snapshot(path: Path | None) -> dict[str, tuple[int, int]]:
  """Relative path -> (size, mtime) of every file and directory under ``path``."""
  if path is None or not path.exists():
    return {}
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.lstat(full)
      out[os.path.relpath(full, path)] = (st.st_size if name in files else 0,
                                          st.st_mtime_ns)
  return out


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path):
  script, args = case.build(shared, tmp_path)
  watched = [shared.root, tmp_path, shared.readonly, shared.full]
  before = [snapshot(p) for p in watched]
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", f"tracer.launch.{script}", *map(str, args)],
                        env=environ(shared), cwd=multiprocess.ROOT,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                        check=False)
  seconds = time.monotonic() - t0
  report = (f"launch.{script} exited {proc.returncode} after {seconds:.1f}s\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}\n--- stdout ---\n"
            f"{proc.stdout[-2000:]}")
  assert "Traceback" not in proc.stderr + proc.stdout, report
  assert proc.returncode == 2, report
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), report
  print(f"{case.name} ({seconds:.1f} s): {lines[0]}")  # shown by pytest -rP
  expect = case.expect.format(readonly=shared.readonly, corpus=shared.corpus,
                              store=shared.store)
  assert expect in lines[0], report
  after = [snapshot(p) for p in watched]
  for path, b, a in zip(watched, before, after):
    assert a == b, (f"{path} changed: added {sorted(set(a) - set(b))[:5]}, "
                    f"removed {sorted(set(b) - set(a))[:5]}, modified "
                    f"{sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]}\n"
                    + report)


def test_catalogue_size():
  assert len(CASES) >= 25


def test_bom_and_crlf_read_as_plain_files(shared: Shared, tmp_path):
  """The shared files (BOM, CRLF; the store was encoded from them) give the
  records of the same lines written plainly."""
  plain_corpus = lines_file(tmp_path, "corpus.jsonl", shared.corpus_lines)
  plain_queries = lines_file(tmp_path, "queries.jsonl", shared.query_lines)

  def records(path):
    return [r for _, r in data_lib.read_records(path, ("id", "text"), ("id", "text"))]

  assert records(shared.corpus) == records(plain_corpus)
  assert [r["id"] for r in records(shared.corpus)] == [f"d{i}" for i in range(NUM_DOCS)]
  assert data_lib.read_queries(str(shared.queries)) == data_lib.read_queries(
      str(plain_queries))
  # Either alone, and a BOM on a file whose first line is blank.
  lines = shared.corpus_lines
  for text in (BOM + "\n".join(lines), CRLF.join(lines) + CRLF,
               BOM + CRLF + CRLF.join(lines)):
    (tmp_path / "variant.jsonl").write_bytes(text.encode())
    assert records(tmp_path / "variant.jsonl") == records(plain_corpus)
  # A BOM anywhere but the file's start is not one (U+FEFF inside JSON text
  # is an error).
  (tmp_path / "late_bom.jsonl").write_bytes(
      (lines[0] + "\n" + BOM + lines[1] + "\n").encode())
  with pytest.raises(data_lib.InputError, match="late_bom.jsonl:2: not valid JSON"):
    records(tmp_path / "late_bom.jsonl")


def test_error_lines_are_one_line_and_escaped():
  from tracer.launch import cli  # pylint: disable=g-import-not-at-top
  assert cli.one_line("a.jsonl:3: bad\n  In file x\n\n    y = 1\n") == (
      "a.jsonl:3: bad In file x y = 1")
  assert cli.one_line("id '\x1b[2J' \u202e") == "id '\\x1b[2J' \\u202e"


def test_print_table_escapes_control_characters(capsys):
  from tracer.launch import common  # pylint: disable=g-import-not-at-top
  row = {"query_id": "q\x1b]0;pwned\x07", "prompt": "p", "target": "t",
         "proponent_ids": ["d\r1"], "proponent_scores": [0.5],
         "proponents": ["text \x1b[31mred\x1b[0m\u202eevil\nline"]}
  common.print_table([row], ["t"], 1)
  out = capsys.readouterr().out
  assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
  assert "\\x1b[31mred" in out and "d\\x0d1" in out
  # A blank line, the query, the header, one line per proponent.
  assert out.split("\n")[3].startswith("     1   0.5000") and out.count("\n") == 4


def test_an_existing_unwritable_output_directory_is_refused(mounts):
  """A directory output (``tracer tokenize --output``) that exists is
  written inside, so its own permission counts, not its parent's."""
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  readonly, _, error = mounts
  if readonly is None:
    pytest.skip(f"cannot mount a read-only tmpfs: {error}")
  with pytest.raises(data_lib.InputError, match=(
      f"--output={readonly}: cannot be written, {readonly} is not writable "
      r"\(read-only file system\)")):
    config.check_writable(str(readonly), "--output", "directory")
  config.check_writable(str(readonly.parent), "--output", "directory")


def test_a_model_axis_that_splits_a_hosts_devices_is_refused(monkeypatch):
  """Hosts of 3 devices, model_axis=2: the middle data row would hold a
  device of each process, which each then holds rows (0, 2) or (1, 3): before
  2026-12-07 accepted, R_train fitted, and the encode's ValueError a
  traceback. (One process here, told it is one of two of 3 devices each.)"""
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer.config import EncodeConfig  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline.jax, "device_count", lambda: 6)
  monkeypatch.setattr(pipeline.jax, "local_device_count", lambda: 3)
  with pytest.raises(InputError, match=re.escape(
      "EncodeConfig.model_axis=2: expected a divisor of the device count 6 "
      "that splits no process's 3 devices over data rows another process "
      "shares: 1, 3, 6")):
    pipeline.make_mesh(EncodeConfig(model_axis=2))
