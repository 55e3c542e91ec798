"""The Gemma family (``tracer.gemma_family``) on a tiny Gemma 3 model.

Needs the ``gemma`` library (``pip install 'tracer[gemma]'``); skipped without
it. Nothing is downloaded: the tokenizer is a sentencepiece model trained
here on the fact corpus with Gemma's special ids (pad 0, EOS 1, BOS 2, unk 3)
and read by the library's own ``gm.text.Gemma3Tokenizer``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

gm = pytest.importorskip("gemma.gm", reason="the gemma library is an extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import tracer  # noqa: E402
from tracer import checkpoint  # noqa: E402
from tracer import data  # noqa: E402
from tracer import facts  # noqa: E402
from tracer import family as family_lib  # noqa: E402
from tracer import gemma_family as gf  # noqa: E402
from tracer import partitioning  # noqa: E402
from tracer import tailpatch  # noqa: E402
from tracer import train as train_lib  # noqa: E402
from tracer.config import ModelConfig, OptimizerConfig  # noqa: E402
from tracer.errors import InputError  # noqa: E402

TRAIN_STEPS = 30
OPTIMIZER = OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=5,
                            total_steps=TRAIN_STEPS, b2=0.99)


def train_tokenizer(texts, prefix: str, vocab_size: int = 256) -> str:
  """A sentencepiece model with Gemma's special ids; returns its path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=prefix,
      vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny Gemma 3 trained a few AdamW steps on a small fact corpus."""
  root = tmp_path_factory.mktemp("gemma")
  corpus_records, queries = facts.generate(
      facts.FactsConfig(facts_per_bucket=2, distractor_docs=5))
  texts = [r["text"] for r in corpus_records]
  vocab = gf.GemmaVocabulary(train_tokenizer(texts, str(root / "sp")))
  # The embedding may be larger than the tokenizer's vocabulary (rounded up).
  config = dataclasses.replace(gf.TINY, vocab_size=-(-vocab.vocab_size // 8) * 8)
  corpus = data.build_corpus(
      "facts", ((r["id"], r["text"], vocab.encode(r["text"])) for r in corpus_records),
      vocab, config.max_len)
  examples = corpus.examples(np.arange(len(corpus)))
  fam = family_lib.get("gemma")
  optimizer = train_lib.make_optimizer(OPTIMIZER)   # AdamW, as tracer trains
  params = fam.init_params(config, seed=0)
  opt_state = optimizer.init(params)
  mesh = partitioning.make_mesh()
  step = train_lib.make_train_step(fam.loss_fn(config), optimizer, mesh, params)
  batch_size = len(corpus) // mesh.size * mesh.size
  losses = []
  for i in range(TRAIN_STEPS):
    rows = train_lib.batch_rows(i, batch_size, len(corpus), seed=0)
    params, opt_state, loss = step(params, opt_state, _batch(examples, rows))
    losses.append(float(loss))
  return dict(root=root, vocab=vocab, config=config, corpus=corpus,
              examples=examples, queries=queries, family=fam, params=params,
              opt_state=opt_state, optimizer=optimizer, losses=losses)


def _batch(examples, rows):
  return {k: v[rows] for k, v in examples.items()}


def _query(s, i=0):
  q = s["queries"][i]
  vocab = s["vocab"]
  return data.query_example(vocab.encode(q["prompt"]), vocab.encode(q["target"]),
                            s["config"].max_len)


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- config and registry --------------------------------------------------------

def test_a_masked_target_outside_the_vocabulary_changes_nothing():
  """As tracer's LM (test_model.py): a weight-0 position's target is never
  read. Before 2026-12-07 Gemma's loss and target log-prob multiplied its
  NaN log-probability by 0: NaN, and the row quarantined."""
  fam, config = family_lib.get("gemma"), gf.TINY
  params = fam.init_params(config, seed=0)
  ex = data.query_example([11, 22, 33, 44], [55, 66], config.max_len)
  bad = {**ex, "targets": ex["targets"].copy()}
  bad["targets"][0] = config.vocab_size + 1      # weight 0: a prompt position
  assert ex["weights"][0] == 0
  for fn in (fam.loss_fn(config), lambda p, e: fam.target_logprob(config, p, e)):
    value, grad = jax.value_and_grad(fn)(params, ex)
    value_bad, grad_bad = jax.value_and_grad(fn)(params, bad)
    assert np.isfinite(value_bad) and value_bad == value
    jax.tree.map(np.testing.assert_array_equal, grad_bad, grad)


def test_registered_and_config_round_trip():
  fam = family_lib.get("gemma")
  assert fam is gf.FAMILY and "gemma" in family_lib.names()
  for config in (gf.TINY, gf.GemmaConfig(preset="gemma3_270m", max_len=256)):
    d = fam.config_to_dict(config)
    assert fam.config_from_dict(d) == config
    assert fam.max_len(config) == config.max_len
  with pytest.raises(InputError, match="unknown fields"):
    fam.config_from_dict({**gf.TINY.to_dict(), "d_model": 3})
  with pytest.raises(InputError, match="preset"):
    fam.config_from_dict({"preset": "gemma9_1t"})
  # A released size builds the library's class (abstractly: no weights).
  shapes = jax.eval_shape(lambda: fam.init_params(
      gf.GemmaConfig(preset="gemma3_270m", max_len=8)))
  assert shapes["embedder"]["input_embedding"].shape == (262_144, 640)
  # The tokenizer check in `tracer train` reads the preset's own embedding
  # (before 2026-12-04: the field's default, 262,144, for Gemma 2 too).
  assert fam.vocab_size(gf.GemmaConfig(preset="gemma3_270m")) == 262_144
  assert fam.vocab_size(gf.GemmaConfig(preset="gemma2_2b")) == 256_128
  assert fam.vocab_size(gf.TINY) == 259
  assert family_lib.get(None).vocab_size(ModelConfig()) == ModelConfig().vocab_size


@pytest.mark.parametrize("fields,message", [
    # Before 2026-12-04 each was a traceback in the library, or accepted.
    ({"max_len": "128"}, "GemmaConfig.max_len='128': expected an integer"),
    ({"attention_pattern": 5}, "GemmaConfig.attention_pattern=5: expected a list"),
    ({"preset": ["gemma3_1b"]}, "GemmaConfig.preset=['gemma3_1b']: expected a "
     "preset name or None"),
    ({"query_pre_attn_norm": "NOPE"}, "GemmaConfig.query_pre_attn_norm='NOPE': "
     "expected one of BY_ONE_OVER_SQRT_HEAD_DIM"),
    ({"num_kv_heads": 3}, "GemmaConfig.num_kv_heads=3: expected a divisor of "
     "num_heads=4"),
    ({"num_layers": 0}, "GemmaConfig.num_layers=0: expected at least 1"),
    ({"use_qk_norm": 1}, "GemmaConfig.use_qk_norm=1: expected true or false"),
    # PAD at position 0 lets the first prediction see the future; an id past
    # the vocabulary was clamped to the last embedding row.
    ({"bos_id": 0}, "GemmaConfig.bos_id=0: expected an id other than PAD (0), "
     "below vocab_size (259)"),
    ({"bos_id": 500}, "GemmaConfig.bos_id=500: expected"),
    ({"preset": "gemma2_2b", "bos_id": 256_200}, "GemmaConfig.bos_id=256200: "
     "expected an id other than PAD (0), below vocab_size (256128)"),
    ({"preset": "gemma3_270m", "num_layers": 40}, "GemmaConfig.num_layers=40 "
     "with preset 'gemma3_270m': a preset brings its own architecture"),
])
def test_bad_config_fields_are_named(fields, message):
  with pytest.raises(InputError, match="^" + re.escape(message)):
    gf.GemmaConfig.from_dict({**gf.TINY.to_dict(), **fields} if "preset" not in fields
                             else fields)


# --- (1) train, save and load in the library's format ------------------------------

def test_train_save_load(setup):
  s = setup
  assert s["losses"][-1] < 0.6 * s["losses"][0], s["losses"]
  path = s["root"] / "params"
  gf.save_params(s["params"], str(path))
  _assert_equal_trees(gf.load_params(str(path)), s["params"])
  # Checked against a config, and read straight onto a (data, model) mesh.
  mesh = partitioning.make_mesh(model=2)
  loaded = gf.load_params(str(path), s["config"], mesh=mesh)
  _assert_equal_trees(loaded, s["params"])
  want = s["family"].param_shardings(s["config"], mesh, s["params"])
  for x, sharding in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim)
  # The library's own loader reads what save_params wrote.
  _assert_equal_trees(gm.ckpts.load_params(str(path)), s["params"])
  other = dataclasses.replace(s["config"], hidden_dim=96)
  with pytest.raises(InputError, match="do not match"):
    gf.load_params(str(path), other)
  # Onto a mesh too, naming the param (before 2026-12-04 Orbax's "Requested
  # shape ... is not compatible with the stored shape", no name).
  with pytest.raises(InputError, match=re.escape(
      "do not match the gemma config (explicit sizes): ['layer_0']['mlp']"
      "['gating_einsum']: stored (2, 128, 64), config gives (2, 96, 64)")):
    gf.load_params(str(path), other, mesh=mesh)
  with pytest.raises(InputError, match="no gemma checkpoint"):
    gf.load_params(str(s["root"] / "missing"))
  # A partial copy: its index or its data files gone (before 2026-12-05
  # "No item metadata found" as if it were not a checkpoint, and a bug's
  # traceback, Orbax's bare Exception).
  for name, lost in (("no_index", "manifest.ocdbt"), ("no_data", "ocdbt.process_0/d/*")):
    shutil.copytree(path, s["root"] / name)
    for gone in (s["root"] / name).glob(lost):
      gone.unlink()
    with pytest.raises(InputError, match=re.escape(
        f"{s['root'] / name}: a file of this checkpoint is missing or damaged (")):
      gf.load_params(str(s["root"] / name), s["config"])
  # A param missing or extra, onto a mesh: named before the restore (before
  # 2026-12-05 Orbax's tree diff, cut at 400 characters).
  fewer = jax.tree.map(lambda x: x, s["params"])
  del fewer["layer_1"]["mlp"]["linear"]
  more = {**s["params"], "layer_9": s["params"]["layer_1"]}
  for name, tree, bad in (
      ("fewer", fewer, "['layer_1']['mlp']['linear']: stored missing, config "
                       "gives (128, 64)"),
      ("more", more, "['layer_9']['attn']['_key_norm']['scale']: stored (16,), "
                     "config gives missing")):
    gf.save_params(tree, str(s["root"] / name))
    with pytest.raises(InputError, match=re.escape(
        f"{s['root'] / name}: params do not match the gemma config (explicit "
        f"sizes): {bad}")):
      gf.load_params(str(s["root"] / name), s["config"], mesh=mesh)


def test_tracer_checkpoint_records_the_family(setup):
  """tracer's own checkpoints (params + optax state + configs) hold a Gemma
  too, and restore it through the family."""
  s = setup
  mngr = checkpoint.manager(str(s["root"] / "tracer_ckpt"))
  checkpoint.save(mngr, TRAIN_STEPS, s["params"], s["opt_state"], s["config"],
                  OPTIMIZER, {"tokenizer": "gemma", "sentencepiece_model": s["vocab"].path},
                  family=s["family"])
  ckpt = checkpoint.restore(str(s["root"] / "tracer_ckpt"),
                            mesh=partitioning.make_mesh(model=2))
  assert ckpt.family is s["family"] and ckpt.model_config == s["config"]
  _assert_equal_trees(ckpt.params, s["params"])
  _assert_equal_trees(ckpt.opt_state, s["opt_state"])


# --- (2) the encoder: exact and factored kernels ----------------------------------

@pytest.mark.parametrize("model_axis", [1, 2])
def test_encoder_kernels_agree(setup, model_axis):
  s = setup
  mesh = partitioning.make_mesh(model=model_axis)
  shardings = s["family"].param_shardings(s["config"], mesh, s["params"])
  batch = _batch(s["examples"], np.arange(8))
  out = {}
  for kernel in ("exact", "factored"):
    with warnings.catch_warnings():
      # The factored kernel names the weights it leaves to the materialized
      # path: all of them unless tracer.factored can be told the gemma
      # library's own layers (gm.nn.Einsum, Embedder; gemma_family module doc).
      warnings.filterwarnings("ignore", "kernel='factored' cannot take")
      enc = tracer.GradientEncoder(
          s["family"].loss_fn(s["config"]), s["params"], projection_dim=512,
          seed=0, mesh=mesh, param_shardings=shardings, microbatch_size=1,
          kernel=kernel)
      out[kernel] = enc.encode(batch, normalize=False)
  assert np.all(np.isfinite(out["exact"]))
  err = np.linalg.norm(out["factored"] - out["exact"]) / np.linalg.norm(out["exact"])
  assert err < 1e-5, err


# --- (3) the optimizer correction ---------------------------------------------------

def test_correction_from_saved_adam_state(setup):
  s = setup
  path = s["root"] / "opt_state"
  gf.save_opt_state(s["opt_state"], str(path))
  exact = gf.load_opt_state(str(path), s["params"], s["optimizer"])
  _assert_equal_trees(exact, s["opt_state"])
  v = tracer.second_moment(exact, s["params"], b2=OPTIMIZER.b2)
  # Without the optimizer: the stored structure, Adam's state found in it.
  v_raw = tracer.second_moment(gf.load_opt_state(str(path), s["params"]),
                               s["params"], b2=OPTIMIZER.b2)
  _assert_equal_trees(v_raw, v)
  assert float(jnp.max(v["layer_0"]["mlp"]["linear"])) > 2 * float(
      jnp.min(v["layer_0"]["mlp"]["linear"]))  # V is not a constant: it matters
  batch = _batch(s["examples"], np.arange(8))
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "kernel='factored' cannot take")
    corrected = tracer.GradientEncoder(
        s["family"].loss_fn(s["config"]), s["params"], second_moment=v,
        epsilon=1e-8, projection_dim=512, microbatch_size=1).encode(batch)
  assert np.all(np.isfinite(corrected))
  np.testing.assert_allclose(np.linalg.norm(corrected, axis=1), 1.0, rtol=1e-5)
  # Without an optimizer state (a released model) the encoder runs with
  # second_moment=None: test_encoder_kernels_agree.


# --- (4) predictions against the library's own logits and sampler -------------------

def test_bos_and_padding_mask(setup):
  """Why position 0 must not be pad: the library masks every 0 token, so a
  query at a pad position attends uniformly to the whole sequence (the
  future included)."""
  s = setup
  model, params = gf.make_model(s["config"]), s["params"]
  tokens = np.asarray(s["vocab"].encode(s["queries"][0]["prompt"]), np.int32)
  changed = tokens.copy()
  changed[-1] = tokens[-1] + 1

  def first_logits(first, toks):
    out = model.apply({"params": params}, np.concatenate([[first], toks]))
    return np.asarray(out.logits[0])

  leaked = np.abs(first_logits(0, tokens) - first_logits(0, changed)).max()
  assert leaked > 1e-4  # position 0's prediction sees the last token
  np.testing.assert_array_equal(first_logits(gf.BOS_ID, tokens),
                                first_logits(gf.BOS_ID, changed))
  # The family puts BOS there.
  ex = data.corpus_example(np.asarray(tokens), s["config"].max_len)
  assert int(gf.model_tokens(s["config"], ex["inputs"])[0]) == gf.BOS_ID


def test_target_logprob_matches_library_logits(setup):
  s = setup
  vocab, config, params = s["vocab"], s["config"], s["params"]
  for i in range(3):
    q = s["queries"][i]
    prompt, target = vocab.encode(q["prompt"]), vocab.encode(q["target"])
    tokens = np.asarray([gf.BOS_ID] + prompt + target, np.int32)
    logits = gf.make_model(config).apply({"params": params}, tokens).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    n = len(prompt)
    want = sum(float(logp[n + j, t]) for j, t in enumerate(target))
    got = float(s["family"].target_logprob(config, params, _query(s, i)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_decode_matches_library_sampler(setup):
  s = setup
  vocab, config, params = s["vocab"], s["config"], s["params"]
  num_tokens = 6
  rows = [0, 1]
  examples = data.stack_examples([_query(s, i) for i in rows])
  ours = np.asarray(s["family"].greedy_decode(config, params, examples, num_tokens))
  sampler = gm.text.Sampler(model=gf.make_model(config), params=params,
                            tokenizer=vocab.tokenizer, cache_length=config.max_len,
                            max_out_length=num_tokens, pad_length=None)
  ends = {vocab.tokenizer.special_tokens.EOS, vocab.tokenizer.special_tokens.END_OF_TURN}
  for row, i in enumerate(rows):
    out = sampler.sample(s["queries"][i]["prompt"], max_new_tokens=num_tokens,
                         return_state=True)
    theirs = np.asarray(out.state.predicted_tokens).reshape(-1)[:num_tokens].tolist()
    # The sampler stops at its end tokens (and zeroes what follows).
    stop = next((k + 1 for k, t in enumerate(theirs) if t in ends), num_tokens)
    assert stop >= 1
    assert ours[row, :stop].tolist() == theirs[:stop]


def _argmax_by_hand(config, params, prompt, n):
  """The oracle: a full forward pass of the library per token, its own mask
  and positions from the tokens (no cache)."""
  tokens = list(prompt)
  for _ in range(n):
    x = np.asarray([[gf.BOS_ID] + tokens], np.int32)
    logits = gf.make_model(config).apply({"params": params}, x).logits
    tokens.append(int(np.argmax(logits[0, -1])))
  return tokens[len(prompt):]


def test_tokenizer_file_is_checked_when_opened(tmp_path, monkeypatch):
  """A damaged file, one with other special ids, or one the library would
  replace by its cache's: an InputError naming it at construction (before
  2026-12-05: a sentencepiece traceback at the first encode, pad/EOS/BOS
  silently mislabelled, or another tokenizer silently read)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = [r["text"] for r in facts.generate(
      facts.FactsConfig(facts_per_bucket=2, distractor_docs=5))[0]]
  good = open(train_tokenizer(texts, str(tmp_path / "good")), "rb").read()
  for name, raw in (("empty", b""), ("cut", good[:len(good) // 2]),
                    ("garbage", b"\x00\xffnot a model" * 10)):
    (tmp_path / f"{name}.model").write_bytes(raw)
    with pytest.raises(InputError, match=re.escape(
        f"{tmp_path / name}.model: not a sentencepiece model file (")):
      gf.GemmaVocabulary(str(tmp_path / f"{name}.model"))
  spm.SentencePieceTrainer.train(   # sentencepiece's own default ids
      sentence_iterator=iter(texts), model_prefix=str(tmp_path / "other"),
      vocab_size=256, model_type="unigram", hard_vocab_limit=False,
      minloglevel=2)
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path}/other.model: special ids (pad, eos, bos, unk) are "
      "(-1, 2, 1, 0); expected Gemma's (0, 1, 2, 3)")):
    gf.GemmaVocabulary(str(tmp_path / "other.model"))
  # The library reads $GEMMA_CACHE_DIR/tokenizer/<name> when it exists.
  cache = tmp_path / "cache"
  (cache / "tokenizer").mkdir(parents=True)
  monkeypatch.setenv("GEMMA_CACHE_DIR", str(cache))
  (cache / "tokenizer" / "good.model").write_bytes(good)  # the same bytes
  assert gf.GemmaVocabulary(str(tmp_path / "good.model")).vocab_size > 0
  smaller = train_tokenizer(texts, str(tmp_path / "smaller"), vocab_size=200)
  (cache / "tokenizer" / "good.model").write_bytes(open(smaller, "rb").read())
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path}/good.model: the gemma library would read "
      f"{cache}/tokenizer/good.model instead")):
    gf.GemmaVocabulary(str(tmp_path / "good.model"))


def test_cached_decode_matches_full_forward_passes():
  # Prompts of several lengths in one batch (the cache's shared end_index),
  # one past the sliding window (16) and one running into the window's end:
  # its tokens past the last position repeat that position's token. (Seed 1:
  # no generated pad id, which the oracle's library mask would hide.)
  config = gf.TINY
  params = family_lib.get("gemma").init_params(config, seed=1)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (1, 7, 20, 60)]
  examples = data.stack_examples(
      [data.query_example(p, [3], config.max_len) for p in prompts])
  out = np.asarray(jax.jit(gf.greedy_decode, static_argnums=(0, 3))(
      config, params, examples, 6))
  assert out.shape == (4, 6) and out.dtype == np.int32
  wants = [_argmax_by_hand(config, params, p, min(6, config.max_len - len(p)))
           for p in prompts]                                # the last: 4 fit
  assert not any(gf.PAD_ID in w for w in wants) and len(set(wants[1])) > 2
  for row, want in zip(out, wants):
    assert row.tolist() == want + [want[-1]] * (6 - len(want))


# --- (5) tail-patch through the family ----------------------------------------------

def test_tail_patch(setup):
  s = setup
  config, params, fam = s["config"], s["params"], s["family"]
  # The default tail-patch step: the checkpoint's optimizer and state, at
  # the schedule's final rate.
  optimizer = tailpatch.tail_patch_optimizer(OPTIMIZER, TRAIN_STEPS)
  opt_state = s["opt_state"]
  queries = data.stack_examples([_query(s, i) for i in range(2)])
  pairs = np.array([[0, 0], [1, 3]])
  got = tailpatch.tail_patch_deltas(config, params, opt_state, optimizer,
                                    s["examples"], queries, pairs, family=fam)

  @jax.jit
  def reference(train, query):
    grads = jax.grad(fam.loss_fn(config))(params, train)
    updates, _ = optimizer.update(grads, opt_state, params)
    patched = optax.apply_updates(params, updates)
    return (fam.target_logprob(config, patched, query)
            - fam.target_logprob(config, params, query))

  for (qi, ti), delta in zip(pairs, got):
    want = reference({k: v[ti] for k, v in s["examples"].items()},
                     {k: v[qi] for k, v in queries.items()})
    np.testing.assert_allclose(delta, float(want), rtol=1e-3, atol=1e-4)
  assert np.any(np.abs(got) > 1e-4)


# --- the launch scripts: train and trace a Gemma through the `tracer` command -----


def test_train_and_trace_commands(tmp_path):
  """`tracer train --family=gemma` records the family in its checkpoint;
  `tracer trace` restores it as a Gemma (``--family`` only lets gin bind
  GemmaConfig), and writes results with the model's predictions. stderr holds nothing (TensorFlow's load lines are
  filtered, gin's include lookup is not logged)."""
  corpus, queries = facts.write_fact_corpus(
      tmp_path / "facts", facts.FactsConfig(facts_per_bucket=1, distractor_docs=4))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  tracer_cmd = [sys.executable, "-m", "tracer.launch.main"]
  steps = ["--gin_bindings=OptimizerConfig.total_steps=20",
           "--gin_bindings=OptimizerConfig.warmup_steps=2",
           "--gin_bindings=TrainConfig.checkpoint_every=20",
           "--gin_bindings=TrainConfig.log_every=10",
           "--gin_bindings=EncodeConfig.projection_dim=512"]
  train = subprocess.run(
      [*tracer_cmd, "train", "--family=gemma", "--gin_file=gemma_tiny",
       f"--corpus={corpus}", f"--workdir={tmp_path / 'w'}", *steps],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert train.stderr == "", train.stderr[-3000:]
  restored = checkpoint.restore(str(tmp_path / "w" / "checkpoints"))
  assert restored.family is gf.FAMILY and restored.model_config.embed_dim == 128
  trace = subprocess.run(
      [*tracer_cmd, "trace", "--family=gemma", "--gin_file=gemma_tiny",
       f"--corpus={corpus}",
       f"--queries={queries}", f"--workdir={tmp_path / 'w'}",
       f"--output={tmp_path / 'r.jsonl'}", "--top_k=3", "--show=1", *steps],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert trace.returncode == 0, trace.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
  assert len(rows) == len(queries.read_text().splitlines())
  assert all(len(r["proponent_ids"]) == 3 and "prediction" in r for r in rows)


def test_released_weights_through_the_commands(setup, tmp_path):
  """`tracer trace --family=gemma --checkpoint=DIR --tokenizer=FILE` on
  params in the library's own format (as released models come): without an
  optimizer state tracer says so and encodes without the correction; with
  `--opt_state` (an optax state saved beside them) it corrects."""
  s = setup
  weights, state = tmp_path / "weights", tmp_path / "opt_state"
  gf.save_params(s["params"], str(weights))
  gf.save_opt_state(s["opt_state"], str(state))
  corpus = facts.write_jsonl(tmp_path / "corpus.jsonl", [
      {"id": s["corpus"].ids[i], "text": s["corpus"].texts[i]}
      for i in range(len(s["corpus"]))])
  queries = facts.write_jsonl(tmp_path / "queries.jsonl", s["queries"][:4])
  c = s["config"]
  bindings = [f"--gin_bindings=GemmaConfig.{k}={v!r}" for k, v in (
      ("vocab_size", c.vocab_size), ("max_len", c.max_len),
      ("num_layers", c.num_layers), ("embed_dim", c.embed_dim),
      ("hidden_dim", c.hidden_dim), ("num_heads", c.num_heads),
      ("head_dim", c.head_dim), ("num_kv_heads", c.num_kv_heads),
      ("attention_pattern", tuple(c.attention_pattern)),
      ("sliding_window_size", c.sliding_window_size))]
  bindings += [f"--gin_bindings=OptimizerConfig.{k}={v!r}" for k, v in (
      ("name", OPTIMIZER.name), ("b2", OPTIMIZER.b2), ("learning_rate", OPTIMIZER.learning_rate),
      ("warmup_steps", OPTIMIZER.warmup_steps), ("total_steps", OPTIMIZER.total_steps))]
  bindings += ["--gin_bindings=EncodeConfig.projection_dim=512"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

  def trace(name, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "tracer.launch.main", "trace", "--family=gemma",
         "--gin_file=gemma_tiny", *bindings, f"--checkpoint={weights}",
         f"--tokenizer={s['root'] / 'sp.model'}", f"--corpus={corpus}",
         f"--queries={queries}", f"--workdir={tmp_path / name}",
         f"--output={tmp_path / name}.jsonl", "--top_k=3", "--show=0", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  plain = trace("plain")
  assert "no optimizer state (--opt_state): no optimizer correction" in plain.stdout
  assert "correction=none" in plain.stdout
  corrected = trace("corrected", f"--opt_state={state}")
  assert "correction=adamw" in corrected.stdout, corrected.stdout
  rows = [json.loads(l) for l in (tmp_path / "corrected.jsonl").read_text().splitlines()]
  assert [r["query_id"] for r in rows] == [q["id"] for q in s["queries"][:4]]
  assert all(len(r["proponent_ids"]) == 3 for r in rows)
