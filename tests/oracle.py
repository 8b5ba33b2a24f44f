"""Float64 NumPy reference for the Simba update of one parameter leaf.

This module is independent of `simba_optax`: it restates the algorithm with
`numpy.linalg.svd` in float64 so that the tests can compare the library with it.
"""

import functools
import math
from fractions import Fraction

import numpy as np
import threadpoolctl

FLOAT32_EPS = float(np.finfo(np.float32).eps)
FLOAT64_EPS = float(np.finfo(np.float64).eps)


def single_threaded_blas(function):
  """Runs `function` with one BLAS thread.

  The reference works on matrices of at most a few hundred rows. On a busy
  2-core host, OpenBLAS's default two threads made a 128 x 192 SVD take 4 s
  instead of 0.01 s.
  """

  @functools.wraps(function)
  def wrapper(*args, **kwargs):
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
      return function(*args, **kwargs)

  return wrapper


def coarse_row_count(n, coarse_fraction=0.5, coarse_rows=None):
  """Returns n_l: `coarse_rows` capped at n, else ceil(coarse_fraction * n), in [1, n]."""
  if coarse_rows is not None:
    count = int(coarse_rows)
  else:
    count = math.ceil(Fraction(str(coarse_fraction)) * n)
  return min(max(count, 1), n)


def heavy_ball_traces(grads, momentum):
  """Returns the traces mu_t = momentum * mu_{t-1} + g_t for t = 1, 2, ..., with mu_0 = 0."""
  traces = []
  trace = np.zeros_like(np.asarray(grads[0], dtype=np.float64))
  for grad in grads:
    trace = momentum * trace + np.asarray(grad, dtype=np.float64)
    traces.append(trace)
  return traces


def matrix_view(leaf, row_axis=-1, batch_axes=()):
  """Reshapes a leaf into matrices of shape batch_shape + (n, d).

  The batch axes come first, in the given order, then the row axis, then all
  other axes flattened in their original order. A scalar is (1, 1) and a
  rank-1 leaf without batch axes is (n, 1).
  """
  leaf = np.asarray(leaf)
  if leaf.ndim == 0:
    return leaf.reshape(1, 1)

  batch = [axis % leaf.ndim for axis in batch_axes]
  row = row_axis % leaf.ndim
  if row in batch:
    raise ValueError(f"row axis {row_axis} is also a batch axis in {tuple(batch_axes)}")
  rest = [axis for axis in range(leaf.ndim) if axis != row and axis not in batch]

  moved = np.transpose(leaf, batch + [row] + rest)
  batch_shape = tuple(leaf.shape[axis] for axis in batch)
  columns = math.prod(leaf.shape[axis] for axis in rest)
  return moved.reshape(batch_shape + (leaf.shape[row], columns))


@single_threaded_blas
def simba_direction(
    block, rank, eps, tolerance_eps=FLOAT32_EPS, drop_tail_below_tolerance=True
):
  """Computes the Simba direction of a sampled block A_s of shape (n_l, d) in float64.

  With k = min(rank, n_l), U the top k - 1 left singular vectors of A_s and
  sigma_i = max(s_i, eps), the direction is

    U diag(1 / sigma_1 .. 1 / sigma_{k-1}) U^T A_s + (A_s - U U^T A_s) / sigma_k.

  Numerical rank: every singular direction with s_i <= s_1 * max(n_l, d) *
  tolerance_eps contributes zero, in the leading terms and in the tail. The
  formula is therefore applied to A_s with those directions removed, and the
  tail term is zero when s_k is at or below that level or when
  k > min(n_l, d). Pass the machine epsilon of the precision the library
  computes in: float32 for float32, bfloat16 and float16 leaves.

  With drop_tail_below_tolerance=False, directions at rounding level still
  enter the tail term (when s_k is above that level), as on the randomized
  path, which cannot tell them apart outside its sketch.
  """
  a = np.asarray(block, dtype=np.float64)
  if a.ndim != 2:
    raise ValueError(f"block must be a matrix, got shape {a.shape}")
  n_l, d = a.shape
  k = min(rank, n_l)
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  matrix_rank_bound = min(n_l, d)
  tol = s[0] * max(n_l, d) * tolerance_eps

  # A_s without the directions at rounding level.
  above = s > tol
  full = a
  a = (u[:, above] * s[above]) @ vt[above]
  tail_source = a if drop_tail_below_tolerance else full

  # Leading k - 1 directions, each scaled by 1 / sigma_i. Those removed above
  # have U^T A_s = 0, so they contribute zero.
  head = min(k - 1, matrix_rank_bound)
  u_head = u[:, :head]
  coefficients = u_head.T @ a
  sigma_head = np.where(above[:head], np.maximum(s[:head], eps), 1.0)
  direction = u_head @ (coefficients / sigma_head[:, None])

  # Flat tail: everything outside the leading directions at the level of sigma_k.
  if k <= matrix_rank_bound and above[k - 1]:
    residual = tail_source - u_head @ (u_head.T @ tail_source)
    direction = direction + residual / max(s[k - 1], eps)
  return direction


def sampled_rows(update_matrix):
  """Returns the indices of the rows of a matrix with at least one non-zero entry."""
  update_matrix = np.asarray(update_matrix)
  return np.flatnonzero(np.any(update_matrix != 0, axis=-1))


@single_threaded_blas
def relative_error(actual, expected):
  """Returns ||actual - expected||_F / ||expected||_F, computed in float64."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@single_threaded_blas
def matrix_with_spectrum(rng, n, d, singular_values):
  """Returns an (n, d) float64 matrix with random singular vectors and the given singular values."""
  count = len(singular_values)
  left, _ = np.linalg.qr(rng.standard_normal((n, count)))
  right, _ = np.linalg.qr(rng.standard_normal((d, count)))
  return (left * np.asarray(singular_values, dtype=np.float64)) @ right.T
