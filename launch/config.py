"""Gin and absl glue shared by the launch scripts (the only place gin is used).

Gin files bind the fields of tracer's config dataclasses (``tracer.config``)
by class name:
``ModelConfig.d_model = 128``, ``OptimizerConfig.name = 'adafactor'``,
``TrainConfig.batch_size = 32``, ``DataConfig.overflow = 'split'``,
``EncodeConfig.projection_dim = 4096`` ...
"""

from __future__ import annotations

import importlib
import os

# TensorFlow (pulled in by seqio) logs at C++ level on import; keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags
from absl import logging
import gin

from tracer import config as tracer_config

flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'ModelConfig.d_model=64'.")
# Flags shared by several scripts are defined here once, so that scripts can
# import one another.
flags.DEFINE_string("corpus", None, "Corpus: a JSONL file, a glob of JSONL shards, a "
                    "seqio task/mixture name, or a directory made by launch.tokenize.")
flags.DEFINE_string("queries", None, "Queries JSONL file.")
flags.DEFINE_string("workdir", None, "Working directory (checkpoints, store, ...).")
flags.DEFINE_string("checkpoint", None, "Checkpoint directory or step directory; "
                    "default: the latest under WORKDIR/checkpoints.")
flags.DEFINE_string("store", None, "Encodings store: a path, gs://, s3:// or "
                    "memory:// URL; default WORKDIR/store.")
flags.DEFINE_string("basis", None, "R_train's eigenbasis file (path or URL): "
                    "where launch.fit_preconditioner and streaming runs save and "
                    "reuse it (default WORKDIR/basis.npz), and the basis a new "
                    "store is encoded in (a store keeps its own).")
flags.DEFINE_string("output", None, "Results JSONL.")
flags.DEFINE_integer("top_k", 10, "Proponents and opponents per query.")
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


def make(cls):
  """An instance of a registered config dataclass with the gin bindings applied."""
  return _CONFIGURABLE[cls]()


def parse_gin() -> None:
  """Parses --gin_file and --gin_bindings (files relative to cwd or the repo).

  Also quiets library INFO logs (Orbax logs every file it writes) unless
  ``--verbosity`` was given; tracer's scripts print their own progress.
  """
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = []
  for f in FLAGS.gin_file:
    if not os.path.exists(f) and os.path.exists(os.path.join(repo, f)):
      f = os.path.join(repo, f)
    if not os.path.exists(f):
      raise FileNotFoundError(f"--gin_file={f}: no such file")
    files.append(f)
  gin.add_config_file_search_path(repo)
  gin.parse_config_files_and_bindings(files, FLAGS.gin_bindings)


flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")


def initialize_distributed() -> None:
  """Starts jax.distributed when asked to (flags), or on TPU pods/clusters
  where JAX finds the topology itself (``TRACER_DISTRIBUTED=1``)."""
  import jax
  if FLAGS.coordinator_address or os.environ.get("TRACER_DISTRIBUTED") == "1":
    # CPU hosts (tests, CPU clusters) need a cross-process collectives backend;
    # the setting does not touch TPU or GPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif os.environ.get("TRACER_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def setup(required: tuple[str, ...] = ()) -> None:
  """What every launch script's ``main`` does first: gin, multi-host, flags."""
  from absl import app
  parse_gin()
  initialize_distributed()
  for module in FLAGS.seqio_module:
    importlib.import_module(module)
  missing = [f"--{name}" for name in required if not FLAGS[name].value]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required")
