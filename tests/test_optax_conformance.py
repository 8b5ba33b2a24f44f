"""Simba inside Optax: extra arguments, jit, scan, wrappers and dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import tree_utils as otu

import simba_optax

# Hyperparameters that set array shapes or the key, so inject_hyperparams
# must keep them static.
STATIC_ARGS = (
    "coarse_fraction", "coarse_rows", "rank", "oversampling",
    "power_iterations", "seed", "mu_dtype", "dimension_numbers",
)


def vector_params(dtype=jnp.float32):
  """Returns a scalar and a vector: leaves that need no matrix factorisation."""
  return {
      "scale": jnp.asarray(0.5, dtype),
      "bias": jnp.asarray([1.0, -2.0, 0.5, 3.0], dtype),
  }


def mixed_params(dtype=jnp.float32):
  """Returns a scalar, a vector and a (4, 3) matrix."""
  params = vector_params(dtype)
  params["kernel"] = jnp.asarray(
      np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0 - 0.8, dtype
  )
  return params


def quadratic_loss(params):
  return sum(jnp.sum((leaf.astype(jnp.float32) - 1.5) ** 2)
             for leaf in jax.tree.leaves(params))


def gradient(params, shift=0.0):
  grads = jax.grad(quadratic_loss)(params)
  return jax.tree.map(lambda g: (g + shift).astype(g.dtype), grads)


def leaf_types(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)


def simba_count(state):
  """Returns the step count of the SimbaState inside ``state``.

  Other states in a chain, such as a schedule's, have a ``count`` too.
  """
  return otu.tree_get(
      state, "count", filtering=lambda path, _: path[-1].tuple_name == "SimbaState"
  )


# Extra arguments and tracing.


def test_update_accepts_extra_args():
  tx = simba_optax.simba(seed=1)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = vector_params()
  grads = gradient(params)
  state = tx.init(params)

  with_extra, extra_state = jax.jit(tx.update)(
      grads, state, params, loss=1.0, step=3
  )
  without_extra, plain_state = jax.jit(tx.update)(grads, state, params)
  chex.assert_trees_all_equal(with_extra, without_extra)
  chex.assert_trees_all_equal(extra_state, plain_state)


def test_chain_passes_extra_args():
  tx = optax.chain(simba_optax.simba(seed=1), optax.scale(-0.1))
  params = vector_params()
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(
      gradient(params), state, params, loss=jnp.float32(2.0)
  )
  assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))


def test_jit_update_traces_once():
  tx = simba_optax.simba(coarse_fraction=0.5, seed=1)
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  params = mixed_params()
  state = tx.init(params)
  for shift in (0.0, 0.25, -0.5):
    _, state = update(gradient(params, shift), state, params, loss=jnp.float32(shift))
  assert int(state.count) == 3


def test_extra_positional_argument_rejected():
  tx = simba_optax.simba()
  params = vector_params()
  with pytest.raises(TypeError):
    tx.update(params, tx.init(params), params, 1.0)


# Convergence over many steps inside lax.scan.

ROSENBROCK_MINIMUM = jnp.array([1.0, 1.0])
MATRIX_TARGET = jnp.array([[3.0, -2.0], [1.0, 4.0]])
MATRIX_MIXING = jnp.array([[2.0, 0.5], [0.5, 1.0]])
VECTOR_TARGET = jnp.array([1.0, -2.0, 3.0])


def rosenbrock(p):
  return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def vector_quadratic(p):
  return jnp.sum((p - VECTOR_TARGET) ** 2)


def matrix_quadratic(p):
  return jnp.sum((MATRIX_MIXING @ (p - MATRIX_TARGET)) ** 2)


def mixed_quadratic(p):
  return (
      (p["scalar"] - 2.0) ** 2
      + jnp.sum((p["vector"] - VECTOR_TARGET) ** 2)
      + jnp.sum((p["matrix"] - MATRIX_TARGET) ** 2)
  )


# name: (objective, start, minimum, coarse_fraction). Rosenbrock's two rows
# are both sampled, since one coordinate per step crawls along the valley.
PROBLEMS = {
    "quadratic": (vector_quadratic, jnp.zeros(3), VECTOR_TARGET, 0.5),
    "rosenbrock": (rosenbrock, jnp.zeros(2), ROSENBROCK_MINIMUM, 1.0),
    "matrix_quadratic": (matrix_quadratic, jnp.zeros((2, 2)), MATRIX_TARGET, 0.5),
    "mixed_tree": (
        mixed_quadratic,
        {"scalar": jnp.zeros(()), "vector": jnp.zeros(3), "matrix": jnp.zeros((2, 2))},
        {"scalar": jnp.asarray(2.0), "vector": VECTOR_TARGET, "matrix": MATRIX_TARGET},
        0.5,
    ),
}
CONVERGENCE_STEPS = 2000


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_scan_converges(problem):
  objective, start, minimum, coarse_fraction = PROBLEMS[problem]
  # Simba's direction has singular values of at most one, whatever the
  # gradient's size, so the learning rate must decay for the iterates to
  # settle.
  schedule = optax.exponential_decay(0.1, CONVERGENCE_STEPS, 1e-4)
  tx = optax.chain(
      simba_optax.simba(momentum=0.9, coarse_fraction=coarse_fraction, seed=0),
      optax.scale_by_learning_rate(schedule),
  )

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(objective)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(
        step, (params, tx.init(params)), length=CONVERGENCE_STEPS
    )
    return params, state

  params, state = run(start)
  assert int(simba_count(state)) == CONVERGENCE_STEPS
  for found, expected in zip(jax.tree.leaves(params), jax.tree.leaves(minimum)):
    np.testing.assert_allclose(found, expected, atol=1e-4)
  assert objective(params) < 1e-5 * objective(start)


# inject_hyperparams.


def test_inject_hyperparams_same_updates():
  hyperparameters = dict(momentum=0.8, eps=1e-6, coarse_fraction=0.5, rank=2, seed=4)
  plain = simba_optax.simba(**hyperparameters)
  injected = optax.inject_hyperparams(simba_optax.simba, static_args=STATIC_ARGS)(
      **hyperparameters
  )
  params = mixed_params()
  plain_update, injected_update = jax.jit(plain.update), jax.jit(injected.update)
  plain_state, injected_state = plain.init(params), injected.init(params)
  for shift in (0.0, 0.5, -0.25):
    grads = gradient(params, shift)
    plain_updates, plain_state = plain_update(grads, plain_state, params)
    injected_updates, injected_state = injected_update(grads, injected_state, params)
    chex.assert_trees_all_close(injected_updates, plain_updates, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(injected_state.inner_state, plain_state, rtol=1e-6, atol=0)
  assert set(injected_state.hyperparams) == {"momentum", "eps"}


def test_injected_momentum_changes_update():
  injected = optax.inject_hyperparams(simba_optax.simba, static_args=STATIC_ARGS)(
      momentum=0.9, seed=2
  )
  params = vector_params()
  grads = gradient(params)
  update = jax.jit(injected.update)
  _, state = update(grads, injected.init(params), params)
  state.hyperparams["momentum"] = jnp.asarray(0.0)
  _, state = update(grads, state, params)
  # With momentum 0 the momentum buffer is the last gradient alone.
  chex.assert_trees_all_equal(state.inner_state.mu, grads)


# dtypes and state types.

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def assert_cond_step_keeps_types(dtype):
  tx = simba_optax.simba(coarse_fraction=0.5, seed=3)
  params = mixed_params(dtype)
  state = tx.init(params)

  @jax.jit
  def step(params, state, take_step):
    grads = gradient(params)
    # Both branches of lax.cond must return the same types, weak types
    # included.
    updates, state = jax.lax.cond(
        take_step,
        lambda: tx.update(grads, state, params),
        lambda: (jax.tree.map(jnp.zeros_like, grads), state),
    )
    return optax.apply_updates(params, updates), state, updates

  initial_types = leaf_types(state)
  for take_step in (True, False, True):
    params, state, updates = step(params, state, take_step)
    for name, leaf in updates.items():
      assert leaf.dtype == dtype, name
    for name, leaf in params.items():
      assert leaf.dtype == dtype, name
    assert leaf_types(state) == initial_types
  assert int(state.count) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_cond_step_keeps_types(dtype):
  assert_cond_step_keeps_types(dtype)


def test_cond_step_keeps_float64():
  with jax.enable_x64(True):
    assert_cond_step_keeps_types(jnp.float64)


def test_mu_dtype_differs_from_params():
  tx = simba_optax.simba(mu_dtype=jnp.float32, seed=3)
  params = vector_params(jnp.bfloat16)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(gradient(params), state, params)
  for name in params:
    assert updates[name].dtype == jnp.bfloat16, name
    assert state.mu[name].dtype == jnp.float32, name


# Optax wrappers.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_multi_steps_first_update_zero(dtype):
  inner = optax.chain(simba_optax.simba(seed=5), optax.scale(-0.1))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = vector_params(dtype)
  state = tx.init(params)
  update = jax.jit(tx.update)

  first, state = update(gradient(params), state, params)
  chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal_dtypes(first, params)
  second, state = update(gradient(params), state, params)
  assert all(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(second))
  assert int(otu.tree_get(state.inner_opt_state, "count")) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_apply_if_finite_skips_nan(dtype):
  inner = optax.chain(simba_optax.simba(seed=6), optax.scale(-0.1))
  tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
  params = mixed_params(dtype)
  state = tx.init(params)
  update = jax.jit(tx.update)

  finite, state = update(gradient(params), state, params)
  assert any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(finite))
  chex.assert_trees_all_equal_dtypes(finite, params)
  inner_before = state.inner_state

  poisoned = gradient(params)
  poisoned["kernel"] = poisoned["kernel"].at[0, 0].set(jnp.nan)
  skipped, state = update(poisoned, state, params)
  chex.assert_trees_all_equal(skipped, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(state.inner_state, inner_before)
  assert int(state.notfinite_count) == 1
  assert not bool(state.last_finite)


def test_masked_leaves_pass_through():
  params = vector_params()
  grads = gradient(params)
  params["steps"] = jnp.asarray(7, jnp.int32)
  grads["steps"] = jnp.asarray(1, jnp.int32)
  mask = {"scale": False, "bias": True, "steps": False}
  tx = optax.masked(simba_optax.simba(seed=7), mask)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)

  assert updates["scale"] == grads["scale"]
  assert updates["steps"] == grads["steps"]
  assert isinstance(state.inner_state.mu["scale"], optax.MaskedNode)
  assert isinstance(state.inner_state.mu["steps"], optax.MaskedNode)
  np.testing.assert_array_equal(state.inner_state.mu["bias"], grads["bias"])
  assert int(jnp.sum(updates["bias"] != 0)) == 2  # ceil(0.5 * 4) rows


def test_partition_by_label():
  params = mixed_params()
  labels = {"scale": "sgd", "bias": "sgd", "kernel": "simba"}
  tx = optax.partition(
      {"simba": optax.chain(simba_optax.simba(seed=8), optax.scale(-0.1)),
       "sgd": optax.sgd(0.1)},
      labels,
  )
  state = tx.init(params)
  grads = gradient(params)
  updates, state = jax.jit(tx.update)(grads, state, params)

  for name in ("scale", "bias"):
    np.testing.assert_allclose(updates[name], -0.1 * grads[name], rtol=1e-6)
  simba_state = state.inner_states["simba"].inner_state[0]
  assert isinstance(simba_state, simba_optax.SimbaState)
  assert int(simba_state.count) == 1
  # Only the sampled rows, the kernel's columns by default, move.
  moved = np.any(np.asarray(updates["kernel"]) != 0, axis=0)
  assert int(moved.sum()) == 2  # ceil(0.5 * 3)


def test_chain_clip_decay_schedule():
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=3)
  simba = simba_optax.simba(coarse_fraction=0.5, seed=9)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.add_decayed_weights(0.01),
      simba,
      optax.scale_by_learning_rate(schedule),
  )
  params = mixed_params()

  @jax.jit
  def step(params, chain_state, simba_state, grads, count):
    chained, chain_state = tx.update(grads, chain_state, params)
    # The same chain, written out by hand.
    norm = optax.tree.norm(grads)
    clipped = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)
    decayed = jax.tree.map(lambda g, p: g + 0.01 * p, clipped, params)
    direction, simba_state = simba.update(decayed, simba_state, params)
    by_hand = jax.tree.map(lambda d: -schedule(count) * d, direction)
    return chained, by_hand, chain_state, simba_state

  chain_state, simba_state = tx.init(params), simba.init(params)
  for count, shift in enumerate((0.0, 2.0, -1.0)):
    grads = gradient(params, shift)
    chained, by_hand, chain_state, simba_state = step(
        params, chain_state, simba_state, grads, count
    )
    chex.assert_trees_all_close(chained, by_hand, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, chained)
  assert int(simba_count(chain_state)) == 3


def test_tree_get_count():
  tx = simba_optax.simba(seed=10)
  params = vector_params()
  state = tx.init(params)
  assert int(otu.tree_get(state, "count")) == 0
  update = jax.jit(tx.update)
  for _ in range(2):
    _, state = update(gradient(params), state, params)
  assert int(otu.tree_get(state, "count")) == 2
  chained = optax.chain(optax.scale(2.0), tx).init(params)
  assert int(otu.tree_get(chained, "count")) == 0


def test_tree_get_count_beside_schedule():
  tx = optax.chain(
      simba_optax.simba(seed=10),
      optax.scale_by_learning_rate(optax.constant_schedule(0.1)),
  )
  state = tx.init(vector_params())
  with pytest.raises(KeyError, match="multiple values"):
    otu.tree_get(state, "count")
  assert int(simba_count(state)) == 0
