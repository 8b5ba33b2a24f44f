"""Coarse model: the rows of a matrix that Simba updates in one step.

The restriction ``R`` of the paper picks ``n_l`` distinct rows of the
``n``-row matrix view, uniformly without replacement, and the prolongation
``P = R^T`` writes the coarse direction back to those rows.

Cost of ``sample_rows``: ``n`` random draws and a partial selection of
``n_l`` of them, with ``O(n)`` memory. The selection is a full sort only when
``n_l`` is a large share of ``n``, where a sort is as cheap.
"""

import math

import jax
import jax.numpy as jnp

# Above this share of the rows, a permutation (a full sort) is used instead of
# a top-k selection. Both draw every n_l-subset with equal probability.
_PERMUTATION_SHARE = 0.25


def coarse_size(rows: int, coarse_fraction: float, coarse_rows: int | None) -> int:
  """Returns ``n_l``, the number of rows sampled from a matrix of ``rows`` rows.

  Args:
    rows: ``n``, the number of rows of the matrix view.
    coarse_fraction: share of the rows to sample, in ``(0, 1]``.
    coarse_rows: if given, the number of rows to sample, capped at ``rows``;
      it takes precedence over ``coarse_fraction``.

  Returns:
    ``min(coarse_rows, rows)`` if ``coarse_rows`` is given, else
    ``ceil(coarse_fraction * rows)``, and in both cases at least 1.
  """
  if coarse_rows is not None:
    return max(1, min(int(coarse_rows), rows))

  # The small margin keeps products such as 0.7 * 10 = 7.000000000000001
  # from rounding up to the next row.
  size = math.ceil(coarse_fraction * rows - 1e-9)
  return max(1, min(size, rows))


def sample_rows(key: jax.Array, rows: int, size: int) -> jax.Array:
  """Draws ``size`` distinct row indices out of ``rows``, uniformly.

  Args:
    key: a PRNG key.
    rows: ``n``, the number of rows to draw from.
    size: ``n_l``, the number of distinct rows to draw.

  Returns:
    An int32 array of shape ``(size,)`` with distinct entries in
    ``[0, rows)``. The order is random; callers must not rely on it.
  """
  if size >= rows:
    return jnp.arange(rows, dtype=jnp.int32)
  if size > _PERMUTATION_SHARE * rows:
    return jax.random.permutation(key, rows)[:size].astype(jnp.int32)

  # The rows with the `size` largest of `rows` i.i.d. uniform scores form a
  # uniformly random subset. lax.top_k breaks ties by index, so the rows stay
  # distinct. A tie at the cutoff, the only case that biases the draw, has
  # probability about rows / 2**32 per step.
  scores = jax.random.bits(key, (rows,), dtype=jnp.uint32)
  _, indices = jax.lax.top_k(scores, size)
  return indices.astype(jnp.int32)


def restrict(matrix: jax.Array, key: jax.Array, size: int):
  """Samples ``size`` rows of ``matrix``: the restriction ``R``.

  Returns:
    The sampled row indices, shape ``(size,)``, and the block ``R @ matrix``
    of shape ``(size, d)``. With ``size`` equal to the number of rows the
    block is ``matrix`` itself and no gather is made.
  """
  rows = matrix.shape[0]
  sampled = sample_rows(key, rows, size)
  if size == rows:
    return sampled, matrix
  return sampled, jnp.take(matrix, sampled, axis=0)


def prolong(block: jax.Array, sampled: jax.Array, rows: int) -> jax.Array:
  """Writes ``block`` into the ``sampled`` rows of zeros: the prolongation ``R^T``."""
  if block.shape[0] == rows:
    return block
  zeros = jnp.zeros((rows,) + block.shape[1:], block.dtype)
  return zeros.at[sampled].set(block)
