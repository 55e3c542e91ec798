"""Orbax checkpoints holding everything later stages need to rebuild the model.

A checkpoint step has two items:
  ``state``:  {"params", "opt_state", "step"} (a PyTree),
  ``config``: {"family": the model family's name (``tracer.family``; absent
               in checkpoints written before families: tracer's LM),
               "model": the family's model config, "optimizer":
               OptimizerConfig dict, "data": {"tokenizer", "max_len",
               "overflow", ...}} (JSON).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from tracer import correction
from tracer import family as family_lib
from tracer import partitioning
from tracer import storage
from tracer import train as train_lib
from tracer.config import DataConfig, field_error
from tracer.errors import InputError, quiet_failed_loads, unread_array


@dataclasses.dataclass
class Checkpoint:
  path: str                    # the step directory
  step: int
  params: Any
  opt_state: Any
  model_config: Any             # the family's model config
  optimizer_config: train_lib.OptimizerConfig
  data_config: dict
  family: family_lib.Family = family_lib.LM

  def loss_fn(self):
    return self.family.loss_fn(self.model_config)

  def optimizer(self):
    return train_lib.make_optimizer(self.optimizer_config)


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """Orbax's manager of the checkpoint directory ``directory`` (a local path or
  ``file://`` or ``gs://``; InputError for ``s3://`` and ``memory://``, which
  this Orbax cannot use)."""
  directory = storage.normalize(directory)
  if directory.startswith("memory://"):
    raise InputError(f"{directory}: checkpoints cannot live on memory:// (Orbax "
                     "reads and writes files); keep them on a disk or gs://")
  if directory.startswith("s3://"):
    # Measured with Orbax 0.12.8 on an S3 server: its file layer (etils)
    # goes through TensorFlow's file systems, which have no s3 ("File system
    # scheme 's3' not implemented"), and through fsspec (EPATH_USE_TF=false,
    # s3fs) the path loses a slash ("Checkpoint path should be absolute").
    raise InputError(f"{directory}: checkpoints cannot live on s3:// (Orbax "
                     f"{ocp.__version__} has no S3 file system); keep them on a "
                     "local or network disk, or gs://")
  return ocp.CheckpointManager(
      storage.local_path(directory) or directory, item_names=("state", "config"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state,
         model_config: Any, optimizer_config: train_lib.OptimizerConfig,
         data_config: dict, family: family_lib.Family = family_lib.LM) -> None:
  """Saves one step (Orbax writes it atomically: a temp dir, then a rename)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state,
                                   "step": step}),
      config=ocp.args.JsonSave({"family": family.name,
                                "model": family.config_to_dict(model_config),
                                "optimizer": optimizer_config.to_dict(),
                                "data": data_config})))
  mngr.wait_until_finished()


def _abstract_state(family, model_config, optimizer_config, mesh):
  """The state's shapes, each leaf on its mesh sharding: params as the family
  lays them out, the optimizer state by shape (Adam's moments follow their
  params when the family's rules are the shape-based default)."""
  params = jax.eval_shape(lambda: family.init_params(model_config))
  opt_state = jax.eval_shape(train_lib.make_optimizer(optimizer_config).init, params)
  tree = {"params": params, "opt_state": opt_state}
  shardings = {"params": family.param_shardings(model_config, mesh, params),
               "opt_state": partitioning.param_shardings(mesh, opt_state)}
  tree = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return {**tree, "step": 0}


def _steps(directory: str) -> tuple[list[int], ocp.CheckpointManager]:
  local = storage.local_path(storage.normalize(directory))
  if local is not None and not os.path.isdir(local):
    raise InputError(f"{directory}: no checkpoint directory")
  mngr = manager(directory)
  return sorted(mngr.all_steps()), mngr


def saved_steps(directory: str) -> list[int]:
  """The steps a CheckpointManager directory holds, in order."""
  steps, mngr = _steps(directory)
  mngr.close()
  return steps


def check_steps(directory: str, wanted) -> None:
  """InputError unless the CheckpointManager ``directory`` holds every step in
  ``wanted`` (checked before anything is computed from them)."""
  steps = saved_steps(directory)
  missing = [step for step in wanted if step not in steps]
  if missing:
    raise InputError(f"{directory}: no step {_listed(missing)}; it holds "
                     f"step(s) {_listed(steps)}")


OPT_STATES = ("all", "second_moment")


def restore(directory: str, step: int | None = None, mesh=None, *,
            opt_state: str = "all") -> Checkpoint:
  """Restores a step (default: the latest) from a CheckpointManager directory.

  The model and optimizer are rebuilt from the checkpoint's own config item,
  so the optimizer state comes back with its exact optax structure. Params and
  optimizer state are read straight onto ``mesh`` (default: every device on
  ``data``), split over its ``model`` axis as ``partitioning.param_shardings``
  says: on a pod each host reads only its shards, and no device ever holds
  more than its share.

  ``opt_state``: "all" (training on, tail-patch), or "second_moment": what
  ``tracer.second_moment`` reads, the first moments left unread (``...``
  leaves; ``correction.without_first_moments``): for AdamW a third less to
  read and hold than params and "all" (params, mu and nu are the same size).
  """
  if opt_state not in OPT_STATES:
    raise ValueError(f"opt_state={opt_state!r}: expected one of {OPT_STATES}")
  mngr, step, where, (family, model_config, optimizer_config, data_config) = (
      _read_config(directory, step))
  mesh = partitioning.make_mesh() if mesh is None else mesh
  target = _abstract_state(family, model_config, optimizer_config, mesh)
  _check_param_shapes(where, target["params"], model_config)
  if opt_state == "second_moment":
    # StandardRestore takes no placeholders; PyTreeRestore skips them.
    target["opt_state"] = correction.without_first_moments(target["opt_state"],
                                                           ocp.PLACEHOLDER)
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  else:
    args = ocp.args.StandardRestore(target)
  try:
    with quiet_failed_loads():
      state = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
  except Exception as e:  # pylint: disable=broad-except
    unread = unread_array(e)
    if unread is None and not isinstance(
        e, (ValueError, KeyError, TypeError, FileNotFoundError)):
      raise
    if (unread or isinstance(e, FileNotFoundError) or "NOT_FOUND" in str(e)
        or _lacks(where, "state")):
      # A file of the state is gone or cut (a partial copy): not another model.
      raise _partial_copy(where, "state", unread or e) from None
    # Arrays of another model than the config item describes.
    raise InputError(f"{where}: its state does not match its model config "
                     f"({_config_text(model_config)}; optimizer "
                     f"{optimizer_config.name}): {_short(e)}") from None
  return Checkpoint(where, int(step), state["params"],
                    state["opt_state"], model_config, optimizer_config,
                    data_config, family)


def saved_step(directory: str) -> tuple[int, train_lib.OptimizerConfig]:
  """The latest step in a CheckpointManager directory and its optimizer
  config, from the step's config item alone: no array is read."""
  mngr, step, _, (_, _, optimizer_config, _) = _read_config(directory, None)
  mngr.close()
  return int(step), optimizer_config


def saved_config(directory: str, step: int | None = None) -> Checkpoint:
  """A step (default: the latest) as ``restore`` gives it, less its arrays
  (params and opt_state None): its configs, from its config item alone."""
  mngr, step, where, (family, model_config, optimizer_config, data_config) = (
      _read_config(directory, step))
  mngr.close()
  return Checkpoint(where, int(step), None, None, model_config, optimizer_config,
                    data_config, family)


def finished(directory: str) -> bool:
  """Whether the training run of a CheckpointManager directory reached its
  last step (``saved_step``: no array is read)."""
  step, optimizer_config = saved_step(directory)
  return step >= optimizer_config.total_steps


def _read_config(directory: str, step: int | None):
  """``(manager, step, step directory, (family, model config, optimizer
  config, data config))`` of a step (default: the latest), from its config
  item."""
  directory = storage.normalize(directory)
  steps, mngr = _steps(directory)
  if not steps:
    raise InputError(f"{directory}: holds no checkpoint; expected a checkpoint "
                     "directory (made by launch.train) or one of its step "
                     "directories")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise InputError(f"{directory}: no step {step}; it holds step(s) "
                     f"{_listed(steps)}")
  where = storage.join(directory, str(step))
  try:
    config = mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    if isinstance(e, FileNotFoundError) or _lacks(where, "config"):
      raise _partial_copy(where, "config", e) from None
    raise InputError(f"{where}: its config item is not a tracer checkpoint's "
                     f"(model, optimizer, data): {_short(e)}") from None
  name = config.get("family") if isinstance(config, dict) else None
  if name is not None and not isinstance(name, str):  # (a TypeError before 2026-12-07)
    raise InputError(f"{where}: its config item's family is {name!r}; expected "
                     "a model family's name")
  try:
    family = family_lib.get(name)
  except InputError as e:
    raise InputError(f"{where}: {e}") from None
  try:
    model_config = family.config_from_dict(config["model"])
    optimizer_config = train_lib.OptimizerConfig.from_dict(config["optimizer"])
    data = DataConfig.from_dict(config.get("data", {}))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise InputError(f"{where}: its config item is not a tracer checkpoint's "
                     f"(model, optimizer, data): {_short(e)}") from None
  # The checks gin's values get: a value edited in (or written by another
  # version) failed deep in the restore or the optimizer, a traceback.
  for checked in (model_config, optimizer_config, data):
    error = field_error(checked)
    if error:
      raise InputError(f"{where}: its config item holds {error}")
  return mngr, step, where, (family, model_config, optimizer_config,
                             config.get("data", {}))


def _lacks(where: str, item: str) -> bool:
  """Whether the step directory ``where`` holds no file of ``item`` (a copy
  cut short before it: rsync copies config/ before state/)."""
  try:
    return not storage.list_dir(where, f"{item}/")
  except InputError:
    return False


def _partial_copy(where: str, item: str, error) -> InputError:
  """The error for a step whose ``item`` is gone or cut: a partial copy, not
  another model's checkpoint."""
  reason = (f"its {item}/ directory is missing" if _lacks(where, item)
            else _short(error))
  return InputError(f"{where}: its {item} cannot be read, a file of it is "
                    f"missing or damaged ({reason}); expected a checkpoint "
                    "copied whole")


def step_of(location: str) -> tuple[str, int | None]:
  """(CheckpointManager directory, step) that ``location`` names: a step
  directory (``runs/3``: step 3 of ``runs``), or a manager's directory
  itself (step None: its latest). A directory named by a number that holds
  step directories (``runs/7``, run 7's checkpoints) is the latter: before
  2026-12-07 it was read as step 7 of ``runs``. A name with leading zeros
  (``runs/02``) is a directory of its own: steps are written ``2``, so it
  is not step 2 (it was, before 2026-12-07)."""
  parent, base = storage.split(location)
  if base.isascii() and base.isdigit() and base == str(int(base)) and not any(
      "/" in k and k.split("/")[0].isdigit() for k in storage.list_dir(location)):
    return parent, int(base)
  return location, None


def is_tracer_checkpoint(location: str) -> bool:
  """Whether ``location`` is a checkpoint directory ``save`` wrote (a
  manager's directory of step directories, or one step directory), as
  opposed to another library's format (e.g. released weights)."""
  keys = storage.list_dir(location)
  return any(k.split("/")[0].isdigit() or k.startswith("config/") for k in keys)


def _check_param_shapes(where: str, params, model_config) -> None:
  """InputError naming the first param whose stored shape is not the one the
  checkpoint's own model config gives (a config item edited, or copied from
  another model), before a restore that would fail less legibly."""
  try:
    # Orbax warns through absl logging that a step's item has no metadata
    # file of its own: true, and not worth a line.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      # A partial copy fails here first, and its stragglers' tracebacks may
      # print before the restore below would begin dropping them.
      with quiet_failed_loads():
        stored = ocp.StandardCheckpointer().metadata(storage.join(where, "state"))
    finally:
      logging.set_verbosity(verbosity)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)["params"]
  except Exception:  # pylint: disable=broad-except
    return  # no metadata to compare with: the restore itself says what is wrong
  shapes = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
            for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    if shapes.get(key) != tuple(x.shape):
      have = shapes[key] if key in shapes else "missing"
      raise InputError(f"{where}: params{key} is {have} in the checkpoint, but "
                       f"its model config ({_config_text(model_config)}) needs "
                       f"{tuple(x.shape)}; expected a checkpoint written with "
                       "this config")


def differences(checkpoint_config, run_config, name: str) -> list[str]:
  """``"<name>.<field>: the checkpoint has X, this run has Y"`` for every
  field in which two config dataclasses differ."""
  have, want = dataclasses.asdict(checkpoint_config), dataclasses.asdict(run_config)
  return [f"{name}.{k}: the checkpoint has {have[k]!r}, this run has {want[k]!r}"
          for k in have if have[k] != want.get(k)]


def _config_text(config) -> str:
  fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
  return ", ".join(f"{k}={v!r}" for k, v in dict(fields).items())


def _listed(steps: list[int], most: int = 10) -> str:
  return str(steps) if len(steps) <= most else (
      f"{steps[:most // 2]} ... {steps[-most // 2:]}")


def _short(error: BaseException, most: int = 400) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= most else text[:most - 3] + "..."

