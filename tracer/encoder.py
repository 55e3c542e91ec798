"""Gradient encodings: TrackStar's per-example vectors.

    encoding = normalize(R^(-1/2) . P . (grad L(example) / (sqrt(V) + eps)))

Per-example projections are taken under ``jax.jit`` on a (data, model) mesh:
examples split over ``data``, params split over ``model`` as training splits
them (``tracer.partitioning``). A batch runs as a sequence of microbatches of
``data_size * microbatch_size`` examples. Two kernels compute the same thing:
``"factored"`` (default, ``tracer.factored``) projects the weights of linen
Dense/DenseGeneral/Einsum/Embed calls from the calls' inputs and output
gradients and never forms their per-example gradients; ``"exact"``
materializes every per-example gradient (``microbatch_size`` of them live per
data shard) and projects it.

Two ways to feed a batch, one computation:
  * global (``project``, ``encode``): every process passes the whole batch;
    results come back whole (queries, tests, small corpora).
  * process-local (``project_local``): every process passes only the
    examples of its own positions (``local_positions``); the projections stay
    where they were computed (``partitioning.local_part`` brings a process its
    own rows), and nothing crosses hosts but the model's own collectives. This
    is how a corpus is encoded on a pod (``tracer.pipeline.encode_corpus``).
A batch of B examples is laid out as ``[steps, step_size]`` positions (B
padded up); step ``s``'s positions are split over the ``data`` axis, so a
process holds a fixed block of each step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, Iterable, NamedTuple, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tracer import correction
from tracer import factored
from tracer import hessian
from tracer import memory
from tracer import partitioning
from tracer import projection


# The factored kernel's verification: a weight whose projection differs from
# the materialized one by more than this (relative L2) is not trusted. Float32
# summation order alone gives ~1e-6; a use outside the layer call gives O(1).
# A model computed in a narrower dtype rounds its materialized gradients to
# that dtype (bf16: 0.15-0.25% measured on the tiny LM, up to 1.9% on a mesh
# of model axis 4), so its weights are allowed 8 of that dtype's epsilons
# (``verify_tolerance``).
VERIFY_TOLERANCE = 1e-3
# Examples the verification compares (a weight's largest error over the
# usable ones decides): one whose gradient is zero (every target masked) or
# not finite checks nothing, and is skipped.
VERIFY_EXAMPLES = 4


# Why an example was quarantined (``Projected.nonfinite``).
FINITE, LOSS_NOT_FINITE, GRADIENT_NOT_FINITE = 0, 1, 2
NONFINITE_REASONS = {LOSS_NOT_FINITE: "non-finite loss",
                     GRADIENT_NOT_FINITE: "non-finite gradient"}


# --- the jitted programs ------------------------------------------------------
#
# Built once per process for what they close over (the loss, layout, plan,
# epsilon, precision and output sharding; jax.jit keys the rest, the argument
# shapes and shardings, itself), so a later encoder of the same model (a
# sweep's next run, a server's next request, the next test) reuses the
# compiled programs instead of compiling them again: an encoder's programs
# were two fifths of a test_pipeline.py run on 2 CPU cores (130 s of 326 s).
# The losses of the built-in families are one function per model config
# (``model.make_loss_fn``) for that; any other loss is reused as long as the
# same function is passed. Few are kept: a compiled program holds its code
# (the tiny LM's step and verification on 8 CPU devices: ~600 of the 65,530
# memory maps Linux allows a process by default), and a process rarely
# alternates between more models than this.


@functools.lru_cache(maxsize=4)
def _projection_program(loss_fn, layout, plan, eps, precision, sharding):
  """Jitted ``(constants, batch) -> (phi, losses)`` over ``[steps, step, ...]``
  batches; ``constants``: ``GradientEncoder._constants``; ``plan`` None for
  the exact kernel."""

  def project_all(constants, batch):
    params, v, scales, sides = constants

    def one(microbatch):
      if plan is None:
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(
            params, microbatch)
        phi = projection.project(layout, correction.correct(grads, v, eps),
                                 precision, sides)
        return phi, losses.astype(jnp.float32)
      return factored.project_examples(plan, layout, loss_fn, params, v, eps,
                                       scales if v is not None else None,
                                       microbatch, precision, sides)
    return jax.lax.map(one, batch)

  return jax.jit(project_all, out_shardings=(sharding, sharding))


@functools.lru_cache(maxsize=4)
def _verification_program(loss_fn, layout, plan, precision, sharding):
  """Jitted ``(constants, batch) -> (errors [blocks], checked)``: the largest
  relative error of ``plan``'s factored projection against the materialized
  one over the batch's first ``VERIFY_EXAMPLES`` examples (``_verified``)."""

  def one(params, sides, example):
    """Block errors ``[blocks]`` (NaN as inf) and whether the example's
    gradient is finite and not zero (else it checks nothing)."""
    grads = jax.grad(loss_fn)(params, example)
    exact = projection.project(layout, jax.tree.map(lambda g: g[None], grads),
                               precision, sides)[0]
    fact = factored.project_examples(
        plan, layout, loss_fn, params, None, 0.0, None,
        jax.tree.map(lambda x: x[None], example), precision, sides)[0][0]
    err = factored.block_errors(layout, plan, fact, exact)
    usable = jnp.all(jnp.isfinite(exact)) & (jnp.linalg.norm(exact) > 0)
    return jnp.where(jnp.isnan(err), jnp.inf, err), usable

  def errors(constants, batch):
    params, _, _, sides = constants
    examples = jax.tree.map(_first_examples, batch)
    err, usable = jax.lax.map(lambda ex: one(params, sides, ex), examples)
    return jnp.max(jnp.where(usable[:, None], err, 0.0), axis=0), jnp.any(usable)

  return jax.jit(errors, out_shardings=sharding)


def _first_examples(x):
  """The first ``VERIFY_EXAMPLES`` positions of a ``[steps, step_size, ...]``
  batch, across steps: one step may hold a single example (a (1, 8) mesh at
  microbatch_size 1), and the plan would then depend on the mesh."""
  steps = -(-VERIFY_EXAMPLES // x.shape[1])
  return x[:steps].reshape(-1, *x.shape[2:])[:VERIFY_EXAMPLES]


def _built(build, *key):
  """``build(*key)``, from the cache where ``key`` can be hashed (a loss that
  is a dataclass of unhashable fields cannot: it is built each time)."""
  try:
    hash(key)
  except TypeError:
    return build.__wrapped__(*key)
  return build(*key)


class Projected(NamedTuple):
  """Unnormalized projections of a batch, as global arrays on the mesh.

  An example whose loss or gradient is not finite gets a zero row and its
  reason in ``nonfinite``; ``usable`` leaves it (and padding) out.
  """
  phi: jax.Array        # f32[steps, step_size, d]
  valid: jax.Array      # bool[steps, step_size]: False at padding positions
  nonfinite: jax.Array  # int8[steps, step_size]: FINITE or a NONFINITE_REASONS key
  usable: jax.Array     # bool[steps, step_size]: valid and finite
  count: int            # real examples that are not finite, over all processes


class GradientEncoder:
  """Encodes examples of any JAX model given ``loss_fn(params, example)``.

  Args:
    loss_fn: scalar loss of ONE example (a pytree of arrays without batch axis).
    params: the params pytree of the checkpoint being explained (host arrays,
      or arrays already on the mesh, e.g. from a sharded restore).
    second_moment: params-shaped pytree V (``tracer.second_moment``), or None
      for no optimizer correction.
    epsilon: added to sqrt(V); default 1e-8, Adam's own default. Launch scripts
      take it from the checkpoint's optimizer config.
    projection_dim: the total projection budget; ``encoder.dim`` is the real d.
    seed: seed of the projection matrices.
    mesh: a (data, model) mesh; None means every device on the data axis.
    param_shardings: how params (and V) lie on ``mesh``: a params-shaped
      pytree of ``NamedSharding`` or ``PartitionSpec`` (e.g. a model family's
      own rules, or the shardings the params were restored with). None: by
      shape (``partitioning.param_shardings``: the largest axis divisible by
      the ``model`` axis is split).
    microbatch_size: examples per data shard per step.
    kernel: "factored" (``tracer.factored``: weights of linen Dense,
      DenseGeneral, Einsum and Embed calls projected from the calls' inputs and
      output gradients; the rest materialized) or "exact" (every per-example
      gradient materialized). Both compute the same encodings.
    rank_one_correction: with the factored kernel, approximate a correction
      that is not rank one per weight (Adam's) by its rank-one factorization
      instead of leaving that weight to the materialized path. A weight
      stacked by nn.scan is fitted per layer (``M_l ~ u_l w_l^T``: the
      factorization of each layer's matrix, exact where that is rank one, as
      Adafactor's is), with or without this.
    projection_precision: how the projections' fp32 matmuls run, "highest"
      or "bf16_6x" (``projection.PRECISIONS``: both fp32-accurate; the second
      on a GPU's bf16 tensor cores).
    verify: with the factored kernel, compare it once (the first
      ``VERIFY_EXAMPLES`` examples of the first batch, no correction, fp32
      matmuls at full precision) with the materialized gradient, block by
      block; a weight whose projections differ by more than its
      ``verify_tolerance`` on an example with a finite, non-zero gradient (it
      is used outside its layer call) falls back to the materialized path,
      with a warning; with no such example, every weight does.
    factored_weights: with the factored kernel, the weights it projects as a
      verification found them before (``factored_weights`` of the encoder
      that encoded a store, kept in its manifest): the plan keeps those,
      sends the rest to the materialized path, and is not verified again.
      Where the plan cannot take one of them (another model code), it is
      verified as usual.
  """

  def __init__(self, loss_fn: Callable[[Any, Any], jax.Array], params: Any, *,
               second_moment: Any | None = None, epsilon: float = 1e-8,
               projection_dim: int = 4096, seed: int = 0, mesh=None,
               param_shardings: Any | None = None,
               microbatch_size: int = 8, kernel: str = "factored",
               rank_one_correction: bool = False, verify: bool = True,
               projection_precision: str = "highest",
               factored_weights: Collection[str] | None = None):
    if kernel not in ("factored", "exact"):
      raise ValueError(f"kernel={kernel!r}: expected 'factored' or 'exact'")
    projection.matmul_precision(projection_precision)  # a known name
    memory.release_programs_near_map_limit()
    self.precision = projection_precision
    self.mesh = partitioning.make_mesh() if mesh is None else mesh
    self.layout = projection.make_layout(params, projection_dim, seed)
    self.epsilon = float(epsilon)
    self.microbatch_size = int(microbatch_size)
    self.kernel = kernel
    self.verify = verify
    self._given = None if factored_weights is None else frozenset(factored_weights)
    self.loss_fn = loss_fn
    param_sharding = partitioning.given_shardings(self.mesh, params, param_shardings)
    self.params = partitioning.place(params, param_sharding)
    if second_moment is not None:
      correction._check_structure(second_moment, params, "second_moment")
      second_moment = partitioning.place(
          jax.tree.map(lambda v: v.astype(jnp.float32) if isinstance(v, jax.Array)
                       else np.asarray(v, np.float32), second_moment),
          param_sharding)
    self.second_moment = second_moment  # less the factored weights' (below)
    self._released: set[str] = set()
    self.step_size = self.mesh.shape[partitioning.DATA] * self.microbatch_size
    lo, hi = partitioning.data_block(self.mesh)
    self._local = (lo * self.microbatch_size, hi * self.microbatch_size)
    self._sharding = partitioning.stepped_batch(self.mesh)
    # Which weights may be factored: all matrices, less those whose correction
    # is not rank one unless its approximation was asked for. The exact
    # kernel needs no fits (a pass over V per weight: 1b.gin's encoder was
    # built in 22.5 s with them, 2.7 s without, on 2 CPU cores).
    fits = (factored.correction_scales(self.layout, second_moment, self.epsilon)
            if kernel == "factored" else {})
    self._scales = {name: uw for name, (uw, _) in fits.items()}
    self._matrices = {b.paths[0]: b.name for b in self.layout.blocks
                      if len(b.paths) == 1 and b.name != projection.VECTORS}
    not_rank_one = {p for p, name in self._matrices.items()
                    if name in fits and fits[name][1] > factored.RANK_ONE_TOLERANCE}
    # Known before any plan (a store's manifest and a basis' key record it),
    # so a weight stacked by nn.scan counts by its block's fit here, though
    # its plan fits it per layer (``_fit_layers``; Adafactor's: exact).
    self._approximate = (kernel == "factored" and rank_one_correction
                         and bool(not_rank_one))
    #: "exact", or "rank_one_correction" when some weight's correction may be
    #: approximated (recorded in store manifests: it changes the encodings).
    self.approximation = "rank_one_correction" if self._approximate else "exact"
    # The matrices whose correction is not rank one and not approximated (a
    # stacked weight's by its layers once planned) take the materialized path.
    self._not_rank_one = set() if self._approximate else not_rank_one
    self._layered: set[str] = set()    # stacked weights fitted per layer
    sides = projection.matrices(self.layout)
    self._sides = partitioning.place(sides, jax.tree.map(
        lambda _: partitioning.replicated(self.mesh), sides))
    self._programs = {}   # example shapes -> (plan, jitted projection)

  @property
  def _constants(self) -> tuple:
    """What every step's program takes besides the batch."""
    return self.params, self.second_moment, self._scales, self._sides

  def _program(self, batch: Any):
    """The jitted ``(constants, batch) -> (phi, losses)`` for batches of this
    example shape, planning (and verifying) the factored kernel once;
    ``constants``: ``self._constants`` (params, V, scales, projections)."""
    key = jax.tree.map(lambda x: (x.shape[2:], str(x.dtype)), batch)
    key = (jax.tree.structure(batch), tuple(jax.tree.leaves(key)))
    if key in self._programs:
      return self._programs[key][1]
    layout, eps, loss_fn = self.layout, self.epsilon, self.loss_fn
    precision = self.precision
    plan = None
    if self.kernel == "factored":
      example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), batch)
      plan = factored.make_plan(loss_fn, self.params, example, layout,
                                set(self._matrices))
      self._fit_layers(plan)
      # Planned only to be named: Adafactor factors V over a weight's two
      # largest axes (a stacked layer's rows and columns: ``_fit_layers``), so
      # a kernel of more than two axes (an attention kernel's heads) is not
      # rank one in its block's view, nor per layer.
      not_rank_one = sorted(plan.factored & self._not_rank_one)
      plan = plan.without(not_rank_one)
      allowed = set(self._matrices) - self._not_rank_one
      missed = sorted(allowed - plan.factored)
      named = lambda ps: f"{', '.join(ps[:3])}{', ...' if len(ps) > 3 else ''}"
      why = []
      if missed:
        why.append(
            f"kernel='factored' cannot take {len(missed)} of {len(allowed)} "
            f"weights ({named(missed)}): "
            "they are not the kernel of a linen Dense, DenseGeneral, "
            "Einsum or Embed call (a bias, a norm scale stacked by nn.scan, "
            "a weight used another way) and take the materialized path "
            "(kernel='exact': all weights, quietly)")
      # Only where other weights' corrections are rank one (Adafactor's): with
      # Adam's, none is, and rank_one_correction=False asked for that.
      if not_rank_one and plan.factored:
        why.append(
            f"kernel='factored' leaves {len(not_rank_one)} weights it could take "
            f"({named(not_rank_one)}) to the materialized path: their "
            "correction 1 / (sqrt(V) + epsilon) is not rank one, per layer "
            "where stacked by nn.scan (Adafactor's V is rank one over a "
            "weight's two largest axes if both have 128 entries or more, else "
            "not: for a kernel of more than two axes, an attention kernel's "
            "heads, those are not its block's rows and columns); "
            "rank_one_correction=True approximates it")
      if why:
        warnings.warn("; ".join(why))
      if self._given is not None and self._given <= plan.factored:
        plan = plan.without(plan.factored - self._given)
      elif self.verify and plan.factored:
        plan = self._verified(plan, batch)
      self._release_second_moment(plan)

    program = _built(_projection_program, loss_fn, layout, plan, eps, precision,
                     self._sharding)
    # Compiled here (its first call reuses it) to be refused by XLA's count
    # of its memory before it runs: a step holds microbatch_size examples'
    # activations (and, unfactored, their gradients) on each data shard.
    memory.check_compiled_memory(
        program.lower(self._constants, batch).compile(),
        f"EncodeConfig.microbatch_size={self.microbatch_size}: an encode step "
        f"({self.kernel} kernel)",
        "a smaller EncodeConfig.microbatch_size (a step's memory grows with it)",
        devices=len(self.mesh.local_devices))
    self._programs[key] = (plan, program)
    return program

  def _fit_layers(self, plan: "factored.Plan") -> None:
    """Fits the correction of ``plan``'s weights stacked by nn.scan per layer,
    once each and before their V is released: their scales become a layer's
    (``M_l = u_l w_l^T``), and so does their rank-one test (Adafactor's V is
    rank one per layer, not over the stacked block)."""
    stacks = {p: st for p, st in plan.stacks if p not in self._layered}
    paths = {self._matrices[p]: p for p in stacks}
    for name, (uw, err) in factored.correction_scales(
        self.layout, self.second_moment, self.epsilon, stacks).items():
      self._scales[name] = uw
      if err > factored.RANK_ONE_TOLERANCE and not self._approximate:
        self._not_rank_one.add(paths[name])
      else:
        self._not_rank_one.discard(paths[name])
    self._layered |= set(stacks)

  def _verified(self, plan: "factored.Plan", batch: Any) -> "factored.Plan":
    """``plan`` less the weights whose factored projection differs from the
    materialized one (``verify`` above) on the first examples of ``batch``."""
    # Replicated, so every process reads the same errors and keeps the same
    # plan. At full precision: a TPU's default runs fp32 matmuls in one bf16
    # pass, a GPU's in TF32, and the two paths would then differ by their
    # rounding, not by how the weight is used.
    errors = _built(_verification_program, self.loss_fn, self.layout, plan,
                    self.precision, partitioning.replicated(self.mesh))
    with jax.default_matmul_precision("highest"):
      err, checked = errors(self._constants, batch)
    err = np.asarray(err.addressable_data(0))
    tolerance = verify_tolerance(plan)
    if not bool(np.asarray(checked.addressable_data(0))):
      steps, step_size = jax.tree.leaves(batch)[0].shape[:2]
      compared = min(VERIFY_EXAMPLES, steps * step_size)
      warnings.warn(
          f"the factored kernel could not be verified: none of the first "
          f"{compared} examples has a finite, non-zero gradient; every "
          "weight takes the materialized path")
      bad = {p: float("nan") for p in plan.factored}
    else:
      bad = {b.paths[0]: float(e) for b, e in zip(self.layout.blocks, err)
             if b.paths[0] in plan.factored and not e <= tolerance[b.paths[0]]}
      if bad:
        warnings.warn(
            "the factored kernel's projections differ from the materialized "
            "gradient's for " + ", ".join(f"{p} ({e:.1%})" for p, e in bad.items())
            + ": each is used outside its Dense/Einsum/Embed call; they take "
            "the materialized path")
    plan = plan.without(bad)
    self._verify_errors = dict(zip((b.name for b in self.layout.blocks),
                                   map(float, err)))
    return plan

  def _release_second_moment(self, plan: "factored.Plan") -> None:
    """Drops V of the weights ``plan`` and every earlier plan factor: their
    correction is the rank-one scales (``_scales``), and V is as large as the
    params in f32 (an 8B model's on a model axis of 8: 4 GB a device). A
    later plan (a new example shape) that takes one of them materialized
    cannot correct it."""
    if self.second_moment is None:
      return
    lost = sorted(self._released - plan.factored)
    if lost:
      raise RuntimeError(
          f"the factored kernel's plan for this example shape materializes "
          f"{', '.join(lost)}, whose V this encoder released after its first "
          "plan factored them; encode examples of one shape per encoder")
    # An earlier plan's program still runs (its shape may come again) and
    # corrects the weights it materializes from V.
    release = plan.factored
    for earlier, _ in self._programs.values():
      release = release & earlier.factored
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        self.second_moment, is_leaf=lambda x: x is None)
    self.second_moment = jax.tree_util.tree_unflatten(treedef, [
        None if projection.path_name(path) in release else v
        for path, v in flat])
    self._released |= release

  @property
  def dim(self) -> int:
    return self.layout.dim

  @property
  def factored_weights(self) -> list[str] | None:
    """The weights the factored kernel projects (sorted; a store's manifest
    keeps them), once a batch has been planned; None before, or with the
    exact kernel."""
    plans = [plan for plan, _ in self._programs.values() if plan is not None]
    return sorted(plans[0].factored) if plans else None

  # --- process-local batches ------------------------------------------------

  def local_positions(self, size: int) -> np.ndarray:
    """Positions of a ``size``-example batch this process supplies, in order.

    The batch is padded to ``steps * step_size`` positions; positions
    ``>= size`` are padding. Every process of a data group gets the same.
    """
    steps = max(1, -(-size // self.step_size))
    lo, hi = self._local
    return (np.arange(steps)[:, None] * self.step_size
            + np.arange(lo, hi)[None, :]).ravel()

  def local_batch_size(self, size: int) -> int:
    return len(self.local_positions(size))

  def put_local(self, local: np.ndarray) -> jax.Array:
    """A global ``[steps, step_size, ...]`` array from this process's values
    for its ``local_positions`` (``[steps * block, ...]``, in that order)."""
    local = np.asarray(local)
    block = self._local[1] - self._local[0]
    steps = len(local) // block
    if steps * block != len(local) or steps == 0:
      raise ValueError(f"a process-local batch has a multiple of {block} "
                       f"examples (local_batch_size), got {len(local)}")
    return partitioning.from_local(
        local.reshape(steps, block, *local.shape[1:]), self._sharding,
        (steps, self.step_size, *local.shape[1:]), axis=1, start=self._local[0])

  def project_local(self, local_batch: Any, local_valid: np.ndarray) -> Projected:
    """Unnormalized ``P (g / (sqrt(V) + eps))`` of a process-local batch.

    Every process calls this together, each with the examples of its own
    positions (``local_batch_size(size)`` of them, all processes agreeing on
    ``size``) and ``local_valid`` marking which are real. Padding positions
    must still hold real examples (repeat one).

    A real example whose loss or gradient is not finite is not an error here:
    its row is zero and ``nonfinite`` says why (the pipeline quarantines it).
    """
    local_valid = np.asarray(local_valid, bool)
    batch = jax.tree.map(self.put_local, local_batch)
    valid = self.put_local(local_valid)
    program = self._program(batch)
    phi, losses = program(self._constants, batch)
    phi, valid, nonfinite, usable, count = _quarantine(phi, losses, valid)
    # Read at once, as the old finite check was: the count is an all-reduce,
    # and waiting for it keeps one program with collectives in flight. With
    # it left unread, the test suite hung twice in the next all-reduce
    # (8 simulated CPU devices on 2 cores) until XLA's timeout aborted it.
    return Projected(phi, valid, nonfinite, usable,
                     int(np.asarray(count.addressable_data(0))))

  def _check(self, preconditioner) -> None:
    if preconditioner is not None and preconditioner.dim != self.dim:
      raise ValueError(f"preconditioner has d={preconditioner.dim}, encoder d={self.dim}")
    if preconditioner is not None and preconditioner.layout_seed != self.layout.seed:
      raise ValueError(f"preconditioner was fitted for projection seed "
                       f"{preconditioner.layout_seed}, encoder uses {self.layout.seed}")

  # --- global batches ---------------------------------------------------------

  def _from_global(self, batch: Any) -> tuple[Any, np.ndarray]:
    """This process's share of a batch every process holds whole."""
    size = batch_size(batch)
    if not size:  # (padding needs an example to repeat)
      raise ValueError("an empty batch: expected at least one example")
    positions = self.local_positions(size)
    # Padding repeats the last example: a real input keeps any loss finite.
    take = np.minimum(positions, size - 1)
    return jax.tree.map(lambda x: np.asarray(x)[take], batch), positions < size

  def project_global(self, batch: Any) -> Projected:
    """``project_local`` for a batch every process holds whole."""
    return self.project_local(*self._from_global(batch))

  def project(self, batch: Any, ids: Sequence[Any] | None = None) -> jax.Array:
    """Unnormalized ``P (g / (sqrt(V) + eps))``: float32 ``[B, dim]`` on the mesh.

    ``batch`` has a leading axis of any size B and is held whole by every
    process. Raises FloatingPointError naming the examples (``ids[i]``, or
    their index) whose loss or gradient is not finite; ``project_global``
    returns them as zero rows instead.
    """
    size = batch_size(batch)
    if ids is not None and len(ids) != size:
      raise ValueError(f"ids: {len(ids)} for a batch of {size} examples")
    projected = self.project_global(batch)
    if projected.count:
      reasons = nonfinite_rows(projected, size)
      names = [ids[i] if ids is not None else i for i in sorted(reasons)[:10]]
      raise FloatingPointError(
          f"non-finite loss or gradient for example(s) {names}; no encodings "
          "were returned")
    return projected.phi.reshape(-1, self.dim)[:size]

  def encode(self, batch: Any, preconditioner: hessian.Preconditioner | None = None,
             *, normalize: bool = True, ids: Sequence[Any] | None = None
             ) -> np.ndarray:
    """Encodings float32 ``[B, dim]``: unit-norm rows unless ``normalize=False``."""
    return partitioning.fetch(self.encode_on_device(
        batch, preconditioner, normalize=normalize, ids=ids))

  def encode_on_device(self, batch: Any,
                       preconditioner: hessian.Preconditioner | None = None, *,
                       normalize: bool = True, ids: Sequence[Any] | None = None
                       ) -> jax.Array:
    """``encode`` without the copy to host: ``[B, dim]`` on the mesh."""
    self._check(preconditioner)
    phi = self.project(batch, ids)
    if preconditioner is not None:
      phi = preconditioner.apply(phi)
    return unit_normalize(phi) if normalize else phi

  def accumulate(self, moments: hessian.Moments, projected: Projected
                 ) -> hessian.Moments:
    """Adds a batch's real, finite rows to R's moments (an all-reduce over hosts)."""
    return hessian.accumulate(moments, projected.phi, projected.usable)


def batch_size(batch: Any) -> int:
  """The leading size every field of ``batch`` shares; ValueError naming the
  fields when they differ (a shorter one would be indexed past its end, a
  longer one cut)."""
  flat = jax.tree_util.tree_flatten_with_path(batch)[0]
  sizes = {jax.tree_util.keystr(path): len(x) for path, x in flat}
  if len(set(sizes.values())) > 1:
    raise ValueError("batch fields differ in their number of examples: "
                     + ", ".join(f"{k} {n}" for k, n in sizes.items()))
  return next(iter(sizes.values()), 0)


def verify_tolerance(plan: "factored.Plan") -> dict[str, float]:
  """Per factored weight, the relative error its verification allows:
  ``VERIFY_TOLERANCE``, or 8 epsilons of the narrowest dtype any of the
  model's layers computes in if that is more (a bf16 model: 2^-4). The
  model's, not the weight's own layer's: a gradient comes back through every
  layer above it (a bf16 model's f32 embedding lookup differed by 0.8% on a
  mesh of model axis 2, its other weights by up to 1.9%, and were refused at
  the weight's own 1e-3 or 2^-6: the factored set hung on the mesh's shape);
  a use outside the layer call still differs by O(1)."""
  eps = max((float(jnp.finfo(site.dtype).eps) for site in plan.sites
             if jnp.issubdtype(site.dtype, jnp.floating)), default=0.0)
  return {site.path: max(VERIFY_TOLERANCE, 8 * eps) for site in plan.sites}


@jax.jit
def _quarantine(phi, losses, valid):
  """Zero rows, reasons and the replicated count of non-finite real examples."""
  loss_ok = jnp.isfinite(losses)
  # A finite row whose squares overflow f32 would make R's moments inf (and
  # its eigendecomposition fail); it is as unusable as an inf gradient.
  grad_ok = (jnp.all(jnp.isfinite(phi), axis=-1)
             & jnp.isfinite(jnp.sum(phi * phi, axis=-1)))
  nonfinite = jnp.where(loss_ok, jnp.where(grad_ok, FINITE, GRADIENT_NOT_FINITE),
                        LOSS_NOT_FINITE).astype(jnp.int8)
  usable = valid & (nonfinite == FINITE)
  phi = jnp.where((nonfinite == FINITE)[..., None], phi, 0.0)
  count = jnp.sum((nonfinite != FINITE) & valid, dtype=jnp.int32)
  return phi, valid, nonfinite, usable, count


def nonfinite_rows(projected: Projected, size: int | None = None) -> dict[int, str]:
  """``{global position: reason}`` of the real examples of a batch every
  process holds whole (``project_global``) that were quarantined."""
  flags = np.asarray(partitioning.fetch(projected.nonfinite)).reshape(-1)
  valid = np.asarray(partitioning.fetch(projected.valid)).reshape(-1)
  size = len(flags) if size is None else size
  return {int(i): NONFINITE_REASONS[int(flags[i])]
          for i in np.flatnonzero((flags != FINITE) & valid) if i < size}


@jax.jit
def unit_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (a zero row stays zero), in float32."""
  x = x.astype(jnp.float32)
  # Divided by its largest entry first: x * x underflows below ~1e-19 and
  # overflows above ~1.8e19 in f32. The scaled row's norm is then >= 1, or
  # 0 for a zero row (kept zero by the 1).
  peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  x = x / jnp.where(peak > 0, peak, 1.0)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1.0)


def fit_preconditioner(encoder: GradientEncoder, train_batches: Iterable[Any],
                       eval_batches: Iterable[Any] | None = None, *,
                       kind: str = "block", rank: int | None = None,
                       damping: float = 0.1, lam: float | None = None,
                       max_query_weight: float | None = hessian.MAX_QUERY_WEIGHT
                       ) -> hessian.Preconditioner:
  """Fits ``R^(-1/2)`` for ``encoder.encode(..., preconditioner=...)``.

  Args:
    encoder: the encoder whose projected gradients R describes.
    train_batches: example batches from the corpus (R_train); a sample of a
      few thousand examples is typical.
    eval_batches: query batches (R_eval). None gives the non-task-specific
      variant R = R_train.
    kind: "block" (one matrix per projection block) or "full" (d x d).
    rank: k of the lambda rule (default 1.5% of d).
    damping: added to every eigenvalue, as a fraction of their mean.
    lam: a fixed mix instead of the lambda rule.
    max_query_weight: the rule's cap (``hessian.task_lambda``); None: none.
  """
  def moments(batches):
    m = hessian.init_moments(encoder.layout, kind)
    for batch in batches:
      previous = m
      m = encoder.accumulate(m, encoder.project_global(batch))
      jax.block_until_ready(previous)  # two in flight (pipeline.train_moments)
    return m

  train = moments(train_batches)
  eval_ = None if eval_batches is None else moments(eval_batches)
  return hessian.fit(train, eval_, kind=kind, dim=encoder.dim,
                     layout_seed=encoder.layout.seed, rank=rank, damping=damping,
                     lam=lam, max_query_weight=max_query_weight)
