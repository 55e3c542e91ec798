"""Orbax checkpoints holding everything later stages need to rebuild the model.

A checkpoint step has two items:
  ``state``:  {"params", "opt_state", "step"} (a PyTree),
  ``config``: {"model": ModelConfig dict, "optimizer": OptimizerConfig dict,
               "data": {"tokenizer", "max_len", "overflow", ...}} (JSON).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from tracer import model as model_lib
from tracer import partitioning
from tracer import storage
from tracer import train as train_lib
from tracer.errors import InputError


@dataclasses.dataclass
class Checkpoint:
  path: str                    # the step directory
  step: int
  params: Any
  opt_state: Any
  model_config: model_lib.ModelConfig
  optimizer_config: train_lib.OptimizerConfig
  data_config: dict

  def loss_fn(self):
    return model_lib.make_loss_fn(self.model_config)

  def optimizer(self):
    return train_lib.make_optimizer(self.optimizer_config)


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      storage.normalize(directory), item_names=("state", "config"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state,
         model_config: model_lib.ModelConfig,
         optimizer_config: train_lib.OptimizerConfig, data_config: dict) -> None:
  """Saves one step (Orbax writes it atomically: a temp dir, then a rename)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state,
                                   "step": step}),
      config=ocp.args.JsonSave({"model": model_config.to_dict(),
                                "optimizer": optimizer_config.to_dict(),
                                "data": data_config})))
  mngr.wait_until_finished()


def _abstract_state(model_config, optimizer_config, mesh):
  """The state's shapes, each leaf on its mesh sharding (by shape, as the
  encoder shards params: Adam's moments follow their params)."""
  params = jax.eval_shape(lambda: model_lib.init_params(model_config))
  opt_state = jax.eval_shape(train_lib.make_optimizer(optimizer_config).init, params)
  tree = {"params": params, "opt_state": opt_state}
  shardings = partitioning.param_shardings(mesh, tree)
  tree = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return {**tree, "step": 0}


def restore(directory: str, step: int | None = None, mesh=None) -> Checkpoint:
  """Restores a step (default: the latest) from a CheckpointManager directory.

  The model and optimizer are rebuilt from the checkpoint's own config item,
  so the optimizer state comes back with its exact optax structure. Params and
  optimizer state are read straight onto ``mesh`` (default: every device on
  ``data``), split over its ``model`` axis as ``partitioning.param_shardings``
  says: on a pod each host reads only its shards, and no device ever holds
  more than its share.
  """
  directory = storage.normalize(directory)
  if not storage.is_url(directory) and not os.path.isdir(directory):
    raise InputError(f"{directory}: no checkpoint directory")
  mngr = manager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise InputError(f"{directory}: holds no checkpoint")
  config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  config = config["config"]
  model_config = model_lib.ModelConfig.from_dict(config["model"])
  optimizer_config = train_lib.OptimizerConfig.from_dict(config["optimizer"])
  mesh = partitioning.make_mesh() if mesh is None else mesh
  target = _abstract_state(model_config, optimizer_config, mesh)
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  return Checkpoint(storage.join(directory, str(step)), int(step), state["params"],
                    state["opt_state"], model_config, optimizer_config,
                    config.get("data", {}))

