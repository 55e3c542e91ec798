"""Gin and absl glue shared by the launch scripts (the only place gin is used).

Gin files bind the fields of tracer's config dataclasses (``tracer.config``)
by class name:
``ModelConfig.d_model = 128``, ``OptimizerConfig.name = 'adafactor'``,
``TrainConfig.batch_size = 32``, ``DataConfig.overflow = 'split'``,
``EncodeConfig.projection_dim = 4096`` ...
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import importlib
import importlib.resources
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from typing import Iterator, Sequence

# TensorFlow (pulled in by seqio) logs at C++ level on import; keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags
from absl import logging
import gin

from tracer.launch import cli
from tracer.launch import outputs
from tracer.launch.outputs import check_top_k, check_writable, same_file  # re-exported
from tracer import config as tracer_config
from tracer import coordination
from tracer import storage
from tracer.errors import InputError

flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'ModelConfig.d_model=64'.")
# Flags shared by several scripts are defined here once, so that scripts can
# import one another.
flags.DEFINE_string("corpus", None, "Corpus: a JSONL or Parquet file, a glob of shards "
                    "(JSONL plain or gzip/bzip2/xz/zstd, Parquet; records without ids "
                    "get 'file:line'; fields other than 'id' and 'text' named after "
                    "'#': 'FILES#text=content,id=hexsha'), a "
                    "seqio task/mixture name, or a directory made by launch.tokenize.")
flags.DEFINE_string("queries", None, "Queries JSONL file (tracer scan and "
                    "trace: or a comma-separated list, several query sets in "
                    "one pass, with as many --output files).")
flags.DEFINE_string("task_queries", None, "Queries JSONL of the task the traced "
                    "queries belong to (tracer trace, scan, serve): R is "
                    "fitted once from its queries and every query set is "
                    "scored under it, so a few queries (a serve request of "
                    "one) get the task's R. No results are written for them.")
flags.DEFINE_string("workdir", None, "Working directory (checkpoints, store, ...).")
flags.DEFINE_string("checkpoint", None, "Checkpoint directory or step directory; "
                    "default: the latest under WORKDIR/checkpoints.")
flags.DEFINE_string("store", None, "Encodings store: a path, gs://, s3:// or "
                    "memory:// URL; default WORKDIR/store.")
flags.DEFINE_string("basis", None, "R_train's eigenbasis file (path or URL): "
                    "where launch.fit_preconditioner and streaming runs save and "
                    "reuse it (default WORKDIR/basis.npz). A new store is "
                    "encoded in it only when --basis is given: it must exist "
                    "and have been fitted for this run's checkpoint and "
                    "settings (any corpus sample); without --basis the store "
                    "fits its own. An existing store keeps its own: a --basis "
                    "beside it must be that one.")
flags.DEFINE_list("sum_steps", [], "TrackStar summed over these checkpoints "
                  "(steps of the run, beside the traced one): tracer trace "
                  "and tracer scan score each row by the sum (one store per "
                  "step, <store>-step<N>); tracer "
                  "quality and family add the method trackstar_sum.")
flags.DEFINE_string("output", None, "Output file: the results JSONL (tracer view: "
                    "the HTML page; tracer scan and trace: one per --queries "
                    "file, comma-separated).")
flags.DEFINE_integer("top_k", 10, "Proponents and opponents per query.",
                     lower_bound=1)
flags.DEFINE_string("family", None, "Model family (tracer.family) of a model "
                    "trained from scratch (tracer train / demo): tracer_lm (default) "
                    "or gemma; its config class is bindable from gin by name. A "
                    "checkpoint says its own family.")
flags.DEFINE_string("tokenizer", None, "The tokenizer file of a model in its "
                    "family's own format (--family=gemma: Gemma's sentencepiece "
                    "model); sets DataConfig.tokenizer to the family's kind.")
flags.DEFINE_string("opt_state", None, "Released weights (--family with a "
                    "--checkpoint in the family's own format) have no optimizer "
                    "state: an optax state saved beside them, for the gin "
                    "OptimizerConfig's optimizer, to correct the gradients with.")
flags.DEFINE_multi_string("seqio_module", [], "Python modules to import before "
                          "reading inputs, e.g. ones that register seqio tasks "
                          "named by --corpus (repeatable).")
FLAGS = flags.FLAGS


_CONFIGURABLE = {}


def register(cls):
  """Makes a config dataclass bindable from gin under its class name."""
  _CONFIGURABLE[cls] = gin.external_configurable(cls, cls.__name__)
  return cls


for _cls in tracer_config.ALL:
  register(_cls)


def check_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """InputError where ``gin_files`` with ``bindings`` would not parse, or
  would give a config out of range (``check_fields``) to a script run with
  them; the parsed config is cleared after."""
  gin.clear_config()
  try:
    parse_gin(gin_files, bindings)
    check_all()
  finally:
    gin.clear_config()


def check_all() -> None:
  """InputError for the first config dataclass gin binds (``register``)
  whose bound values are out of range (``check_fields``): at the start of
  a run that makes them later, after long work."""
  for cls in _CONFIGURABLE:
    make(cls)


def check_fields(obj) -> None:
  """InputError naming the first field of a config dataclass whose (gin-bound)
  value is not one it may hold (``tracer.config.field_error``)."""
  error = tracer_config.field_error(obj)
  if error:
    raise InputError(f"gin: {error}")


def make(cls):
  """An instance of a registered config dataclass with the gin bindings
  applied, checked (``check_fields``)."""
  try:
    obj = _CONFIGURABLE[cls]()
  except RecursionError:  # a binding that makes the class it binds
    raise InputError(f"gin: {_self_reference(cls)}, without end; expected a "
                     "value (a number, a 'string', a list)") from None
  check_fields(obj)
  return obj


def _self_reference(cls) -> str:
  """Which binding of ``cls`` makes a config object by reference (``@X()``),
  in words: where ``cls`` never stops making itself."""
  for field in dataclasses.fields(cls):
    try:
      value = gin.query_parameter(f"{cls.__name__}.{field.name}")
    except ValueError:
      continue  # not bound
    if isinstance(value, gin.config.ConfigurableReference):
      call = "()" if value.evaluate else ""
      return (f"{cls.__name__}.{field.name} = @{value.selector}{call} makes a "
              f"{value.selector} to make a {cls.__name__}")
  return f"a binding of {cls.__name__} refers back to {cls.__name__}"


def model_family():
  """The family ``--family`` names (default tracer's LM)."""
  from tracer import family as family_lib  # pylint: disable=g-import-not-at-top
  return family_lib.get(FLAGS.family)


def model_config_class():
  """The model config dataclass gin binds for ``--family``: ``ModelConfig``
  for tracer's LM, else the family's ``config_class``."""
  family = model_family()
  return getattr(family, "config_class", tracer_config.ModelConfig)


def default_gin_file() -> None:
  """No --gin_file given (the demo, the quality table): the tiny config of
  ``--family`` (``configs/tiny.gin``, ``configs/gemma_tiny.gin``)."""
  if not FLAGS.gin_file:
    FLAGS.gin_file = ["configs/gemma_tiny.gin" if FLAGS.family == "gemma"
                      else "configs/tiny.gin"]


def shipped_configs() -> Path:
  """The folder of the gin configs tracer ships (the repo's configs/,
  installed as the package ``tracer.configs``); gin ``include``s of
  ``configs/X.gin`` resolve against its parent."""
  return Path(str(importlib.resources.files("tracer.configs")))


def gin_file_path(name: str) -> str:
  """``--gin_file``: a path (relative to the working directory), or a config
  tracer ships, by name: ``configs/tiny.gin``, ``tiny.gin`` or ``tiny``
  work from any directory."""
  if os.path.isdir(name):
    raise InputError(f"--gin_file={name}: is a directory; expected a gin file")
  if os.path.exists(name):
    return name
  shipped = shipped_configs()
  base = os.path.basename(name)
  base = base if base.endswith(".gin") else base + ".gin"
  if name in (base, base[:-4], f"configs/{base}") and (shipped / base).is_file():
    return str(shipped / base)
  known = ", ".join(sorted(p.stem for p in shipped.glob("*.gin")))
  raise GinFileNotFound(f"--gin_file={name}: no such file, and not a config "
                        f"tracer ships ({known})")


def _quiet_library_logs() -> None:
  """Library INFO logs off unless ``--verbosity`` was given."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_gin(gin_files: Sequence[str] | None = None,
              bindings: Sequence[str] | None = None) -> None:
  """Parses --gin_file (``gin_file_path``) and --gin_bindings (or the files
  and bindings given).

  Also quiets library INFO logs (Orbax logs every file it writes) unless
  ``--verbosity`` was given; tracer's scripts print their own progress.
  """
  _quiet_library_logs()
  files = [gin_file_path(f) for f in
           (FLAGS.gin_file if gin_files is None else gin_files)]
  bindings = list(FLAGS.gin_bindings if bindings is None else bindings)
  for path in files:  # gin's own messages name no file ("Unexpected token")
    data = storage.read_bytes(path) or b""
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                       "expected a gin file") from None
    if data.startswith(b"\xef\xbb\xbf"):
      raise InputError(f"{path}: starts with a byte order mark, which gin cannot "
                       "parse; expected the file saved as UTF-8 without one")
  config_class = model_config_class()
  if config_class not in _CONFIGURABLE:
    register(config_class)
  gin.add_config_file_search_path(str(shipped_configs().parent))
  verbosity = logging.get_verbosity()
  # gin tries an include's path as given first, and logs an ERROR when it is
  # not there before it finds the file on the search path: not worth a line.
  logging.set_verbosity(logging.FATAL)
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except tokenize.TokenError:
    # An unclosed bracket or triple-quoted string at the end of a file or
    # of the bindings: Python's tokenizer raises, naming neither.
    raise InputError(f"gin: {_unclosed_site(files, bindings)}") from None
  except NameError as e:
    # `from __gin__ import dynamic_registration` makes gin look each name up
    # among the file's imports, which have none of tracer's configs: gin's
    # message is three lines (what, "In file ..., line N", the binding).
    what, *rest = [line.strip() for line in str(e).splitlines() if line.strip()]
    site = re.fullmatch(r'In file "(.*)", line (\d+)', rest[0]) if rest else None
    where = (f"file {site[1]}, line {site[2]}" if site else "--gin_bindings"
             if rest and rest[0].startswith("In bindings") else "a gin file")
    text = f": {rest[1]!r}" if len(rest) > 1 else ""
    raise InputError(f"gin: {what.rstrip('.')} ({where}{text}); expected "
                     "bindings without `from __gin__ import "
                     "dynamic_registration` (tracer's configs are registered "
                     "by name: Class.field = value)") from None
  except RecursionError:  # gin follows includes without a limit of its own
    raise InputError(f"gin: {', '.join(files)}: a file includes itself (or one "
                     "that includes it); expected includes without a cycle") from None
  except (ValueError, SyntaxError, ImportError, OSError) as e:
    # Unknown configurable or parameter, bad syntax, a bad import or a
    # missing include in a file: gin's message names the file or binding
    # and its line.
    if isinstance(e, SyntaxError):
      lines = "\n".join(bindings).splitlines()
      if e.filename and e.filename != "<string>":
        where, text = f"file {e.filename}, line {e.lineno}", e.text or ""
      else:
        where = "--gin_bindings"
        text = lines[e.lineno - 1] if 0 < (e.lineno or 0) <= len(lines) else ""
      msg = e.msg
      token = re.search(r"malformed node or string(?: on line \d+)?: <ast\.\w+ "
                        r"object at 0x[0-9a-f]+>\s+Failed to parse token '(.*)'$", msg)
      if token:  # gin's words hold the repr of a Python ast node
        msg = (f"cannot read the value {token[1]}; expected a number, a string "
               f"in quotes ('{token[1]}'), a list, @configurable or %macro")
      e = f"{msg} ({where}: {text.strip()!r})"
    macro = re.search(r"No bindings specified for '([\w./]+)/gin\.macro'", str(e))
    if macro:  # gin's message quotes the whole config, naming no file or line
      name = macro[1]
      site = _gin_site(rf"%{re.escape(name)}(?![\w.])", files, bindings)
      raise InputError(f"gin: {site}: macro %{name} is bound nowhere; expected a "
                       f"binding '{name} = VALUE' in a gin file or --gin_bindings") from None
    from tracer import family as family_lib  # pylint: disable=g-import-not-at-top
    hint = next((f"; pass --family={name} to bind {cls}"
                 for cls, name in family_lib.CONFIG_CLASSES.items()
                 if f"No configurable matching '{cls}'" in str(e)), "")
    raise InputError(f"gin: {e}{hint}") from None
  finally:
    logging.set_verbosity(verbosity)
  _check_applied(files, bindings)


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _unclosed(text: str) -> tuple[str, int, str] | None:
  """(what is left open, its line, what would close it) where ``text`` ends
  inside a bracket or a triple-quoted string; None where it does not."""
  opened = []
  try:
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
      if tok.string in _CLOSERS:
        opened.append((tok.string, tok.start[0]))
      elif tok.string in _CLOSERS.values() and opened:
        opened.pop()
  except tokenize.TokenError as e:
    if opened and "string" not in str(e.args[0]):
      bracket, lineno = opened[-1]
      return repr(bracket), lineno, repr(_CLOSERS[bracket])
    lineno, col = e.args[1]
    rest = text.splitlines()[lineno - 1][col:]
    quote = min((rest.find(q), q) for q in ('"""', "'''") if q in rest)[1]
    return f"a string opened with {quote}", lineno, quote
  return None


def _unclosed_site(files: Sequence[str], bindings: Sequence[str]) -> str:
  """What is left open at the end of a gin file (or one it includes) or of
  ``bindings``, and where, in the style of gin's syntax errors."""
  texts = [(f"file {path}", data.decode("utf-8", "replace"))
           for path, data in _gin_texts(files)]
  for where, text in [*texts, ("--gin_bindings", "\n".join(bindings))]:
    found = _unclosed(text)
    if found:
      what, lineno, closer = found
      line = text.splitlines()[lineno - 1].strip()
      where = where if where == "--gin_bindings" else f"{where}, line {lineno}"
      return (f"{what} is never closed; expected a closing {closer} before the "
              f"end ({where}: {line!r})")
  return "a bracket or string is never closed; expected it closed"


def _check_applied(files: Sequence[str], bindings: Sequence[str]) -> None:
  """InputError for a binding gin would keep and never apply: one of a
  scope (``train/ModelConfig.d_model = 64``; tracer's scripts enter no gin
  scope), or a macro no binding uses (``projection_dim = 1024``, a class name
  left out)."""
  text = gin.config_str()
  macros = re.search(r"^# Macros:\n# =+\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
  for line in (macros[1].splitlines() if macros else ()):
    name, _, value = line.partition(" = ")
    if re.fullmatch(r"[\w.]+", name) and not re.search(
        rf"%{re.escape(name)}(?![\w.])", text):
      site = _gin_site(rf"^\s*{re.escape(name)}\s*=", files, bindings)
      fields = [f"{cls.__name__}.{name}" for cls in _CONFIGURABLE
                if name in {f.name for f in dataclasses.fields(cls)}]
      raise InputError(
          f"gin: {site}: {name} = {value} binds a macro no binding uses (%{name}), "
          "so it would change nothing; expected Class.field = value"
          + (f" ({' or '.join(fields)} = {value})" if fields else ""))
  names = "|".join(re.escape(cls.__name__) for cls in _CONFIGURABLE)
  scoped = re.search(rf"^([\w./]+)/({names})\.(\w+) = (.*)$", text, re.M)
  if scoped:
    scope, cls, field, value = scoped.groups()
    site = _gin_site(rf"(^|\s){re.escape(f'{scope}/{cls}.{field}')}\s*=", files,
                     bindings)
    raise InputError(f"gin: {site}: {scope}/{cls}.{field} is a scoped binding, "
                     "which tracer never applies (its scripts enter no gin "
                     f"scope); expected {cls}.{field} = {value}")


_INCLUDE = re.compile(rb"""^[ \t]*include[ \t]+(['"])(.+?)\1""", re.M)


def _gin_texts(paths: Sequence[str]) -> Iterator[tuple[str, bytes]]:
  """(path, bytes) of each gin file of ``paths`` and of the files it
  includes, depth first, each once (found as gin finds them: as given, else
  under ``shipped_configs()``'s parent; one not found is skipped)."""
  seen = set()

  def walk(path: str) -> Iterator[tuple[str, bytes]]:
    if os.path.realpath(path) in seen:
      return
    seen.add(os.path.realpath(path))
    data = storage.read_bytes(path) or b""
    yield path, data
    for m in _INCLUDE.finditer(data):
      inc = m[2].decode("utf-8", "replace")
      found = [p for p in (inc, os.path.join(shipped_configs().parent, inc))
               if os.path.isfile(p)]
      if found:
        yield from walk(found[0])

  for path in paths:
    yield from walk(path)


def gin_sha256(name: str) -> str:
  """sha256 of a ``--gin_file``'s bytes followed by those of the files it
  includes (``_gin_texts``), so an edit to an included file changes it too.
  A file without includes: the sha256 of its bytes."""
  digest = hashlib.sha256()
  for _, data in _gin_texts([gin_file_path(name)]):
    digest.update(data)
  return digest.hexdigest()


def _gin_site(pattern: str, files: Sequence[str], bindings: Sequence[str]) -> str:
  """Where the regex ``pattern`` first matches a binding: ``FILE:LINE`` of a
  gin file (or one it includes), or the ``--gin_bindings`` entry."""
  regex = re.compile(pattern)
  for path, data in _gin_texts(files):
    for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
      if regex.search(line.split("#", 1)[0]):
        return f"{path}:{lineno}"
  return next((f"--gin_bindings={b.strip()!r}" for b in bindings if regex.search(b)),
              "a gin file")


class GinFileNotFound(InputError, FileNotFoundError):
  """--gin_file names no file."""


flags.DEFINE_string("compilation_cache", None, "Where compiled XLA programs are "
                    "kept between runs (a local directory): a rerun, a new "
                    "query set or a restarted server reads them instead of "
                    "compiling again. Default $JAX_COMPILATION_CACHE_DIR, else "
                    "$XDG_CACHE_HOME/tracer/jax (~/.cache/tracer/jax); 'none' "
                    "keeps none.")


def compilation_cache_dir(flag: str | None, environ=os.environ) -> str | None:
  """The persistent compilation cache ``--compilation_cache`` names (None:
  off); unset, ``JAX_COMPILATION_CACHE_DIR``, else the user's cache dir."""
  if flag == "none":
    return None
  if flag and storage.is_url(flag):
    # jax reads gs:// through TensorFlow's file systems, untried here.
    raise InputError(f"--compilation_cache={flag}: expected a local directory "
                     "(on a pod, one on a file system every host mounts)")
  if flag:
    return flag
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "tracer", "jax")


def use_compilation_cache() -> None:
  """Turns on jax's persistent compilation cache (``--compilation_cache``)
  before anything is compiled. jax keeps only programs that took at least
  ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile, keyed on
  the program, the devices, the compiler options and the jax and XLA
  versions, so a kept program is the one a compile would make. A local
  directory that cannot be made is said once and the run compiles as
  before. Only process 0 of a multi-host run writes entries (jax's rule),
  so the other hosts read them only from a directory they share."""
  import jax
  path = compilation_cache_dir(FLAGS.compilation_cache)
  if path and not storage.is_url(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      print(f"compilation cache {path}: cannot be made ({e.strerror}); "
            "compiling without it (--compilation_cache=DIR names another)",
            flush=True)
      path = None
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    jax.config.update("jax_compilation_cache_dir", path)


flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.",
                     lower_bound=0)
# (jax.distributed refused these with a ValueError traceback)
flags.register_multi_flags_validator(
    ["process_id", "num_processes"],
    lambda f: f["process_id"] < f["num_processes"],
    "expected --process_id below --num_processes (processes count from 0)")
flags.DEFINE_float(
    "silent_process_timeout_s", coordination.SILENT_TIMEOUT_S,
    "Multi-host: a process not heard from for this long (killed, out of "
    "memory, stopped, its host lost) ends every process, each saying which, "
    f"with status {coordination.LOST_STATUS} (rerun to resume). 0: leave it to "
    "jax.distributed, which aborts every process after its heartbeat timeout "
    "(100 s).")
# jax.distributed's heartbeat is twice it (coordination.distributed_heartbeat_s),
# an int32 of seconds: NaN, inf and 1e10 were tracebacks. (absl's bounds let
# NaN through: every comparison with it is False.)
_MAX_SILENT_S = (2**31 - 1) // 2
flags.register_validator(
    "silent_process_timeout_s", lambda v: 0 <= v <= _MAX_SILENT_S,
    f"expected seconds in [0, {_MAX_SILENT_S}] (0: no limit of tracer's own)")


def initialize_distributed() -> None:
  """Starts jax.distributed when asked to (flags), or on TPU pods/clusters
  where JAX finds the topology itself (``TRACER_DISTRIBUTED=1``); on several
  processes, a thread that ends this one when another fails or (process
  0's) falls silent for ``--silent_process_timeout_s``
  (``coordination.FailureWatcher``), and one that ends it and tells the
  others on SIGTERM, SIGINT or SIGHUP (``launch.cli``; on one process, one
  that ends it on SIGTERM or SIGHUP once its store claim is given up)."""
  import jax
  if FLAGS.coordinator_address or os.environ.get("TRACER_DISTRIBUTED") == "1":
    # CPU hosts (tests, CPU clusters) need a cross-process collectives backend;
    # the setting does not touch TPU or GPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  silent_s = FLAGS.silent_process_timeout_s  # (its range: a flag validator)
  heartbeat = coordination.distributed_heartbeat_s(silent_s)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, heartbeat_timeout_seconds=heartbeat)
  elif os.environ.get("TRACER_DISTRIBUTED") == "1":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  # (every process sees the same devices: all refuse alike, before work)
  from tracer import partitioning  # pylint: disable=g-import-not-at-top
  partitioning.check_even_processes()
  if coordination.client() is not None:
    # Which processes share a host (or a cgroup), told before any plan
    # shares its memory among them (``memory.host_memory_bytes``).
    from tracer import memory  # pylint: disable=g-import-not-at-top
    coordination.tell_host(memory.host_identity())
    coordination.agree("hosts told", "")
    # Another process's failure (or silence) ends this one with its message
    # (launch.cli), also while it waits for the others at its end
    # (registered after jax's own exit handler, so run before it).
    watcher = coordination.FailureWatcher(cli.other_process_failed,
                                          silent_timeout_s=silent_s)
    atexit.register(watcher.close)
  cli.end_on_signals(coordination)


# Flags of this module and launch.common that only some scripts read. A
# script names those it reads (``run(main, uses=...)``): its --help lists
# them, and any other of them given is refused, not silently ignored.
SCRIPT_FLAGS = ("workdir", "checkpoint", "corpus", "store", "basis", "queries",
                "task_queries", "output", "top_k", "sum_steps", "tokenizer",
                "opt_state", "max_quarantined", "claim_timeout_s", "verify_store",
                "check_chunks", "shard_queries")


# Modules whose flags several scripts read (those only some read are in
# SCRIPT_FLAGS); the other tracer.launch modules' flags are their script's.
_SHARED_FLAG_MODULES = ("tracer.launch.config", "tracer.launch.common",
                        "tracer.launch.progress")


def run(main, uses: Sequence[str] | None = None, shows: Sequence[str] = ()) -> None:
  """``cli.run(main)``; with ``uses`` (names in ``SCRIPT_FLAGS``), those are
  the script's own flags in its --help, and another of ``SCRIPT_FLAGS``
  given to it is an InputError. ``shows``: other modules' flags it reads,
  listed in its --help too."""
  if uses is None:
    cli.run(main)
    return
  # absl's --help lists the key flags of the module named sys.argv[0].
  for name in (*uses, *shows, "gin_file", "gin_bindings"):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])

  def checked(argv):
    unused = [f"--{n}" for n in SCRIPT_FLAGS
              if n in FLAGS and FLAGS[n].present and n not in uses]
    # And another script's own flags, defined where this one imports it
    # (demo imports trace: `tracer demo --streaming` was ignored, as were
    # `tracer quality --show` and `tracer family --sgd_learning_rate`).
    unused += [f"--{flag.name}" for module, defined in FLAGS.flags_by_module_dict().items()
               if module.startswith("tracer.launch.") and module not in _SHARED_FLAG_MODULES
               for flag in defined if flag.present and flag.name not in shows]
    if unused:
      _tell_the_others_first()
      script = "tracer " + os.path.basename(sys.argv[0]).removesuffix(
          ".py").replace("_", "-")
      it = "it" if len(unused) == 1 else "them"
      raise InputError(f"{', '.join(unused)}: {script} does not read {it}, so "
                       f"{'it' if it == 'it' else 'they'} would be ignored; "
                       f"expected only its own flags ({script} --help)")
    return main(argv)
  cli.run(checked)


def _tell_the_others_first() -> None:
  """Joins jax.distributed (when the flags ask for it) before an error that
  comes before ``setup``'s join, so that ``launch.cli`` can pass the error
  on: a process that failed unjoined left the others waiting for it until
  jax's 5-minute registration deadline, then aborting (before 2026-12-07).
  A join that fails leaves the error to be said alone."""
  if not (FLAGS.coordinator_address or os.environ.get("TRACER_DISTRIBUTED") == "1"):
    return
  try:
    initialize_distributed()
  except Exception:  # pylint: disable=broad-except
    pass


def query_set_files(queries: str, output: str) -> list[tuple[str, str]]:
  """``--queries`` and ``--output`` as (queries file, output file) pairs:
  one of each, or comma-separated lists of as many (the query sets of
  ``tracer scan`` and ``tracer trace``, one output each)."""
  split = lambda value: [v.strip() for v in value.split(",") if v.strip()]
  files, outs = split(queries), split(output)
  if not files:  # (`--queries=,`: no set, found after the model and store loaded)
    raise InputError(f"--queries={queries}: names no file; expected a queries "
                     "file, or several separated by commas")
  if len(files) != len(outs):
    count = lambda n: f"{n} file{'s' if n != 1 else ''}"
    raise InputError(f"--output: {count(len(outs))} for {count(len(files))} in "
                     "--queries; expected one output per queries file, in order")
  # One file in two spellings (out.jsonl, ./out.jsonl) or through a link is
  # named twice too: the second set's results replaced the first's.
  twice = next((o for i, o in enumerate(outs)
                if any(same_file(o, other) for other in outs[:i])), None)
  if twice:
    first = next(other for other in outs if same_file(twice, other))
    again = "" if first == twice else f" (again as {twice})"
    raise InputError(f"--output: {first} is named more than once{again}; "
                     "expected one output per queries file")
  return list(zip(files, outs))


def setup(required: tuple[str, ...] = (), output_is: str = "file",
          query_sets: bool = False, reads_basis: bool = False) -> None:
  """What every launch script's ``main`` does first: gin, multi-host, flags.
  ``output_is``: what ``--output`` names, "file" or "directory";
  ``query_sets``: ``--queries`` and ``--output`` may be lists
  (``query_set_files``); ``reads_basis``: the script reads (and saves) the
  basis at its default, WORKDIR/basis.npz, when --basis is not given (a
  streaming ``tracer trace``)."""
  from absl import app
  # Joined first: an error in gin (a file one host lacks) then reaches the
  # other processes (launch.cli); before 2026-12-07 they waited 5 minutes
  # for this one, then aborted. Joining compiles nothing, so the cache's
  # setting still comes before any compile.
  _quiet_library_logs()
  initialize_distributed()
  parse_gin()
  use_compilation_cache()
  for module in FLAGS.seqio_module:
    importlib.import_module(module)
  missing = [f"--{name}" for name in required if not FLAGS[name].value]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required")
  # Before any work: a workdir or store that is a file, an output that
  # cannot be written or would replace an input.
  for name, kind in (("workdir", "directory"), ("store", "directory"),
                     ("checkpoint", "directory"), ("basis", "file")):
    outputs.check_kind(FLAGS[name].value, f"--{name}", kind,
                       written=name != "checkpoint")
  check_outputs(output_is, query_sets, reads_basis)


def check_workdir_writable(*made: str) -> None:
  """InputError unless --workdir can be written, where this run writes into
  it: always (``made`` empty: a training run's checkpoints and log), or
  where one of ``made`` (names in it: "store", "basis.npz") is not there yet
  and would be made. Before, a read-only workdir was an OSError traceback
  from Orbax, or failed after every training step."""
  local = storage.local_path(FLAGS.workdir) if FLAGS.workdir else None
  if local and (not made or not all(os.path.exists(os.path.join(local, name))
                                    for name in made)):
    check_writable(FLAGS.workdir, "--workdir", "directory")


def check_outputs(output_is: str = "file", query_sets: bool = False,
                  reads_basis: bool = False) -> None:
  """InputError where an --output cannot be written or would replace an
  input, given or read at its default (``setup``'s arguments)."""
  if not FLAGS.output:
    return
  pairs = (query_set_files(FLAGS.queries, FLAGS.output)
           if query_sets and FLAGS.queries else [(FLAGS.queries, FLAGS.output)])
  given = {name: FLAGS[name].value for name in (
      "task_queries", "corpus", "basis", "store", "checkpoint")}
  if FLAGS.workdir:  # the defaults (launch.common), as they would be read
    given["store"] = given["store"] or storage.join(FLAGS.workdir, "store")
    given["checkpoint"] = given["checkpoint"] or storage.join(FLAGS.workdir,
                                                              "checkpoints")
    if reads_basis:  # (results written over it: the next run's basis was gone)
      given["basis"] = given["basis"] or storage.join(FLAGS.workdir, "basis.npz")
  for _, output in pairs:
    check_writable(output, "--output", output_is)
    for queries, _ in pairs:
      outputs.check_not_an_input(output, {"queries": queries, **given})


def integers(flag: str, values) -> list[int]:
  """A list flag's values as integers; InputError naming the flag."""
  out = []
  for v in values:
    try:
      out.append(int(v))
    except ValueError:
      raise InputError(f"--{flag}: {v!r} is not an integer; expected a "
                       "comma-separated list of integers") from None
  return out


def _macro_value(value, seen=frozenset()):
  """``value`` (a gin binding's, as ``gin.query_parameter`` gives it) with
  its macros (``%D``, and a macro's own macros, also inside lists, tuples
  and dicts) replaced by their values; a macro in a cycle is left as it is."""
  if isinstance(value, gin.config.ConfigurableReference):
    name = "/".join(value.scopes)
    if value.selector != "gin.macro" or name in seen:
      return value
    return _macro_value(gin.query_parameter(f"{name}/gin.macro.value"),
                        seen | {name})
  if isinstance(value, (list, tuple)):
    return type(value)(_macro_value(v, seen) for v in value)
  if isinstance(value, dict):
    return {k: _macro_value(v, seen) for k, v in value.items()}
  return value


def check_bound_fields(cls, have, where: str, what: str = "a checkpoint of",
                       expected: str = "the gin files the model was trained with"
                       ) -> None:
  """Raises InputError if a gin binding of ``cls`` (a config dataclass) names
  a value other than ``have``'s (an instance, or a dict of some fields): e.g.
  ``--gin_file=configs/small.gin`` with a checkpoint of the tiny model, whose
  own ModelConfig would silently win. ``what``, ``expected``: the message's
  words for ``have``'s owner and for what would agree with it."""
  if not isinstance(have, dict):
    have = {f.name: getattr(have, f.name) for f in dataclasses.fields(have)}
  owner = what.split()[1]  # "checkpoint" of "a checkpoint of"
  diffs = []
  for name, value in have.items():
    try:
      bound = _macro_value(gin.query_parameter(f"{cls.__name__}.{name}"))
    except ValueError:
      continue  # not bound
    if bound != value:
      diffs.append(f"{cls.__name__}.{name}: the {owner} has {value!r}, the gin "
                   f"bindings say {bound!r}")
  if diffs:
    raise InputError(f"{where}: {what} another {cls.__name__} than the "
                     f"gin bindings name ({'; '.join(diffs)}); expected {expected}")
