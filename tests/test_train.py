"""Tests of training: the loss falls, the batch order, resuming, gin configs."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil

from absl import flags
from absl.testing import flagsaver
import gin
import jax
import numpy as np
import pytest

from tracer.launch import config as launch_config
from tracer.launch import train as launch_train
from tracer import checkpoint as ckpt_lib
from tracer import config as tracer_config
from tracer import facts
from tracer import model as model_lib
from tracer import memory
from tracer import train as train_lib

TINY_GIN = """
ModelConfig.max_len = 32
ModelConfig.d_model = 32
ModelConfig.num_layers = 1
ModelConfig.num_heads = 2
ModelConfig.d_ff = 64
OptimizerConfig.learning_rate = 1e-2
TrainConfig.batch_size = 16
"""


@pytest.fixture(autouse=True)
def gin_bindings():
  """Each test binds its own gin config; none leaks into other tests."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  records = facts.generate(facts.FactsConfig(facts_per_bucket=5,
                                             distractor_docs=10))[0]
  return str(facts.write_jsonl(tmp_path_factory.mktemp("facts") / "corpus.jsonl",
                               records))


def _train(corpus, workdir, **bindings):
  gin.clear_config()
  gin.parse_config(TINY_GIN + "\n".join(f"{k} = {v!r}" for k, v in bindings.items()))
  return launch_train.train(corpus, str(workdir))


def _log(workdir):
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_loss_falls_on_fact_corpus(corpus_path, tmp_path):
  metrics = _train(corpus_path, tmp_path, **{
      "OptimizerConfig.warmup_steps": 5, "OptimizerConfig.total_steps": 40,
      "TrainConfig.log_every": 5, "TrainConfig.checkpoint_every": 40})
  log = _log(tmp_path)
  assert [m["step"] for m in log] == list(range(5, 45, 5))
  assert metrics == log[-1]
  losses = [m["loss"] for m in log]
  # Steps 1-5 average ~6 nats (uniform over 259 bytes is 5.56); after 40 steps
  # a 1-layer model has learned English-like byte statistics.
  assert losses[0] > 5.0
  assert losses[-1] < 0.65 * losses[0], losses
  assert losses[-1] < min(losses[:-1]) + 0.05, losses

  ckpt = ckpt_lib.restore(os.path.join(tmp_path, "checkpoints"))
  assert ckpt.step == 40
  assert ckpt.model_config == model_lib.ModelConfig(
      max_len=32, d_model=32, num_layers=1, num_heads=2, d_ff=64)
  assert ckpt.optimizer_config.total_steps == 40
  assert {k: ckpt.data_config[k] for k in ("tokenizer", "overflow", "corpus",
                                           "num_rows")} == {
      "tokenizer": "byte", "overflow": "truncate", "corpus": corpus_path,
      "num_rows": 138}
  assert int(ckpt.opt_state[1][0].count) == 40  # AdamW's step count


def test_batch_order_is_a_function_of_the_step():
  a = [train_lib.batch_rows(s, 8, 20, seed=0) for s in range(10)]
  b = [train_lib.batch_rows(s, 8, 20, seed=0) for s in reversed(range(10))][::-1]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  flat = np.concatenate(a)  # 80 positions: 4 epochs of 20 rows
  for epoch in range(4):
    assert sorted(flat[20 * epoch:20 * (epoch + 1)]) == list(range(20))
  assert not np.array_equal(flat[:20], flat[20:40])  # each epoch reshuffles
  assert not np.array_equal(train_lib.batch_rows(0, 8, 20, seed=1), a[0])
  assert a[0].dtype == np.int64 and a[0].shape == (8,)


def test_gin_refuses_optimizer_values_that_cannot_train():
  # Each of these trained before without a word (learning_rate=-1 ascends
  # the loss; eps=0 makes a never-used embedding row NaN; clip_norm=0
  # learns nothing), or failed deep inside numpy (a size past int32).
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  from tracer.config import EncodeConfig, ModelConfig, OptimizerConfig, PreconditionerConfig  # pylint: disable=g-import-not-at-top
  for cls, fields, message in [
      (OptimizerConfig, {"learning_rate": -1.0}, "learning_rate = -1.0: expected a value > 0"),
      (OptimizerConfig, {"learning_rate": float("inf")}, "learning_rate = inf: expected a finite number"),
      (OptimizerConfig, {"b2": 1.0}, "b2 = 1.0: expected a value in [0, 1)"),
      (OptimizerConfig, {"b1": float("nan")}, "b1 = nan: expected a finite number"),
      (OptimizerConfig, {"eps": 0.0}, "eps = 0.0: expected a value > 0"),
      (OptimizerConfig, {"clip_norm": 0}, "clip_norm = 0: expected a value > 0"),
      (OptimizerConfig, {"weight_decay": -0.1}, "weight_decay = -0.1: expected a value >= 0"),
      (OptimizerConfig, {"final_lr_fraction": 2.0}, "final_lr_fraction = 2.0: expected a value in [0, 1]"),
      (OptimizerConfig, {"adafactor_decay_rate": 0.0}, "adafactor_decay_rate = 0.0: expected a value in (0, 1]"),
      (ModelConfig, {"rope_base": 0.5}, "rope_base = 0.5: expected a value > 1"),
      (ModelConfig, {"max_len": 99999999999999999999}, "max_len = 99999999999999999999: expected a value < 2**31"),
      (ModelConfig, {"max_len": -3}, "max_len = -3: expected a value >= 1"),
      (PreconditionerConfig, {"sample_seed": -1}, "sample_seed = -1: expected a value >= 0"),
      # inf in float32 (before 2026-12-05 epsilon = 1e300 made every
      # corrected gradient non-finite, blamed on the checkpoint).
      (EncodeConfig, {"epsilon": 1e300}, "epsilon = 1e+300: expected a value float32 "
       "holds (at most 3.403e+38 in size)")]:
    with pytest.raises(InputError, match=re.escape(f"gin: {cls.__name__}.") + re.escape(message)):
      config.check_fields(cls(**fields))
  config.check_fields(OptimizerConfig(b1=0.0, weight_decay=0.0, final_lr_fraction=1.0,
                                      adafactor_decay_rate=1.0))
  config.check_fields(ModelConfig(max_len=2**31 - 1))
  config.check_fields(EncodeConfig(epsilon=3e38))


def test_resume_equals_uninterrupted_run(corpus_path, tmp_path):
  # Warmup (10 steps) outlasts both interruptions, so the learning rate at
  # resume depends on the restored step count; after it the rate is constant,
  # so it does not depend on total_steps either.
  common = {"OptimizerConfig.warmup_steps": 10,
            "OptimizerConfig.final_lr_fraction": 1.0,
            "TrainConfig.log_every": 2, "TrainConfig.checkpoint_every": 4}
  full = tmp_path / "full"
  _train(corpus_path, full, **common, **{"OptimizerConfig.total_steps": 12})
  reference = ckpt_lib.restore(str(full / "checkpoints"))
  assert reference.step == 12
  # The steps a run keeps, as `tracer family` reads them before training.
  kept = lambda every, keep, total: launch_train.kept_steps(
      tracer_config.TrainConfig(checkpoint_every=every, keep_checkpoints=keep), total)
  assert ckpt_lib.saved_steps(str(full / "checkpoints")) == kept(4, 2, 12) == [8, 12]
  assert kept(7, 2, 20) == [14, 20] and kept(7, 9, 20) == [7, 14, 20]
  assert kept(1000, 3, 10) == [10] and kept(50, 100, 100) == [50, 100]

  # Stopped after 6 steps, then rerun with more total steps.
  short = tmp_path / "short"
  _train(corpus_path, short, **common, **{"OptimizerConfig.total_steps": 6})
  assert ckpt_lib.restore(str(short / "checkpoints")).step == 6
  _train(corpus_path, short, **common, **{"OptimizerConfig.total_steps": 12})
  resumed = ckpt_lib.restore(str(short / "checkpoints"))
  assert resumed.step == 12
  _assert_trees_equal(resumed.params, reference.params)
  _assert_trees_equal(resumed.opt_state, reference.opt_state)
  # The resumed run logged only the steps it ran.
  assert [m["step"] for m in _log(short)] == [2, 4, 6, 8, 10, 12]
  np.testing.assert_allclose([m["loss"] for m in _log(short)],
                             [m["loss"] for m in _log(full)], rtol=1e-6)

  # Killed after the step-8 checkpoint: the rerun picks it up.
  crashed = tmp_path / "crashed"
  shutil.copytree(full, crashed)
  shutil.rmtree(crashed / "checkpoints" / "12")
  assert ckpt_lib.restore(str(crashed / "checkpoints")).step == 8
  _train(corpus_path, crashed, **common, **{"OptimizerConfig.total_steps": 12})
  again = ckpt_lib.restore(str(crashed / "checkpoints"))
  assert again.step == 12
  _assert_trees_equal(again.params, reference.params)
  _assert_trees_equal(again.opt_state, reference.opt_state)
  # Steps 10 and 12, logged by the run that lost its step-12 checkpoint, are
  # logged once: the rerun drops them before it logs them again.
  assert [m["step"] for m in _log(crashed)] == [2, 4, 6, 8, 10, 12]

  # A workdir is not resumed with another model, optimizer, data rule,
  # batches or corpus: the run would not be the uninterrupted one.
  with pytest.raises(ValueError, match="cannot resume.*ModelConfig, "
                     "OptimizerConfig differ .*OptimizerConfig.name: the "
                     "checkpoint has 'adamw', this run has 'adafactor'"):
    _train(corpus_path, crashed, **common, **{
        "OptimizerConfig.total_steps": 16, "ModelConfig.d_model": 64,
        "OptimizerConfig.name": "adafactor"})
  for binding, message in [
      ({"OptimizerConfig.learning_rate": 0.5}, "OptimizerConfig.learning_rate: "
       "the checkpoint has 0.01, this run has 0.5"),
      ({"TrainConfig.batch_size": 8}, "TrainConfig.batch_size: the checkpoint "
       "has 16, this run has 8"),
      ({"TrainConfig.seed": 3}, "TrainConfig.seed: the checkpoint has 0, this "
       "run has 3"),
      ({"DataConfig.overflow": "split"}, "DataConfig.overflow: the checkpoint "
       "has 'truncate', this run has 'split'")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      _train(corpus_path, crashed, **common, **{"OptimizerConfig.total_steps": 16},
             **binding)
  with open(corpus_path) as f:
    lines = f.readlines()
  edited = tmp_path / "edited.jsonl"  # the same count of rows, in another order
  edited.write_text("".join(lines[::-1]))
  with pytest.raises(ValueError, match="cannot resume, the checkpoint's corpus "
                     "differ .*fingerprint .*the same count, other rows"):
    _train(str(edited), crashed, **common, **{"OptimizerConfig.total_steps": 16})
  assert ckpt_lib.restore(str(crashed / "checkpoints")).step == 12
  # Fewer total steps than the checkpoint has taken is an error (before
  # 2026-12-04 the run returned nothing, silently); as many is a no-op.
  with pytest.raises(ValueError, match="the checkpoint is at step 12, past "
                     "OptimizerConfig.total_steps=8; expected total_steps of at "
                     "least 12"):
    _train(corpus_path, crashed, **common, **{"OptimizerConfig.total_steps": 8})
  _train(corpus_path, crashed, **common, **{"OptimizerConfig.total_steps": 12})
  assert [m["step"] for m in _log(crashed)] == [2, 4, 6, 8, 10, 12]
  # Mid-run, total_steps is the learning rates of the steps left: refused
  # (before 2026-12-07 taken: the resumed run was not the uninterrupted one).
  shutil.rmtree(crashed / "checkpoints" / "12")
  with pytest.raises(ValueError, match=re.escape(
      "OptimizerConfig.total_steps: the checkpoint has 12, this run has 16 (the "
      "schedule of the steps after step 8: only a finished run's total_steps "
      "may change)")):
    _train(corpus_path, crashed, **common, **{"OptimizerConfig.total_steps": 16})
  assert ckpt_lib.restore(str(crashed / "checkpoints")).step == 8


def test_bad_train_configs_fail_early(corpus_path, tmp_path):
  with pytest.raises(ValueError, match=re.escape(
      "ModelConfig: the model embeds 100 token ids (vocab_size), fewer than the "
      "tokenizer's 259")):
    _train(corpus_path, tmp_path, **{"ModelConfig.vocab_size": 100})
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the 8"):
    _train(corpus_path, tmp_path, **{"TrainConfig.batch_size": 12})
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
  # XLA's count of a step's memory, before any batch is read (before
  # 2026-12-06: RESOURCE_EXHAUSTED after 162 s of the first step). The
  # directories the run made are removed again (before 2026-12-07 the new
  # workdir and its checkpoints/ were left behind).
  (tmp_path / "new").mkdir()
  (tmp_path / "new" / "kept.txt").write_text("")
  with pytest.raises(ValueError, match=re.escape(
      "TrainConfig.batch_size=8000000: a training step takes ") + r"[\d,.]+ GiB on "
      r"each of this host's 8 devices, [\d,.]+ GiB in all \(XLA's count after "
      r"compiling\), more than this host's [\d,.]+ GiB; expected a smaller "
      r"TrainConfig.batch_size"):
    _train(corpus_path, tmp_path / "new" / "w",
           **{"TrainConfig.batch_size": 8_000_000})
  assert os.listdir(tmp_path / "new") == ["kept.txt"]


def test_a_program_past_a_devices_memory_is_refused():
  compiled = jax.jit(lambda x: x @ x.T).lower(
      jax.ShapeDtypeStruct((1024, 256), np.float32)).compile()
  need = memory.compiled_bytes(compiled)
  assert need >= 1024 * 1024 * 4  # the [1024, 1024] output at least
  memory.check_compiled_memory(compiled, "x", "y", device_have=need)
  with pytest.raises(ValueError, match=re.escape(
      f"the product takes {need / 2**20:.1f} MiB on each device (XLA's count "
      f"after compiling), more than a device's {(need - 1) / 2**20:.1f} MiB; "
      "expected fewer rows")):
    memory.check_compiled_memory(compiled, "the product", "fewer rows",
                                   device_have=need - 1)
  with pytest.raises(ValueError, match=f"more than this host's {need / 2**20:.1f} MiB"):
    memory.check_compiled_memory(compiled, "the product", "fewer rows",
                                   have=need)  # 8 devices share it


def _gin_file_values(path):
  values = {}
  with open(path) as f:
    for line in f:
      if "=" in line and not line.lstrip().startswith(("#", "include")):
        key, value = line.split("=", 1)
        values[key.strip()] = ast.literal_eval(value.strip())
  return values


def test_gin_files_and_bindings():
  tiny = _gin_file_values(os.path.join(os.path.dirname(__file__), "..", "configs",
                                       "tiny.gin"))
  with flagsaver.flagsaver(gin_file=["configs/tiny.gin"],
                           gin_bindings=["ModelConfig.d_model = 64",
                                         "OptimizerConfig.name = 'adafactor'"]):
    launch_config.parse_gin()
  model = launch_config.make(model_lib.ModelConfig)
  assert model.d_model == 64  # the binding beats the file
  assert (model.num_layers, model.max_len) == (tiny["ModelConfig.num_layers"],
                                               tiny["ModelConfig.max_len"])
  opt = launch_config.make(train_lib.OptimizerConfig)
  assert opt.name == "adafactor"
  assert opt.total_steps == tiny["OptimizerConfig.total_steps"]
  train_config = launch_config.make(tracer_config.TrainConfig)
  assert train_config.batch_size == tiny["TrainConfig.batch_size"]
  with flagsaver.flagsaver(gin_file=["configs/none.gin"]):
    with pytest.raises(FileNotFoundError, match="none.gin"):
      launch_config.parse_gin()


def test_gin_macros_are_compared_by_their_values():
  # Before 2026-12-07 `D = 16` with `ModelConfig.d_model = %D` was compared
  # as '%D' with a checkpoint's 16, and refused.
  have = model_lib.ModelConfig(d_model=16, num_heads=2)
  launch_config.parse_gin([], ["E = 16", "D = %E", "ModelConfig.d_model = %D",
                               "ModelConfig.num_heads = 2"])
  launch_config.check_bound_fields(model_lib.ModelConfig, have, "ckpt/3")
  gin.clear_config()
  launch_config.parse_gin([], ["D = 32", "ModelConfig.d_model = %D"])
  with pytest.raises(launch_config.InputError, match=re.escape(
      "ModelConfig.d_model: the checkpoint has 16, the gin bindings say 32")):
    launch_config.check_bound_fields(model_lib.ModelConfig, have, "ckpt/3")


def test_gin_values_it_cannot_read_are_one_line():
  # Before 2026-12-07: an unquoted string gave gin's words with the repr of a
  # Python ast node ("<ast.Name object at 0x7f...>"), and a class bound to
  # make itself was a RecursionError traceback.
  with pytest.raises(launch_config.InputError) as e:
    launch_config.check_gin([], ["ModelConfig.activation = relu"])
  assert str(e.value) == (
      "gin: cannot read the value relu; expected a number, a string in quotes "
      "('relu'), a list, @configurable or %macro (--gin_bindings: "
      "'ModelConfig.activation = relu')")
  with pytest.raises(launch_config.InputError, match=re.escape(
      "gin: ModelConfig.d_model = @ModelConfig() makes a ModelConfig to make a "
      "ModelConfig, without end; expected a value")):
    launch_config.check_gin([], ["ModelConfig.d_model = @ModelConfig()"])


def test_gin_dynamic_registration_is_one_line(tmp_path):
  # Before 2026-12-07 gin's NameError (its names looked up among the file's
  # imports, which hold none of tracer's configs) was a traceback.
  path = tmp_path / "dyn.gin"
  path.write_text("from __gin__ import dynamic_registration\n"
                  "EncodeConfig.seed = 1\n")
  expected = ("expected bindings without `from __gin__ import "
              "dynamic_registration` (tracer's configs are registered by name: "
              "Class.field = value)")
  with pytest.raises(launch_config.InputError) as e:
    launch_config.check_gin([str(path)], [])
  assert str(e.value) == (
      "gin: 'EncodeConfig' was not provided by an import statement (file "
      f"{path}, line 2: 'EncodeConfig.seed = 1'); {expected}")
  with pytest.raises(launch_config.InputError) as e:
    launch_config.check_gin([], ["from __gin__ import dynamic_registration",
                                 "EncodeConfig.seed = 1"])
  assert str(e.value) == (
      "gin: 'EncodeConfig' was not provided by an import statement "
      f"(--gin_bindings: 'EncodeConfig.seed = 1'); {expected}")


def test_gin_sha256_reads_includes(tmp_path, monkeypatch):
  # Before 2026-12-05 a sweep hashed a gin file's own bytes: an edit to a
  # file it includes left the hash, and the sweep's finished runs, as they were.
  import hashlib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  (tmp_path / "inner.gin").write_text("A.x = 1\n")
  (tmp_path / "outer.gin").write_text(
      "# include 'commented.gin'\ninclude 'inner.gin'\ninclude 'outer.gin'\n"
      "include \"configs/tiny.gin\"\n")
  first = launch_config.gin_sha256("outer.gin")
  assert first == launch_config.gin_sha256(str(tmp_path / "outer.gin"))
  (tmp_path / "inner.gin").write_text("A.x = 2\n")
  assert launch_config.gin_sha256("outer.gin") != first
  # The shipped config it includes is read from the package (it is not in
  # the working directory); a file without includes hashes as its bytes.
  tiny = launch_config.shipped_configs() / "tiny.gin"
  assert launch_config.gin_sha256("tiny") == hashlib.sha256(
      tiny.read_bytes()).hexdigest()
  expected = hashlib.sha256((tmp_path / "outer.gin").read_bytes()
                            + b"A.x = 2\n" + tiny.read_bytes()).hexdigest()
  assert launch_config.gin_sha256("outer.gin") == expected


def test_learning_rate_schedule():
  c = train_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110,
                                final_lr_fraction=0.1)
  lr = train_lib.learning_rate_schedule(c)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-6)


def test_a_damaged_train_log_is_named_not_a_traceback(tmp_path):
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  log = tmp_path / "train_log.jsonl"
  log.write_text('{"step": 10, "loss": 2.0}\n\n{"step": 20, "loss": 1.5}\n'
                 '{"step": 30, "loss": 1.0}\n')
  assert launch_train._log_up_to(str(log), 20) == [
      '{"step": 10, "loss": 2.0}\n', '{"step": 20, "loss": 1.5}\n']
  log.write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "lo\n')  # cut short
  with pytest.raises(InputError, match=r"train_log.jsonl:2: not a train log line"):
    launch_train._log_up_to(str(log), 20)
