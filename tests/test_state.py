"""Simba's state and tree handling: momentum, step count, row samples, dtypes.

Most updates run without `jax.jit` so that JAX's per-operation caches are
shared between tests; the variant tests compare compiled and uncompiled runs.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import simba_optax
from oracle import (
    coarse_row_count,
    heavy_ball_traces,
    matrix_view,
    relative_error,
    sampled_rows,
    simba_direction,
)

# Float32 computation against the float64 reference, relative Frobenius error.
RELATIVE_TOLERANCE = 1e-4

# Dense kernel (in, out) whose matrix view is 50 x 16.
KERNEL = (16, 50)


def random_tree(rng, shapes, dtype=np.float32):
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def assert_leaf_matches(trace, update, *, count, rank, eps=1e-8, row_axis=-1,
                        batch_axes=(), tolerance=RELATIVE_TOLERANCE):
  """Checks each matrix of a leaf: `count` sampled rows, equal to the reference there.

  `trace` is the momentum trace the direction is computed from. Returns the
  sampled rows of every matrix, in matrix-view order.
  """
  trace_matrices = matrix_view(trace, row_axis, batch_axes).astype(np.float64)
  update_matrices = matrix_view(update, row_axis, batch_axes).astype(np.float64)
  assert np.all(np.isfinite(update_matrices))

  shape = update_matrices.shape
  trace_matrices = trace_matrices.reshape((-1,) + shape[-2:])
  update_matrices = update_matrices.reshape((-1,) + shape[-2:])
  samples = []
  for trace_matrix, update_matrix in zip(trace_matrices, update_matrices):
    rows = sampled_rows(update_matrix)
    assert rows.size == count
    expected = simba_direction(trace_matrix[rows], rank, eps)
    assert relative_error(update_matrix[rows], expected) <= tolerance
    samples.append(rows)
  return samples


def run_steps(transformation, grads):
  """Applies `transformation` to a list of gradient trees from `init`.

  Returns the updates and the states after each step.
  """
  state = transformation.init(grads[0])
  updates, states = [], []
  for grad in grads:
    update, state = transformation.update(grad, state, grad)
    updates.append(update)
    states.append(state)
  return updates, states


def test_momentum_trace_over_steps():
  rng = np.random.default_rng(0)
  shapes = {"kernel": KERNEL, "bias": (50,)}
  grads = [random_tree(rng, shapes) for _ in range(4)]
  transformation = simba_optax.simba(momentum=0.9, rank=5)

  updates, states = run_steps(transformation, grads)

  for name in shapes:
    traces = heavy_ball_traces([grad[name] for grad in grads], 0.9)
    for step, (update, state) in enumerate(zip(updates, states)):
      trace = np.asarray(state.mu[name])
      assert trace.dtype == np.float32
      assert relative_error(trace, traces[step]) <= 1e-6
      count = coarse_row_count(50)
      assert_leaf_matches(trace, np.asarray(update[name]), count=count, rank=5)


def test_count_increments_key_fixed():
  rng = np.random.default_rng(1)
  grads = [random_tree(rng, {"kernel": KERNEL}) for _ in range(3)]
  transformation = simba_optax.simba(rank=5, seed=3)
  initial = transformation.init(grads[0])

  _, states = run_steps(transformation, grads)

  assert isinstance(initial, simba_optax.SimbaState)
  assert initial.count.dtype == jnp.int32
  assert initial.count.shape == ()
  assert int(initial.count) == 0
  assert initial.key.dtype == jnp.uint32
  assert initial.key.shape == (2,)
  for step, state in enumerate(states, start=1):
    assert int(state.count) == step
    assert state.count.dtype == jnp.int32
    np.testing.assert_array_equal(state.key, initial.key)


def test_sample_changes_every_step():
  # 7 of 50 rows: two steps draw the same set with probability 1 / C(50, 7),
  # about 1e-8.
  rng = np.random.default_rng(2)
  grad = {"kernel": rng.standard_normal(KERNEL).astype(np.float32)}
  transformation = simba_optax.simba(momentum=0.0, coarse_rows=7, rank=5)

  updates, _ = run_steps(transformation, [grad] * 6)

  samples = [tuple(sampled_rows(matrix_view(update["kernel"]))) for update in updates]
  assert all(len(rows) == 7 for rows in samples)
  assert len(set(samples)) == len(samples)


def test_identical_leaves_sampled_separately():
  rng = np.random.default_rng(3)
  leaf = rng.standard_normal(KERNEL).astype(np.float32)
  grad = {"first": leaf, "second": leaf.copy()}
  transformation = simba_optax.simba(momentum=0.0, coarse_rows=7, rank=5)

  (update,), _ = run_steps(transformation, [grad])

  first = sampled_rows(matrix_view(update["first"]))
  second = sampled_rows(matrix_view(update["second"]))
  assert first.size == 7
  assert second.size == 7
  assert not np.array_equal(first, second)


def test_same_seed_same_updates():
  rng = np.random.default_rng(4)
  grads = [random_tree(rng, {"kernel": KERNEL}) for _ in range(3)]
  first, _ = run_steps(simba_optax.simba(rank=5, seed=3), grads)
  second, _ = run_steps(simba_optax.simba(rank=5, seed=3), grads)

  for first_update, second_update in zip(first, second):
    np.testing.assert_array_equal(first_update["kernel"], second_update["kernel"])


@pytest.mark.parametrize(
    "key", [jax.random.key(3), jax.random.PRNGKey(3)], ids=["typed", "raw"]
)
def test_seed_key_equals_int(key):
  rng = np.random.default_rng(5)
  grads = [random_tree(rng, {"kernel": KERNEL}) for _ in range(2)]
  from_int, int_states = run_steps(simba_optax.simba(rank=5, seed=3), grads)
  from_key, key_states = run_steps(simba_optax.simba(rank=5, seed=key), grads)

  np.testing.assert_array_equal(int_states[0].key, key_states[0].key)
  for int_update, key_update in zip(from_int, from_key):
    np.testing.assert_array_equal(int_update["kernel"], key_update["kernel"])


def test_different_seeds_different_samples():
  rng = np.random.default_rng(6)
  grad = random_tree(rng, {"kernel": KERNEL})
  (third,), _ = run_steps(simba_optax.simba(coarse_rows=7, rank=5, seed=3), [grad])
  (fourth,), _ = run_steps(simba_optax.simba(coarse_rows=7, rank=5, seed=4), [grad])

  third_rows = sampled_rows(matrix_view(third["kernel"]))
  fourth_rows = sampled_rows(matrix_view(fourth["kernel"]))
  assert not np.array_equal(third_rows, fourth_rows)


@functools.cache
def sample_masks(rows, coarse_rows, steps):
  """Returns a (steps, rows) bool array: which rows of a vector leaf each step updated."""
  grad = jnp.ones((rows,), jnp.float32)
  transformation = simba_optax.simba(momentum=0.0, coarse_rows=coarse_rows, rank=5)

  def step(state, _):
    update, state = transformation.update(grad, state, grad)
    return state, update != 0

  _, masks = jax.jit(
      lambda state: jax.lax.scan(step, state, None, length=steps)
  )(transformation.init(grad))
  return np.asarray(masks)


# Small and large shares of the rows, which a sampler may draw differently.
@pytest.mark.parametrize(
    "rows, coarse_rows, steps", [(20, 5, 2000), (20, 10, 2000), (64, 3, 4000)]
)
def test_sample_uniform_over_rows(rows, coarse_rows, steps):
  masks = sample_masks(rows, coarse_rows, steps)
  share = coarse_rows / rows

  assert np.all(masks.sum(axis=1) == coarse_rows)

  # Pearson's statistic on the row counts. Rows drawn without replacement
  # make it (n - n_l) / (n - 1) times a chi-square with n - 1 degrees of
  # freedom, so the statistic is rescaled before the p-value. With the
  # library's fixed seed, a uniform sampler fails this with probability 1e-3.
  counts = masks.sum(axis=0)
  statistic, _ = scipy.stats.chisquare(counts)
  scaled = statistic * (rows - 1) / (rows - coarse_rows)
  assert scipy.stats.chi2.sf(scaled, rows - 1) > 1e-3

  # Consecutive steps: independent draws share n_l**2 / n rows on average,
  # with the hypergeometric variance below. Bound: 5 standard errors.
  overlaps = np.sum(masks[1:] & masks[:-1], axis=1)
  variance = coarse_rows * share * (1 - share) * (rows - coarse_rows) / (rows - 1)
  standard_error = np.sqrt(variance / overlaps.size)
  assert abs(overlaps.mean() - coarse_rows * share) < 5 * standard_error


@pytest.mark.parametrize("coarse_rows", [5, 10])
def test_sample_pairs_uncorrelated(coarse_rows):
  # A pair of rows is drawn together with probability n_l (n_l - 1) /
  # (n (n - 1)), here at least 105 times in 2000 steps. A z-score above 5 in
  # any of the 190 pairs of 20 rows has probability about 1e-4 under uniform
  # sampling.
  rows, steps = 20, 2000
  masks = sample_masks(rows, coarse_rows, steps)

  indicators = masks.astype(np.float64)
  pair_counts = indicators.T @ indicators
  pair_share = coarse_rows * (coarse_rows - 1) / (rows * (rows - 1))
  expected = steps * pair_share
  deviation = np.sqrt(steps * pair_share * (1 - pair_share))
  off_diagonal = pair_counts[~np.eye(rows, dtype=bool)]
  assert np.max(np.abs(off_diagonal - expected)) / deviation < 5


class VariantsTest(chex.TestCase):
  """Compiled and uncompiled updates: same rows, same values as the reference."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_updates_match_reference(self):
    rng = np.random.default_rng(7)
    shapes = {"kernel": KERNEL, "bias": (50,)}
    grads = [random_tree(rng, shapes) for _ in range(3)]
    transformation = simba_optax.simba(momentum=0.9, rank=5)
    update_fn = self.variant(transformation.update)
    state = transformation.init(grads[0])
    eager_state = transformation.init(grads[0])

    for grad in grads:
      update, state = update_fn(grad, state, grad)
      eager_update, eager_state = transformation.update(grad, eager_state, grad)
      for name in shapes:
        trace = np.asarray(state.mu[name])
        leaf = np.asarray(update[name])
        eager_leaf = np.asarray(eager_update[name])
        samples = assert_leaf_matches(trace, leaf, count=25, rank=5)
        eager_samples = assert_leaf_matches(trace, eager_leaf, count=25, rank=5)
        np.testing.assert_array_equal(samples[0], eager_samples[0])
        assert relative_error(leaf, eager_leaf) <= RELATIVE_TOLERANCE
      self.assertEqual(int(state.count), int(eager_state.count))


def test_leaf_ranks_zero_to_four():
  rng = np.random.default_rng(8)
  shapes = {
      "scalar": (),
      "vector": (50,),
      "kernel": KERNEL,
      "rank3": (3, 4, 5),
      "conv": (3, 3, 2, 4),
  }
  grad = random_tree(rng, shapes)
  transformation = simba_optax.simba(momentum=0.0, rank=5)

  (update,), _ = run_steps(transformation, [grad])

  for name, shape in shapes.items():
    leaf = np.asarray(update[name])
    assert leaf.shape == shape
    assert leaf.dtype == np.float32
    rows = matrix_view(grad[name]).shape[0]
    assert_leaf_matches(grad[name], leaf, count=coarse_row_count(rows), rank=5)

  # A scalar is a 1 x 1 matrix whose direction is its sign.
  np.testing.assert_allclose(
      float(update["scalar"]), np.sign(grad["scalar"]), rtol=RELATIVE_TOLERANCE
  )


def test_batch_axes_slices_own_samples():
  # Both leaves contain three 50 x 16 matrices: layers stacked on axis 0 of a
  # (3, in, out) kernel, and heads on axis 1 of an (out, heads, in) leaf with
  # the rows on axis 0.
  rng = np.random.default_rng(9)
  shapes = {"stacked": (3, 16, 50), "heads": (50, 3, 16)}
  dimension_numbers = {
      "stacked": simba_optax.SimbaDimensionNumbers(row_axis=-1, batch_axes=(0,)),
      "heads": simba_optax.SimbaDimensionNumbers(row_axis=0, batch_axes=(1,)),
  }
  grad = random_tree(rng, shapes)
  transformation = simba_optax.simba(
      momentum=0.0, rank=5, dimension_numbers=dimension_numbers
  )

  (update,), _ = run_steps(transformation, [grad])

  for name, shape in shapes.items():
    dims = dimension_numbers[name]
    leaf = np.asarray(update[name])
    assert leaf.shape == shape
    samples = assert_leaf_matches(
        grad[name], leaf, count=25, rank=5,
        row_axis=dims.row_axis, batch_axes=dims.batch_axes,
    )
    # Three slices share a sample with probability about 1 / C(50, 25)**2.
    assert len({tuple(rows) for rows in samples}) == 3


@pytest.mark.parametrize(
    "dims",
    [
        simba_optax.SimbaDimensionNumbers(row_axis=0, batch_axes=(0,)),
        simba_optax.SimbaDimensionNumbers(row_axis=3),
        simba_optax.SimbaDimensionNumbers(batch_axes=(0, 0)),
        simba_optax.SimbaDimensionNumbers(row_axis=-1, batch_axes=(-4,)),
    ],
    ids=["row_is_batch", "row_out_of_range", "batch_repeated", "batch_out_of_range"],
)
def test_dimension_numbers_invalid(dims):
  params = {"kernel": np.zeros((3, 16, 50), np.float32)}
  transformation = simba_optax.simba(dimension_numbers=dims)

  with pytest.raises(ValueError):
    transformation.init(params)


# Unit roundoff of the update's dtype: the float32 direction is rounded once.
@pytest.mark.parametrize(
    "dtype, roundoff", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)]
)
def test_low_precision_params(dtype, roundoff):
  rng = np.random.default_rng(10)
  grads = [
      {"kernel": jnp.asarray(rng.standard_normal(KERNEL), dtype)} for _ in range(2)
  ]
  transformation = simba_optax.simba(momentum=0.9, rank=5)

  updates, states = run_steps(transformation, grads)

  for update, state in zip(updates, states):
    assert update["kernel"].dtype == dtype
    assert state.mu["kernel"].dtype == dtype
    trace = np.asarray(state.mu["kernel"].astype(jnp.float32))
    leaf = np.asarray(update["kernel"].astype(jnp.float32))
    assert_leaf_matches(
        trace, leaf, count=25, rank=5, tolerance=roundoff + RELATIVE_TOLERANCE
    )


def test_mu_dtype_sets_buffer():
  rng = np.random.default_rng(11)
  grads = [random_tree(rng, {"kernel": KERNEL}) for _ in range(2)]
  transformation = simba_optax.simba(momentum=0.9, rank=5, mu_dtype=jnp.bfloat16)

  updates, states = run_steps(transformation, grads)

  for update, state in zip(updates, states):
    assert state.mu["kernel"].dtype == jnp.bfloat16
    assert update["kernel"].dtype == jnp.float32
    trace = np.asarray(state.mu["kernel"].astype(jnp.float32))
    assert_leaf_matches(trace, np.asarray(update["kernel"]), count=25, rank=5)


def test_none_and_masked_leaves_pass():
  rng = np.random.default_rng(12)
  kernel = rng.standard_normal(KERNEL).astype(np.float32)
  grad = {"kernel": kernel, "skipped": None, "masked": optax.MaskedNode()}
  transformation = simba_optax.simba(momentum=0.0, rank=5)

  (update,), (state,) = run_steps(transformation, [grad])

  assert update["skipped"] is None
  assert isinstance(update["masked"], optax.MaskedNode)
  assert state.mu["skipped"] is None
  assert isinstance(state.mu["masked"], optax.MaskedNode)
  assert_leaf_matches(kernel, np.asarray(update["kernel"]), count=25, rank=5)


def test_optax_masked_skips_leaves():
  rng = np.random.default_rng(13)
  grad = random_tree(rng, {"kernel": KERNEL, "bias": (50,)})
  transformation = optax.masked(
      simba_optax.simba(momentum=0.0, rank=5), {"kernel": True, "bias": False}
  )

  (update,), _ = run_steps(transformation, [grad])

  np.testing.assert_array_equal(update["bias"], grad["bias"])
  assert_leaf_matches(grad["kernel"], np.asarray(update["kernel"]), count=25, rank=5)


def test_gradient_shape_mismatch_raises():
  transformation = simba_optax.simba()
  state = transformation.init({"kernel": np.zeros(KERNEL, np.float32)})
  wrong = {"kernel": np.zeros((16, 49), np.float32)}

  with pytest.raises(ValueError):
    transformation.update(wrong, state, wrong)


def test_integer_params_rejected():
  transformation = simba_optax.simba()

  with pytest.raises(TypeError):
    transformation.init({"steps": np.zeros((4, 3), np.int32)})


@pytest.mark.parametrize(
    "hyperparameters",
    [
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"coarse_fraction": 0.0},
        {"coarse_fraction": 1.5},
        {"coarse_rows": 0},
        {"rank": 0},
        {"eps": -1e-8},
        {"eps": float("nan")},
        {"oversampling": -1},
        {"power_iterations": -1},
    ],
    ids=lambda hyperparameters: "-".join(f"{k}={v}" for k, v in hyperparameters.items()),
)
def test_hyperparameter_out_of_range(hyperparameters):
  with pytest.raises(ValueError):
    simba_optax.simba(**hyperparameters)


@pytest.mark.parametrize(
    "hyperparameters",
    [{"rank": 2.5}, {"coarse_rows": 3.0}, {"seed": "zero"}, {"mu_dtype": jnp.int32}],
    ids=["rank_float", "coarse_rows_float", "seed_string", "mu_dtype_int"],
)
def test_hyperparameter_wrong_type(hyperparameters):
  with pytest.raises(TypeError):
    simba_optax.simba(**hyperparameters)
