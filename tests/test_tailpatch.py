"""Tests of tail-patch: a known answer, the vectorized path, the metric."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import optax
import pytest

from tracer import data as data_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import tailpatch
from tracer import train as train_lib
from tracer.errors import InputError

CONFIG = model_lib.ModelConfig(d_model=32, num_layers=1, num_heads=2, d_ff=64,
                               max_len=32)
OPT_CONFIG = train_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=5,
                                       total_steps=40)
TRAIN_STEPS = 30
BATCH = 8
DOCS = ["the cat is red.", "the dog is blue.", "the cow is green.",
        "the pig is pink.", "a bird can fly.", "fish swim in water.",
        "snow is cold.", "sun is hot."]
QUERIES = [("the cat is", " red"), ("the dog is", " blue"),
           ("fish swim in", " water")]


def _encode(text: str) -> list[int]:
  return [b + 3 for b in text.encode()]   # seqio ByteVocabulary ids


@pytest.fixture(scope="module")
def setup():
  """A tiny model trained TRAIN_STEPS Adam steps on DOCS (one batch of all)."""
  train = data_lib.stack_examples([
      data_lib.corpus_example(np.asarray(_encode(d) + [data_lib.EOS_ID], np.int32),
                              CONFIG.max_len) for d in DOCS])
  queries = data_lib.stack_examples([
      data_lib.query_example(_encode(p), _encode(t), CONFIG.max_len)
      for p, t in QUERIES])
  mesh = partitioning.make_mesh()
  optimizer = train_lib.make_optimizer(OPT_CONFIG)
  rep = partitioning.replicated(mesh)
  params = jax.device_put(model_lib.init_params(CONFIG), rep)
  opt_state = jax.device_put(optimizer.init(params), rep)
  step = train_lib.make_train_step(model_lib.make_loss_fn(CONFIG), optimizer, mesh, params)
  batch = partitioning.to_global(train, partitioning.all_devices_batch(mesh))
  for _ in range(TRAIN_STEPS):
    params, opt_state, _ = step(params, opt_state, batch)
    # One step in flight (launch/train.py: a queue of dispatched steps with
    # collectives can deadlock XLA:CPU's simulated devices).
    jax.block_until_ready(params)
  return dict(train=train, queries=queries, mesh=mesh, params=params,
              opt_state=opt_state,
              optimizer=tailpatch.tail_patch_optimizer(OPT_CONFIG, TRAIN_STEPS))


def _loop_deltas(params, opt_state, optimizer, train, queries, pairs):
  """The reference: one pair at a time, no vmap."""
  @jax.jit
  def one(example, query):
    grads = jax.grad(lambda p: model_lib.example_loss(CONFIG, p, example))(params)
    updates, _ = optimizer.update(grads, opt_state, params)
    patched = optax.apply_updates(params, updates)
    return (model_lib.target_logprob(CONFIG, patched, query)
            - model_lib.target_logprob(CONFIG, params, query))

  take = lambda examples, i: {k: v[i] for k, v in examples.items()}
  return np.asarray([one(take(train, t), take(queries, q)) for q, t in pairs])


def test_stepping_on_the_fact_raises_its_probability_most(setup):
  pairs = np.asarray([[0, i] for i in range(len(DOCS))])   # query 0: DOCS[0]
  default = tailpatch.tail_patch_deltas(
      CONFIG, setup["params"], setup["opt_state"], setup["optimizer"],
      setup["train"], setup["queries"], pairs, mesh=setup["mesh"], batch_size=BATCH)
  sgd = tailpatch.tail_patch_optimizer(OPT_CONFIG, TRAIN_STEPS, sgd_learning_rate=0.1)
  plain = tailpatch.tail_patch_deltas(
      CONFIG, setup["params"], sgd.init(setup["params"]), sgd, setup["train"],
      setup["queries"], pairs, mesh=setup["mesh"], batch_size=BATCH)
  for deltas in (default, plain):
    assert deltas.shape == (len(DOCS),) and deltas.dtype == np.float32
    assert deltas[0] > 0
    assert deltas[0] > 2 * np.max(deltas[1:]), deltas


def test_a_bf16_model_is_tail_patched_in_f32(setup):
  """A delta is a difference of two nearly equal log-probs: a model whose
  config computes in bf16 is patched in f32, the deltas of the same params
  under the f32 config (bitwise: the same program)."""
  pairs = np.asarray([[0, i] for i in range(4)])
  deltas = {dtype: tailpatch.tail_patch_deltas(
      dataclasses.replace(CONFIG, dtype=dtype), setup["params"],
      setup["opt_state"], setup["optimizer"], setup["train"], setup["queries"],
      pairs, mesh=setup["mesh"], batch_size=BATCH)
            for dtype in ("bfloat16", "float32")}
  np.testing.assert_array_equal(deltas["bfloat16"], deltas["float32"])
  with pytest.raises(ValueError, match=r"pairs: expected int\[P, 2\], got shape "
                     r"\(2, 3\)"):
    tailpatch.tail_patch_deltas(CONFIG, setup["params"], setup["opt_state"],
                                setup["optimizer"], setup["train"], setup["queries"],
                                np.zeros((2, 3), int), mesh=setup["mesh"])
  with pytest.raises(ValueError, match="sgd_learning_rate=0: expected > 0"):
    tailpatch.tail_patch_optimizer(OPT_CONFIG, TRAIN_STEPS, sgd_learning_rate=0)


def test_a_learning_rate_of_0_is_refused():
  """The checkpoint's own rate at 0 (warmup's first step; a schedule ending
  at 0, at and past its end) patches nothing: before 2026-12-08 every delta
  was rounding alone (-2.4e-7 in the audit), tabled without a word."""
  ends_at_0 = dataclasses.replace(OPT_CONFIG, final_lr_fraction=0.0)
  for config, step in ((OPT_CONFIG, 0), (ends_at_0, 40), (ends_at_0, 50)):
    with pytest.raises(InputError, match=re.escape(
        f"the checkpoint's learning rate at step {step} is 0.0 (OptimizerConfig"
        f".warmup_steps=5, total_steps=40, final_lr_fraction="
        f"{config.final_lr_fraction}): a tail-patch step at it would patch "
        "nothing")):
      tailpatch.tail_patch_optimizer(config, step)
    tailpatch.tail_patch_optimizer(config, step, sgd_learning_rate=0.1)
  tailpatch.tail_patch_optimizer(ends_at_0, 39)


@pytest.mark.parametrize("shape", [(8, 1), (1, 1), (4, 2), (1, 8)])
def test_vectorized_equals_per_pair_loop(setup, shape, monkeypatch):
  """Pairs over ``data``, each pair's step over ``model`` (params split as
  they are for training, never whole on one device): the same deltas."""
  data, model = shape
  mesh = partitioning.make_mesh(data, model, devices=jax.devices()[:data * model])
  placed = []
  place = partitioning.place
  monkeypatch.setattr(partitioning, "place",
                      lambda *a: placed.append(place(*a)) or placed[-1])
  rng = np.random.default_rng(0)
  everything = np.stack(np.meshgrid(np.arange(len(QUERIES)), np.arange(len(DOCS)),
                                    indexing="ij"), -1).reshape(-1, 2)
  pairs = everything[rng.permutation(len(everything))[:13]]   # 13: not % 8
  got = tailpatch.tail_patch_deltas(
      CONFIG, setup["params"], setup["opt_state"], setup["optimizer"],
      setup["train"], setup["queries"], pairs, mesh=mesh, batch_size=BATCH)
  want = _loop_deltas(setup["params"], setup["opt_state"], setup["optimizer"],
                      setup["train"], setup["queries"], pairs)
  assert got.shape == (13,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Params and optimizer state as placed: with a model axis, the largest
  # leaves are split over it (a device holds 1/model of them).
  assert len(placed) == 2
  for tree in placed:
    big = max(jax.tree.leaves(tree), key=lambda x: x.size)
    assert big.addressable_shards[0].data.size == big.size // model


def test_optimizer_state_unchanged_and_final_learning_rate(setup):
  before = jax.tree.map(np.array, setup["opt_state"])
  pairs = np.asarray([[0, 0], [1, 1], [2, 5]])
  first = tailpatch.tail_patch_deltas(
      CONFIG, setup["params"], setup["opt_state"], setup["optimizer"],
      setup["train"], setup["queries"], pairs, mesh=setup["mesh"], batch_size=BATCH)
  second = tailpatch.tail_patch_deltas(
      CONFIG, setup["params"], setup["opt_state"], setup["optimizer"],
      setup["train"], setup["queries"], pairs, mesh=setup["mesh"], batch_size=BATCH)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.array, setup["opt_state"]))
  np.testing.assert_array_equal(first, second)

  # The update is the training optimizer's at unit rate times schedule(step).
  lr = float(train_lib.learning_rate_schedule(OPT_CONFIG)(TRAIN_STEPS))
  assert tailpatch.final_learning_rate(OPT_CONFIG, TRAIN_STEPS) == pytest.approx(lr)
  assert 0 < lr < OPT_CONFIG.learning_rate
  sgd = tailpatch.tail_patch_optimizer(OPT_CONFIG, TRAIN_STEPS, sgd_learning_rate=0.5)
  unit = train_lib.make_optimizer(OPT_CONFIG,
                                  learning_rate=optax.constant_schedule(1.0))
  scheduled = train_lib.make_optimizer(OPT_CONFIG)

  @jax.jit
  def updates(params, opt_state, example):
    grads = jax.grad(lambda p: model_lib.example_loss(CONFIG, p, example))(params)
    update = lambda opt, state: opt.update(grads, state, params)[0]
    return (grads, update(setup["optimizer"], opt_state), update(unit, opt_state),
            update(scheduled, opt_state), update(sgd, sgd.init(params)))

  grads, got, at_unit_rate, next_training_step, sgd_update = updates(
      setup["params"], setup["opt_state"], {k: v[0] for k, v in setup["train"].items()})
  close = lambda a, b, rtol: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-9), a, b)
  close(got, jax.tree.map(lambda w: lr * w, at_unit_rate), 1e-5)
  # The training optimizer's own schedule would take the same next step.
  close(got, next_training_step, 1e-5)
  close(sgd_update, jax.tree.map(lambda g: -0.5 * g, grads), 1e-6)


def test_tail_patch_at_k():
  nan = np.nan
  deltas = np.asarray([[4.0, 2.0, 0.0, nan],
                       [1.0, nan, nan, nan],
                       [nan, nan, nan, nan]])   # no proponents: left out
  got = tailpatch.tail_patch_at_k(deltas, ks=(1, 3, 10))
  assert got == pytest.approx({"tail_patch@1": (4 + 1) / 2,
                               "tail_patch@3": (2 + 1) / 2,
                               "tail_patch@10": (2 + 1) / 2})
  as_dict = tailpatch.tail_patch_at_k({"a": [4.0, 2.0, 0.0], "b": [1.0]}, ks=(1, 3))
  assert as_dict == pytest.approx({"tail_patch@1": 2.5, "tail_patch@3": 1.5})
  assert np.isnan(tailpatch.tail_patch_at_k(np.full((2, 3), nan), ks=(1,))[
      "tail_patch@1"])
  with_se = tailpatch.tail_patch_at_k(deltas, ks=(1,), stderr=True)
  # Per-query values 4 and 1: sample std 2.1213, over sqrt(2).
  assert with_se["tail_patch@1_se"] == pytest.approx(1.5)


def test_deltas_that_are_not_finite_are_left_out_as_nan_ones_are():
  # Before, only NaN was: one -inf made a method's mean -inf and its
  # standard error NaN, while nonfinite_listed counted it as left out.
  from tracer.launch import quality  # pylint: disable=g-import-not-at-top
  for bad in (np.nan, -np.inf, np.inf):
    deltas = np.asarray([[4.0, bad], [1.0, 3.0], [2.0, 2.0]])
    got = tailpatch.tail_patch_at_k(deltas, ks=(2,), stderr=True)
    # Per query 4, 2 and 2 (the first query's second delta left out).
    assert got == pytest.approx({"tail_patch@2": 8 / 3, "tail_patch@2_se": 2 / 3})
    per_method = np.stack([deltas, deltas - 1])   # [M, C, K]
    lists, paired = quality.paired_tail_patch(per_method, 2, ("trackstar", "bm25"))
    assert lists["trackstar"] == [4.0, 2.0, 2.0]
    assert paired["bm25"]["mean"] == pytest.approx(1.0)


def test_tail_patch_queries_take_each_bucket_in_turn():
  from tracer.launch import quality  # pylint: disable=g-import-not-at-top
  buckets = ["1", "2-3", "4-10", "11+"]
  queries = [{"bucket": b} for b in buckets for _ in range(10)]
  count = lambda chosen: {b: sum(queries[i]["bucket"] == b for i in chosen)
                          for b in buckets}
  # Before: buckets in string order ("11+" before "2-3"), the last cut off:
  # {"1": 2, "2-3": 1, "11+": 2} for 5, 4-10 none.
  assert count(quality.tail_patch_queries(queries, 5)) == {
      "1": 2, "2-3": 1, "4-10": 1, "11+": 1}
  assert count(quality.tail_patch_queries(queries, 6)) == {
      "1": 2, "2-3": 2, "4-10": 1, "11+": 1}
  assert count(quality.tail_patch_queries(queries, 8)) == dict.fromkeys(buckets, 2)
  # A small bucket's shortfall is made up from the others (before: 4 of 6).
  small = [{"bucket": "1"}] + [{"bucket": "11+"}] * 20
  chosen = quality.tail_patch_queries(small, 6)
  assert len(chosen) == 6 and 0 in chosen
  assert list(chosen) == sorted(chosen)


@pytest.mark.parametrize("k", [1, 5, 6, 10])
def test_random_topk_lists_k_of_each_for_any_k_up_to_the_rows(k):
  # Before, k past half the rows gave num_rows - k opponents, and writing
  # the results failed after every method was scored.
  from tracer.launch import quality  # pylint: disable=g-import-not-at-top
  top = quality.random_topk(10, 3, k, seed=1)
  for rows in (top.proponent_rows, top.opponent_rows):
    assert rows.shape == (3, k)
    assert all(len(set(r)) == k and set(r) <= set(range(10)) for r in rows.tolist())
  assert top.proponent_scores.shape == top.opponent_scores.shape == (3, k)


def test_pairs_for_topk_dedupes_across_methods():
  rows = np.asarray([[[5, 2, -1], [2, 7, 5]],     # method 0: 2 queries x 3
                     [[2, 9, 5], [7, -1, -1]]])   # method 1
  pairs, inverse = tailpatch.pairs_for_topk(rows)
  assert len(pairs) == len({tuple(p) for p in pairs}) == 6
  for m, q, k in np.ndindex(rows.shape):
    if rows[m, q, k] < 0:
      assert inverse[m, q, k] == -1
    else:
      assert tuple(pairs[inverse[m, q, k]]) == (q, rows[m, q, k])
  deltas = np.arange(len(pairs), dtype=np.float32) + 1
  per_entry = tailpatch.deltas_for_topk(deltas, inverse)
  assert per_entry.shape == rows.shape
  assert np.array_equal(np.isnan(per_entry), rows < 0)
  np.testing.assert_array_equal(per_entry[rows >= 0], deltas[inverse[rows >= 0]])
  # A pair whose step made the loss NaN is counted per method, apart from
  # the missing proponents (both are NaN to tail_patch_at_k).
  np.testing.assert_array_equal(tailpatch.nonfinite_listed(per_entry, inverse), [0, 0])
  broken = deltas.copy()
  broken[inverse[0, 1, 1]] = np.nan   # (query 1, row 7): listed by both methods
  per_entry = tailpatch.deltas_for_topk(broken, inverse)
  np.testing.assert_array_equal(tailpatch.nonfinite_listed(per_entry, inverse), [1, 1])
