"""Simba's direction on one leaf against the float64 NumPy reference in `oracle`.

The updates run without `jax.jit`: JAX then caches each operation by shape, so
the tests share compilations as long as they reuse a few leaf shapes. Compiled
updates are compared with these in `test_state.py`.
"""

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

# Dense kernels (in, out). Their matrix views are (out, in): 12 x 8, 8 x 12,
# 10 x 10, 50 x 16 for sampling and 128 x 192 for the randomized path.
TALL = (8, 12)
WIDE = (12, 8)
SQUARE = (10, 10)
SAMPLED = (16, 50)
LARGE = (192, 128)


def first_update(grad, **hyperparameters):
  """Returns the update of the first step after `init`, with momentum 0 unless given.

  The first momentum trace equals the gradient for any momentum, so this is
  the direction of `grad` itself.
  """
  hyperparameters.setdefault("momentum", 0.0)
  transformation = simba_optax.simba(**hyperparameters)
  state = transformation.init(grad)
  update, _ = transformation.update(grad, state, grad)
  return np.asarray(update)


def float32_leaf(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def leaf_from_matrix(matrix):
  """Returns the Dense-kernel leaf (in, out) whose default matrix view is `matrix`."""
  return np.ascontiguousarray(np.asarray(matrix).T)


def decaying_leaf(rng, spectrum):
  """Returns a float32 leaf of shape LARGE whose matrix view has the given spectrum."""
  rows, columns = LARGE[1], LARGE[0]
  matrix = matrix_with_spectrum(rng, rows, columns, spectrum)
  return leaf_from_matrix(matrix.astype(np.float32))


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


@pytest.mark.parametrize("shape", [SQUARE, TALL, WIDE])
@pytest.mark.parametrize("rank", [20, 4])
def test_exact_path_full_rows(shape, rank):
  # rank=4 keeps a flat tail, and rank=20 exceeds both sides of the matrix.
  rng = np.random.default_rng(0)
  grad = float32_leaf(rng, shape)

  update = first_update(grad, coarse_fraction=1.0, rank=rank)

  assert update.dtype == np.float32
  assert update.shape == grad.shape
  assert_full_matches(grad, update, rank=rank, eps=1e-8)


@pytest.mark.parametrize("coarse_fraction", [None, 0.14, 0.56])
def test_sampled_rows_match_oracle(coarse_fraction):
  # In float64, 0.14 * 50 and 0.56 * 50 round above 7 and 28, but n_l is
  # the ceiling of the exact products: 7 and 28. None keeps the default 0.5.
  rng = np.random.default_rng(1)
  grad = float32_leaf(rng, SAMPLED)
  hyperparameters = {"rank": 5}
  if coarse_fraction is None:
    count = coarse_row_count(SAMPLED[1])
  else:
    count = coarse_row_count(SAMPLED[1], coarse_fraction)
    hyperparameters["coarse_fraction"] = coarse_fraction

  update = first_update(grad, **hyperparameters)

  assert_sampled_block_matches(grad, update, count=count, rank=5, eps=1e-8)


def test_coarse_rows_overrides_fraction():
  rng = np.random.default_rng(2)
  grad = float32_leaf(rng, SAMPLED)

  update = first_update(grad, coarse_fraction=0.9, coarse_rows=7, rank=5)

  assert_sampled_block_matches(grad, update, count=7, rank=5, eps=1e-8)


def test_coarse_rows_capped_at_rows():
  rng = np.random.default_rng(3)
  grad = float32_leaf(rng, TALL)

  update = first_update(grad, coarse_rows=50, rank=4)

  assert_sampled_block_matches(grad, update, count=12, rank=4, eps=1e-8)


@pytest.mark.parametrize(
    "coarse_fraction, rank", [(1.0, 12), (0.5, 12), (1.0, 20)]
)
def test_randomized_path_decaying_spectrum(coarse_fraction, rank):
  # Singular values 0.7**i, held at 2e-4 from i = 24 on so that none is at
  # the float32 rounding level s_1 * 192 * eps = 2.3e-5. With rank +
  # oversampling at most 30, well below min(n_l, d), the randomized range
  # finder is the cheaper path. Float32 error grows with s_1 / s_k, which is
  # about 50 at rank 12 and 880 at rank 20.
  rng = np.random.default_rng(4)
  spectrum = np.maximum(0.7 ** np.arange(128), 2e-4)
  grad = decaying_leaf(rng, spectrum)
  count = coarse_row_count(128, coarse_fraction)

  update = first_update(
      grad,
      coarse_fraction=coarse_fraction,
      rank=rank,
      oversampling=10,
      power_iterations=2,
  )

  assert_sampled_block_matches(grad, update, count=count, rank=rank, eps=1e-8)


def rounding_level_leaf():
  # Twelve singular values 0.7**i and 116 at 5e-6, below the rounding level
  # 2.3e-5 of a 128 x 192 float32 block. Kept in the tail, those 116
  # directions change the direction by about 8e-4 relative.
  rng = np.random.default_rng(5)
  spectrum = np.where(np.arange(128) < 12, 0.7 ** np.arange(128), 5e-6)
  return decaying_leaf(rng, spectrum)


def test_rounding_level_directions_dropped():
  # oversampling=300 makes the sketch as wide as the block: the exact path,
  # which drops every direction at rounding level.
  grad = rounding_level_leaf()

  update = first_update(grad, coarse_fraction=1.0, rank=12, oversampling=300)

  assert_full_matches(grad, update, rank=12, eps=1e-8)


def test_randomized_tail_keeps_rounding_level():
  # The randomized path cannot split the residual outside its sketch, so
  # rounding-level directions there stay in the tail term.
  grad = rounding_level_leaf()

  update = first_update(grad, coarse_fraction=1.0, rank=12, oversampling=10)

  expected = simba_direction(
      matrix_view(grad), 12, 1e-8, drop_tail_below_tolerance=False
  )
  assert relative_error(matrix_view(update), expected) <= RELATIVE_TOLERANCE
  dropped = simba_direction(matrix_view(grad), 12, 1e-8)
  assert relative_error(matrix_view(update), dropped) > RELATIVE_TOLERANCE


@pytest.mark.parametrize("oversampling", [4, 21], ids=["randomized", "exact"])
def test_scaled_identity_divided_by_three(oversampling):
  # 3 * I has one singular value, so the leading subspace is not unique, but
  # the direction is: G_s / 3 on the sampled rows. With n_l = 25 and rank 4,
  # a sketch of 4 + 4 columns takes the randomized path and 4 + 21 the exact.
  grad = 3.0 * np.eye(50, dtype=np.float32)

  update = first_update(
      grad, coarse_fraction=0.5, rank=4, oversampling=oversampling
  )

  rows = sampled_rows(matrix_view(update))
  assert rows.size == 25
  expected = matrix_view(grad)[rows] / 3.0
  assert relative_error(matrix_view(update)[rows], expected) <= RELATIVE_TOLERANCE


def test_vector_leaf_is_normalized():
  # A rank-1 leaf is an (n, 1) matrix: its direction is a_s / ||a_s||.
  rng = np.random.default_rng(6)
  grad = float32_leaf(rng, (50,))

  update = first_update(grad, rank=20)

  rows = sampled_rows(matrix_view(update))
  assert rows.size == 25
  block = grad[rows].astype(np.float64)
  assert relative_error(update[rows], block / np.linalg.norm(block)) <= RELATIVE_TOLERANCE
  assert_sampled_block_matches(grad, update, count=25, rank=20, eps=1e-8)


def test_rank_between_columns_and_rows():
  # 12 x 8 view with rank 10: k = 10 exceeds d = 8, so the tail is zero and
  # every singular direction gets the factor 1.
  rng = np.random.default_rng(7)
  grad = float32_leaf(rng, TALL)

  update = first_update(grad, coarse_fraction=1.0, rank=10)

  assert_full_matches(grad, update, rank=10, eps=1e-8)
  singular_values = np.linalg.svd(matrix_view(update).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular_values, 1.0, rtol=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("rank", [20, 3])
def test_duplicated_rows_rank_deficient(rank):
  # 12 rows that repeat 4 distinct rows: numerical rank 4. With rank=20 the
  # tail is at rounding level and contributes zero. With rank=3 the tail
  # contains the last two of the four genuine directions.
  rng = np.random.default_rng(8)
  distinct = rng.standard_normal((4, 8))
  matrix = np.tile(distinct, (3, 1)).astype(np.float32)
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=rank)

  assert_full_matches(grad, update, rank=rank, eps=1e-8)


def test_duplicated_rows_unit_singular_values():
  # With rank above the numerical rank, the direction is the polar factor of
  # the rank-4 block: its non-zero singular values are all 1, the others 0.
  rng = np.random.default_rng(8)
  distinct = rng.standard_normal((4, 8))
  matrix = np.tile(distinct, (3, 1)).astype(np.float32)

  update = first_update(leaf_from_matrix(matrix), coarse_fraction=1.0, rank=20)

  singular_values = np.linalg.svd(matrix_view(update).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular_values[:4], 1.0, rtol=RELATIVE_TOLERANCE)
  assert np.all(singular_values[4:] <= RELATIVE_TOLERANCE)


@pytest.mark.parametrize("shape", [TALL, WIDE])
def test_zero_rows_rank_deficient(shape):
  rng = np.random.default_rng(9)
  matrix = float32_leaf(rng, shape[::-1])
  matrix[[1, 4, 7]] = 0.0
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=20)

  assert_full_matches(grad, update, rank=20, eps=1e-8)
  assert np.max(np.abs(matrix_view(update)[[1, 4, 7]])) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    "shape, hyperparameters",
    [
        ((), {}),
        ((50,), {}),
        (TALL, {"coarse_fraction": 1.0}),
        (SAMPLED, {"coarse_fraction": 0.14, "rank": 5}),
        (LARGE, {"coarse_fraction": 1.0, "rank": 20}),  # randomized path
    ],
)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_gradient_gives_zero(shape, hyperparameters, eps):
  grad = np.zeros(shape, np.float32)

  update = first_update(grad, eps=eps, **hyperparameters)

  assert update.shape == shape
  assert update.dtype == np.float32
  assert np.all(update == 0.0)


@pytest.mark.parametrize(
    "hyperparameters",
    [{"coarse_rows": 1}, {"coarse_fraction": 0.01}],
    ids=["coarse_rows", "fraction"],
)
def test_single_coarse_row_is_normalized(hyperparameters):
  # One sampled row gives k = 1 and the direction a / ||a||. The fraction
  # 0.01 of 50 rows rounds up to one row.
  rng = np.random.default_rng(10)
  grad = float32_leaf(rng, SAMPLED)

  update = first_update(grad, rank=20, **hyperparameters)

  rows = sampled_rows(matrix_view(update))
  assert rows.size == 1
  block = matrix_view(grad)[rows].astype(np.float64)
  expected = block / np.linalg.norm(block)
  assert relative_error(matrix_view(update)[rows], expected) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("shape", [TALL, WIDE])
def test_rank_one_divides_by_top(shape):
  # With rank=1 there is no leading direction, only the tail: A_s / s_1.
  rng = np.random.default_rng(11)
  grad = float32_leaf(rng, shape)

  update = first_update(grad, coarse_fraction=1.0, rank=1)

  matrix = matrix_view(grad).astype(np.float64)
  expected = matrix / np.linalg.norm(matrix, ord=2)
  assert relative_error(matrix_view(update), expected) <= RELATIVE_TOLERANCE
  assert_full_matches(grad, update, rank=1, eps=1e-8)


@pytest.mark.parametrize("shape", [TALL, WIDE, SQUARE])
def test_rank_above_both_dims(shape):
  # Every singular direction gets the factor 1: the direction is U V^T.
  rng = np.random.default_rng(12)
  grad = float32_leaf(rng, shape)

  update = first_update(grad, coarse_fraction=1.0, rank=50)

  assert_full_matches(grad, update, rank=50, eps=1e-8)
  singular_values = np.linalg.svd(matrix_view(update).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(singular_values, 1.0, rtol=RELATIVE_TOLERANCE)


@pytest.mark.parametrize(
    "shape, coarse_fraction, rank",
    [
        (TALL, 1.0, 4),
        (SAMPLED, 0.14, 5),
        (LARGE, 0.5, 12),  # randomized path
    ],
)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_scale_invariance_without_floor(shape, coarse_fraction, rank, scale):
  rng = np.random.default_rng(13)
  if shape == LARGE:
    grad = decaying_leaf(rng, np.maximum(0.7 ** np.arange(128), 2e-4))
  else:
    grad = float32_leaf(rng, shape)
  scaled = (grad.astype(np.float64) * scale).astype(np.float32)
  assert np.all(np.isfinite(scaled))
  assert np.all((scaled != 0) == (grad != 0))
  count = coarse_row_count(matrix_view(grad).shape[0], coarse_fraction)
  hyperparameters = {"coarse_fraction": coarse_fraction, "rank": rank, "eps": 0.0}

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
  rng = np.random.default_rng(14)
  grad = float32_leaf(rng, TALL, scale=1e-11)
  eps = 1e-8

  update = first_update(grad, coarse_fraction=1.0, rank=4, eps=eps)

  expected = matrix_view(grad).astype(np.float64) / eps
  assert relative_error(matrix_view(update), expected) <= RELATIVE_TOLERANCE
  assert_full_matches(grad, update, rank=4, eps=eps)


@pytest.mark.parametrize("rank", [4, 20])
def test_floor_between_singular_values(rank):
  # Singular values from 1e-7 to 1e-9 around eps = 1e-8: the floor replaces
  # the smaller half of them. At rank=4 the tail level is s_4 = 1.4e-8.
  rng = np.random.default_rng(15)
  spectrum = np.logspace(-7, -9, 8)
  matrix = matrix_with_spectrum(rng, 12, 8, spectrum).astype(np.float32)
  grad = leaf_from_matrix(matrix)

  update = first_update(grad, coarse_fraction=1.0, rank=rank, eps=1e-8)

  assert_full_matches(grad, update, rank=rank, eps=1e-8)

