r"""Benchmarks (not tests): encode vs. a training step, and the scan.

  tracer benchmark --suite=encode --models=tiny,small --dims=4096,65536
  tracer benchmark --suite=scan
  tracer benchmark --suite=correction --workdir=demo
  tracer benchmark --suite=decode --decode_models=tiny,gemma3_270m
  tracer benchmark --suite=predictions --models=tiny,small --decode_batch=64

encode: examples/s and tokens/s of ``GradientEncoder.encode`` (per-example
gradients, correction, projection, unit norm), for each encoder kernel
(``--kernels=exact,factored``), against a plain training step (forward +
backward + AdamW update) on the same batch and model, and the peak memory XLA
plans for each compiled program (arguments + outputs + temporaries), as ratios
measured in the same process; and the largest power-of-two microbatch whose
program XLA plans within ``--memory_budget_mb``.
correction: the error of rank-one factorizations of Adam's correction (what
``EncodeConfig.rank_one_correction`` approximates), weighted by real
per-example gradients of a trained checkpoint.
scan: ``launch.benchmark_scan`` (in-memory and store scans against numpy,
faiss and the machine's roofline).
decode: the Gemma family's greedy decode (the keys-and-values cache) against
one full forward pass over the window per token, on random-init weights (a
released size by preset, or ``tiny``: ``gemma_family.TINY``), and whether the
two give the same tokens.
predictions: ``pipeline.predictions`` of ``--decode_batch`` queries on
tracer's LM (``--models``), split over the data axis against every device
running them all. On a CPU, set the 8-device flag to see the split.

Run it on real devices: do not set the 8-device XLA flag the tests use.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import numpy as np

from tracer.launch import cli
from tracer.launch import config
from tracer import encoder as encoder_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import memory
from tracer import pipeline
from tracer import projection
from tracer import train as train_lib
from tracer.errors import InputError

SUITES = ("encode", "scan", "correction", "decode", "predictions")
flags.DEFINE_list("suite", ["encode", "scan"], "Which benchmarks: encode, scan, "
                  "correction (needs --workdir with an AdamW checkpoint and facts), "
                  "decode (needs the gemma extra), predictions.")
flags.register_validator(
    "suite", lambda suites: bool(suites) and set(suites) <= set(SUITES),
    f"expected one or more of {', '.join(SUITES)}")
flags.DEFINE_list("models", ["tiny", "small"], "Gin configs under configs/.")
flags.DEFINE_list("dims", ["4096", "65536"], "Projection dims for encode.")
flags.DEFINE_integer("batch_size", 0, "Examples per call (0: 32 tiny, 8 others).",
                     lower_bound=0)
flags.DEFINE_integer("microbatch_size", 0, "Encoder microbatch (0: batch/devices).",
                     lower_bound=0)
flags.DEFINE_integer("repeats", 3, "Timed repetitions after one warm-up.",
                     lower_bound=1)
KERNELS = ("exact", "factored")  # encoder.GradientEncoder's
flags.DEFINE_list("kernels", list(KERNELS), "Encoder kernels to compare.")
flags.DEFINE_list("precisions", ["highest"], "The projections' matmul precisions "
                  "to time (EncodeConfig.projection_precision); past the first, "
                  "rows report their encodings' error against the first's.")
flags.DEFINE_integer("memory_budget_mb", 4096, "Budget for the largest-microbatch "
                     "search (XLA's planned memory; 0: skip the search).")
flags.DEFINE_bool("run", True, "Time the programs; false: compile and plan only.")
flags.DEFINE_bool("per_example", True, "Plan each program at twice the batch too "
                  "(memory per example); each plan is a compile, minutes at 1B.")
flags.DEFINE_bool("verify", True, "Check the encoder on one example against "
                  "jax.grad first (GradientEncoder's verify: one more compile; "
                  "not with --norun, which runs nothing).")
flags.DEFINE_list("decode_models", ["tiny", "gemma3_270m"], "Gemma configs for "
                  "the decode suite: tiny, or a gemma_family.PRESETS name.")
flags.DEFINE_integer("decode_batch", 8, "Queries per decode call.", lower_bound=1)
flags.DEFINE_integer("decode_prompt", 32, "Prompt tokens per query.", lower_bound=1)
flags.DEFINE_integer("decode_steps", 16, "Tokens decoded per query.", lower_bound=1)
# The longest context of the Gemma presets (Gemma 3 4B-27B): past it the
# decode window (the next power of two) is no model's, and at 2^27 tokens
# numpy's query arrays alone took gigabytes before any check.
DECODE_MAX_TOKENS = 131_072
flags.register_multi_flags_validator(
    ["decode_prompt", "decode_steps"],
    lambda f: f["decode_prompt"] + f["decode_steps"] <= DECODE_MAX_TOKENS,
    f"expected --decode_prompt + --decode_steps <= {DECODE_MAX_TOKENS:,} tokens "
    "(the longest Gemma context)")
flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
FLAGS = flags.FLAGS


def _check_models(names: list[str]) -> bool:
  """Each --models name a gin file or a config tracer ships (before, an
  unknown one was blamed on --gin_file, after the models before it ran)."""
  for name in names:
    try:
      config.gin_file_path(name)
    except InputError as e:
      what = "is a directory" if "is a directory" in str(e) else (
          "is no file and not a config tracer ships")
      known = ", ".join(sorted(p.stem for p in config.shipped_configs().glob("*.gin")))
      raise flags.ValidationError(f"{name!r} {what}; expected config names "
                                  f"({known}) or gin files") from None
  return True


# Checked with the flags, not once the models before had run (--kernels=bogus
# was a traceback after 15 s, --dims=abc one from int()).
cli.check_list_flag("models")
flags.register_validator("models", _check_models)
cli.check_list_flag("dims", least=1)
cli.check_list_flag("kernels", choices=KERNELS)
cli.check_list_flag("precisions", choices=sorted(projection.PRECISIONS))
cli.check_list_flag("decode_models")


def _check_decode_models(values) -> bool:
  """Each --decode_models name tiny or a Gemma preset, where the decode suite
  runs (before, an unknown one was a traceback after the models before it;
  the Gemma library's import, ~10 s, is paid only by that suite)."""
  if "decode" in values["suite"]:
    from tracer import gemma_family as gf  # pylint: disable=g-import-not-at-top
    for name in values["decode_models"]:
      if name != "tiny" and name not in gf.PRESETS:
        raise flags.ValidationError(f"--decode_models: {name!r} is not one of "
                                    f"tiny, {', '.join(gf.PRESETS)}")
  return True


flags.register_multi_flags_validator(["suite", "decode_models"],
                                     _check_decode_models)


def model_config(name: str) -> model_lib.ModelConfig:
  gin.clear_config()
  gin.add_config_file_search_path(str(config.shipped_configs().parent))
  gin.parse_config_file(config.gin_file_path(name))
  return config.make(model_lib.ModelConfig)


def random_batch(cfg: model_lib.ModelConfig, size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (size, cfg.max_len)).astype(np.int32)
  inputs = np.concatenate([np.zeros((size, 1), np.int32), tokens[:, :-1]], 1)
  return {"inputs": inputs, "targets": tokens,
          "weights": np.ones((size, cfg.max_len), np.float32)}


def timed(fn, repeats: int) -> tuple[float, float]:
  """Seconds per call (best of ``repeats``) after one warm-up call, and the
  warm-up call's seconds (compiling, planning, verifying and one run)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best, first


def peak_bytes(compiled) -> int:
  return memory.compiled_bytes(compiled) or 0


def encoder(cfg, params, v, mesh, dim, kernel, microbatch, verify=True,
            precision="highest"):
  return encoder_lib.GradientEncoder(
      model_lib.make_loss_fn(cfg), params, second_moment=v, projection_dim=dim,
      mesh=mesh, microbatch_size=microbatch, kernel=kernel, verify=verify,
      projection_precision=precision)


def encode_memory(enc, cfg, steps: int = 1) -> int:
  """XLA's planned bytes for ``steps`` steps of ``enc``'s compiled program."""
  shape = lambda dtype: jax.ShapeDtypeStruct(
      (steps, enc.step_size, cfg.max_len), dtype, sharding=enc._sharding)
  batch = {"inputs": shape(np.int32), "targets": shape(np.int32),
           "weights": shape(np.float32)}
  program = enc._program(batch)
  return peak_bytes(program.lower(enc._constants, batch).compile())


def largest_microbatch(cfg, params, v, mesh, dim, kernel, budget: int,
                       limit: int = 4096) -> int:
  """The largest power-of-two microbatch whose program XLA plans within
  ``budget`` bytes (0 if not even 1 fits); compiles, does not run."""
  best, m = 0, 1
  while m <= limit:
    enc = encoder(cfg, params, v, mesh, dim, kernel, m, verify=False)
    if encode_memory(enc, cfg) > budget:
      break
    best, m = m, m * 2
  return best


def encode_rows(name: str, dims, batch_size: int, microbatch: int, repeats: int,
                kernels, budget_mb: int, run: bool = True, per_example: bool = True,
                verify: bool = True, precisions=("highest",)):
  t0 = time.perf_counter()
  # At 1B parameters each phase is minutes of compiling: say where time goes.
  phase = lambda what: logging.info("encode benchmark %s: %s done at %.1f s",
                                    name, what, time.perf_counter() - t0)
  cfg = model_config(name)
  mesh = partitioning.make_mesh()
  params = model_lib.init_params(cfg)
  opt_cfg = train_lib.OptimizerConfig()
  optimizer = train_lib.make_optimizer(opt_cfg)
  rep = partitioning.replicated(mesh)
  params = jax.device_put(params, rep)
  opt_state = jax.jit(optimizer.init, out_shardings=rep)(params)
  batch = random_batch(cfg, batch_size)
  on_mesh = partitioning.to_global(batch, partitioning.all_devices_batch(mesh))
  phase("init")

  step = train_lib.make_train_step(model_lib.make_loss_fn(cfg), optimizer, mesh, params)
  # The train step donates params and state: time it on copies.
  state = {"p": jax.tree.map(jax.numpy.copy, params), "o": opt_state}

  def train_once():
    state["p"], state["o"], loss = step(state["p"], state["o"], on_mesh)
    return loss

  train_s = timed(train_once, repeats)[0] if run else float("nan")
  phase("training step")
  train_mem = peak_bytes(step.lower(state["p"], state["o"], on_mesh).compile())
  # Memory per example: the slope between batch and twice the batch.
  double = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (2 * x.shape[0], *x.shape[1:]), x.dtype, sharding=x.sharding), on_mesh)
  train_per_example = ((peak_bytes(step.lower(state["p"], state["o"], double).compile())
                        - train_mem) / batch_size if per_example else float("nan"))
  phase("training step plans")
  # V = 1: a correction every kernel applies exactly (rank one).
  v = jax.tree.map(lambda x: jax.numpy.ones_like(x), params)
  microbatch = microbatch or max(1, batch_size // mesh.size)
  tokens = batch_size * cfg.max_len
  # Planning alone runs nothing, and the factored kernel's check runs a real
  # batch: without --run the plans are unverified (before 2026-12-08 the
  # check was handed the plan's shapes: a TypeError).
  verify = verify and run
  rows = []
  for dim, kernel, precision in itertools.product(dims, kernels, precisions):
    enc = encoder(cfg, params, v, mesh, dim, kernel, microbatch, verify,
                  precision)
    encode_s, first_s = (timed(lambda: enc.encode_on_device(batch), repeats)
                         if run else (float("nan"), float("nan")))
    phase(f"{kernel} d={dim} {precision} timed calls")
    # The encodings' largest error against the first precision's (unit rows).
    error = float("nan")
    if run and len(precisions) > 1:
      got = np.asarray(partitioning.fetch(enc.encode_on_device(batch)))
      if precision == precisions[0]:
        first = got
      else:
        error = float(np.max(np.linalg.norm(got - first, axis=1)))
    one_step = encode_memory(enc, cfg)
    steps = -(-batch_size // enc.step_size)
    # Each plan is a compile (minutes at 1B parameters): plan once per shape.
    enc_mem = one_step if steps == 1 else encode_memory(enc, cfg, steps)
    if per_example:
      twice = encoder(cfg, params, v, mesh, dim, kernel, 2 * microbatch,
                      verify=False, precision=precision)
      enc_per_example = (encode_memory(twice, cfg) - one_step) / enc.step_size
    else:
      enc_per_example = float("nan")
    rows.append({
        "model": name, "params": model_lib.param_count(params), "d": enc.dim,
        "kernel": kernel, "precision": precision, "error_vs_first": error,
        "batch": batch_size, "microbatch": enc.microbatch_size,
        "encode_ex_per_s": batch_size / encode_s, "encode_tok_per_s": tokens / encode_s,
        "train_ex_per_s": batch_size / train_s, "train_tok_per_s": tokens / train_s,
        "time_ratio": encode_s / train_s, "first_call_s": first_s,
        "encode_mem_mb": enc_mem / 2**20,
        "train_mem_mb": train_mem / 2**20,
        "mem_ratio": enc_mem / train_mem if train_mem else float("nan"),
        "encode_mb_per_example": enc_per_example / 2**20,
        "train_mb_per_example": train_per_example / 2**20,
        "max_microbatch": (largest_microbatch(cfg, params, v, mesh, dim, kernel,
                                              budget_mb * 2**20)
                           if budget_mb else 0)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def correction_rows(workdir: str, num_examples: int = 64) -> list[dict]:
  """How far rank-one factorizations of Adam's ``M = 1/(sqrt(V) + eps)`` are
  from it, where it matters: ``||G o (M' - M)|| / ||G o M||`` over the matrix
  weights of the checkpoint in ``workdir``, G the per-example gradients of
  ``num_examples`` rows of its corpus (``WORKDIR/facts/corpus.jsonl``)."""
  from tracer import checkpoint as ckpt_lib
  from tracer import correction
  from tracer import data as data_lib
  from tracer import projection
  from tracer.config import DataConfig
  ckpt = ckpt_lib.restore(os.path.join(workdir, "checkpoints"))
  if ckpt.optimizer_config.name != "adamw":
    raise app.UsageError(f"{workdir}: the correction suite needs an AdamW checkpoint")
  v = correction.second_moment(ckpt.opt_state, ckpt.params, b2=ckpt.optimizer_config.b2)
  eps = ckpt.optimizer_config.eps
  corpus = data_lib.read_corpus(
      os.path.join(workdir, "facts", "corpus.jsonl"),
      DataConfig.from_dict(ckpt.data_config).vocabulary(), ckpt.model_config.max_len)
  rows = np.linspace(0, len(corpus) - 1, num_examples).astype(int)
  grads = jax.vmap(jax.grad(model_lib.make_loss_fn(ckpt.model_config)), (None, 0))(
      ckpt.params, corpus.examples(rows))
  flat = lambda t: {projection.path_name(p): np.asarray(x, np.float64)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  g, vv = flat(grads), flat(v)
  names = ("row/column sums of M (tracer's)", "best rank one (SVD)", "best rank 4 (SVD)",
           "Adafactor's rule on V, then 1/sqrt")
  err, norm = dict.fromkeys(names, 0.0), 0.0
  for path, x in vv.items():
    if x.ndim < 2:
      continue
    a, b = projection.matrix_shape(x.shape)
    m = 1.0 / (np.sqrt(x.reshape(a, b)) + eps)
    u_, s_, vt = np.linalg.svd(m, full_matrices=False)
    r, c = x.reshape(a, b).mean(1), x.reshape(a, b).mean(0)
    approx = {names[0]: np.outer(m.sum(1), m.sum(0) / m.sum()),
              names[1]: s_[0] * np.outer(u_[:, 0], vt[0]),
              names[2]: (u_[:, :4] * s_[:4]) @ vt[:4],
              names[3]: 1.0 / (np.sqrt(np.outer(r, c) / r.mean()) + eps)}
    gm = g[path].reshape(len(rows), a, b)
    norm += float(np.sum((gm * m) ** 2))
    for name, m2 in approx.items():
      err[name] += float(np.sum((gm * (m2 - m)) ** 2))
  out = [{"factorization": n, "relative_error": float(np.sqrt(e / norm))}
         for n, e in err.items()]
  for row in out:
    print(json.dumps(row), flush=True)
  return out


def decode_rows(models, batch: int, prompt: int, steps: int, repeats: int
                ) -> list[dict]:
  """Seconds per greedy decode of ``steps`` tokens after ``prompt``-token
  prompts, ``batch`` at a time, in the window ``pipeline.predictions``
  decodes in (``decode_length``): the Gemma family's cached decode against
  a full forward pass per token (the baseline, written here)."""
  import dataclasses
  import jax.numpy as jnp
  from tracer import data as data_lib
  from tracer import gemma_family as gf

  def full_passes(cfg, params, examples, num_tokens):
    inputs = jnp.asarray(examples["inputs"], jnp.int32)
    prompt_len = jnp.argmax(examples["weights"] > 0, axis=-1)
    positions = jnp.arange(inputs.shape[1])
    inputs = jnp.where(positions <= prompt_len[:, None], inputs, gf.PAD_ID)

    def body(i, carry):
      inputs, out = carry
      pos = jnp.minimum(prompt_len + i, inputs.shape[1] - 1)
      logits = gf.logits(cfg, params, inputs)[jnp.arange(len(pos)), pos]
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      inputs = jnp.where(positions == (pos + 1)[:, None], token[:, None], inputs)
      return inputs, out.at[:, i].set(token)

    out = jnp.zeros((inputs.shape[0], num_tokens), jnp.int32)
    return jax.lax.fori_loop(0, num_tokens, body, (inputs, out))[1]

  rows = []
  for name in models:
    window = 1 << (prompt + steps).bit_length()
    cfg = (dataclasses.replace(gf.TINY, max_len=max(window, gf.TINY.max_len))
           if name == "tiny" else gf.GemmaConfig(preset=name, max_len=window))
    params = gf.FAMILY.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    examples = data_lib.stack_examples([data_lib.query_example(
        rng.integers(3, 256, prompt).tolist(), [3] * steps, cfg.max_len)
        for _ in range(batch)])
    length = pipeline.decode_length(examples["weights"], steps)
    examples = {k: v[:, :length] for k, v in examples.items()}
    row = {"model": name, "params": model_lib.param_count(params), "batch": batch,
           "prompt": prompt, "steps": steps, "window": length}
    tokens = {}
    for kind, fn in (("cached", gf.greedy_decode), ("full_passes", full_passes)):
      run = jax.jit(fn, static_argnums=(0, 3))
      row[f"{kind}_s"], row[f"{kind}_first_call_s"] = timed(
          lambda: run(cfg, params, examples, steps), repeats)
      tokens[kind] = np.asarray(run(cfg, params, examples, steps))
    row["speedup"] = row["full_passes_s"] / row["cached_s"]
    row["same_tokens"] = float(np.mean(tokens["cached"] == tokens["full_passes"]))
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def predictions_rows(models, batch: int, prompt: int, steps: int, repeats: int
                     ) -> list[dict]:
  """Seconds per ``pipeline.predictions`` call (greedy decode plus both
  probabilities) of ``batch`` queries on tracer's LM (a shipped gin config,
  random weights): the queries split over the data axis of a mesh of every
  device, against the baseline of no mesh (every device runs all of them)."""
  import types
  from tracer import data as data_lib
  from tracer import family as family_lib

  mesh = partitioning.make_mesh()
  vocab = data_lib.make_vocabulary("byte")
  rng = np.random.default_rng(0)
  text = lambda n: "".join(map(chr, rng.integers(97, 123, n)))
  queries = [{"id": str(i), "prompt": text(prompt), "target": text(steps)}
             for i in range(batch)]
  rows = []
  for name in models:
    cfg = model_config(name)
    params = model_lib.init_params(cfg, 0)
    ckpt = types.SimpleNamespace(family=family_lib.LM, model_config=cfg,
                                 params=partitioning.place(
                                     params, partitioning.param_shardings(mesh, params)))
    examples = data_lib.query_examples(queries, vocab, cfg.max_len)
    row = {"model": name, "params": model_lib.param_count(params), "batch": batch,
           "prompt": prompt, "steps": steps, "data_axis": mesh.shape[partitioning.DATA]}
    preds = {}
    for kind, m in (("split", mesh), ("every_device", None)):
      call = lambda: pipeline.predictions(ckpt, examples, queries, vocab,
                                          batch_size=batch, mesh=m)
      row[f"{kind}_s"], _ = timed(call, repeats)
      preds[kind] = call()
    row["speedup"] = row["every_device_s"] / row["split_s"]
    row["same_tokens"] = float(np.mean([a == b for a, b in zip(*preds.values())]))
    row["max_probability_rel_diff"] = max(
        abs(a.probability - b.probability) / b.probability
        for a, b in zip(*preds.values()))
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def markdown(rows, columns) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def batch_size(name: str, given: int) -> int:
  """The encode suite's batch for the model ``name``: ``given``
  (--batch_size), or 0 for the default, 32 for tiny and 8 for others."""
  return given or (32 if name == "tiny" else 8)


def _device_count() -> int:
  """``jax.device_count()``, its backends started quietly: each one missing
  (e.g. libtpu) is logged at INFO, not before a refusal's one line."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    return jax.device_count()
  finally:
    logging.set_verbosity(verbosity)


def check_batch_sizes(models, given: int, devices: int) -> None:
  """InputError, before any model is made, where a model's batch does not
  split evenly over the ``devices`` its training step and encode shard it
  over (before, jax's IndivisibleError traceback once the model was
  made and its training step compiled)."""
  for name in models:
    size = batch_size(name, given)
    if size % devices:
      flag = (f"--batch_size={size}" if given else
              f"--batch_size=0 (model {name}'s default, {size})")
      raise InputError(f"{flag}: each batch is split over the {devices} "
                       f"devices, which {size} examples do not divide; "
                       f"expected a multiple of {devices}")


def main(argv):
  del argv
  config.check_writable(FLAGS.json_out, "--json_out")  # before minutes of work
  if "encode" in FLAGS.suite:
    check_batch_sizes(FLAGS.models, FLAGS.batch_size, _device_count())
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
  print(f"devices: {device}")
  out = {"device": device}
  if "encode" in FLAGS.suite:
    rows = []
    for name in FLAGS.models:
      bs = batch_size(name, FLAGS.batch_size)
      rows += encode_rows(name, [int(d) for d in FLAGS.dims], bs,
                          FLAGS.microbatch_size, FLAGS.repeats, FLAGS.kernels,
                          FLAGS.memory_budget_mb, FLAGS.run, FLAGS.per_example,
                          FLAGS.verify, FLAGS.precisions)
    out["encode"] = rows
    print(markdown(rows, ["model", "params", "d", "kernel", "precision",
                          "error_vs_first", "batch",
                          "encode_ex_per_s", "encode_tok_per_s", "train_ex_per_s",
                          "time_ratio", "first_call_s", "encode_mem_mb",
                          "train_mem_mb", "mem_ratio", "encode_mb_per_example",
                          "train_mb_per_example",
                          "max_microbatch"]))
  if "correction" in FLAGS.suite:
    out["correction"] = correction_rows(FLAGS.workdir or "demo")
    print(markdown(out["correction"], ["factorization", "relative_error"]))
  if "decode" in FLAGS.suite:
    out["decode"] = decode_rows(FLAGS.decode_models, FLAGS.decode_batch,
                                FLAGS.decode_prompt, FLAGS.decode_steps,
                                FLAGS.repeats)
    print(markdown(out["decode"], ["model", "params", "batch", "prompt", "steps",
                                   "window", "cached_s", "full_passes_s",
                                   "speedup", "same_tokens"]))
  if "predictions" in FLAGS.suite:
    out["predictions"] = predictions_rows(FLAGS.models, FLAGS.decode_batch,
                                          FLAGS.decode_prompt, FLAGS.decode_steps,
                                          FLAGS.repeats)
    print(markdown(out["predictions"], [
        "model", "params", "batch", "prompt", "steps", "data_axis", "split_s",
        "every_device_s", "speedup", "same_tokens", "max_probability_rel_diff"]))
  if "scan" in FLAGS.suite:
    from tracer.launch import benchmark_scan
    out["scan"] = benchmark_scan.run_scan_benchmark(repeats=FLAGS.repeats)
    print(benchmark_scan.to_markdown(out["scan"]))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(out, f, indent=2)


USES = ("workdir",)


if __name__ == "__main__":
  config.run(main, uses=USES)
