"""Model families (``tracer.family``): the registry, checkpoints that record
their family, and explicit param shardings for the encoder."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import tracer
from tracer import checkpoint as ckpt_lib
from tracer import data as data_lib
from tracer import family as family_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import tailpatch
from tracer import train as train_lib
from tracer.errors import InputError

MODEL = model_lib.ModelConfig(vocab_size=259, max_len=16, d_model=32, num_layers=1,
                              num_heads=2, d_ff=64)
OPT = train_lib.OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=1,
                                total_steps=4)


def _examples(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return data_lib.stack_examples([
      data_lib.corpus_example(rng.integers(3, 259, size=int(k)).astype(np.int32),
                              MODEL.max_len)
      for k in rng.integers(4, MODEL.max_len + 1, size=n)])


def test_registry():
  assert family_lib.get(None) is family_lib.LM
  assert family_lib.get("tracer_lm") is family_lib.LM
  assert "gemma" in family_lib.names() and "tracer_lm" in family_lib.names()
  with pytest.raises(InputError, match=r"model family 'llama': expected one of "
                     r"gemma, tracer_lm"):
    family_lib.get("llama")
  if importlib.util.find_spec("gemma") is None:
    with pytest.raises(InputError, match=r"pip install 'tracer\[gemma\]'"):
      family_lib.get("gemma")


def test_lm_family_is_the_model_module():
  params = family_lib.LM.init_params(MODEL, seed=3)
  ex = jax.tree.map(lambda x: x[0], _examples(1))
  np.testing.assert_array_equal(
      family_lib.LM.loss_fn(MODEL)(params, ex),
      model_lib.example_loss(MODEL, params, ex))
  assert family_lib.LM.config_from_dict(family_lib.LM.config_to_dict(MODEL)) == MODEL
  assert family_lib.LM.max_len(MODEL) == 16


@dataclasses.dataclass(frozen=True)
class _Scaled:
  """A second family for the test: tracer's LM with every loss doubled, and
  its params replicated (its own sharding rule)."""
  name: str = "test_scaled"

  def config_from_dict(self, d):
    return model_lib.ModelConfig.from_dict(d)

  def config_to_dict(self, config):
    return config.to_dict()

  def init_params(self, config, seed=0):
    return model_lib.init_params(config, seed)

  def loss_fn(self, config):
    return lambda p, ex: 2.0 * model_lib.example_loss(config, p, ex)

  def target_logprob(self, config, params, example):
    return 2.0 * model_lib.target_logprob(config, params, example)

  def greedy_decode(self, config, params, examples, num_tokens):
    return model_lib.greedy_decode(config, params, examples, num_tokens)

  def param_shardings(self, config, mesh, params):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)

  def max_len(self, config):
    return config.max_len

  def vocab_size(self, config):
    return config.vocab_size


def test_checkpoint_records_and_restores_its_family(tmp_path):
  scaled = family_lib.register(_Scaled())
  optimizer = train_lib.make_optimizer(OPT)
  params = model_lib.init_params(MODEL)
  mngr = ckpt_lib.manager(str(tmp_path / "ckpt"))
  ckpt_lib.save(mngr, 1, params, optimizer.init(params), MODEL, OPT, {}, family=scaled)
  mngr.close()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = ckpt_lib.manager(str(tmp_path / "ckpt")).restore(
      1, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  assert config["family"] == "test_scaled"
  mesh = partitioning.make_mesh(model=2)
  restored = ckpt_lib.restore(str(tmp_path / "ckpt"), mesh=mesh)
  assert restored.family is scaled
  # Params lie as the family says (replicated), not split by shape.
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(restored.params))
  ex = jax.tree.map(lambda x: x[0], _examples(1))
  np.testing.assert_allclose(restored.loss_fn()(restored.params, ex),
                             2.0 * model_lib.example_loss(MODEL, params, ex), rtol=1e-6)
  # Tail-patch goes through the family too: twice the LM's base log-prob.
  queries = _examples(2, seed=1)
  lm = tailpatch.tail_patch_deltas(MODEL, params, optimizer.init(params),
                                   optax_sgd(), _examples(2), queries,
                                   np.array([[0, 0], [1, 1]]))
  doubled = tailpatch.tail_patch_deltas(MODEL, params, optimizer.init(params),
                                        optax_sgd(), _examples(2), queries,
                                        np.array([[0, 0], [1, 1]]), family=scaled)
  assert not np.allclose(lm, doubled)


def optax_sgd():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.sgd(1e-2)


def test_checkpoint_without_a_family_is_tracer_lm(tmp_path):
  """Checkpoints written before families were recorded restore as the LM."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  optimizer = train_lib.make_optimizer(OPT)
  params = model_lib.init_params(MODEL)
  mngr = ckpt_lib.manager(str(tmp_path / "old"))
  mngr.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params,
                                   "opt_state": optimizer.init(params), "step": 2}),
      config=ocp.args.JsonSave({"model": MODEL.to_dict(), "optimizer": OPT.to_dict(),
                                "data": {}})))
  mngr.wait_until_finished()
  mngr.close()
  restored = ckpt_lib.restore(str(tmp_path / "old"))
  assert restored.family is family_lib.LM and restored.model_config == MODEL
  # Its optimizer has taken no step: V = 0 corrects nothing (before
  # 2026-12-04 Adafactor's then quarantined every row as non-finite).
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer.config import EncodeConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError, match="has taken no step \\(count 0\\)"):
    pipeline.build_encoder(restored, EncodeConfig(projection_dim=64))


def test_explicit_param_shardings_give_the_same_encodings():
  params = model_lib.init_params(MODEL, seed=2)
  mesh = partitioning.make_mesh(model=2)
  batch = _examples(8)
  kwargs = dict(projection_dim=256, seed=0, mesh=mesh, kernel="exact")
  default = tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params, **kwargs)
  # Every matrix split on its last axis (a PartitionSpec per leaf), vectors whole.
  specs = jax.tree.map(lambda x: P(*([None] * (x.ndim - 1)), "model")
                       if x.ndim >= 2 and x.shape[-1] % 2 == 0 else P(), params)
  given = tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params,
                                 param_shardings=specs, **kwargs)
  leaf = jax.tree.leaves(given.params)[1]
  assert leaf.sharding.spec == jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, P))[1]
  np.testing.assert_allclose(partitioning.fetch(given.project(batch)),
                             partitioning.fetch(default.project(batch)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="param_shardings: its tree"):
    tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params,
                           param_shardings={"embed": P()}, **kwargs)
  # The embedding has 259 rows: an odd count cannot be split in two.
  bad = jax.tree.map(lambda x: P("model") if x.shape[0] == 259 else P(), params)
  with pytest.raises(ValueError, match=r"param_shardings\['embed'\]\['embedding'\]: "
                     r"P\('model',\) does not divide shape \(259, 32\)"):
    tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params,
                           param_shardings=bad, **kwargs)
  # Shardings on another mesh, an axis the mesh has not: named per param
  # (an unclear jit error, and an error outside the check, before).
  other = partitioning.param_shardings(partitioning.make_mesh(model=4), params)
  with pytest.raises(ValueError, match=r"param_shardings\['embed'\]\['embedding'\]: "
                     r"a NamedSharding on another mesh \(\{'data': 2, 'model': 4\}\)"):
    tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params,
                           param_shardings=other, **kwargs)
  typo = jax.tree.map(lambda x: P("mdl") if x.ndim >= 2 else P(), params)
  with pytest.raises(ValueError, match=r"\]: axis 'mdl' is not one of the mesh's"):
    tracer.GradientEncoder(model_lib.make_loss_fn(MODEL), params,
                           param_shardings=typo, **kwargs)


def test_a_large_weight_the_model_axis_cannot_split_is_an_error():
  """Gemma's shapes (2^18 rows, 2^k * 5 widths) split over a model axis of 2
  or 4, never 3: before 2026-12-04 every such weight sat whole on each device."""
  params = {"embed": jax.ShapeDtypeStruct((1 << 18, 640), np.float32),
            "norm": jax.ShapeDtypeStruct((640,), np.float32),
            "small": jax.ShapeDtypeStruct((6, 5), np.float32)}
  split = partitioning.param_shardings(
      partitioning.make_mesh(2, 2, devices=jax.devices()[:4]), params)
  assert split["embed"].spec == P("model", None)
  three = partitioning.make_mesh(1, 3, devices=jax.devices()[:3])
  with pytest.raises(InputError, match=re.escape(
      "params['embed']: shape (262144, 640) has no axis divisible by the mesh's "
      "model axis (3), so it would sit whole on every device; expected a model "
      "axis that splits every large weight (2, 4, 5, 8, 10, 16, 20, 32)")):
    partitioning.param_shardings(three, params)
  # Small ones may stay whole: (6, 5) splits over 3, the norm is a vector.
  del params["embed"]
  assert partitioning.param_shardings(three, params)["small"].spec == P("model", None)
