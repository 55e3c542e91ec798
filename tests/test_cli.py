"""The ``tracer`` command (issue 12): subcommands, packaging, shipped gin
configs, a quiet start, progress bars only where they belong."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import facts
from tracer.errors import InputError
from tracer.launch import config as config_lib
from tracer.launch import main as main_lib
from tracer.launch import progress as progress_lib

REPO = Path(__file__).resolve().parent.parent
TRACER = Path(sys.executable).parent / "tracer"  # the console script pip made
# A user's environment: no test-only settings (conftest's device count) leak in.
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _tracer(*args, cwd, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([str(TRACER), *map(str, args)], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  records = facts.generate(facts.FactsConfig(facts_per_bucket=2, distractor_docs=5))[0]
  return facts.write_jsonl(tmp_path_factory.mktemp("c") / "corpus.jsonl", records)


def test_help_lists_every_subcommand_with_its_line(tmp_path):
  assert TRACER.exists(), "pip install -e . makes the `tracer` console script"
  proc = _tracer("--help", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for name, module in main_lib.COMMANDS.items():
    summary = main_lib.summary(module)
    assert summary, f"tracer.launch.{module} has no docstring"
    assert any(line.split() and line.split()[0] == name and line.endswith(summary)
               for line in lines), f"{name}: {summary!r} not in\n{proc.stdout}"
  assert proc.stderr == ""


def test_every_subcommand_names_a_script_with_main():
  for name, module in main_lib.COMMANDS.items():
    spec = importlib.util.find_spec(f"tracer.launch.{module}")
    assert spec is not None, name
    source = Path(spec.origin).read_text()
    assert "def main(" in source and '__name__ == "__main__"' in source, name


def test_unknown_subcommand_is_one_error_line(tmp_path):
  proc = _tracer("tarce", cwd=tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: unknown subcommand 'tarce'")
  assert "trace" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_subcommand_flags_and_bad_input(tmp_path):
  proc = _tracer("plan", "--help", cwd=tmp_path)  # absl alone: exit status 1
  assert "capacity plan" in proc.stdout and "--params" in proc.stdout, proc.stderr
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  proc = _tracer("make-facts", "--helpfull", cwd=tmp_path)
  assert proc.returncode == 0 and "--facts_per_bucket" in proc.stdout, proc.stderr
  # Underscores work too; absl's flag errors stay one line.
  proc = _tracer("make_facts", "--nosuchflag", cwd=tmp_path)
  assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
  # Sizes past what a generated set is made in memory for (before
  # 2026-12-05 it grew without bound; -1 facts was a traceback).
  for script, flag in (("make-facts", "--distractor_docs=99999999999"),
                       ("make-facts", "--facts_per_bucket=-1"),
                       ("family", "--set_distractor_docs=99999999999")):
    proc = _tracer(script, "--out=o", flag, cwd=tmp_path) if script == "make-facts" \
        else _tracer(script, flag, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: flag {flag}: "), proc.stderr
  assert not (tmp_path / "o").exists() and not (tmp_path / "family").exists()
  # --out: an unknown URL scheme, a file (before 2026-12-06 "FILE/corpus.jsonl:
  # cannot write: File exists", and gcs://b/f written to ./gcs:/b/f).
  (tmp_path / "afile").write_text("")
  for out, message in (
      ("gcs://b/f", "gcs://b/f: unknown URL scheme 'gcs://'; expected a local "
       "path or a gs://, s3://, memory:// or file:// URL"),
      ("afile", "--out=afile: is a file; expected a directory (new, empty, or "
       "one tracer wrote)")):
    proc = _tracer("make-facts", f"--out={out}", "--facts_per_bucket=1",
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"error: {message}\n", proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
  # A script's --help lists the shared flags it reads (config.run's uses),
  # not the others; one of the others given is refused, not ignored.
  proc = _tracer("scan", "--help", cwd=tmp_path)
  for flag in ("--workdir", "--queries", "--top_k", "--store", "--gin_file"):
    assert flag in proc.stdout, (flag, proc.stdout)
  assert "--basis" not in proc.stdout and "--max_quarantined" not in proc.stdout
  proc = _tracer("verify", "--store=s", "--workdir=w", "--top_k=3", cwd=tmp_path)
  assert proc.returncode == 2 and proc.stderr == (
      "error: --workdir, --top_k: tracer verify does not read them, so they would "
      "be ignored; expected only its own flags (tracer verify --help)\n"), proc.stderr
  # The demo makes its own corpus and queries.
  proc = _tracer("demo", "--corpus=c.jsonl", cwd=tmp_path)
  assert proc.returncode == 2 and proc.stderr.startswith(
      "error: --corpus: tracer demo does not read it"), proc.stderr
  assert not (tmp_path / "demo").exists()
  # Nor another script's own flags, defined where this one imports it
  # (before 2026-12-07 each of these ran, the flag ignored).
  for script, flag in (("demo", "--streaming"), ("quality", "--show=3"),
                       ("family", "--sgd_learning_rate=0.1")):
    proc = _tracer(script, flag, "--workdir=w", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: {flag.split('=')[0]}: tracer {script} does not read it"), proc.stderr
  assert not (tmp_path / "w").exists()


# The benchmarks' bad flags (2026-12-06): each refused at once, in one line,
# before any corpus, array or model is made. Before, each was a traceback
# (int(), numpy's "negative dimensions", ZeroDivisionError, IsADirectoryError
# at the end), a message blaming something else (--gin_file, "the corpus is
# empty", a manifest), or found after the timings. The small sizes keep the
# old code's runs short.
BENCHMARK_DATA = ("benchmark-data", "--rows=10", "--workdir={tmp}/wd")
BENCHMARK_SCAN = ("benchmark-scan", "--rows=300", "--dim=16", "--queries=2", "--k=2",
                  "--repeats=1", "--eval_examples=2", "--block=8",
                  "--store_chunk_rows=64", "--workdir={tmp}/wd")
BENCHMARK = ("benchmark", "--suite=encode", "--models=tiny", "--dims=64",
             "--kernels=exact", "--batch_size=2", "--memory_budget_mb=0", "--norun",
             "--noper_example", "--noverify")
BENCHMARK_FLAG_ERRORS = [
    (BENCHMARK_DATA, "--rows=-5", "flag --rows=['-5']: -5: expected integers >= 1"),
    (BENCHMARK_DATA, "--rows=abc", "flag --rows=['abc']: 'abc' is not an integer"),
    (BENCHMARK_DATA, "--rows=0", "flag --rows=['0']: 0: expected integers >= 1"),
    (BENCHMARK_DATA, "--batch_size=0", "flag --batch_size=0: 0 is not a positive"),
    (BENCHMARK_DATA, "--batch_size=-3", "flag --batch_size=-3: -3 is not a positive"),
    (BENCHMARK_DATA, "--join_docs=-1", "flag --join_docs=-1: -1 is not a non-negative"),
    (BENCHMARK_DATA, "--max_len=0", "flag --max_len=0: 0 is not a positive"),
    (BENCHMARK_DATA, "--max_len=-1", "flag --max_len=-1: -1 is not a positive"),
    (BENCHMARK_DATA, "--join_docs=10 --join_parts=0",
     "flag --join_parts=0: 0 is not a positive"),
    (BENCHMARK_DATA, "--tokenize_processes=1 --shards_as=jsonl,csv",
     "flag --shards_as=['jsonl', 'csv']: 'csv' is not one of jsonl, gzip, zstd"),
    (BENCHMARK_DATA, "--tokenize_processes=0",
     "flag --tokenize_processes=['0']: 0: expected integers >= 1"),
    (BENCHMARK_DATA, "--encode_memory=chunk,bogus", "flag --encode_memory=['chunk', "
     "'bogus']: 'bogus' is not one of examples, encodings, chunk, chunk_float32"),
    (BENCHMARK_DATA, "--scan_memory=float32,f16", "flag --scan_memory=['float32', "
     "'f16']: 'f16' is not one of bfloat16, float32, bfloat16_8, float32_8, "
     "bfloat16_q256"),
    (BENCHMARK_DATA, "--rows=10,10000000000000", "--rows=10,10000000000000: the "
     "corpora and what is made of them take about 1,162 bytes per row at "
     "--max_len=32, "),
    (BENCHMARK_DATA, "--read={tmp}/nosuch.jsonl", "--read={tmp}/nosuch.jsonl: no "
     "such file; expected a JSONL or Parquet file"),
    # Found by the phase's own process: its line, not a RuntimeError.
    (BENCHMARK_DATA, "--read={tmp}/bad.jsonl", "{tmp}/bad.jsonl:1: not valid JSON"),
    (BENCHMARK_DATA, "--tokenize_processes=1 --json_out={tmp}/adir",
     "--json_out={tmp}/adir: is a directory; expected a file"),
    (BENCHMARK_SCAN, "--block=0", "flag --block=0: 0 is not a positive"),
    (BENCHMARK_SCAN, "--eval_examples=-1", "flag --eval_examples=-1: -1 is not a "
     "positive"),
    (BENCHMARK_SCAN, "--fused_tiles=abc", "flag --fused_tiles=['abc']: 'abc' is not "
     "ROWS:DIM:WARPS:STAGES"),
    (BENCHMARK_SCAN, "--store_chunk_rows=0", "flag --store_chunk_rows=0: 0 is not"),
    (BENCHMARK_SCAN, "--chunk_rows=0", "flag --chunk_rows=0: 0 is not a positive"),
    (BENCHMARK_SCAN, "--rows=100000000000 --dim=1024", "--rows=100000000000 "
     "--dim=1024: the scan benchmark holds about 14 bytes per element"),
    (BENCHMARK_SCAN, "--output={tmp}/adir", "--output={tmp}/adir: is a directory; "
     "expected a file"),
    # (until an audit on 2026-12-08: int() tracebacks, a 0 refused by the scan
    # without the flag's name, a count off --query_sets once the rows were made)
    (BENCHMARK_SCAN, "--query_sets=2 --query_set_sizes=16,abc",
     "flag --query_set_sizes=['16', 'abc']: 'abc' is not an integer"),
    (BENCHMARK_SCAN, "--query_sets=2 --query_set_sizes=16,-3",
     "flag --query_set_sizes=['16', '-3']: -3: expected integers >= 1"),
    (BENCHMARK_SCAN, "--query_sets=2 --query_set_sizes=16,0",
     "flag --query_set_sizes=['16', '0']: 0: expected integers >= 1"),
    (BENCHMARK_SCAN, "--query_sets=3 --query_set_sizes=16,4", "flags query_sets=3, "
     "query_set_sizes=['16', '4']: --query_set_sizes: 2 sizes for --query_sets=3; "
     "expected one size a set"),
    (BENCHMARK, "--kernels=exact,bogus",
     "flag --kernels=['exact', 'bogus']: 'bogus' is not one of exact, factored"),
    (BENCHMARK, "--dims=abc", "flag --dims=['abc']: 'abc' is not an integer"),
    (BENCHMARK, "--batch_size=-1", "flag --batch_size=-1: -1 is not a non-negative"),
    (BENCHMARK, "--microbatch_size=-1", "flag --microbatch_size=-1: -1 is not a "
     "non-negative"),
    (BENCHMARK, "--models=nosuch", "flag --models=['nosuch']: 'nosuch' is no file "
     "and not a config tracer ships; expected config names (1b, "),
    (BENCHMARK, "--json_out={tmp}/adir", "--json_out={tmp}/adir: is a directory; "
     "expected a file"),
    (BENCHMARK, "--decode_batch=0", "flag --decode_batch=0: 0 is not a positive"),
    (BENCHMARK, "--decode_prompt=-2", "flag --decode_prompt=-2: -2 is not a positive"),
    (BENCHMARK, "--decode_steps=0", "flag --decode_steps=0: 0 is not a positive"),
    (BENCHMARK, "--decode_prompt=200000", "flags decode_prompt=200000, "
     "decode_steps=16: expected --decode_prompt + --decode_steps <= 131,072"),
    (BENCHMARK, "--suite=decode --decode_models=tiny,gemma9", "flags suite=['decode'], "
     "decode_models=['tiny', 'gemma9']: --decode_models: 'gemma9' is not one of "
     "tiny, gemma2_2b, "),
]


@pytest.mark.parametrize("base,flags,message", BENCHMARK_FLAG_ERRORS,
                         ids=[f"{b[0]}{f}" for b, f, _ in BENCHMARK_FLAG_ERRORS])
def test_benchmark_bad_flags_are_refused_before_any_work(tmp_path, base, flags,
                                                         message):
  (tmp_path / "adir").mkdir()
  (tmp_path / "bad.jsonl").write_text("not json\n")
  args = [a.format(tmp=tmp_path) for a in (*base, *flags.split())]
  line = _error_line(_tracer(*args, cwd=tmp_path))
  assert line.startswith(f"error: {message.format(tmp=tmp_path)}"), line
  assert not (tmp_path / "wd").exists() and not any((tmp_path / "adir").iterdir())


def test_benchmark_batch_the_devices_do_not_divide_is_refused(tmp_path):
  """``tracer benchmark --suite=encode`` splits each batch over every
  device: a batch they do not divide (--batch_size, or a model's default)
  is refused before any model is made. Until an audit on 2026-12-08 it was
  jax's IndivisibleError traceback once the training step compiled."""
  for devices, flags_, message in [
      (8, ["--batch_size=12"], "--batch_size=12: each batch is split over the "
       "8 devices, which 12 examples do not divide; expected a multiple of 8"),
      (16, ["--batch_size=0", "--models=tiny,small"], "--batch_size=0 (model "
       "small's default, 8): each batch is split over the 16 devices, which 8 "
       "examples do not divide; expected a multiple of 16")]:
    env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([str(TRACER), *BENCHMARK, *flags_], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert _error_line(proc) == f"error: {message}"


def test_benchmark_plans_without_running_on_its_default_verify():
  """``tracer benchmark --norun`` (plans only) with the default --verify: the
  factored kernel's check runs a real batch, so the plans go unverified.
  Before 2026-12-08 the check was handed the plan's shapes: a TypeError."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from tracer.launch import benchmark  # pylint: disable=g-import-not-at-top
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS(["test"])
  row, = benchmark.encode_rows("tiny", [64], 8, 0, 1, ["factored"], 0, run=False,
                               per_example=False, verify=True)
  assert row["encode_mem_mb"] > 0 and row["encode_ex_per_s"] != row["encode_ex_per_s"]  # NaN


def test_every_script_on_the_shared_flags_names_those_it_reads():
  """A script that parses the shared flags (``config.run``) declares which of
  ``config.SCRIPT_FLAGS`` it reads; each name is one of them."""
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  for path in sorted((REPO / "launch").glob("*.py")):
    source = path.read_text()
    if "config.run(" not in source or path.name == "config.py":
      continue
    assert "config.run(main, uses=USES" in source, path.name
    module = importlib.import_module(f"tracer.launch.{path.stem}")
    unknown = set(module.USES) - set(config.SCRIPT_FLAGS)
    assert not unknown, (path.name, unknown)


def test_ctrl_c_ends_a_run_in_one_line(tmp_path):
  # (Python's own SIGINT handler: an xdist worker's children inherit SIGINT
  # ignored.)
  code = ("import os, signal; from tracer.launch import cli\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "def main(argv):\n"
          "  try:\n"
          "    os.kill(os.getpid(), signal.SIGINT)\n"
          "  finally:\n"
          "    print('cleaned up')\n"
          "cli.run(main)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                        capture_output=True, text=True, timeout=60)
  assert (proc.returncode, proc.stdout, proc.stderr) == (130, "cleaned up\n",
                                                          "interrupted\n")


def test_no_top_level_launch_package_is_installed(tmp_path):
  code = ("import importlib.util as u; print(u.find_spec('launch'), "
          "u.find_spec('tracer.launch') is not None, u.find_spec('tracer.configs') is not None)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                        capture_output=True, text=True, timeout=60)
  assert proc.stdout.split() == ["None", "True", "True"], proc.stdout + proc.stderr


def test_shipped_gin_configs_work_from_any_directory(tmp_path):
  # small.gin includes configs/tiny.gin: the include resolves too.
  code = ("from absl import flags; from tracer.launch import config; "
          "from tracer.config import ModelConfig; "
          "flags.FLAGS(['x', '--gin_file=configs/small.gin']); config.parse_gin(); "
          "print(config.make(ModelConfig).d_model)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  small = (REPO / "configs" / "small.gin").read_text()
  assert f"ModelConfig.d_model = {proc.stdout.split()[-1]}" in small
  proc = _tracer("tokenize", "--gin_file=nosuch", "--corpus=x", "--output=y",
                 cwd=tmp_path)
  assert proc.returncode == 2
  assert "--gin_file=nosuch: no such file, and not a config tracer ships" in proc.stderr
  assert "tiny" in proc.stderr


def test_quiet_start_and_no_bar_off_a_terminal(tmp_path, corpus):
  """Nothing but tracer's own lines, on stdout; stderr empty (no TensorFlow,
  CUDA or absl noise, no progress bar: not a terminal)."""
  proc = _tracer("tokenize", "--gin_file=tiny", f"--corpus={corpus}",
                 f"--output={tmp_path / 'tok'}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  assert proc.stdout.startswith(f"{tmp_path / 'tok'}: "), proc.stdout


def _on_a_terminal(args, cwd) -> str:
  """Runs ``tracer ARGS`` with stdout and stderr a pseudo-terminal; returns
  what it showed."""
  leader, follower = pty.openpty()
  proc = subprocess.Popen([str(TRACER), *args], cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                          stdout=follower, stderr=follower)
  os.close(follower)
  shown = b""
  while True:
    try:
      data = os.read(leader, 65536)
    except OSError:  # the child closed the terminal
      break
    if not data:
      break
    shown += data
  assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
  os.close(leader)
  return shown.decode(errors="replace")


def test_bar_on_a_terminal_and_noprogress(tmp_path, corpus):
  shown = _on_a_terminal(["tokenize", "--gin_file=tiny", f"--corpus={corpus}",
                          f"--output={tmp_path / 'a'}"], tmp_path)
  assert "tokenize: " in shown and "rows/s" in shown, shown
  shown = _on_a_terminal(["tokenize", "--gin_file=tiny", f"--corpus={corpus}",
                          f"--output={tmp_path / 'b'}", "--noprogress"], tmp_path)
  assert "rows/s]" not in shown and f"{tmp_path / 'b'}: " in shown, shown


def test_progress_bar_counts_rate_and_time_left():
  out = io.StringIO()
  bar = progress_lib.Progress("encode corpus", "rows", file=out)
  for done in (4, 8, 10):
    bar(done, 10)
  bar(12, 10)  # closed at 10/10: later calls draw nothing
  text = out.getvalue()
  assert "encode corpus: 100%" in text and "10/10" in text and "rows/s" in text
  assert "12/10" not in text
  resumed = io.StringIO()
  bar = progress_lib.Progress("train", "steps", initial=90, file=resumed)
  bar(100, 100)
  assert "100/100" in resumed.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
  progress_lib.Progress("scan store", "rows")(5, 10)
  assert capsys.readouterr().err == ""


def test_compiled_programs_are_kept_between_runs(tmp_path, corpus):
  """By default a command keeps its compiled programs in the user's cache
  dir ($XDG_CACHE_HOME/tracer/jax) and a second run reads them instead of
  compiling; ``--compilation_cache=none`` keeps none."""
  # A user's environment: no cache named (conftest names one for the tests).
  env = {k: v for k, v in ENV.items() if not k.startswith("JAX_")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"),
             JAX_LOG_COMPILES="1",  # jax then logs each cache hit on stderr
             # Every program, however fast it compiles on this machine.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cache = tmp_path / "xdg" / "tracer" / "jax"

  def train(workdir, *flags):
    proc = subprocess.run(
        [str(TRACER), "train", "--gin_file=tiny", f"--corpus={corpus}",
         f"--workdir={tmp_path / workdir}",
         "--gin_bindings=OptimizerConfig.total_steps=2",
         "--gin_bindings=OptimizerConfig.warmup_steps=1", *flags],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  def hits(stderr):
    return {line.split("'")[1] for line in stderr.splitlines()
            if "Persistent compilation cache hit for '" in line}

  first = train("a")
  kept = {p.name for p in cache.iterdir()}
  assert any(name.startswith("jit_") for name in kept), kept
  assert not hits(first)
  second = train("b")
  if "Loading XLA:CPU AOT result" in second and not hits(second):
    # XLA rejects every CPU entry on some x86 CPUs (jax-ml/jax#38445: LLVM
    # tuning attributes taken for missing features); nothing to test there.
    pytest.skip("this CPU's XLA rejects its own cached programs")
  assert hits(second), second[-3000:]      # the train step among them
  assert {p.name for p in cache.iterdir()} == kept   # nothing compiled anew

  def compile_one(*flags, **environ):
    """A program no train step has (cheaper than a third train)."""
    code = ("import sys; from absl import flags; import jax; "
            "from tracer.launch import config; flags.FLAGS(sys.argv); "
            "config.use_compilation_cache(); "
            "print(jax.jit(lambda x: (x * 3.0).sum())(jax.numpy.ones(7)))")
    proc = subprocess.run([sys.executable, "-c", code, *flags], cwd=tmp_path,
                          env={**env, **environ}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name for p in cache.iterdir()} - kept

  # Off, also where jax's own variable names the directory.
  assert compile_one("--compilation_cache=none",
                     JAX_COMPILATION_CACHE_DIR=str(cache)) == set()
  assert any("lambda" in name for name in compile_one())  # kept by default


def test_the_compilation_cache_flag_names_the_directory():
  dirs = lambda flag, **environ: config_lib.compilation_cache_dir(flag, environ)
  assert dirs(None) == os.path.join(os.path.expanduser("~"), ".cache", "tracer", "jax")
  assert dirs(None, XDG_CACHE_HOME="/x") == "/x/tracer/jax"
  assert dirs(None, XDG_CACHE_HOME="/x", JAX_COMPILATION_CACHE_DIR="/j") == "/j"
  assert dirs("/c", JAX_COMPILATION_CACHE_DIR="/j") == "/c"
  with pytest.raises(InputError, match="--compilation_cache=gs://b/c: expected a "
                     "local directory"):
    dirs("gs://b/c")
  assert dirs("none", JAX_COMPILATION_CACHE_DIR="/j") is None


def _error_line(proc: subprocess.CompletedProcess) -> str:
  """The one ``error:`` line of a run that bad input ended (exit 2)."""
  report = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, report
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), report
  return lines[0]


def _metrics_inputs(tmp_path) -> tuple[Path, Path]:
  """A queries file and a results file (method ``r``) for tracer evaluate."""
  from tracer import evaluate  # pylint: disable=g-import-not-at-top
  queries = tmp_path / "queries.jsonl"
  queries.write_text(json.dumps({"id": "a", "prompt": "p", "target": "t",
                                 "fact_doc_ids": ["d1"]}) + "\n")
  results = tmp_path / "r.jsonl"
  evaluate.write_results(results, [{"query_id": "a", "proponent_ids": ["d1"],
                                    "proponent_scores": [1.0]}])
  return queries, results


def test_a_reader_that_leaves_early_ends_the_run_quietly(tmp_path):
  """``tracer evaluate ... | head -1``: the reader closes its end before the
  tables are printed (before 2026-12-05: a BrokenPipeError traceback)."""
  queries, results = _metrics_inputs(tmp_path)
  proc = subprocess.Popen([str(TRACER), "evaluate", f"--queries={queries}",
                           f"--results={results}", "--k=1"], cwd=tmp_path, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc.stdout.close()  # long before the run prints (it starts python first)
  stderr = proc.stderr.read().decode()
  assert proc.wait(timeout=300) == 141, stderr
  assert stderr == ""


@pytest.mark.parametrize("scheme", ["file://", "memory://"])
def test_evaluate_merges_into_a_metrics_file_at_a_url(tmp_path, scheme):
  """The metrics file is read as it is written, through tracer.storage: one
  at a URL keeps the numbers other tools wrote there."""
  from tracer import storage  # pylint: disable=g-import-not-at-top
  from tracer.launch import evaluate as launch_evaluate  # pylint: disable=g-import-not-at-top
  queries, results = _metrics_inputs(tmp_path)
  out = f"{scheme}{tmp_path}/m.json"
  storage.write_text(out, json.dumps({"r": {"tail_patch@10": 0.5}}))
  launch_evaluate.run(queries, [results], out)
  assert json.loads(storage.read_text(out)) == {"r": {
      "tail_patch@10": 0.5, **launch_evaluate.run(queries, [results])["r"]}}


def test_evaluate_output_that_is_no_metrics_file_is_one_error_line(tmp_path):
  queries, results = _metrics_inputs(tmp_path)
  (tmp_path / "dir").mkdir()
  (tmp_path / "latin1.json").write_bytes(b'{"r\xe9": {}}')
  (tmp_path / "notes.json").write_text("some notes\n")
  for name, why in [("dir", "is a directory"),
                    ("latin1.json", "not valid UTF-8 (invalid continuation "
                     "byte at byte 3)"),
                    ("notes.json", "bad JSON: Expecting value")]:
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / name
    data = None if out.is_dir() else out.read_bytes()
    line = _error_line(_tracer("evaluate", f"--queries={queries}",
                               f"--results={results}", f"--output={out}",
                               cwd=tmp_path))
    assert line.startswith(f"error: {out}") and why in line, line
    assert line.endswith("expected a metrics file: a JSON object of method -> "
                         "metrics"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert data is None or out.read_bytes() == data


def test_tokenize_output_that_is_a_file_or_a_missing_source(tmp_path, corpus):
  """An --output that is a file is refused before any work; a missing source
  leaves no output directory behind."""
  taken = tmp_path / "notes.txt"
  taken.write_text("mine\n")
  for output in (taken, f"file://{taken}"):
    line = _error_line(_tracer("tokenize", "--gin_file=tiny", f"--corpus={corpus}",
                               f"--output={output}", cwd=tmp_path))
    assert line == (f"error: --output={output}: is a file; expected a directory "
                    "(new, empty, or one tracer wrote)")
  assert taken.read_text() == "mine\n"
  line = _error_line(_tracer("tokenize", "--gin_file=tiny", "--corpus=missing.jsonl",
                             "--output=tok", cwd=tmp_path))
  assert line == "error: missing.jsonl: no such file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
  # A tokenized corpus as the source (before 2026-12-06: "is a directory;
  # expected a file", though --corpus takes one elsewhere).
  assert _tracer("tokenize", "--gin_file=tiny", f"--corpus={corpus}", "--output=tok",
                 cwd=tmp_path).returncode == 0
  line = _error_line(_tracer("tokenize", "--gin_file=tiny", "--corpus=tok",
                             "--output=tok2", cwd=tmp_path))
  assert line == ("error: --corpus=tok: already a tokenized corpus; pass it as "
                  "--corpus to the commands that read one (train, encode, trace), "
                  "or give tokenize its source files")
  assert not (tmp_path / "tok2").exists()


def test_trace_refuses_flags_it_would_ignore(tmp_path):
  """A store's flags with --streaming (only those the user set), and a
  negative --show."""
  common = ["trace", f"--workdir={tmp_path / 'w'}", "--queries=q.jsonl",
            "--corpus=c.jsonl", "--output=r.jsonl"]
  line = _error_line(_tracer(*common, "--streaming", "--store=s", "--check_chunks",
                             cwd=tmp_path))
  assert line.startswith("error: --streaming with --store, --check_chunks: a "
                         "streaming run keeps no store"), line
  for flag in ("--verify_store", "--claim_timeout_s=9"):
    line = _error_line(_tracer(*common, "--streaming", flag, cwd=tmp_path))
    assert line.startswith(f"error: --streaming with {flag.split('=')[0]}:"), line
  # Defaults are not the user's, and streaming honours --max_quarantined: the
  # run goes on (to the missing checkpoint).
  line = _error_line(_tracer(*common, "--streaming", "--max_quarantined=0.5",
                             cwd=tmp_path))
  assert line.endswith("checkpoints: no checkpoint directory"), line
  # --shard_queries: one of three, and only where a scan reads it.
  line = _error_line(_tracer(*common, "--shard_queries=maybe", cwd=tmp_path))
  assert line == ("error: flag --shard_queries=maybe: value should be one of "
                  "<auto|always|never>"), line
  line = _error_line(_tracer("serve", f"--workdir={tmp_path / 'w'}",
                             "--shard_queries=always", cwd=tmp_path))
  assert line.startswith("error: --shard_queries: tracer serve does not read "
                         "it"), line
  line = _error_line(_tracer(*common, "--show=-1", cwd=tmp_path))
  assert line == "error: flag --show=-1: -1 is not a non-negative integer"


def test_view_refuses_server_flags_without_a_server(tmp_path):
  """--queries and --top_k say what to ask a server; alone they would be
  ignored."""
  results = tmp_path / "r.jsonl"
  results.write_text(json.dumps({"query_id": "a", "proponent_ids": ["d1"],
                                 "proponent_scores": [1.0]}) + "\n")
  view = ["view", f"--results={results}", f"--output={tmp_path / 'v.html'}"]
  for flags, named in [(["--top_k=2"], "--top_k"),
                       (["--queries=q.jsonl", "--top_k=2"], "--queries, --top_k")]:
    line = _error_line(_tracer(*view, *flags, cwd=tmp_path))
    assert line.startswith(f"error: {named} without --server: they say what to "
                           "ask a running `tracer serve`"), line
  assert not (tmp_path / "v.html").exists()
  proc = _tracer(*view, cwd=tmp_path)
  assert proc.returncode == 0 and (tmp_path / "v.html").exists(), proc.stderr


def test_a_checkpoint_that_is_a_file_is_refused_as_an_input(tmp_path):
  """Before 2026-12-06 the message offered to make it ("new, empty, or one
  tracer wrote"): words for an output directory."""
  (tmp_path / "ckpt").write_text("weights\n")
  line = _error_line(_tracer("scan", "--gin_file=tiny", f"--checkpoint={tmp_path / 'ckpt'}",
                             "--workdir=w", "--queries=q.jsonl", "--output=r.jsonl",
                             cwd=tmp_path))
  assert line == f"error: --checkpoint={tmp_path / 'ckpt'}: is a file; expected a directory"


def _parsed_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])


def test_a_streaming_output_over_the_default_basis_is_refused(tmp_path):
  """Before 2026-12-07 ``tracer trace --streaming --output=W/basis.npz``
  wrote its results over the basis it had saved there (the next run: 'not a
  basis file')."""
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  _parsed_flags()
  w = tmp_path / "w"
  with flagsaver.flagsaver(workdir=str(w), queries=str(tmp_path / "q.jsonl"),
                           output=str(w / "basis.npz")):
    with pytest.raises(InputError) as e:
      config_lib.check_outputs(query_sets=True, reads_basis=True)
    assert str(e.value) == (f"--output={w / 'basis.npz'}: is the --basis file; "
                            "expected another path (the output would replace it)")
    config_lib.check_outputs(query_sets=True)  # a run on a store reads none there
    with flagsaver.flagsaver(basis=str(tmp_path / "b.npz")):  # given elsewhere
      config_lib.check_outputs(query_sets=True, reads_basis=True)


def test_an_output_named_twice_in_other_spellings_is_refused(tmp_path,
                                                             monkeypatch):
  """Before 2026-12-07 only equal strings were caught: out.jsonl and
  ./out.jsonl (or a link to it) passed, and the second query set's results
  replaced the first's."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "out.jsonl").write_text("")
  os.symlink("out.jsonl", tmp_path / "link.jsonl")
  for outs, named in [("a.jsonl,a.jsonl", "a.jsonl"),
                      ("out.jsonl,./out.jsonl", "out.jsonl (again as ./out.jsonl)"),
                      ("new.jsonl,./new.jsonl", "new.jsonl (again as ./new.jsonl)"),
                      ("out.jsonl,link.jsonl", "out.jsonl (again as link.jsonl)"),
                      (f"{tmp_path}/out.jsonl,out.jsonl",
                       f"{tmp_path}/out.jsonl (again as out.jsonl)")]:
    with pytest.raises(InputError) as e:
      config_lib.query_set_files("qa.jsonl,qb.jsonl", outs)
    first, _, again = named.partition(" ")
    assert str(e.value) == (f"--output: {first} is named more than once"
                            f"{' ' + again if again else ''}; expected one "
                            "output per queries file"), outs
  assert config_lib.query_set_files("qa.jsonl,qb.jsonl", "out.jsonl,b.jsonl") == [
      ("qa.jsonl", "out.jsonl"), ("qb.jsonl", "b.jsonl")]
  # No file at all (before 2026-12-07 found after the model and store loaded,
  # in words naming no flag: "scan_sets: 1 stores and query sets of []").
  with pytest.raises(InputError, match=r"^--queries=,: names no file; expected"):
    config_lib.query_set_files(",", ",")


def test_a_workdir_that_cannot_be_written_is_refused_up_front(tmp_path,
                                                              monkeypatch):
  """Before 2026-12-07 tracer train into a read-only workdir was an OSError
  traceback from Orbax (a new one) or failed after every step (a resumed
  one). Only what a run would make there is checked: an existing store is
  read as it is."""
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  _parsed_flags()
  ro = tmp_path / "ro"
  (ro / "w" / "store").mkdir(parents=True)
  access = os.access  # (root writes anywhere: the denial is the test's)
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      not str(path).startswith(str(ro)) and access(path, mode, **kw)))
  for workdir, made in [("new", ()), ("w", ()), ("w", ("basis.npz",)),
                        ("new", ("store",))]:
    with flagsaver.flagsaver(workdir=str(ro / workdir)):
      with pytest.raises(InputError) as e:
        config_lib.check_workdir_writable(*made)
    where = ro / workdir if workdir == "w" else ro
    assert str(e.value) == (f"--workdir={ro / workdir}: cannot be written, {where} "
                            "is not writable (permission denied); expected a "
                            "path in a writable directory")
  with flagsaver.flagsaver(workdir=str(ro / "w")):
    config_lib.check_workdir_writable("store")  # reused, not made
  with flagsaver.flagsaver(workdir=str(tmp_path / "new")):
    config_lib.check_workdir_writable()


@pytest.mark.parametrize("values,message", [
    ({"silent_process_timeout_s": float("nan")}, "expected seconds in "
     "[0, 1073741823] (0: no limit of tracer's own)"),
    ({"silent_process_timeout_s": float("inf")}, "expected seconds in"),
    ({"silent_process_timeout_s": 1e10}, "expected seconds in"),
    ({"silent_process_timeout_s": -1.0}, "expected seconds in"),
    ({"num_processes": 0}, "0 is not a positive integer"),
    ({"process_id": -1}, "-1 is not a non-negative integer"),
    ({"process_id": 3}, "expected --process_id below --num_processes "
     "(processes count from 0)"),
])
def test_multi_host_flags_out_of_range_are_refused(values, message):
  """Before 2026-12-07 NaN, inf or 1e10 s were tracebacks (jax.distributed's
  heartbeat, twice the timeout, is an int32), and a process id past the
  processes was jax's ValueError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  _parsed_flags()
  with flagsaver.flagsaver():
    with pytest.raises(flags.IllegalFlagValueError) as e:
      for name, value in values.items():
        setattr(flags.FLAGS, name, value)
    assert message in str(e.value)
  with flagsaver.flagsaver(silent_process_timeout_s=1073741823.0, num_processes=4,
                           process_id=3):
    pass
