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
      os.path.abspath(directory), item_names=("state", "config"),
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


def _abstract_state(model_config, optimizer_config, sharding=None):
  params = jax.eval_shape(lambda: model_lib.init_params(model_config))
  opt_state = jax.eval_shape(train_lib.make_optimizer(optimizer_config).init, params)
  tree = {"params": params, "opt_state": opt_state, "step": 0}
  if sharding is None:
    return tree
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
      if hasattr(x, "shape") else x, tree)


def restore(directory: str, step: int | None = None, sharding=None) -> Checkpoint:
  """Restores a step (default: the latest) from a CheckpointManager directory.

  The model and optimizer are rebuilt from the checkpoint's own config item,
  so the optimizer state comes back with its exact optax structure.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise InputError(f"{directory}: no checkpoint directory")
  mngr = manager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise InputError(f"{directory}: holds no checkpoint")
  config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  config = config["config"]
  model_config = model_lib.ModelConfig.from_dict(config["model"])
  optimizer_config = train_lib.OptimizerConfig.from_dict(config["optimizer"])
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = _abstract_state(model_config, optimizer_config, sharding)
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  return Checkpoint(os.path.join(directory, str(step)), int(step), state["params"],
                    state["opt_state"], model_config, optimizer_config,
                    config.get("data", {}))
