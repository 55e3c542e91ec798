r"""Trains the LM: data parallel over all devices, Orbax checkpoints, resumable.

  tracer train --gin_file=configs/tiny.gin \
      --corpus=DIR/corpus.jsonl --workdir=W

``--corpus`` also takes a glob of JSONL shards, a registered seqio task or
mixture name, or a directory made by ``launch.tokenize``. Rerunning with
the same workdir resumes from the latest checkpoint in ``W/checkpoints``.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import numpy as np

from tracer.launch import config
from tracer.launch.progress import Progress, say
from tracer import checkpoint as ckpt_lib
from tracer import claim as claim_lib
from tracer import corpus as corpus_lib
from tracer import memory
from tracer import model as model_lib
from tracer import partitioning
from tracer import storage
from tracer import train as train_lib
from tracer.config import DataConfig, OptimizerConfig, TrainConfig
from tracer.errors import InputError

FLAGS = flags.FLAGS


def train(corpus_source: str, workdir: str) -> dict:
  """Runs (or resumes) training of the ``--family`` model; returns the last
  logged metrics."""
  memory.release_programs_near_map_limit()  # (e.g. ``tracer family``'s sets)
  family = config.model_family()
  config_class = config.model_config_class()
  model_config = config.make(config_class)
  opt_config = config.make(OptimizerConfig)
  data_config = config.make(DataConfig)
  train_config = config.make(TrainConfig)

  vocab = data_config.vocabulary()
  if vocab.vocab_size > family.vocab_size(model_config):
    raise InputError(f"{config_class.__name__}: the model embeds "
                     f"{family.vocab_size(model_config)} token ids (vocab_size), "
                     f"fewer than the tokenizer's {vocab.vocab_size}")
  max_len = family.max_len(model_config)
  corpus = corpus_lib.open_corpus(corpus_source, data_config, max_len)
  mesh = partitioning.make_mesh()
  if train_config.batch_size % mesh.size:
    raise InputError(f"TrainConfig.batch_size={train_config.batch_size} must be a "
                     f"multiple of the {mesh.size} devices")
  optimizer = train_lib.make_optimizer(opt_config)
  checkpoints = os.path.join(workdir, "checkpoints")
  # The local directories the manager makes (the workdir, its checkpoints/),
  # removed again if a new run is refused before its first step, as an
  # encode's are (claim.Claim.release): a refusal leaves nothing behind.
  made = claim_lib.missing_dirs(checkpoints)
  mngr = ckpt_lib.manager(checkpoints, max_to_keep=train_config.keep_checkpoints)
  replicated = partitioning.replicated(mesh)
  batches = {k: getattr(train_config, k) for k in _BATCH_FIELDS}
  if mngr.latest_step() is not None:
    restored = ckpt_lib.restore(str(mngr.directory), mesh=mesh)
    recorded = restored.data_config
    rows = recorded.get("num_rows")
    fingerprint = recorded.get("corpus_fingerprint")
    # A resumed run must take the steps the uninterrupted run would have:
    # the same model, optimizer, data and batches (TrainConfig's batch size
    # and seed). Only a finished run's total_steps may change (training on
    # past the end, its learning rate then on the longer schedule's curve):
    # mid-run it is the schedule of the steps left (before 2026-12-07 taken,
    # silently, and the steps after the crash had other learning rates).
    diffs = {  # what differs -> the differences, each "field: ckpt has, run has"
        "family": [f"family: the checkpoint has {restored.family.name!r}, this "
                   f"run has {family.name!r}"] if restored.family is not family else [],
        config_class.__name__: ckpt_lib.differences(
            restored.model_config, model_config, config_class.__name__)
        if restored.family is family else [],
        "OptimizerConfig": [
            d if not d.startswith("OptimizerConfig.total_steps:") else
            f"{d} (the schedule of the steps after step {restored.step}: only a "
            "finished run's total_steps may change)"
            for d in ckpt_lib.differences(restored.optimizer_config, opt_config,
                                          "OptimizerConfig")
            if not d.startswith("OptimizerConfig.total_steps:")
            or restored.step < restored.optimizer_config.total_steps],
        "DataConfig": ckpt_lib.differences(DataConfig.from_dict(recorded),
                                           data_config, "DataConfig"),
        "TrainConfig": [
            f"TrainConfig.{k}: the checkpoint has {v!r}, this run has {batches[k]!r}"
            for k, v in recorded.get("train", batches).items() if batches.get(k) != v],
        "corpus": [
            f"the checkpoint's corpus had {rows} rows, this one has {len(corpus)}"
        ] if rows != len(corpus) else [
            f"the checkpoint's corpus rows have fingerprint {fingerprint}, this "
            f"one's {corpus.fingerprint} (the same count, other rows)"
        ] if fingerprint and corpus.fingerprint and fingerprint != corpus.fingerprint
        else [],
    }
    changed = [what for what, d in diffs.items() if d]
    if changed:
      raise InputError(f"{mngr.directory}: cannot resume, the checkpoint's "
                       f"{', '.join(changed)} differ from this run's ("
                       f"{'; '.join(sum(diffs.values(), []))})")
    params, opt_state, start = restored.params, restored.opt_state, restored.step
    if start > opt_config.total_steps:
      raise InputError(f"{mngr.directory}: the checkpoint is at step {start}, past "
                       f"OptimizerConfig.total_steps={opt_config.total_steps}; "
                       f"expected total_steps of at least {start}")
    say(f"resuming from step {start}" if start < opt_config.total_steps else
        f"already trained: the checkpoint is at total_steps={start}")
  else:
    params = jax.device_put(family.init_params(model_config, train_config.seed),
                            replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    start = 0
  data_dict = {**data_config.to_dict(), "corpus": corpus_source,
               "num_rows": len(corpus), "corpus_fingerprint": corpus.fingerprint,
               "train": batches}
  say(f"corpus {corpus_source}: {len(corpus)} rows; model "
        f"{model_lib.param_count(params):,} params; mesh {dict(mesh.shape)}")

  step_fn = train_lib.make_train_step(family.loss_fn(model_config), optimizer, mesh,
                                      params)
  sharding = partitioning.all_devices_batch(mesh)
  if start < opt_config.total_steps:
    try:
      _check_step_memory(step_fn, params, opt_state, corpus,
                         train_config.batch_size, sharding)
    except InputError:
      mngr.close()
      claim_lib.remove_dirs(made)
      raise
  host_rows = partitioning.host_slice(train_config.batch_size)
  log_path = storage.join(workdir, "train_log.jsonl")
  logged = _log_up_to(log_path, start) if jax.process_index() == 0 else []
  metrics, losses, t0, steps_timed = {}, [], time.perf_counter(), 0
  progress = Progress("train", unit="steps", initial=start)
  for step in range(start, opt_config.total_steps):
    rows = train_lib.batch_rows(step, train_config.batch_size, len(corpus),
                                train_config.seed)
    batch = partitioning.to_global(corpus.examples(rows[host_rows]), sharding)
    params, opt_state, loss = step_fn(params, opt_state, batch)
    losses.append(loss)
    if len(losses) > 1:
      # At most two steps in flight: a long queue of dispatched steps can
      # deadlock XLA:CPU's collectives across simulated devices.
      losses[-2].block_until_ready()
    steps_timed += 1
    done = step + 1
    if done % train_config.log_every == 0 or done == opt_config.total_steps:
      mean_loss = float(np.mean(jax.device_get(losses)))
      elapsed = time.perf_counter() - t0
      metrics = {"step": done, "loss": mean_loss, "steps_per_s": steps_timed / elapsed,
                 "tokens_per_s": steps_timed * train_config.batch_size
                 * max_len / elapsed}
      left = (opt_config.total_steps - done) / metrics["steps_per_s"]
      progress.postfix(loss=f"{mean_loss:.4f}")
      say(f"step {done}/{opt_config.total_steps}  loss {mean_loss:.4f}  "
          f"{metrics['steps_per_s']:.2f} steps/s  "
          f"{metrics['tokens_per_s']:.0f} tokens/s  {left:.0f}s left")
      if jax.process_index() == 0:
        # Rewritten whole (object storage has no append): a line per
        # log_every steps, so a few MB at most.
        logged.append(json.dumps(metrics) + "\n")
        storage.write_text(log_path, "".join(logged))
      losses, t0, steps_timed = [], time.perf_counter(), 0
    progress(done, opt_config.total_steps)
    if saves_at(done, train_config, opt_config.total_steps):
      ckpt_lib.save(mngr, done, params, opt_state, model_config, opt_config, data_dict,
                    family)
  mngr.close()
  return metrics


def saves_at(step: int, train_config: TrainConfig, total_steps: int) -> bool:
  """Whether a run saves a checkpoint after ``step``: every
  ``checkpoint_every`` steps, and the last."""
  return step % train_config.checkpoint_every == 0 or step == total_steps


def kept_steps(train_config: TrainConfig, total_steps: int) -> list[int]:
  """The checkpoints a finished run keeps: the last ``keep_checkpoints`` it
  saved (the manager's ``max_to_keep``)."""
  keep = train_config.keep_checkpoints
  # Every checkpoint_every-th step saves, so the last `keep` saves lie in
  # the last keep * checkpoint_every steps.
  start = max(1, total_steps - keep * train_config.checkpoint_every)
  saved = [s for s in range(start, total_steps + 1)
           if saves_at(s, train_config, total_steps)]
  return saved[-keep:]


def _check_step_memory(step_fn, params, opt_state, corpus, batch_size: int,
                       sharding) -> None:
  """InputError where a step of ``batch_size`` rows would not fit in memory,
  by XLA's count once the step is compiled (the loop's first step reuses
  that compile), before any batch is read."""
  batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((batch_size, *a.shape[1:]), a.dtype,
                                     sharding=sharding),
      corpus.examples(np.arange(1)))
  memory.check_compiled_memory(
      step_fn.lower(params, opt_state, batch).compile(),
      f"TrainConfig.batch_size={batch_size}: a training step",
      "a smaller TrainConfig.batch_size (a step's memory grows with it)")


# The TrainConfig fields that choose each step's rows (``train.batch_rows``).
_BATCH_FIELDS = ("batch_size", "seed")


def _log_up_to(path: str, step: int) -> list[str]:
  """The lines of ``path`` (the train log; a local path or URL) up to
  ``step``: a run that stopped after logging later steps resumes from its
  last checkpoint and logs those steps again."""
  data = storage.read_bytes(path)
  kept = []
  for number, line in enumerate((data or b"").decode("utf-8", "replace").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      logged = record.get("step", 0) if isinstance(record, dict) else None
    except ValueError:
      logged = None
    if not isinstance(logged, int):
      raise InputError(f"{path}:{number}: not a train log line (expected a JSON "
                       "object with an integer 'step'); the log was edited or "
                       "damaged: remove that line, or the log, to resume")
    if logged <= step:
      kept.append(line + "\n")
  return kept


def main(argv):
  del argv
  config.setup(required=("corpus", "workdir"))
  config.check_workdir_writable()
  train(FLAGS.corpus, FLAGS.workdir)


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "corpus")


if __name__ == "__main__":
  config.run(main, uses=USES)
