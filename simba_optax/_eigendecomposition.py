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

In place: the randomized path writes ``D`` over the block one piece of rows
at a time (``_SPLIT`` pieces unless the block is long), so the update needs
the block and one piece's product, not a second block. Long blocks, whose long side spans more than
``_PIECE_ENTRIES`` entries, take every path in pieces along that side, so
that beyond the block itself only small buffers are needed (see
``inverse_root_directions``).

Numerical rank: singular values at or below ``s_1 * max(n_l, d) * eps_dtype``
carry only rounding noise, so their directions contribute zero, and a tail
level at that size contributes zero as well. ``A`` is divided by its largest
magnitude first, so gradients of 1e-30 or 1e30 neither underflow nor overflow
in float32.
"""

import math

import jax
import jax.numpy as jnp

# Rough flop count of an SVD of an m x m matrix, as a multiple of m**3.
_SMALL_SVD_FLOPS = 22

# Entries in one piece of a long block, over all blocks of a batch: 2**22
# float32 values are 16 MiB. Each piece costs a loop iteration and a LAPACK
# call, whose thread synchronisation dominates on a busy CPU if the pieces
# are small.
_PIECE_ENTRIES = 2**22

# Pieces of rows in which the randomized path writes D over a block that is
# not long. The update then needs the block, a quarter of it for one piece's
# product, and small factors: at most the leaf's size for a 256 x 256 leaf.
_SPLIT = 4

# Blocks per iteration of the CPU loop in inverse_root_directions. Their
# unbatched LAPACK calls are independent, so XLA can run them on two cores.
# On a 24-layer MLP of width 256 (2 cores), 2 gave the fastest step of 1, 2
# and 4.
_CPU_UNROLL = 2


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
  # LAPACK's factors of a block of NaN need not be NaN. Every entry of such
  # a block is NaN (see inverse_root_directions), so one entry poisons D.
  factors = factors + a[0, 0] * 0

  direction = q @ ((w * factors) @ zt)
  return direction if tall else direction.T


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
    An all-zero block gives an all-zero ``D``, and a block that contains a
    NaN or an infinity an all-NaN ``D``.
  """
  # Scale by the largest magnitude, NaN for a block with a NaN or an
  # infinity, which makes its direction all NaN.
  scale = _largest_magnitude(block)[0, 0]
  safe_scale = jnp.where(scale > 0, scale, 1.0) + scale * 0
  return inverse_root_directions(
      block[None], key[None], safe_scale[None], rank=rank, eps=eps,
      oversampling=oversampling, power_iterations=power_iterations,
  )[0]


def _largest_magnitude(blocks: jax.Array) -> jax.Array:
  """Returns each block's largest magnitude, NaN if it contains a NaN or an infinity.

  The result has shape ``(..., 1, 1)``. XLA on CPU may skip NaN in a max
  reduction, so a sum of ``x * 0``, zero or NaN, is added to it.
  """
  axes = (-2, -1)
  largest = jnp.max(jnp.abs(blocks), axis=axes, keepdims=True)
  return largest + jnp.sum(blocks * 0, axis=axes, keepdims=True)


def _transpose(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _piece_length(blocks: jax.Array) -> int:
  """Returns the length of the pieces along the long side of ``blocks``.

  The pieces of all blocks in the batch contain about ``_PIECE_ENTRIES``
  entries together. A piece is at least four times as long as the block is
  wide, so that stacking the ``width x width`` factor ``R`` on each piece
  adds at most 25% to the flops of one QR of the whole block.
  """
  return _length_of_pieces(blocks.shape[-2:], math.prod(blocks.shape[:-2]))


def _length_of_pieces(shape: tuple[int, int], batch: int) -> int:
  """Returns ``_piece_length`` for a batch of ``batch`` blocks of ``shape``."""
  width = min(shape)
  return max(_PIECE_ENTRIES // (width * batch), 4 * width)


def _read_piece(a: jax.Array, start, size: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis % a.ndim)


def _r_factor(a: jax.Array, axis: int) -> jax.Array:
  """Returns ``R`` with ``R^T R = B^T B``, where ``B`` is ``a`` or ``a^T``.

  ``axis`` is the long axis of ``a``'s trailing two, ``-2`` for a tall
  block (``B = a``) and ``-1`` for a wide one (``B = a^T``). ``B`` is read
  in pieces along its long side (a tall-skinny QR): the running ``R`` is
  stacked on each piece and factorised again, so ``a`` is never copied.
  """
  length = a.shape[axis]
  piece = min(length, _piece_length(a))

  def read(start, size):
    block = _read_piece(a, start, size, axis)
    # A flat optimization barrier makes XLA convert only this piece to
    # LAPACK's column-major layout. Without it, XLA keeps a column-major copy
    # of all of a for the loop.
    flat = jax.lax.optimization_barrier(block.reshape(-1))
    block = flat.reshape(block.shape)
    return block if axis == -2 else _transpose(block)

  def stack_on(r, start, size):
    stacked = jnp.concatenate([r, read(start, size)], axis=-2)
    return jnp.linalg.qr(stacked, mode="r")

  count, rest = divmod(length, piece)
  r = jnp.linalg.qr(read(0, piece), mode="r")
  r = jax.lax.fori_loop(1, count, lambda i, r: stack_on(r, i * piece, piece), r)
  if rest:
    r = stack_on(r, count * piece, rest)
  return r


def _transform_pieces(
    a: jax.Array, transform, axis: int, split: int = 1
) -> jax.Array:
  """Returns ``a`` with every piece along ``axis`` replaced by ``transform``.

  ``transform(piece, start)`` maps the piece of ``a`` that begins at index
  ``start`` of ``axis`` to an array of the same shape. Each piece is read
  before it is written, so XLA updates ``a``'s buffer in place instead of
  allocating a second one. That needs ``a`` to be unused afterwards and the
  loop not to run under ``jax.vmap``, which turns the update into a scatter.
  A block that would be one piece is split into ``split`` pieces, because
  XLA writes a single piece that covers the whole block to a new buffer.
  """
  length = a.shape[axis]
  piece = min(length, _piece_length(a))

  def update(a, start, size):
    new = transform(_read_piece(a, start, size, axis), start)
    return jax.lax.dynamic_update_slice_in_dim(a, new, start, axis=axis % a.ndim)

  if piece == length:
    piece = -(-length // min(split, length))

  count, rest = divmod(length, piece)
  # The short last piece goes first, so that the loop's result is the output
  # and XLA passes it on without a copy.
  if rest:
    a = update(a, count * piece, rest)
  return jax.lax.fori_loop(0, count, lambda i, a: update(a, i * piece, piece), a)


def _standard_normal(keys: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Draws an array of ``shape`` for each key of ``keys``."""
  draws = jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(keys.reshape(-1))
  return draws.reshape(keys.shape + shape)


def _long_exact_direction(a: jax.Array, rank: int, eps: jax.Array) -> jax.Array:
  rows, columns = a.shape[-2:]
  axis = -2 if rows >= columns else -1
  _, s, zt = jnp.linalg.svd(_r_factor(a, axis))
  tolerance = s[..., :1] * max(rows, columns) * jnp.finfo(a.dtype).eps

  # The right singular vectors of R are a's singular vectors on its short
  # side, so D = a Z^T diag(levels) Z (tall) or Z^T diag(levels) Z a (wide).
  # NOTE: forming D from a and this inverse root, and not from the Q of a
  # QR as _exact_direction does, makes the rounding error grow with
  # s_1 / s_k. Measured with rank 20 on a 64 x 192 float32 block with
  # singular values max(0.7**i, 2e-4): 8e-5 relative error against 2e-5.
  head, tail = _inverse_levels_batched(s, rank, eps, tolerance)
  fill = jnp.broadcast_to(tail[..., None], s.shape[:-1] + (s.shape[-1] - head.shape[-1],))
  levels = jnp.where(s > tolerance, jnp.concatenate([head, fill], axis=-1), 0.0)
  inverse_root = (_transpose(zt) * levels[..., None, :]) @ zt

  if axis == -2:
    return _transform_pieces(a, lambda piece, _: piece @ inverse_root, axis)
  return _transform_pieces(a, lambda piece, _: inverse_root @ piece, axis)


def _randomized_directions(
    a: jax.Array, keys: jax.Array, rank: int, eps: jax.Array,
    oversampling: int, power_iterations: int,
) -> jax.Array:
  """Returns ``D`` for a batch of blocks by the randomized path.

  ``D`` is written over ``a`` one piece at a time, so beyond ``a`` only
  buffers of a piece's size are needed.
  """
  rows, columns = a.shape[-2:]
  sketch = rank + oversampling

  # Range finder: an orthonormal basis of the dominant column space of a.
  omega = _standard_normal(keys, (columns, sketch), a.dtype)
  basis, _ = jnp.linalg.qr(a @ omega)
  for _ in range(power_iterations):
    # (basis^T a)^T equals a^T basis; XLA on CPU computes it about 1.7 times
    # faster in this orientation.
    right, _ = jnp.linalg.qr(_transpose(_transpose(basis) @ a))
    basis, _ = jnp.linalg.qr(a @ right)

  # With projection = basis^T a = zt^T diag(s) w^T p^T, the part of a inside
  # the sketch's span is basis @ zt^T diag(s) w^T p^T, an SVD. Its directions
  # get s_i / sigma_i with no subtraction, as on the exact path. Only the
  # residual outside the span, already of the tail's size, is a difference.
  projection = _transpose(basis) @ a
  p, r = jnp.linalg.qr(_transpose(projection))
  w, s, zt = jnp.linalg.svd(r)
  tolerance = s[..., :1] * max(rows, columns) * jnp.finfo(a.dtype).eps

  # Tail directions are not checked against the tolerance one by one, so
  # that those inside the sketch are treated like those in the residual.
  head, tail = _inverse_levels_batched(s, rank, eps, tolerance)
  factors = jnp.concatenate(
      [s[..., : head.shape[-1]] * head, s[..., head.shape[-1]:] * tail[..., None]],
      axis=-1,
  )
  inside = (_transpose(zt) * factors[..., None, :]) @ _transpose(w)
  tail = tail[..., None, None]

  # D = basis @ inside @ p^T + tail * (a - basis @ projection), regrouped as
  # tail * a + basis @ rest so that only one product has a's size. The
  # rounding error is the same order: either way a term of size tail * s_1
  # cancels down to the residual.
  # NOTE: directions at rounding level still enter the tail term here, with
  # weight at most tolerance / sigma_k, where the exact path drops them. The
  # residual outside the sketch cannot be split into directions cheaply.
  rest = inside @ _transpose(p) - tail * projection

  if rows < columns and divides_in_place(a.shape[-2:], a.shape[0]):
    # A long wide block is written in pieces of its long side, the columns.
    def transform(piece, start):
      return tail * piece + basis @ _read_piece(rest, start, piece.shape[-1], -1)

    return _transform_pieces(a, transform, -1)

  # Other blocks are written in pieces of rows. A piece has fewer rows than
  # the block and all its columns, so no n_l x n_l array appears.
  def transform(piece, start):
    basis_rows = _read_piece(basis, start, piece.shape[-2], -2)
    return tail * piece + basis_rows @ rest

  return _transform_pieces(a, transform, -2, split=_SPLIT)


def _inverse_levels_batched(
    s: jax.Array, rank: int, eps: jax.Array, tolerance: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Applies ``_inverse_levels`` to each row of ``s``, shape ``(batch, m)``."""
  return jax.vmap(_inverse_levels, in_axes=(0, None, 0, 0))(
      s, rank, eps, tolerance[:, 0]
  )


def _scaled_directions(
    a: jax.Array, keys: jax.Array, eps: jax.Array, *, rank: int,
    oversampling: int, power_iterations: int,
) -> jax.Array:
  """Returns ``D`` for a batch of blocks whose largest magnitude is at most 1.

  ``eps`` has one floor per block, in the blocks' units. An all-zero block
  gives an all-zero ``D`` on every path: its singular values are zero, so
  every factor is zero. ``a`` is overwritten where XLA can.
  """
  rows, columns = a.shape[-2:]
  rank = min(rank, rows)
  axis = -2 if rows >= columns else -1

  if min(rows, columns) == 1:
    # A single row or column has one singular value, its norm, so D is the
    # block divided by max(norm, eps): no factorisation needed.
    norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))
    norm = jnp.where(norm > 0, jnp.maximum(norm, eps[..., None, None]), 1.0)
    return _transform_pieces(a, lambda piece, _: piece / norm, axis)
  if use_randomized(rows, columns, rank, oversampling, power_iterations):
    return _randomized_directions(
        a, keys, rank, eps, oversampling, power_iterations
    )
  if divides_in_place(a.shape[-2:], a.shape[0]):
    return _long_exact_direction(a, rank, eps)
  return jax.vmap(_exact_direction, in_axes=(0, None, 0))(a, rank, eps)


def divides_in_place(shape: tuple[int, int], batch: int) -> bool:
  """Returns whether ``inverse_root_directions`` divides such blocks itself.

  That is the case for long blocks, processed in pieces (see
  ``inverse_root_directions``). Other blocks should be passed already
  divided by their scales, with ``divided=True``.
  """
  return max(shape) > _length_of_pieces(shape, batch)


def inverse_root_directions(
    blocks: jax.Array,
    keys: jax.Array,
    scales: jax.Array,
    *,
    rank: int,
    eps: jax.Array,
    oversampling: int,
    power_iterations: int,
    divided: bool = False,
) -> jax.Array:
  """Applies ``inverse_root_direction`` to a batch of blocks with given scales.

  Each block is taken divided by its scale, a value at least its largest
  magnitude such as the largest magnitude of the leaf it comes from. A
  scale known before the block is gathered lets XLA fuse the division into
  the gather (pass the divided blocks and ``divided=True``), where a scale
  taken from the block would need a second copy of it. Long blocks (see
  ``divides_in_place``) are divided here, in place. A NaN scale, which the
  caller passes for a leaf with a NaN or an infinity, makes the block's
  ``D`` all NaN on every path.

  Args:
    blocks: shape ``(batch, n_l, d)``.
    keys: one PRNG key per block, shape ``(batch,)``.
    scales: one positive scale per block, shape ``(batch,)``.
    divided: whether ``blocks`` are already divided by ``scales``.
    rank: as for ``inverse_root_direction``.
    eps: as for ``inverse_root_direction``.
    oversampling: as for ``inverse_root_direction``.
    power_iterations: as for ``inverse_root_direction``.

  Returns:
    The directions, with the shape and dtype of ``blocks``.

  A block whose long side spans more than ``_PIECE_ENTRIES`` entries over
  the batch takes the same paths one piece of the long side at a time, in
  place: the update then needs no second buffer of the blocks' size, which
  decides whether a leaf of 10**6 x 64 or more fits in memory.

  On CPU the blocks are decomposed one after another in a loop, so that
  every LAPACK call gets a single matrix. In jaxlib 0.10.2 a batched LAPACK
  call splits its batch over XLA's thread pool and blocks until the pieces
  are done. Two such calls running at once, one per pool thread, then wait
  for each other forever (seen on 2 cores with two groups of 12 equal
  layers). Other platforms get one batched computation.
  """
  settings = dict(
      rank=rank, oversampling=oversampling, power_iterations=power_iterations,
  )
  scales = scales.astype(blocks.dtype)
  eps = jnp.asarray(eps, blocks.dtype) / scales

  def batched(blocks, keys, scales, eps):
    if not divided and divides_in_place(blocks.shape[-2:], blocks.shape[0]):
      # Divided in place: a divided copy next to the blocks would double
      # their memory.
      axis = -2 if blocks.shape[-2] >= blocks.shape[-1] else -1
      blocks = _transform_pieces(
          blocks, lambda piece, _: piece / scales[:, None, None], axis
      )
    elif not divided:
      blocks = blocks / scales[:, None, None]
    return _scaled_directions(blocks, keys, eps, **settings)

  if blocks.shape[0] == 1:
    return batched(blocks, keys, scales, eps)

  def one_at_a_time(*inputs):
    def body(carry, inputs):
      return carry, batched(*(x[None] for x in inputs))[0]

    return jax.lax.scan(body, None, inputs, unroll=_CPU_UNROLL)[1]

  return jax.lax.platform_dependent(
      blocks, keys, scales, eps, cpu=one_at_a_time, default=batched
  )
