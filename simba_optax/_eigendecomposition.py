"""Truncated eigendecomposition of ``Q = A A^T`` and its floored inverse root.

For a sampled block ``A`` of shape ``(n_l, d)`` this module returns

  ``D = U diag(1/sigma_1 .. 1/sigma_{k-1}) U^T A + (A - U U^T A) / sigma_k``

where ``(sigma_i^2, u_i)`` are the ``k`` leading eigenpairs of ``A A^T``,
``sigma_i = max(s_i, eps)`` with ``s_i`` the singular values of ``A``, and
``U = [u_1 .. u_{k-1}]``. That is ``Q^{-1/2} A`` with every eigenvalue past
the ``k``-th raised to the ``k``-th and every eigenvalue floored at ``eps^2``.

``Q`` is never formed, because squaring in float32 loses the small singular
values. Singular values come from an SVD of a small triangular factor:

* exact path: a QR of the thin side of ``A`` (``max(n_l, d) x m`` with
  ``m = min(n_l, d)``), then an SVD of the ``m x m`` factor ``R``.
  Cost about ``4 n_l d m + 22 m^3`` flops and ``n_l d`` memory.
* randomized path (Halko, Martinsson & Tropp 2011, Algorithm 4.4): a
  Gaussian sketch with ``l = k + oversampling`` columns, ``power_iterations``
  re-orthonormalised power iterations, then the exact path on the
  ``l x d`` projection ``B = Y^T A``. Cost about
  ``(4 + 4 power_iterations) n_l d l`` flops and ``(n_l + 2 d) l`` memory.

``use_randomized`` picks the cheaper of the two in flops; the exact path is
also taken whenever the sketch would not be smaller than ``m``.

Numerical rank: singular values at or below ``s_1 * max(n_l, d) * eps_dtype``
carry only rounding noise, so their directions contribute zero, and a tail
level at that size contributes zero as well. ``A`` is divided by its largest
magnitude first, so gradients of 1e-30 or 1e30 neither underflow nor overflow
in float32.
"""

import jax
import jax.numpy as jnp

# Rough flop count of an SVD of an m x m matrix, as a multiple of m**3.
_SMALL_SVD_FLOPS = 22


def use_randomized(
    rows: int, columns: int, rank: int, oversampling: int,
    power_iterations: int,
) -> bool:
  """Returns whether the randomized path is cheaper than the exact one.

  Args:
    rows: ``n_l``, the number of sampled rows.
    columns: ``d``, the number of columns.
    rank: ``k``, the number of eigenpairs needed.
    oversampling: extra sketch columns.
    power_iterations: number of power iterations.

  Returns:
    ``True`` when the sketch is narrower than ``min(rows, columns)`` and its
    estimated flop count is below the exact path's.
  """
  thin = min(rows, columns)
  sketch = min(rank, rows) + oversampling
  if sketch >= thin:
    return False

  exact = 4 * rows * columns * thin + _SMALL_SVD_FLOPS * thin**3
  randomized = (
      (4 + 4 * power_iterations) * rows * columns * sketch
      + (2 + 2 * power_iterations) * (rows + columns) * sketch**2
      + _SMALL_SVD_FLOPS * sketch**3
  )
  return randomized < exact


def _thin_svd(matrix: jax.Array):
  """Returns ``q, w, s, zt`` with ``matrix = q @ w @ diag(s) @ zt``.

  ``matrix`` must have at least as many rows as columns. ``q`` has
  orthonormal columns and ``w``, ``zt`` are square and orthogonal.
  """
  q, r = jnp.linalg.qr(matrix)
  w, s, zt = jnp.linalg.svd(r)
  return q, w, s, zt


def _inverse_levels(
    s: jax.Array, rank: int, eps: jax.Array, tolerance: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Returns ``1 / sigma_i`` for the ``rank - 1`` leading values, and the tail's.

  Both are zero where the singular value is at or below ``tolerance``. The
  tail level is zero too when ``rank`` exceeds ``len(s)``, since the
  ``rank``-th singular value is then exactly zero.
  """
  active = s > tolerance
  inverse = jnp.where(active, 1.0 / jnp.where(active, jnp.maximum(s, eps), 1.0), 0.0)
  tail = inverse[rank - 1] if rank <= s.shape[0] else jnp.zeros((), s.dtype)
  return inverse[: rank - 1], tail


def _exact_direction(a: jax.Array, rank: int, eps: jax.Array) -> jax.Array:
  rows, columns = a.shape
  tall = rows >= columns
  q, w, s, zt = _thin_svd(a if tall else a.T)
  tolerance = s[0] * max(rows, columns) * jnp.finfo(a.dtype).eps

  # Every singular direction i gets the factor s_i / sigma_i, where
  # sigma_i is the tail level for i >= rank. No subtraction is needed.
  head, tail = _inverse_levels(s, rank, eps, tolerance)
  levels = jnp.concatenate([head, jnp.broadcast_to(tail, (s.shape[0] - head.shape[0],))])
  factors = jnp.where(s > tolerance, s * levels, 0.0)

  direction = q @ ((w * factors) @ zt)
  return direction if tall else direction.T


def _randomized_direction(
    a: jax.Array, key: jax.Array, rank: int, eps: jax.Array,
    oversampling: int, power_iterations: int,
) -> jax.Array:
  rows, columns = a.shape
  sketch = rank + oversampling

  # Range finder: an orthonormal basis of the dominant column space of a.
  omega = jax.random.normal(key, (columns, sketch), a.dtype)
  basis, _ = jnp.linalg.qr(a @ omega)
  for _ in range(power_iterations):
    right, _ = jnp.linalg.qr(a.T @ basis)
    basis, _ = jnp.linalg.qr(a @ right)

  # With projection = basis^T a = zt^T diag(s) w^T p^T, the part of a inside
  # the sketch's span is basis @ zt^T diag(s) w^T p^T, an SVD. Its directions
  # get s_i / sigma_i with no subtraction, as on the exact path. Only the
  # residual outside the span, already of the tail's size, is a difference.
  projection = basis.T @ a
  p, w, s, zt = _thin_svd(projection.T)
  tolerance = s[0] * max(rows, columns) * jnp.finfo(a.dtype).eps

  # Tail directions are not checked against the tolerance one by one, so
  # that those inside the sketch are treated like those in the residual.
  head, tail = _inverse_levels(s, rank, eps, tolerance)
  factors = jnp.concatenate([s[: head.shape[0]] * head, s[head.shape[0]:] * tail])
  inside = basis @ ((zt.T * factors) @ (w.T @ p.T))

  # NOTE: directions at rounding level still enter the tail term here, with
  # weight at most tolerance / sigma_k, where the exact path drops them. The
  # residual outside the sketch cannot be split into directions cheaply.
  residual = a - basis @ projection
  return inside + tail * residual


def inverse_root_direction(
    block: jax.Array,
    key: jax.Array,
    *,
    rank: int,
    eps: jax.Array,
    oversampling: int,
    power_iterations: int,
) -> jax.Array:
  """Applies the floored, truncated ``(A A^T)^{-1/2}`` to a block ``A``.

  Args:
    block: ``A``, shape ``(n_l, d)``, a float32 or float64 array.
    key: PRNG key for the sketch; unused on the exact path.
    rank: ``k``, the number of eigenpairs kept; capped at ``n_l``.
    eps: floor on the square roots of the eigenvalues, ``>= 0``.
    oversampling: extra sketch columns of the randomized path.
    power_iterations: power iterations of the randomized path.

  Returns:
    ``D`` as in the module docstring, with the shape and dtype of ``block``.
    An all-zero block gives an all-zero ``D``.
  """
  rows, columns = block.shape
  rank = min(rank, rows)

  # Scale by the largest magnitude. The direction is invariant to the scale
  # of A once eps is scaled with it.
  scale = jnp.max(jnp.abs(block))
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  a = block / safe_scale
  eps = jnp.asarray(eps, block.dtype) / safe_scale

  if min(rows, columns) == 1:
    # A single row or column has one singular value, its norm, so D is the
    # block divided by max(norm, eps): no factorisation needed.
    norm = jnp.sqrt(jnp.sum(a * a))
    direction = a / jnp.maximum(norm, eps)
  elif use_randomized(rows, columns, rank, oversampling, power_iterations):
    direction = _randomized_direction(
        a, key, rank, eps, oversampling, power_iterations
    )
  else:
    direction = _exact_direction(a, rank, eps)
  return jnp.where(scale > 0, direction, 0.0)
