"""Simba's direction on one leaf against the float64 NumPy reference in `oracle`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simba_optax
from oracle import (
    coarse_row_count,
    matrix_view,
    matrix_with_spectrum,
    relative_error,
    sampled_rows,
    simba_direction,
)

# Float32 computation against the float64 reference, relative Frobenius error.
RELATIVE_TOLERANCE = 1e-4


def first_update(grad, **hyperparameters):
  """Returns the update of the first step after `init`, with momentum 0 unless given.

  The first momentum trace equals the gradient for any momentum, so this is
  the direction of `grad` itself.
  """
  hyperparameters.setdefault("momentum", 0.0)
  transformation = simba_optax.simba(**hyperparameters)
  grad = jnp.asarray(grad)
  state = transformation.init(grad)
  update, _ = jax.jit(transformation.update)(grad, state, grad)
  return np.asarray(update)


def float32_leaf(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def leaf_from_matrix(matrix):
  """Returns the Dense-kernel leaf (in, out) whose default matrix view is `matrix`."""
  return np.ascontiguousarray(np.asarray(matrix).T)


def assert_sampled_block_matches(grad, update, *, count, rank, eps, tolerance=RELATIVE_TOLERANCE):
  """Checks that `update` has `count` non-zero rows and equals the reference on them.

  Returns the relative error on the sampled block.
  """
  grad_matrix = matrix_view(grad)
  update_matrix = matrix_view(update)
  assert np.all(np.isfinite(update_matrix))

  rows = sampled_rows(update_matrix)
  assert rows.size == count

  expected = simba_direction(grad_matrix[rows], rank, eps)
  error = relative_error(update_matrix[rows], expected)
  assert error <= tolerance
  return error


def assert_full_matches(grad, update, *, rank, eps, tolerance=RELATIVE_TOLERANCE):
  """Checks an update with every row sampled against the reference on the whole matrix."""
  update_matrix = matrix_view(update)
  assert np.all(np.isfinite(update_matrix))

  expected = simba_direction(matrix_view(grad), rank, eps)
  error = relative_error(update_matrix, expected)
  assert error <= tolerance
  return error


@pytest.mark.parametrize(
    "shape, rank, oversampling",
    [
        ((10, 10), 20, 10),  # square, rank above n
        ((8, 12), 20, 10),  # tall matrix view: 12 rows, 8 columns
        ((12, 8), 20, 10),  # wide matrix view: 8 rows, 12 columns
        ((16, 24), 6, 10),  # flat tail: k + p = 16 = min(n, d)
        ((24, 16), 6, 10),
        ((30, 5), 3, 2),  # wide, rank below n, k + p = min(n, d)
    ],
)
def test_exact_path_full_rows(shape, rank, oversampling):
  rng = np.random.default_rng(0)
  grad = float32_leaf(rng, shape)

  update = first_update(
      grad, coarse_fraction=1.0, rank=rank, oversampling=oversampling
  )

  assert update.dtype == np.float32
  assert update.shape == grad.shape
  assert_full_matches(grad, update, rank=rank, eps=1e-8)


@pytest.mark.parametrize(
    "rows, coarse_fraction",
    [(40, 0.5), (40, 0.3), (10, 0.7), (30, 0.1), (9, 0.5), (25, 0.25)],
)
def test_sampled_rows_match_oracle(rows, coarse_fraction):
  rng = np.random.default_rng(1)
  grad = float32_leaf(rng, (16, rows))
  count = coarse_row_count(rows, coarse_fraction)

  update = first_update(grad, coarse_fraction=coarse_fraction, rank=5)

  assert_sampled_block_matches(grad, update, count=count, rank=5, eps=1e-8)


def test_coarse_rows_overrides_fraction():
  rng = np.random.default_rng(2)
  grad = float32_leaf(rng, (6, 30))

  update = first_update(grad, coarse_fraction=0.9, coarse_rows=4, rank=3)

  assert_sampled_block_matches(grad, update, count=4, rank=3, eps=1e-8)


def test_coarse_rows_capped_at_rows():
  rng = np.random.default_rng(3)
  grad = float32_leaf(rng, (6, 5))

  update = first_update(grad, coarse_rows=50, rank=3)

  assert_sampled_block_matches(grad, update, count=5, rank=3, eps=1e-8)


@pytest.mark.parametrize("coarse_fraction", [1.0, 0.5])
def test_randomized_path_decaying_spectrum(coarse_fraction):
  # Matrix view 256 x 384 with singular values 0.7**i. With rank + oversampling
  # = 30 far below min(n_l, d), the randomized range finder is the cheaper path.
  rng = np.random.default_rng(4)
  spectrum = 0.7 ** np.arange(256)
  matrix = matrix_with_spectrum(rng, 256, 384, spectrum).astype(np.float32)
  grad = leaf_from_matrix(matrix)
  count = coarse_row_count(256, coarse_fraction)

  update = first_update(
      grad,
      coarse_fraction=coarse_fraction,
      rank=20,
      oversampling=10,
      power_iterations=2,
  )

  assert_sampled_block_matches(grad, update, count=count, rank=20, eps=1e-8)


def test_randomized_path_flat_spectrum():
  # 3 * I has one singular value, so the leading subspace is not unique, but
  # the direction is: G_s / 3 on the sampled rows.
  grad = 3.0 * np.eye(64, dtype=np.float32)

  update = first_update(grad, coarse_fraction=0.5, rank=4, oversampling=4)

  rows = sampled_rows(update)
  assert rows.size == 32
  assert relative_error(update[rows], grad[rows] / 3.0) <= RELATIVE_TOLERANCE
  assert_sampled_block_matches(grad, update, count=32, rank=4, eps=1e-8)


def test_exact_path_scaled_identity():
  grad = 3.0 * np.eye(12, dtype=np.float32)

  update = first_update(grad, coarse_fraction=0.5, rank=4)

  rows = sampled_rows(update)
  assert rows.size == 6
  assert relative_error(update[rows], grad[rows] / 3.0) <= RELATIVE_TOLERANCE


def test_vector_leaf_is_normalized():
  # A rank-1 leaf is an (n, 1) matrix: its direction is a_s / ||a_s||.
  rng = np.random.default_rng(5)
  grad = float32_leaf(rng, (30,))

  update = first_update(grad, rank=20)

  rows = sampled_rows(matrix_view(update))
  assert rows.size == 15
  block = grad[rows].astype(np.float64)
  assert relative_error(update[rows], block / np.linalg.norm(block)) <= RELATIVE_TOLERANCE
  assert_sampled_block_matches(grad, update, count=15, rank=20, eps=1e-8)


def test_columns_fewer_than_rank():
  rng = np.random.default_rng(6)
  grad = float32_leaf(rng, (3, 12))

  update = first_update(grad, coarse_fraction=1.0, rank=20)

  assert_full_matches(grad, update, rank=20, eps=1e-8)


@pytest.mark.parametrize("rank", [20, 3])
def test_duplicated_rows_rank_deficient(rank):
  # 12 rows that repeat 4 distinct rows: numerical rank 4. With rank=20 the
  # tail is at rounding level and contributes zero. With rank=3 the tail
  # holds one genuine direction and the rounding noise of the other 8.
  rng = np.random.default_rng(7)
  distinct = rng.standard_normal((4, 16))
  matrix = np.tile(distinct, (3, 1)).astype(np.float32)
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=rank)

  assert_full_matches(grad, update, rank=rank, eps=1e-8)


def test_duplicated_rows_unit_singular_values():
  # With rank above the numerical rank, the direction is the polar factor of
  # the rank-4 block: its non-zero singular values are all 1.
  rng = np.random.default_rng(8)
  distinct = rng.standard_normal((4, 16))
  matrix = np.tile(distinct, (3, 1)).astype(np.float32)

  update = first_update(leaf_from_matrix(matrix), coarse_fraction=1.0, rank=20)

  singular_values = np.linalg.svd(matrix_view(update).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular_values[:4], 1.0, rtol=RELATIVE_TOLERANCE)
  assert np.all(singular_values[4:] <= RELATIVE_TOLERANCE)


@pytest.mark.parametrize("shape", [(10, 12), (12, 10)])
def test_zero_rows_rank_deficient(shape):
  rng = np.random.default_rng(9)
  matrix = rng.standard_normal(shape).astype(np.float32)
  matrix[[1, 4, 7]] = 0.0
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=20)

  assert_full_matches(grad, update, rank=20, eps=1e-8)
  assert np.max(np.abs(matrix_view(update)[[1, 4, 7]])) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    "shape, hyperparameters",
    [
        ((), {}),
        ((7,), {}),
        ((8, 12), {"coarse_fraction": 1.0}),
        ((3, 4, 5), {"eps": 0.0}),
        ((384, 256), {"rank": 8, "oversampling": 8}),  # randomized path
        ((384, 256), {"rank": 8, "oversampling": 8, "eps": 0.0}),
    ],
)
def test_zero_gradient_gives_zero(shape, hyperparameters):
  grad = np.zeros(shape, np.float32)

  update = first_update(grad, **hyperparameters)

  assert update.shape == shape
  assert np.all(update == 0.0)


def test_single_coarse_row():
  rng = np.random.default_rng(10)
  grad = float32_leaf(rng, (10, 7))

  update = first_update(grad, coarse_rows=1, rank=20)

  rows = sampled_rows(matrix_view(update))
  assert rows.size == 1
  block = matrix_view(grad)[rows].astype(np.float64)
  expected = block / np.linalg.norm(block)
  assert relative_error(matrix_view(update)[rows], expected) <= RELATIVE_TOLERANCE


def test_small_fraction_rounds_up_to_one_row():
  rng = np.random.default_rng(11)
  grad = float32_leaf(rng, (10, 7))

  update = first_update(grad, coarse_fraction=0.01, rank=20)

  assert_sampled_block_matches(grad, update, count=1, rank=20, eps=1e-8)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_rank_one_divides_by_top(shape):
  # With rank=1 there is no leading direction, only the tail: A_s / s_1.
  rng = np.random.default_rng(12)
  grad = float32_leaf(rng, shape)

  update = first_update(grad, coarse_fraction=1.0, rank=1)

  matrix = matrix_view(grad).astype(np.float64)
  expected = matrix / np.linalg.norm(matrix, ord=2)
  assert relative_error(matrix_view(update), expected) <= RELATIVE_TOLERANCE
  assert_full_matches(grad, update, rank=1, eps=1e-8)


@pytest.mark.parametrize("shape", [(5, 6), (6, 5)])
def test_rank_above_both_dims(shape):
  # Every singular direction gets the factor 1: the direction is U V^T.
  rng = np.random.default_rng(13)
  grad = float32_leaf(rng, shape)

  update = first_update(grad, coarse_fraction=1.0, rank=50)

  singular_values = np.linalg.svd(matrix_view(update).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular_values, 1.0, rtol=RELATIVE_TOLERANCE)
  assert_full_matches(grad, update, rank=50, eps=1e-8)


@pytest.mark.parametrize(
    "shape, coarse_fraction, rank, oversampling",
    [
        ((8, 12), 1.0, 4, 10),
        ((12, 40), 0.5, 5, 10),
        ((384, 256), 0.5, 8, 8),  # randomized path
    ],
)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_scale_invariance_without_floor(shape, coarse_fraction, rank, oversampling, scale):
  rng = np.random.default_rng(14)
  grad = float32_leaf(rng, shape)
  scaled = (grad.astype(np.float64) * scale).astype(np.float32)
  assert np.all(np.isfinite(scaled))
  count = coarse_row_count(shape[-1], coarse_fraction)
  hyperparameters = dict(
      coarse_fraction=coarse_fraction, rank=rank, oversampling=oversampling, eps=0.0
  )

  update = first_update(grad, **hyperparameters)
  scaled_update = first_update(scaled, **hyperparameters)

  # Same key and step, so the same rows, and eps=0 makes the direction scale-free.
  rows = sampled_rows(matrix_view(update))
  scaled_rows = sampled_rows(matrix_view(scaled_update))
  assert np.array_equal(rows, scaled_rows)
  assert relative_error(scaled_update, update) <= RELATIVE_TOLERANCE
  assert_sampled_block_matches(scaled, scaled_update, count=count, rank=rank, eps=0.0)


def test_floor_on_tiny_gradient():
  # Every singular value is below eps, so the direction is A_s / eps.
  rng = np.random.default_rng(15)
  grad = float32_leaf(rng, (8, 12), scale=1e-11)
  eps = 1e-8

  update = first_update(grad, coarse_fraction=1.0, rank=4, eps=eps)

  expected = matrix_view(grad).astype(np.float64) / eps
  assert relative_error(matrix_view(update), expected) <= RELATIVE_TOLERANCE
  assert_full_matches(grad, update, rank=4, eps=eps)


@pytest.mark.parametrize("rank", [4, 20])
def test_floor_between_singular_values(rank):
  # Singular values from 1e-7 to 1e-9 around eps = 1e-8: the floor replaces
  # the smaller half of them.
  rng = np.random.default_rng(16)
  spectrum = np.logspace(-7, -9, 10)
  matrix = matrix_with_spectrum(rng, 10, 14, spectrum).astype(np.float32)
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=rank, eps=1e-8)

  assert_full_matches(grad, update, rank=rank, eps=1e-8)
