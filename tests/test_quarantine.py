"""Non-finite examples are quarantined, not fatal: corpus rows and queries."""

from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from tracer import data as data_lib
from tracer import hessian
from tracer import model as model_lib
from tracer import pipeline
from tracer import scan as scan_lib
from tracer.config import EncodeConfig, PreconditionerConfig
from tracer.encoder import GradientEncoder
from tracer.errors import QuarantineLimitError

CONFIG = model_lib.ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               max_len=16)
POISON = "~"   # any example holding it has a NaN loss (see loss_fn)
NUM_DOCS = 40
BAD_DOCS = (6, 21, 39)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("quarantine")
  rng = np.random.default_rng(0)
  with open(root / "corpus.jsonl", "w") as f:
    for i in range(NUM_DOCS):
      text = "".join(rng.choice(list("abcdefgh"), 6))
      if i in BAD_DOCS:
        text = text[:3] + POISON + text[3:]
      f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
  with open(root / "queries.jsonl", "w") as f:
    for i, prompt in enumerate(["abca", "hg" + POISON + "a", "fedc"]):
      f.write(json.dumps({"id": f"q{i}", "prompt": prompt, "target": "ab"}) + "\n")
  vocab = data_lib.make_vocabulary()
  params = model_lib.init_params(CONFIG)
  token = vocab.encode(POISON)[0]
  lm_loss = model_lib.make_loss_fn(CONFIG)

  def loss_fn(p, example):  # NaN for any example that holds the poison token
    poisoned = jnp.any(example["inputs"] == token)
    return lm_loss(p, example) + jnp.where(poisoned, jnp.nan, 0.0)

  corpus = data_lib.read_corpus(str(root / "corpus.jsonl"), vocab, CONFIG.max_len)
  encoder = GradientEncoder(loss_fn, params,
                            projection_dim=256, microbatch_size=2, kernel="exact")
  queries = data_lib.read_queries(str(root / "queries.jsonl"))
  query_examples = data_lib.query_examples(queries, vocab, CONFIG.max_len)
  return root, corpus, encoder, queries, query_examples


def _store(root, name, encoder, corpus):
  ecfg = EncodeConfig(store_dtype="float32", chunk_rows=8)
  ckpt = types.SimpleNamespace(path="/nonexistent", step=1, params=None)
  manifest = pipeline.manifest(ckpt, encoder, "none", 0.0, None, corpus, ecfg,
                               params_fingerprint="test")
  return pipeline.open_store(str(root / name), manifest)


def test_corpus_rows_are_quarantined_and_never_returned(setup):
  root, corpus, encoder, queries, query_examples = setup
  store = _store(root, "store", encoder, corpus)
  done = pipeline.encode_corpus(encoder, None, corpus, store, batch_size=12,
                                max_quarantined=0.1)
  assert done == (NUM_DOCS, len(BAD_DOCS))
  assert store.quarantined() == {r: "non-finite loss" for r in BAD_DOCS}
  rows = store.read_rows(0, NUM_DOCS)
  assert np.all(rows[list(BAD_DOCS)] == 0) and np.all(np.isfinite(rows))
  assert np.all(np.abs(np.delete(rows, BAD_DOCS, axis=0)).sum(axis=1) > 0)

  metric, vectors, skipped = pipeline.query_metric(
      encoder, None, query_examples, PreconditionerConfig(kind="none"), 2,
      [q["id"] for q in queries])
  assert skipped == {1: "non-finite loss"}
  assert np.all(vectors[1] == 0) and np.all(np.isfinite(vectors))
  # A query whose gradient is zero (here: its target's weights zeroed) would
  # score every row 0, its proponents arbitrary rows: left out with its
  # reason (before 2026-12-08 listed without a word).
  flat = {**query_examples, "weights": query_examples["weights"].copy()}
  flat["weights"][2] = 0
  assert pipeline.query_metric(
      encoder, None, flat, PreconditionerConfig(kind="none"), 2,
      [q["id"] for q in queries])[2] == {1: "non-finite loss",
                                          2: pipeline.ZERO_GRADIENT}
  k = NUM_DOCS - len(BAD_DOCS)
  topk = scan_lib.scan_store(store, vectors, k, metric=metric.row_metric())
  for side in (topk.proponent_rows, topk.opponent_rows):
    assert not np.isin(side[[0, 2]], BAD_DOCS).any()
  results = pipeline.result_rows(queries, corpus, topk, skipped)
  assert results[1]["query_id"] == "q1" and results[1]["proponent_ids"] == []
  assert results[1]["error"].startswith("non-finite loss")
  assert len(results[0]["proponent_ids"]) == k and "error" not in results[0]
  # A k past the rows outside quarantine: every record lists those rows alone.
  every = scan_lib.scan_store(store, vectors, NUM_DOCS, metric=metric.row_metric())
  for row in pipeline.result_rows(queries, corpus, every, skipped)[::2]:
    for side in ("proponent", "opponent"):
      assert sorted(row[f"{side}_ids"]) == sorted(
          f"d{i}" for i in range(NUM_DOCS) if i not in BAD_DOCS), row
      assert np.all(np.isfinite(row[f"{side}_scores"])), row

  # Streaming mode leaves them out too.
  streamed = pipeline.stream_corpus(encoder, None, corpus, vectors, metric, k, 12,
                                    max_quarantined=0.1)
  assert streamed.quarantined == len(BAD_DOCS)
  np.testing.assert_array_equal(streamed.topk.proponent_rows[[0, 2]],
                                topk.proponent_rows[[0, 2]])


def test_too_many_quarantined_rows_stop_the_run(setup):
  root, corpus, encoder, _, _ = setup
  store = _store(root, "limited", encoder, corpus)
  with pytest.raises(QuarantineLimitError,
                     match=r"3 corpus rows had a non-finite loss or gradient, "
                     r"more than --max_quarantined=0.05 of the 40 rows.*'d6'"):
    pipeline.encode_corpus(encoder, None, corpus, store, batch_size=40,
                           max_quarantined=0.05)
  assert store.pending_chunks() == list(range(store.num_chunks))
  # Streaming: the same limit.
  with pytest.raises(QuarantineLimitError,
                     match=r"3 corpus rows had a non-finite loss or gradient, "
                     r"more than --max_quarantined=0.05 of the 40 rows.*'d6'"):
    pipeline.stream_corpus(encoder, None, corpus, np.zeros((1, encoder.dim)),
                           hessian.identity_metric(encoder.dim), 3, 40,
                           max_quarantined=0.05)


def test_a_resumed_run_is_judged_against_the_store(setup):
  """A rerun finishing the last chunk (row 39 of it non-finite) is held to
  the store's limit, as the whole run was: before 2026-12-05 it was held
  to its own 8 rows, allowed int(0.1 * 8) = 0 quarantined, and every rerun
  stopped, so the store could never be finished."""
  root, corpus, encoder, _, _ = setup
  store = _store(root, "resumed", encoder, corpus)
  assert pipeline.encode_corpus(encoder, None, corpus, store, batch_size=8,
                                max_quarantined=0.1) == (NUM_DOCS, len(BAD_DOCS))
  store.unmark(store.num_chunks - 1)  # as if killed before its marker
  assert pipeline.encode_corpus(encoder, None, corpus, store, batch_size=8,
                                max_quarantined=0.1) == (8, 1)
  assert store.is_complete()
  assert store.quarantined() == {r: "non-finite loss" for r in BAD_DOCS}


def test_r_train_leaves_quarantined_rows_out(setup):
  _, corpus, encoder, _, _ = setup
  cfg = PreconditionerConfig(train_examples=0)
  moments = pipeline.train_moments(encoder, corpus, cfg, batch_size=12)
  assert int(moments.count) == NUM_DOCS - len(BAD_DOCS)
  assert all(np.all(np.isfinite(np.asarray(m))) for m in moments.sums)


def test_r_train_of_only_nonfinite_rows_names_the_corpus(setup):
  """A diverged checkpoint (every loss NaN): fitting R_train is an error
  naming the corpus and the rows sampled, not a bare ValueError."""
  root, corpus, encoder, _, _ = setup
  diverged = GradientEncoder(lambda p, example: jnp.nan * encoder.loss_fn(p, example),
                             encoder.params, projection_dim=256,
                             microbatch_size=2, kernel="exact")
  with pytest.raises(QuarantineLimitError, match=(
      rf"{root}/corpus.jsonl: every one of the 16 rows sampled for R_train "
      r"has a non-finite loss or gradient; expected a checkpoint whose loss "
      r"is finite on the corpus")):
    pipeline.fit_basis(diverged, corpus, PreconditionerConfig(train_examples=16),
                       batch_size=12)
