"""Simba under hostile input: non-finite and extreme values, rank-deficient blocks, misuse.

Numerical checks compare float32 updates with the float64 reference in
`oracle`, within `RELATIVE_TOLERANCE` in the Frobenius norm.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import simba_optax
from oracle import (
    coarse_row_count,
    heavy_ball_traces,
    matrix_view,
    matrix_with_spectrum,
    relative_error,
    sampled_rows,
    simba_direction,
)
from simba_optax import SimbaDimensionNumbers

RELATIVE_TOLERANCE = 1e-4


@functools.cache
def make_simba(**hyperparameters):
  """Returns one `simba` per setting, so that tests share its compiled update."""
  return simba_optax.simba(**hyperparameters)


@functools.cache
def compiled_update(transformation):
  return jax.jit(transformation.update)


def run_steps(transformation, grads):
  """Runs `transformation` over a list of gradient trees with one compiled update.

  Returns the updates and the states after each step, as NumPy trees.
  """
  update = compiled_update(transformation)
  state = transformation.init(grads[0])
  updates, states = [], []
  for grad in grads:
    step_update, state = update(grad, state, grad)
    updates.append(jax.tree.map(np.asarray, step_update))
    states.append(jax.tree.map(np.asarray, state))
  return updates, states


def assert_matches_reference(trace, update, *, count, rank, eps):
  """Checks that `update` has `count` non-zero rows that equal the reference there."""
  trace_matrix = matrix_view(trace).astype(np.float64)
  update_matrix = matrix_view(update).astype(np.float64)
  assert np.all(np.isfinite(update_matrix))

  rows = sampled_rows(update_matrix)
  assert rows.size == count
  expected = simba_direction(trace_matrix[rows], rank, eps)
  assert relative_error(update_matrix[rows], expected) <= RELATIVE_TOLERANCE
  return rows


def leaf_from_matrix(matrix):
  """Returns the Dense kernel (in, out) whose default matrix view is `matrix`."""
  return np.ascontiguousarray(np.asarray(matrix, np.float32).T)


def rank_one(rng, rows, columns):
  return np.outer(rng.standard_normal(rows), rng.standard_normal(columns))


def duplicated_rows(rng, rows, columns):
  distinct = rng.standard_normal((4, columns))
  return np.tile(distinct, (rows // 4, 1))


def gapped_spectrum(rng, rows, columns):
  """Returns a rank-30 matrix with singular values 0.75**i, i < 30.

  The smallest, 2.4e-4 of the largest, is far from float32 rounding level,
  so the float32 and float64 computations keep the same directions.
  """
  return matrix_with_spectrum(rng, rows, columns, 0.75 ** np.arange(30))


# --- Non-finite gradients -------------------------------------------------------

# Dense kernel (in, out) = (6, 8): the matrix view has 8 rows, 4 sampled per step.
SMALL_KERNEL = (6, 8)


def six_gradients(seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          "kernel": rng.standard_normal(SMALL_KERNEL).astype(np.float32),
          "neighbour": rng.standard_normal(SMALL_KERNEL).astype(np.float32),
          "bias": rng.standard_normal((8,)).astype(np.float32),
      }
      for _ in range(6)
  ]


def with_bad_entry(grad, row, value):
  """Returns a copy of `grad` whose kernel has `value` in one entry of matrix row `row`."""
  bad = jax.tree.map(np.copy, grad)
  bad["kernel"][2, row] = value
  return bad


def sampled_kernel_rows(transformation, step):
  """Returns the kernel rows that step `step` (1-based) samples, from a clean run."""
  updates, _ = run_steps(transformation, six_gradients()[:step])
  return set(sampled_rows(matrix_view(updates[-1]["kernel"])).tolist())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_entry_poisons_leaf(value):
  # Whether or not the entry's row is sampled, the kernel's whole update is
  # NaN, so the step fails now and not when that row is next sampled. The
  # other leaves keep their finite updates, including the neighbour whose
  # block is decomposed in the same batched call.
  grads = six_gradients()
  transformation = make_simba(rank=3)
  clean_updates, _ = run_steps(transformation, grads[:3])
  # The loop below puts the entry in sampled rows and in rows not sampled.
  sampled = sampled_kernel_rows(transformation, 3)
  assert 0 < len(sampled) < SMALL_KERNEL[1]

  for row in range(SMALL_KERNEL[1]):
    bad = grads[:2] + [with_bad_entry(grads[2], row, value)]

    updates, _ = run_steps(transformation, bad)

    assert np.all(np.isnan(updates[2]["kernel"])), f"row {row}"
    for name in ("neighbour", "bias"):
      np.testing.assert_array_equal(updates[2][name], clean_updates[2][name])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_momentum_keeps_only_gradient_value(value):
  # The eigen-computation of the poisoned block produces NaN, but the
  # momentum is beta * mu + g alone: only the bad entry is non-finite.
  grads = six_gradients()
  transformation = make_simba(rank=3)
  row = min(sampled_kernel_rows(transformation, 3))
  bad = grads[:2] + [with_bad_entry(grads[2], row, value)]

  _, states = run_steps(transformation, bad)

  trace = heavy_ball_traces([grad["kernel"] for grad in bad], 0.9)[2]
  momentum = states[2].mu["kernel"]
  finite = np.isfinite(trace)
  assert np.count_nonzero(~finite) == 1
  assert np.array_equal(np.isnan(momentum), np.isnan(trace))
  assert np.array_equal(np.isinf(momentum), np.isinf(trace))
  # Float32 rounding of beta * mu + g, whose terms are of order one.
  np.testing.assert_allclose(momentum[finite], trace[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_apply_if_finite_skips_bad_step(value):
  # Step 3 of 6 has one bad entry. Under apply_if_finite its update is zero
  # and steps 4 to 6 equal steps 3 to 5 of a run without step 3, whichever
  # row contains the entry.
  grads = six_gradients()
  transformation = optax.apply_if_finite(
      optax.chain(make_simba(rank=3), optax.scale(-0.1)),
      max_consecutive_errors=3,
  )
  skipped_updates, _ = run_steps(transformation, grads[:2] + grads[3:])

  for row in range(SMALL_KERNEL[1]):
    bad = grads[:2] + [with_bad_entry(grads[2], row, value)] + grads[3:]

    updates, states = run_steps(transformation, bad)

    for name in ("kernel", "neighbour", "bias"):
      assert np.all(updates[2][name] == 0.0)
      for step in range(3, 6):
        assert np.all(np.isfinite(updates[step][name]))
        np.testing.assert_array_equal(
            updates[step][name], skipped_updates[step - 1][name],
            err_msg=f"row {row}, step {step + 1}, leaf {name}",
        )
    assert int(states[5].total_notfinite) == 1
    assert int(states[5].notfinite_count) == 0


def test_momentum_overflow_gives_nan():
  # Finite gradients of 3e38 overflow the float32 momentum at step 2. That
  # step's update is NaN, like an update from a non-finite gradient.
  gradient = np.zeros(SMALL_KERNEL, np.float32)
  gradient[:, 0] = 3e38
  gradient[:, 1] = 1.0
  transformation = make_simba(momentum=0.9, coarse_fraction=1.0)

  updates, states = run_steps(transformation, [{"kernel": gradient}] * 2)

  assert np.all(np.isfinite(updates[0]["kernel"]))
  assert np.any(np.isinf(states[1].mu["kernel"]))
  assert np.all(np.isnan(updates[1]["kernel"]))


# --- Extreme magnitudes ---------------------------------------------------------

# Dense kernel (24, 40): matrix view 40 x 24, 20 rows sampled, exact path.
KERNEL = (24, 40)


def scaled_gradients(scale, steps=4, seed=1):
  rng = np.random.default_rng(seed)
  grads = [rng.standard_normal(KERNEL) for _ in range(steps)]
  return [{"kernel": (scale * grad).astype(np.float32)} for grad in grads]


@pytest.mark.parametrize("scale, eps", [(1e-30, 0.0), (1e30, 0.0), (1e30, 1e-8)])
def test_extreme_scale_matches_unscaled(scale, eps):
  # Where the floor is inactive the direction does not depend on the
  # gradients' scale: eps = 0, or eps far below the singular values.
  transformation = make_simba(momentum=0.9, rank=6, eps=eps)
  grads = scaled_gradients(scale)
  assert all(np.all(np.isfinite(grad["kernel"])) for grad in grads)

  updates, states = run_steps(transformation, grads)
  unscaled_updates, _ = run_steps(transformation, scaled_gradients(1.0))

  for step in range(len(grads)):
    update = updates[step]["kernel"]
    assert np.all(np.isfinite(update))
    assert relative_error(update, unscaled_updates[step]["kernel"]) <= RELATIVE_TOLERANCE
    assert_matches_reference(
        states[step].mu["kernel"], update, count=20, rank=6, eps=eps
    )


def test_extreme_scale_randomized_path():
  # Matrix view 200 x 160 with 100 rows sampled: rank 8 + oversampling 10 is
  # far below 100, so the randomized range finder runs.
  rng = np.random.default_rng(2)
  matrix = gapped_spectrum(rng, 200, 160)
  transformation = make_simba(momentum=0.0, rank=8, eps=0.0)
  updates = {}
  for scale in (1.0, 1e-30, 1e30):
    leaf = (scale * matrix.T).astype(np.float32)
    (update,), _ = run_steps(transformation, [{"kernel": leaf}])
    updates[scale] = update["kernel"]

  for scale in (1e-30, 1e30):
    assert np.all(np.isfinite(updates[scale]))
    assert relative_error(updates[scale], updates[1.0]) <= RELATIVE_TOLERANCE


def test_floor_takes_over_tiny_gradients():
  # With eps = 1e-8 and singular values near 1e-29 the floor is active for
  # every direction: the update is the momentum's sampled rows divided by eps.
  transformation = make_simba(momentum=0.9, rank=6, eps=1e-8)
  grads = scaled_gradients(1e-30)

  updates, states = run_steps(transformation, grads)

  for step in range(len(grads)):
    trace = matrix_view(states[step].mu["kernel"]).astype(np.float64)
    update = matrix_view(updates[step]["kernel"])
    rows = assert_matches_reference(
        states[step].mu["kernel"], updates[step]["kernel"], count=20, rank=6, eps=1e-8
    )
    assert relative_error(update[rows], trace[rows] / 1e-8) <= RELATIVE_TOLERANCE


def test_zero_gradients_then_normal():
  # 100 zero gradients give exactly zero updates and leave the momentum at
  # zero; the next gradients take the normal path.
  transformation = make_simba(momentum=0.9, rank=6, eps=1e-8)
  zeros = {"kernel": jnp.zeros(KERNEL), "bias": jnp.zeros((40,))}
  state = transformation.init(zeros)

  def zero_step(state, _):
    update, state = transformation.update(zeros, state, zeros)
    # A sum, not a maximum, so that a NaN would show.
    magnitude = jax.tree.map(lambda leaf: jnp.sum(jnp.abs(leaf)), update)
    return state, magnitude

  state, magnitude = jax.jit(
      lambda state: jax.lax.scan(zero_step, state, length=100)
  )(state)

  for name in zeros:
    assert np.all(np.asarray(magnitude[name]) == 0.0)
    assert np.all(np.asarray(state.mu[name]) == 0.0)
  assert int(state.count) == 100

  rng = np.random.default_rng(3)
  grads = [
      {
          "kernel": rng.standard_normal(KERNEL).astype(np.float32),
          "bias": rng.standard_normal((40,)).astype(np.float32),
      }
      for _ in range(2)
  ]
  update = jax.jit(transformation.update)
  for step, grad in enumerate(grads):
    step_update, state = update(grad, state, grad)
    for name in grads[0]:
      trace = heavy_ball_traces([g[name] for g in grads], 0.9)[step]
      assert_matches_reference(
          trace, np.asarray(step_update[name]), count=20, rank=6, eps=1e-8
      )


# --- Rank-deficient blocks ------------------------------------------------------


# Oversampling that makes rank + oversampling exceed min(n_l, d): exact path.
EXACT = dict(oversampling=100)

# name: (matrix of the deficient leaf, matrix of its full-rank neighbour,
# hyperparameters). Matrices are (rows, columns) of the default view. The
# randomized cases sample 100 of 200 rows with rank 8 and 10 oversampling
# columns, far below min(n_l, d) = 100.
RANK_DEFICIENT_CASES = {
    "zero": (
        lambda rng: np.zeros((40, 24)),
        lambda rng: rng.standard_normal((40, 24)),
        dict(rank=6, **EXACT),
    ),
    "zero_randomized": (
        lambda rng: np.zeros((200, 160)),
        lambda rng: gapped_spectrum(rng, 200, 160),
        dict(rank=8),
    ),
    "rank_one_exact": (
        lambda rng: rank_one(rng, 40, 24),
        lambda rng: rng.standard_normal((40, 24)),
        dict(rank=6, **EXACT),
    ),
    "rank_one_randomized": (
        lambda rng: rank_one(rng, 200, 160),
        lambda rng: gapped_spectrum(rng, 200, 160),
        dict(rank=8),
    ),
    "scaled_identity": (
        lambda rng: 3.0 * np.eye(32),
        lambda rng: rng.standard_normal((32, 32)),
        dict(rank=4, **EXACT),
    ),
    "duplicated_rows_exact": (
        lambda rng: duplicated_rows(rng, 40, 24),
        lambda rng: rng.standard_normal((40, 24)),
        dict(rank=6, **EXACT),
    ),
    "duplicated_rows_randomized": (
        lambda rng: duplicated_rows(rng, 200, 160),
        lambda rng: gapped_spectrum(rng, 200, 160),
        dict(rank=8),
    ),
    "one_row": (
        lambda rng: rng.standard_normal((1, 24)),
        lambda rng: rng.standard_normal((1, 24)),
        dict(rank=6),
    ),
    "one_coarse_row": (
        lambda rng: rank_one(rng, 40, 24),
        lambda rng: rng.standard_normal((40, 24)),
        dict(rank=6, coarse_rows=1),
    ),
    "rank_hyperparameter_one": (
        lambda rng: duplicated_rows(rng, 40, 24),
        lambda rng: rng.standard_normal((40, 24)),
        dict(rank=1, **EXACT),
    ),
    "rank_above_both_dims": (
        lambda rng: duplicated_rows(rng, 8, 6),
        lambda rng: rng.standard_normal((8, 6)),
        dict(rank=100),
    ),
}


@pytest.mark.parametrize("case", sorted(RANK_DEFICIENT_CASES))
def test_rank_deficient_beside_full_rank(case):
  # The two leaves have equal shapes, so their blocks are decomposed in one
  # batched call; each must still equal its own reference.
  deficient, full, hyperparameters = RANK_DEFICIENT_CASES[case]
  rng = np.random.default_rng(4)
  grad = {
      "deficient": leaf_from_matrix(deficient(rng)),
      "full": leaf_from_matrix(full(rng)),
  }
  rows = matrix_view(grad["full"]).shape[0]
  count = coarse_row_count(rows, coarse_rows=hyperparameters.get("coarse_rows"))
  transformation = make_simba(momentum=0.0, **hyperparameters)

  (update,), _ = run_steps(transformation, [grad])

  rank = hyperparameters["rank"]
  assert_matches_reference(grad["full"], update["full"], count=count, rank=rank, eps=1e-8)
  if not np.any(grad["deficient"]):
    assert np.all(update["deficient"] == 0.0)
    return
  assert_matches_reference(
      grad["deficient"], update["deficient"], count=count, rank=rank, eps=1e-8
  )


@pytest.mark.parametrize("case", ["rank_one_exact", "rank_one_randomized", "one_coarse_row"])
def test_rank_one_rows_normalized(case):
  # A rank-1 block has one singular value, its Frobenius norm, so the
  # sampled rows are G_s / ||G_s||_F for every rank setting.
  deficient, _, hyperparameters = RANK_DEFICIENT_CASES[case]
  matrix = deficient(np.random.default_rng(5)).astype(np.float32)
  transformation = make_simba(momentum=0.0, **hyperparameters)

  (update,), _ = run_steps(transformation, [{"kernel": leaf_from_matrix(matrix)}])

  update_matrix = matrix_view(update["kernel"])
  rows = sampled_rows(update_matrix)
  block = matrix[rows].astype(np.float64)
  assert relative_error(update_matrix[rows], block / np.linalg.norm(block)) <= RELATIVE_TOLERANCE


# --- Misuse ---------------------------------------------------------------------


def nested_params():
  return {"encoder": {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}}


def test_missing_leaf_names_path():
  transformation = simba_optax.simba()
  state = transformation.init(nested_params())
  grad = {"encoder": {"dense": {"kernel": jnp.zeros((3, 4))}}}

  with pytest.raises(ValueError, match="does not match the tree of the state") as info:
    transformation.update(grad, state)
  assert "['encoder']['dense']['bias']" in str(info.value)


def test_extra_leaf_with_dimension_tree():
  # The tree of dimension numbers fits the parameters, so the error must name
  # the gradient tree and its extra leaf, not the dimension numbers.
  dims = {"encoder": {"dense": {"kernel": SimbaDimensionNumbers(), "bias": None}}}
  transformation = simba_optax.simba(dimension_numbers=dims)
  state = transformation.init(nested_params())
  grad = nested_params()
  grad["encoder"]["dense"]["scale"] = jnp.zeros(())

  with pytest.raises(ValueError, match="gradient tree does not match") as info:
    transformation.update(grad, state)
  assert "['encoder']['dense']['scale']" in str(info.value)


def test_shape_mismatch_with_row_axis():
  # A gradient of another rank must be reported as a shape mismatch, not as
  # a row axis out of range for the gradient.
  dims = {"encoder": {"dense": {"kernel": SimbaDimensionNumbers(row_axis=1), "bias": None}}}
  transformation = simba_optax.simba(dimension_numbers=dims)
  state = transformation.init(nested_params())
  grad = nested_params()
  grad["encoder"]["dense"]["kernel"] = jnp.zeros((12,))

  with pytest.raises(
      ValueError,
      match=re.escape("['encoder']['dense']['kernel'] has shape (12,)"),
  ):
    transformation.update(grad, state)


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int8, jnp.bool_])
def test_non_float_gradient_names_path(dtype):
  transformation = simba_optax.simba()
  state = transformation.init(nested_params())
  grad = nested_params()
  grad["encoder"]["dense"]["bias"] = jnp.zeros((4,), dtype)

  with pytest.raises(TypeError) as info:
    transformation.update(grad, state)
  message = str(info.value)
  assert "['encoder']['dense']['bias']" in message
  assert jnp.dtype(dtype).name in message


@pytest.mark.parametrize(
    "mu_dtype, gradient_dtype",
    [(None, jnp.bfloat16), (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float16)],
)
def test_gradient_dtype_differs_from_buffer(mu_dtype, gradient_dtype):
  # Not an error: mu_dtype sets the buffer's dtype apart from the
  # gradient's, and mixed-precision gradients are common. The buffer keeps
  # its dtype, so the state's types are stable under jit and scan, and the
  # update takes the gradient's dtype.
  rng = np.random.default_rng(6)
  params = {"kernel": jnp.asarray(rng.standard_normal((16, 10)), jnp.float32)}
  transformation = simba_optax.simba(momentum=0.9, rank=4, mu_dtype=mu_dtype)
  state = transformation.init(params)
  buffer_dtype = state.mu["kernel"].dtype
  grad = {"kernel": params["kernel"].astype(gradient_dtype)}

  update, new_state = jax.jit(transformation.update)(grad, state)

  assert new_state.mu["kernel"].dtype == buffer_dtype
  assert update["kernel"].dtype == gradient_dtype
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  trace = np.asarray(grad["kernel"].astype(buffer_dtype), np.float64)
  rows = sampled_rows(matrix_view(np.asarray(update["kernel"], np.float32)))
  assert rows.size == 5
  expected = simba_direction(matrix_view(trace)[rows], 4, 1e-8)
  actual = matrix_view(np.asarray(update["kernel"], np.float64))[rows]
  # Float32 computation, then rounding to the gradient's dtype.
  rounding = float(jnp.finfo(gradient_dtype).eps) / 2
  assert relative_error(actual, expected) <= RELATIVE_TOLERANCE + rounding
