"""Matrix view of a parameter leaf: which axis gives the rows Simba samples.

Simba preconditions each leaf as a stack of matrices of shape ``(n, d)``. The
``row_axis`` gives the ``n`` rows that the coarse model samples. Every other
axis, except the ``batch_axes``, is flattened into the ``d`` columns in its
original order. Batch axes (stacked layers from ``nn.scan``, attention heads
that should not share a preconditioner) are moved to the front and mapped
over, so each slice is its own matrix with its own sample.

Cost: one transpose and one reshape of the leaf, no arithmetic.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from simba_optax import _validation


class SimbaDimensionNumbers(NamedTuple):
  """Axes of a parameter leaf that form Simba's matrices.

  Attributes:
    row_axis: axis whose entries are the rows of the matrix view, the axis
      that Simba samples. The default, the last axis, is the output features
      of Flax and Haiku kernels (Dense ``(in, out)``, Conv ``(..., in, out)``).
      Negative values count from the end.
    batch_axes: axes mapped over, each slice a separate matrix with its own
      sample (for example the layer axis of stacked layers).
  """

  row_axis: int = -1
  batch_axes: Sequence[int] = ()


DimensionNumbersSpec = (
    SimbaDimensionNumbers
    | Any
    | Callable[[Any], Any]
    | None
)


class LeafView(NamedTuple):
  """Static description of one leaf's matrix view.

  Attributes:
    shape: shape of the leaf.
    row_axis: the row axis, normalised to ``[0, ndim)``; ``None`` for a scalar.
    batch_axes: the batch axes, normalised and sorted.
    batch_size: number of matrices, the product of the batch axes' sizes.
    rows: ``n``, the number of rows of each matrix.
    columns: ``d``, the number of columns of each matrix.
  """

  shape: tuple[int, ...]
  row_axis: int | None
  batch_axes: tuple[int, ...]
  batch_size: int
  rows: int
  columns: int

  @property
  def permutation(self) -> tuple[int, ...]:
    """Axis order that puts the batch axes first, then the row axis."""
    if self.row_axis is None:
      return ()
    leading = self.batch_axes + (self.row_axis,)
    rest = tuple(a for a in range(len(self.shape)) if a not in leading)
    return leading + rest


def is_dimension_numbers(value: Any) -> bool:
  return isinstance(value, SimbaDimensionNumbers)


def _normalize_axis(axis: Any, ndim: int, label: str, path: str) -> int:
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(
        f"simba: {label} for leaf {path} must be an int, got {axis!r}."
    )
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"simba: {label}={axis} is out of range for leaf {path} with"
        f" {ndim} dimensions; the allowed range is [{-ndim}, {ndim}). Pass"
        " SimbaDimensionNumbers with valid axes for this leaf."
    )
  return axis % ndim


def make_leaf_view(
    shape: Sequence[int], dims: SimbaDimensionNumbers | None, path: str
) -> LeafView:
  """Builds the matrix view of a leaf, validating ``dims`` against its shape.

  Args:
    shape: shape of the leaf.
    dims: the leaf's dimension numbers; ``None`` means the default.
    path: the leaf's path in the parameter tree, used in error messages.

  Returns:
    The leaf's ``LeafView``.

  Raises:
    TypeError: if ``dims`` is not a ``SimbaDimensionNumbers`` or an axis is
      not an int.
    ValueError: if an axis is out of range, repeated, or both a row and a
      batch axis.
  """
  shape = tuple(int(s) for s in shape)
  if dims is None:
    dims = SimbaDimensionNumbers()
  if not is_dimension_numbers(dims):
    raise TypeError(
        f"simba: dimension numbers for leaf {path} must be"
        f" SimbaDimensionNumbers or None, got {dims!r}."
    )

  batch_axes = dims.batch_axes
  if isinstance(batch_axes, int) and not isinstance(batch_axes, bool):
    batch_axes = (batch_axes,)
  if not isinstance(batch_axes, Sequence):
    raise TypeError(
        f"simba: batch_axes for leaf {path} must be a sequence of ints, got"
        f" {dims.batch_axes!r}."
    )

  ndim = len(shape)
  if ndim == 0:
    # A scalar is a 1 x 1 matrix. Row axis -1 or 0 names its only entry.
    _normalize_axis(dims.row_axis, 1, "row_axis", path)
    if batch_axes:
      raise ValueError(
          f"simba: leaf {path} is a scalar, so it has no batch axes; got"
          f" batch_axes={tuple(batch_axes)}. Use batch_axes=() for it."
      )
    return LeafView(shape, None, (), 1, 1, 1)

  row_axis = _normalize_axis(dims.row_axis, ndim, "row_axis", path)
  normalized = tuple(
      _normalize_axis(a, ndim, "batch_axes entry", path) for a in batch_axes
  )
  if len(set(normalized)) != len(normalized):
    raise ValueError(
        f"simba: batch_axes={tuple(batch_axes)} for leaf {path} with shape"
        f" {shape} repeats an axis. List each batch axis once."
    )
  if row_axis in normalized:
    raise ValueError(
        f"simba: row_axis={dims.row_axis} is also in"
        f" batch_axes={tuple(batch_axes)} for leaf {path} with shape {shape}."
        " An axis is either the row axis or a batch axis."
    )

  normalized = tuple(sorted(normalized))
  batch_size = math.prod(shape[a] for a in normalized)
  rows = shape[row_axis]
  columns = math.prod(
      s for a, s in enumerate(shape) if a != row_axis and a not in normalized
  )
  return LeafView(shape, row_axis, normalized, batch_size, rows, columns)


def to_matrices(leaf: jax.Array, view: LeafView) -> jax.Array:
  """Returns the leaf as a ``(batch_size, rows, columns)`` stack."""
  stacked = jnp.transpose(leaf, view.permutation) if view.permutation else leaf
  return stacked.reshape(view.batch_size, view.rows, view.columns)


def prolong_to_leaf(
    directions: jax.Array, sampled: jax.Array, view: LeafView,
    fill_value: jax.typing.ArrayLike = 0.0, out_sharding: Any = None,
) -> jax.Array:
  """Writes each matrix's sampled rows into an array of the leaf's shape: ``R^T``.

  Args:
    directions: ``(batch_size, n_l, columns)``, the direction of each matrix
      on its sampled rows.
    sampled: ``(batch_size, n_l)``, the sampled rows of each matrix, in
      increasing order.
    view: the leaf's view.
    fill_value: a scalar, the value of the rows not sampled.
    out_sharding: an explicit sharding for the result, or ``None``.

  Returns:
    An array of the leaf's shape. The rows are scattered straight into the
    leaf's layout, because inverting ``to_matrices`` after a scatter would
    transpose an array of the leaf's size, which XLA on CPU stages in a
    temporary buffer of that size.
  """
  if view.row_axis is None:
    return directions.reshape(view.shape)

  size = sampled.shape[-1]
  batch_shape = tuple(view.shape[a] for a in view.batch_axes)
  # Scatter dimensions first (batch coordinates, then the sampled row), then
  # one window dimension per axis that is not a batch axis, in the leaf's
  # order, of size 1 at the row axis. Stating that size-1 window keeps XLA
  # from inserting it with a layout that costs a copy of the updates.
  window_shape = tuple(
      1 if a == view.row_axis else view.shape[a]
      for a in range(len(view.shape)) if a not in view.batch_axes
  )
  updates = directions.reshape(batch_shape + (size,) + window_shape)
  coordinates = [
      jax.lax.broadcasted_iota(jnp.int32, batch_shape + (size,), position)
      for position in range(len(batch_shape))
  ]
  coordinates.append(sampled.reshape(batch_shape + (size,)).astype(jnp.int32))
  indices = jnp.stack(coordinates, axis=-1)
  dimension_numbers = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(len(batch_shape) + 1, updates.ndim)),
      inserted_window_dims=view.batch_axes,
      scatter_dims_to_operand_dims=view.batch_axes + (view.row_axis,),
  )

  def scatter(filled, indices, updates):
    return jax.lax.scatter(
        filled, indices, updates, dimension_numbers,
        indices_are_sorted=False, unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )

  filled = jnp.full(
      view.shape, fill_value, directions.dtype, out_sharding=out_sharding
  )
  if out_sharding is not None:
    scatter = jax.sharding.auto_axes(
        scatter, out_sharding=out_sharding,
        axes=out_sharding.mesh.explicit_axes,
    )
  return scatter(filled, indices, updates)


def _is_tree_leaf(value: Any) -> bool:
  return value is None or isinstance(value, optax.MaskedNode)


def resolve_dimension_numbers(spec: DimensionNumbersSpec, tree: Any) -> Any:
  """Expands a dimension-numbers spec to a tree shaped like ``tree``.

  Args:
    spec: ``None`` (the default for every leaf), one
      ``SimbaDimensionNumbers`` for every leaf, a tree of them (with ``None``
      for the default) matching ``tree``, or a callable from ``tree`` to one
      of these.
    tree: the parameters or updates.

  Returns:
    A tree with the structure of ``tree`` (``None`` and ``optax.MaskedNode``
    entries kept as leaves) whose leaves are ``SimbaDimensionNumbers`` or
    ``None``.
  """
  if callable(spec) and not is_dimension_numbers(spec):
    spec = spec(tree)
  if spec is None or is_dimension_numbers(spec):
    return jax.tree.map(lambda _: spec, tree, is_leaf=_is_tree_leaf)

  try:
    return jax.tree.map(
        lambda _, dims: dims, tree, spec, is_leaf=_is_tree_leaf
    )
  except (ValueError, TypeError):
    raise ValueError(
        "simba: dimension_numbers must be None, one SimbaDimensionNumbers,"
        " a tree of them with the structure of the parameters, or a callable"
        " that returns one of these; the tree given does not match the"
        f" parameters: {_spec_difference(tree, spec)}."
    ) from None


def _spec_difference(tree: Any, spec: Any) -> str:
  """Describes how the leaf paths of a dimension-numbers tree differ from ``tree``'s."""
  is_spec_leaf = lambda x: x is None or is_dimension_numbers(x)  # noqa: E731
  difference = _validation.leaf_path_difference(
      tree, spec,
      is_leaf=lambda x: _is_tree_leaf(x) or is_spec_leaf(x),
  )
  return difference or "the same leaf paths, but other container types"
