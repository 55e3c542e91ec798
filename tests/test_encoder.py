"""Tests of GradientEncoder against a brute-force numpy oracle.

The oracle builds every piece by hand: per-example gradients flattened with
``ravel_pytree``, the correction ``g / (sqrt(V) + eps)`` in float64, the whole
projection as one explicit Kronecker-expanded matrix (``dense_matrix``, itself
checked in ``test_projection.py``), R_train / R_eval and the lambda rule with
numpy's ``eigh``, then unit normalization.
"""

from __future__ import annotations

import logging

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from tracer import encoder as encoder_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import projection

# Few examples and d of a few hundred: R is rank deficient on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:R is estimated"),
              # The toy model is plain jax: the factored kernel names its weights.
              pytest.mark.filterwarnings("ignore:kernel='factored' cannot take")]

TINY = model_lib.ModelConfig(vocab_size=259, max_len=8, d_model=8, num_layers=1,
                             num_heads=2, d_ff=16)
TINY_DIM = 520      # s = 8: the embedding, down, gate, up and the vectors are
                    # projected on one side, attention matrices are not at all.
EPS = 1e-4


# A hand-written model: a 2-D, a 3-D weight and two vectors. Every size is
# divisible by 2 and 4 so that model-parallel meshes really split it.

def toy_params():
  rng = np.random.default_rng(0)
  shapes = {"w": (8, 12), "t": (4, 3, 8), "bias": (12,), "scale": (8,)}
  return {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
          for k, s in shapes.items()}


def toy_loss(params, ex):
  h = jnp.tanh(ex["x"] * params["scale"]) @ params["w"] + params["bias"]   # [12]
  z = jnp.einsum("a,abc->bc", h[:4], params["t"])                           # [3, 8]
  return jnp.sum(jnp.sin(z) * ex["y"]) + 0.1 * jnp.sum(h * h)


def toy_batch(n, seed):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, 8)).astype(np.float32),
          "y": rng.normal(size=(n, 3, 8)).astype(np.float32)}


def lm_batch(n, seed):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, TINY.vocab_size, size=(n, TINY.max_len)).astype(np.int32)
  inputs = np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], axis=1)
  weights = np.ones((n, TINY.max_len), np.float32)
  for i in range(n):                      # some padding, some prompt-only queries
    weights[i, TINY.max_len - rng.integers(0, 4):] = 0
  return {"inputs": inputs, "targets": targets, "weights": weights}


def random_v(params, seed):
  """A positive second moment spanning a few orders of magnitude."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(np.exp(rng.normal(size=x.shape) * 1.5) * 1e-4, jnp.float32),
      params)


def take(batch, idx):
  return jax.tree.map(lambda x: x[idx], batch)


def concat(*batches):
  return jax.tree.map(lambda *x: np.concatenate(x), *batches)


# The oracle ---------------------------------------------------------------------

def flat_grads(loss_fn, params, batch):
  """[n, |theta|] float64: per-example gradients in ravel_pytree order."""
  grad = jax.jit(jax.grad(loss_fn))
  n = len(jax.tree.leaves(batch)[0])
  return np.stack([
      np.asarray(jax.flatten_util.ravel_pytree(grad(params, take(batch, i)))[0],
                 np.float64) for i in range(n)])


def oracle_projected(grads, v, eps, layout, params):
  if v is not None:
    v = np.asarray(jax.flatten_util.ravel_pytree(v)[0], np.float64)
    grads = grads / (np.sqrt(v) + eps)
  return grads @ projection.dense_matrix(layout, params).T


def oracle_inv_sqrt(phi_train, phi_eval, segments, rank, damping):
  """(lam, R^(-1/2) as one dense block-diagonal d x d matrix)."""
  seg = lambda phi: [phi[:, lo:hi].T @ phi[:, lo:hi] / len(phi) for lo, hi in segments]
  r_train = seg(phi_train)
  if phi_eval is None:
    lam, mixed = 0.0, r_train
  else:
    r_eval = seg(phi_eval)
    t = np.sort(np.concatenate([np.linalg.eigh(r)[0] for r in r_train]))[::-1]
    e = np.sort(np.concatenate([np.linalg.eigh(r)[0] for r in r_eval]))[::-1]
    k = min(rank, len(t) - 1)
    lam = t[k] / (t[k] + e[k])
    mixed = [lam * re + (1 - lam) * rt for re, rt in zip(r_eval, r_train)]
  d = segments[-1][1]
  out = np.zeros((d, d))
  for (lo, hi), r in zip(segments, mixed):
    w, u = np.linalg.eigh(r)
    w = np.maximum(w, 0)
    w = w + damping * w.mean()
    out[lo:hi, lo:hi] = u @ np.diag(w ** -0.5) @ u.T
  return lam, out


def normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def segments_of(layout, kind):
  if kind == "full":
    return [(0, layout.dim)]
  return [(b.offset, b.offset + b.size) for b in layout.blocks]


# Oracle test on the tiny Transformer --------------------------------------------

@pytest.fixture(scope="module")
def lm():
  params = model_lib.init_params(TINY, seed=0)
  v = random_v(params, 1)
  loss_fn = model_lib.make_loss_fn(TINY)
  enc = encoder_lib.GradientEncoder(loss_fn, params, second_moment=v, epsilon=EPS,
                                    projection_dim=TINY_DIM, seed=3,
                                    microbatch_size=2)
  train, queries = lm_batch(16, 10), lm_batch(8, 11)
  grads = flat_grads(loss_fn, params, concat(train, queries))
  phi = oracle_projected(grads, v, EPS, enc.layout, params)
  return dict(params=params, v=v, enc=enc, train=train, queries=queries,
              phi_train=phi[:16], phi_eval=phi[16:])


def test_layout_mixes_projected_and_identity_sides(lm):
  layout = lm["enc"].layout
  assert layout.dim == TINY_DIM
  kinds = {b.name: tuple(m is None for m in projection.block_matrices(layout, b))
           for b in layout.blocks}
  assert kinds["embed/embedding"] == (False, True)         # 259 -> 8, 8 kept
  assert kinds["layer_0/gate/kernel"] == (True, False)     # 8 kept, 16 -> 8
  assert kinds["layer_0/query/kernel"] == (True, True)     # not projected
  assert kinds[projection.VECTORS] == (True, False)        # 1 x 24 -> 1 x 8


def test_projected_gradients_match_oracle(lm):
  enc = lm["enc"]
  got = enc.encode(lm["train"], normalize=False)
  want = lm["phi_train"]
  assert got.shape == (16, TINY_DIM) and got.dtype == np.float32
  scale = np.abs(want).max()
  np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)
  np.testing.assert_allclose(np.asarray(enc.project(lm["train"])), got, rtol=0, atol=0)
  # Without a preconditioner the encoding is the normalized projection.
  np.testing.assert_allclose(enc.encode(lm["train"]), normalize(want), atol=1e-5)


@pytest.mark.parametrize("kind", ["block", "full"])
def test_encodings_match_oracle(lm, kind):
  enc, rank, damping = lm["enc"], 5, 0.1
  segs = segments_of(enc.layout, kind)
  phi = np.concatenate([lm["phi_train"], lm["phi_eval"]])

  pre = encoder_lib.fit_preconditioner(enc, [take(lm["train"], slice(0, 10)),
                                             take(lm["train"], slice(10, 16))],
                                       [lm["queries"]], kind=kind, rank=rank,
                                       damping=damping, max_query_weight=None)
  lam, inv = oracle_inv_sqrt(lm["phi_train"], lm["phi_eval"], segs, rank, damping)
  assert 0.05 < lam < 0.95                      # a real mix, not a degenerate one
  assert pre.lam == pytest.approx(lam, rel=1e-4)
  assert (pre.kind, pre.num_train, pre.num_eval, pre.dim) == (kind, 16, 8, TINY_DIM)
  # (Batches of at most 16 examples: one compilation of the encoder.)
  got = np.concatenate([enc.encode(lm["train"], pre), enc.encode(lm["queries"], pre)])
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
  np.testing.assert_allclose(got, normalize(phi @ inv), atol=1e-5)

  # The non-task-specific variant: R = R_train.
  pre = encoder_lib.fit_preconditioner(enc, [lm["train"]], None, kind=kind,
                                       damping=damping)
  lam, inv = oracle_inv_sqrt(lm["phi_train"], None, segs, rank, damping)
  assert pre.lam == lam == 0.0 and pre.num_eval == 0
  np.testing.assert_allclose(enc.encode(lm["queries"], pre),
                             normalize(lm["phi_eval"] @ inv), atol=1e-5)


# The same encodings on every mesh and microbatch size ---------------------------

@pytest.fixture(scope="module")
def toy():
  params = toy_params()
  v = random_v(params, 2)
  # Queries of the same size as the batch: one compilation per encoder.
  batch, queries = toy_batch(11, 20), toy_batch(11, 21)
  ref = encoder_lib.GradientEncoder(toy_loss, params, second_moment=v, epsilon=EPS,
                                    projection_dim=100, seed=1)
  grads = flat_grads(toy_loss, params, concat(batch, queries))
  phi = oracle_projected(grads, v, EPS, ref.layout, params)
  lam, inv = oracle_inv_sqrt(phi[:11], phi[11:], segments_of(ref.layout, "full"),
                             rank=2, damping=0.1)
  return dict(params=params, v=v, batch=batch, queries=queries, layout=ref.layout,
              phi=phi[:11], encodings=normalize(phi[:11] @ inv), lam=lam,
              grads=grads)


# (data, model) mesh -> microbatch sizes. Every mesh and every size twice, not
# the whole product: each encoder is a compilation of a few seconds.
MESHES = {(1, 1): [1, 3], (8, 1): [1, 8], (4, 2): [3, 8], (2, 4): [1, 3]}


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_same_encodings_on_every_mesh(toy, shape):
  data, model = shape
  devices = jax.devices()[:data * model]
  mesh = partitioning.make_mesh(data, model, devices)
  for microbatch in MESHES[shape]:
    enc = encoder_lib.GradientEncoder(toy_loss, toy["params"], second_moment=toy["v"],
                                      epsilon=EPS, projection_dim=100, seed=1,
                                      mesh=mesh, microbatch_size=microbatch)
    assert enc.layout == toy["layout"] and enc.dim == 78
    phi = enc.project(toy["batch"])
    assert phi.shape == (11, 78)
    assert phi.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(partitioning.fetch(phi), toy["phi"],
                               rtol=1e-5, atol=1e-5 * np.abs(toy["phi"]).max())
    pre = encoder_lib.fit_preconditioner(enc, [toy["batch"]], [toy["queries"]],
                                         kind="full", rank=2, damping=0.1,
                                         max_query_weight=None)
    assert pre.lam == pytest.approx(toy["lam"], rel=1e-4)
    got = enc.encode(toy["batch"], pre)
    np.testing.assert_allclose(got, toy["encodings"], atol=1e-5,
                               err_msg=f"mesh {shape}, microbatch {microbatch}")


# Unbiasedness of the random projection -------------------------------------------

def test_projection_is_unbiased_and_cosines_converge(toy):
  params = toy["params"]
  v = np.asarray(jax.flatten_util.ravel_pytree(toy["v"])[0], np.float64)
  # Two related examples, so that their gradients are neither orthogonal nor equal.
  pair = toy_batch(2, 40)
  pair = jax.tree.map(lambda a: np.stack([a[0], a[0] + 0.7 * a[1]]), pair)
  corrected = flat_grads(toy_loss, params, pair) / (np.sqrt(v) + EPS)
  unravel = jax.flatten_util.ravel_pytree(params)[1]
  tree = jax.tree.map(lambda a, b: jnp.stack([a, b]),
                      unravel(jnp.asarray(corrected[0], jnp.float32)),
                      unravel(jnp.asarray(corrected[1], jnp.float32)))
  x, y = corrected
  exact = np.array([x @ y, x @ x, y @ y])
  exact_cos = exact[0] / np.sqrt(exact[1] * exact[2])
  assert 0.1 < abs(exact_cos) < 0.9

  def sample(budget, seeds):
    out = []
    for seed in seeds:
      layout = projection.make_layout(params, budget, seed)
      p = np.asarray(projection.project(layout, tree), np.float64)
      out.append([p[0] @ p[1], p[0] @ p[0], p[1] @ p[1]])
    return np.array(out)

  # Every side projected (s = 6 < every side but the vector block's 1).
  assert all(min(b.k) < min(b.shape) or b.shape[0] == 1
             for b in projection.make_layout(params, 100).blocks)
  ips = sample(100, range(400))
  mean = ips.mean(0)
  se = ips.std(0, ddof=1) / np.sqrt(len(ips))
  # Unbiased: within 4 standard errors (a false alarm has p < 1e-4; the three
  # statistics are correlated, and seeds 0-399 give |z| < 2.5)...
  assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)
  # ... and the test has power: the standard error is a few % of the value.
  assert np.all(se < 0.06 * np.abs(exact)), (se, exact)   # measured: <= 0.04
  # A single projection is genuinely random (not an accidental identity).
  assert ips[:, 0].std() > 0.05 * abs(exact[0])

  # Cosines: consistent, the error shrinking as d grows, exact without projection.
  errors = {}
  for budget in [20, 100, 180]:
    s = sample(budget, range(40))
    cos = s[:, 0] / np.sqrt(s[:, 1] * s[:, 2])
    errors[budget] = np.sqrt(np.mean((cos - exact_cos) ** 2))
  assert errors[20] > errors[100] > errors[180]
  assert errors[100] < 0.3 and errors[180] < 0.15     # measured: 0.20, 0.09
  full = sample(10**6, [0])[0]
  np.testing.assert_allclose(full[0] / np.sqrt(full[1] * full[2]), exact_cos,
                             rtol=1e-5)

  # The encoder's own encodings (no R, normalized) give the same cosine.
  for seed in [1]:
    enc = encoder_lib.GradientEncoder(toy_loss, params, second_moment=toy["v"],
                                      epsilon=EPS, projection_dim=180, seed=seed)
    e = enc.encode(pair)
    s = sample(180, [seed])[0]
    assert e[0] @ e[1] == pytest.approx(s[0] / np.sqrt(s[1] * s[2]), abs=1e-5)


# Errors ---------------------------------------------------------------------------

def test_non_finite_loss_names_the_example(toy):
  enc = encoder_lib.GradientEncoder(toy_loss, toy["params"], projection_dim=100,
                                    microbatch_size=1)
  batch = toy_batch(5, 30)
  ids = ["a", "b", "c", "d", "e"]
  enc.encode(batch, ids=ids)                     # finite: fine
  bad = jax.tree.map(np.copy, batch)
  bad["x"][3, 2] = np.nan
  with pytest.raises(FloatingPointError, match=r"example\(s\) \['d'\]"):
    enc.encode(bad, ids=ids)
  with pytest.raises(FloatingPointError, match=r"example\(s\) \[3\]"):
    enc.encode_on_device(bad)
  # The last example, repeated as padding, is reported once.
  bad = jax.tree.map(np.copy, batch)
  bad["y"][4, 0, 0] = np.inf
  bad["x"][0, 0] = np.nan
  with pytest.raises(FloatingPointError, match=r"example\(s\) \['a', 'e'\]"):
    enc.encode(bad, ids=ids)


def test_non_finite_gradient_with_finite_loss():
  params = toy_params()

  def loss_fn(p, ex):          # d/d bias of sqrt(|0 * sum(bias)|) is nan
    return toy_loss(p, ex) + jnp.sqrt(jnp.abs(jnp.sum(p["bias"]) * ex["flag"]))

  batch = dict(toy_batch(4, 31), flag=np.array([1.0, 0.0, 1.0, 1.0], np.float32))
  assert np.all(np.isfinite(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)))
  enc = encoder_lib.GradientEncoder(loss_fn, params, projection_dim=100)
  with pytest.raises(FloatingPointError, match=r"example\(s\) \['q1'\]"):
    enc.encode(batch, ids=["q0", "q1", "q2", "q3"])


def test_mismatched_inputs(toy):
  params = toy["params"]
  extra = dict(toy["v"], other=jnp.ones(3))
  with pytest.raises(ValueError, match="does not match the params tree"):
    encoder_lib.GradientEncoder(toy_loss, params, second_moment=extra)
  wrong = dict(toy["v"], w=jnp.ones((12, 8)))
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(12, 8\)"):
    encoder_lib.GradientEncoder(toy_loss, params, second_moment=wrong)
  enc = encoder_lib.GradientEncoder(toy_loss, params, projection_dim=50)
  empty = jax.tree.map(lambda x: x[:0], toy["batch"])  # was an IndexError
  with pytest.raises(ValueError, match="an empty batch: expected at least one"):
    enc.project(empty)
  # Fields of other lengths were cut (longer) or indexed past their end.
  (name, first), *_ = toy["batch"].items()
  for n in (len(first) - 1, len(first) + 1):
    ragged = {**toy["batch"], name: np.resize(np.asarray(first), (n, *first.shape[1:]))}
    with pytest.raises(ValueError, match=(r"batch fields differ in their number of "
                                          rf"examples: \['{name}'\] {n}, ")):
      enc.project(ragged)
  with pytest.raises(ValueError, match=f"ids: 1 for a batch of {len(first)} examples"):
    enc.project(toy["batch"], ids=["a"])
  other = encoder_lib.GradientEncoder(toy_loss, params, projection_dim=100)
  pre = encoder_lib.fit_preconditioner(other, [toy["batch"]])
  with pytest.raises(ValueError, match="preconditioner has d=78"):
    enc.encode(toy["batch"], pre)
  # Same d, another projection: R^(-1/2) is in another basis.
  reseeded = encoder_lib.GradientEncoder(toy_loss, params, projection_dim=100, seed=5)
  with pytest.raises(ValueError, match="projection seed 0, encoder uses 5"):
    reseeded.encode(toy["batch"], pre)


def test_unit_normalize():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(encoder_lib.unit_normalize(x), [[0.6, 0.8], [0.0, 0.0]])
  # Rows whose squares underflow or overflow f32 (before 2026-12-06: a norm
  # of 7e18 for 1e-20s, a zero row for 2e19s).
  for scale in [1e-20, 1e-23, 2e19, 1e25]:
    row = np.full((1, 64), scale, np.float32)
    row[0, 0] *= 2
    got = np.asarray(encoder_lib.unit_normalize(row), np.float64)
    np.testing.assert_allclose(got, row / np.linalg.norm(row.astype(np.float64)),
                               rtol=1e-6)


def test_a_row_whose_squares_overflow_is_quarantined():
  """Finite entries whose squares overflow f32 would make R's moments inf
  (before 2026-12-06, fit_basis then failed with a LinAlgError)."""
  phi = jnp.array([[[1.0, 2.0], [3e19, 1.0], [0.0, 0.0]]])    # [steps, step, d]
  phi, _, nonfinite, usable, count = encoder_lib._quarantine(
      phi, jnp.zeros((1, 3)), jnp.ones((1, 3), bool))
  assert nonfinite.tolist() == [[encoder_lib.FINITE, encoder_lib.GRADIENT_NOT_FINITE,
                                 encoder_lib.FINITE]]
  assert usable.tolist() == [[True, False, True]] and int(count) == 1
  np.testing.assert_array_equal(phi[0, 1], [0.0, 0.0])


# The projections' matmul precision ----------------------------------------------

def _step_text(enc, batch) -> str:
  """The StableHLO of ``enc``'s step program for ``batch``."""
  local, _ = enc._from_global(batch)
  batch = jax.tree.map(enc.put_local, local)
  return enc._program(batch).lower(enc._constants, batch).as_text()


def _projection_dots(enc, batch) -> tuple[int, int]:
  """(dots at HIGHEST, dots with the bf16 x6 algorithm) in ``enc``'s program."""
  dots = [line for line in _step_text(enc, batch).splitlines() if "dot_general" in line]
  return (sum("HIGHEST" in line for line in dots),
          sum("num_primitive_operations = 6" in line for line in dots))


@pytest.mark.parametrize("kernel", ["factored", "exact"])
def test_projection_precision_reaches_every_projection(kernel):
  # "bf16_6x" runs every projection matmul with XLA's BF16_BF16_F32_X6 (the
  # model's own matmuls keep their precision), and on the CPU, which computes
  # it in fp32, the encodings are the same.
  params = model_lib.init_params(TINY)
  batch = lm_batch(4, 3)
  encodings, counts = [], []
  for precision in ("highest", "bf16_6x"):
    enc = encoder_lib.GradientEncoder(
        model_lib.make_loss_fn(TINY), params, projection_dim=TINY_DIM,
        kernel=kernel, projection_precision=precision, microbatch_size=1)
    counts.append(_projection_dots(enc, batch))
    encodings.append(enc.encode(batch))
  (highest, none), (left, x6) = counts
  assert highest > 0 and none == 0
  assert left == 0 and x6 == highest
  np.testing.assert_allclose(encodings[1], encodings[0], atol=1e-6)


@pytest.mark.parametrize("kernel", ["factored", "exact"])
def test_the_step_takes_the_projections_as_arguments(kernel):
  # Generated inside the step, every projected side was a jax.random.normal
  # there: two thirds of the step's XLA:CPU compile time.
  enc = encoder_lib.GradientEncoder(model_lib.make_loss_fn(TINY),
                                    model_lib.init_params(TINY),
                                    projection_dim=TINY_DIM, kernel=kernel)
  assert any(m is not None for pair in projection.matrices(enc.layout).values()
             for m in pair)
  text = _step_text(enc, lm_batch(4, 3))
  assert "dot_general" in text
  assert "threefry" not in text and "rng_bit_generator" not in text


def test_unknown_projection_precision_is_named():
  with pytest.raises(ValueError, match="projection_precision='tf32'"):
    encoder_lib.GradientEncoder(toy_loss, toy_params(), projection_dim=100,
                                projection_precision="tf32")


def test_local_part_inverts_from_local_and_refuses_a_second_split():
  mesh = partitioning.make_mesh(data=4, model=2)
  x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  y = partitioning.from_local(x, sharding, x.shape, axis=1, start=0)
  np.testing.assert_array_equal(partitioning.local_part(y, axis=1), x)
  # Split on the model axis too: one shard per row offset would drop half.
  both = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("model", "data")))
  with pytest.raises(ValueError, match="split along axis 0 too"):
    partitioning.local_part(both, axis=1)


def _compiled(caplog, fn):
  """``fn()``'s result and the names of the programs XLA compiled for it."""
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jax._src.dispatch"), \
      jax.log_compiles(True):
    out = fn()
  return out, [r.getMessage().split(" ")[4] for r in caplog.records
               if r.getMessage().startswith("Finished XLA compilation of")]


@pytest.mark.parametrize("kernel", ["factored", "exact"])
def test_a_later_encoder_of_the_model_reuses_the_compiled_programs(caplog, kernel):
  # A sweep's next run, a server's next request, the next test: each builds
  # an encoder of the same model. Its step (and the factored kernel's
  # verification) were compiled again for every encoder, two fifths of a
  # test_pipeline.py run. The programs take the params, V and projections as
  # arguments, so the second encoder's encodings are its own params'.
  batch = lm_batch(8, 5)
  first = model_lib.init_params(TINY, seed=1)
  second = model_lib.init_params(TINY, seed=2)

  def encoder(params, loss_fn, seed):
    return encoder_lib.GradientEncoder(
        loss_fn, params, second_moment=random_v(params, seed), epsilon=EPS,
        projection_dim=TINY_DIM, seed=7, kernel=kernel, microbatch_size=2,
        rank_one_correction=True)  # (else a random V leaves nothing factored)

  _, names = _compiled(caplog, lambda: encoder(
      first, model_lib.make_loss_fn(TINY), 3).encode(batch))
  assert "jit(project_all)" in names
  assert ("jit(errors)" in names) == (kernel == "factored"), names
  got, names = _compiled(caplog, lambda: encoder(
      second, model_lib.make_loss_fn(TINY), 4).encode(batch))
  assert "jit(project_all)" not in names and "jit(errors)" not in names, names
  # Another loss function (equal, but not the model's own): compiled afresh.
  want, names = _compiled(caplog, lambda: encoder(
      second, lambda p, ex: model_lib.example_loss(TINY, p, ex), 4).encode(batch))
  assert "jit(project_all)" in names
  np.testing.assert_allclose(got, want, atol=1e-6)
