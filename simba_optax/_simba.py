"""Simba: the Optax gradient transformation and its state."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from simba_optax import _eigendecomposition
from simba_optax import _matrix_view
from simba_optax import _partition
from simba_optax import _row_sampling
from simba_optax import _validation
from simba_optax._matrix_view import LeafView
from simba_optax._matrix_view import SimbaDimensionNumbers


class SimbaState(NamedTuple):
  """State of ``simba``.

  Attributes:
    count: number of updates taken so far.
    key: raw key data of the PRNG key that, folded with ``count`` and the
      leaf's index, draws the rows and sketches of each step. Raw ``uint32``
      data keeps the state a plain tree of arrays for checkpointers.
    mu: heavy-ball sum of gradients, ``mu <- momentum * mu + g``, one buffer
      per parameter leaf.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  key: jax.Array  # shape=key data shape (2,) for threefry, dtype=jnp.uint32
  mu: optax.Updates  # the params' shapes, dtype=mu_dtype or the params'


def _is_empty(value: Any) -> bool:
  return value is None or isinstance(value, optax.MaskedNode)


def _prepare_key(seed: Any) -> tuple[jax.Array, Any]:
  """Returns the raw key data and the key implementation for ``seed``."""
  # Under optax.inject_hyperparams the factory runs inside jit, where the
  # key would otherwise become a traced value.
  with jax.ensure_compile_time_eval():
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      if seed.shape != ():
        raise ValueError(
            "simba: seed must be a single PRNG key, got a key array of shape"
            f" {seed.shape}. Pass one key, for example jax.random.key(0)."
        )
      return jax.random.key_data(seed), jax.random.key_impl(seed)

    default = jax.random.key(0)
    raw_shape = jax.random.key_data(default).shape
    if isinstance(seed, (jax.Array, np.ndarray)) and seed.dtype == np.uint32:
      # Raw key data of the default implementation, as jax.random.PRNGKey returns.
      if seed.shape != raw_shape:
        raise ValueError(
            f"simba: seed of shape {seed.shape} is not raw key data of the"
            f" default PRNG implementation, which has shape {raw_shape}. Pass"
            " an int or a typed key from jax.random.key."
        )
      return jnp.asarray(seed), jax.random.key_impl(default)

    is_int = isinstance(seed, (int, np.integer)) or (
        isinstance(seed, (jax.Array, np.ndarray)) and seed.shape == ()
        and jnp.issubdtype(seed.dtype, jnp.integer)
    )
    if isinstance(seed, bool) or not is_int:
      raise TypeError(
          "simba: seed must be an int or a PRNG key from jax.random.key, got"
          f" {seed!r}."
      )
    try:
      key = jax.random.key(seed)
    except OverflowError:
      raise ValueError(
          f"simba: seed={seed} does not fit in 64 bits. Pass an int in"
          f" [{-2**63}, {2**63 - 1}]."
      ) from None
    return jax.random.key_data(key), jax.random.key_impl(key)


def _check_float_leaf(leaf: Any, path: str, what: str) -> None:
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"simba: {what} leaf {path} has dtype {dtype}; Simba supports only"
        " real floating-point leaves. Exclude it with optax.masked or"
        " optax.partition, or cast it to a float dtype."
    )


def _leaf_views(
    tree: Any, spec: Any, what: str
) -> tuple[list[LeafView | None], Any, list[str]]:
  """Validates ``tree``'s leaves and returns their matrix views.

  Returns:
    The views in flattening order (``None`` for ``None`` and
    ``optax.MaskedNode`` entries), the tree's structure with those entries as
    leaves, and the leaves' paths.
  """
  dims_tree = _matrix_view.resolve_dimension_numbers(spec, tree)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_empty
  )
  dims = treedef.flatten_up_to(dims_tree)

  views, paths = [], []
  for (path, leaf), leaf_dims in zip(path_leaves, dims):
    name = jax.tree_util.keystr(path) or "<root>"
    paths.append(name)
    if _is_empty(leaf):
      views.append(None)
      continue
    _check_float_leaf(leaf, name, what)
    views.append(_matrix_view.make_leaf_view(jnp.shape(leaf), leaf_dims, name))
  return views, treedef, paths


# Whether blocks of equal shape from different leaves share one batched
# decomposition. Only benchmarks turn it off, to measure what it saves.
GROUP_EQUAL_SHAPES = True


def _batched_directions(
    stacks: list[jax.Array], keys: list[jax.Array], sizes: list[int],
    scales: list[jax.Array], eps: jax.typing.ArrayLike,
    decomposition: dict[str, int],
) -> list[jax.Array]:
  """Returns the coarse direction of every matrix in ``stacks``.

  Args:
    stacks: one ``(batch, n, d)`` array per leaf, in the compute dtype.
    keys: one key per leaf, split into one key per matrix of its stack.
    sizes: ``n_l`` per leaf.
    scales: the scale of each matrix, shape ``(batch,)`` per leaf: its
      largest magnitude, or NaN for a leaf with a NaN or an infinity.
    eps: the floor on singular values.
    decomposition: ``rank``, ``oversampling`` and ``power_iterations``.

  Returns:
    One pair per leaf: the direction on the sampled rows, ``(batch, n_l, d)``,
    and the sampled rows, ``(batch, n_l)``.

  Blocks of the same shape and dtype, from one leaf or several, are stacked
  and decomposed in one batched computation, so a network of equal layers
  compiles one set of linear-algebra calls instead of one per layer.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, (stack, size) in enumerate(zip(stacks, sizes)):
    shape = (size, stack.shape[-1])
    group = (shape, stack.dtype) if GROUP_EQUAL_SHAPES else (i,)
    groups.setdefault(group, []).append(i)

  directions: list[jax.Array | None] = [None] * len(stacks)
  samples: list[jax.Array | None] = [None] * len(stacks)
  decompose = functools.partial(
      _eigendecomposition.inverse_root_directions, eps=eps, **decomposition
  )
  for members in groups.values():
    batch = sum(stacks[i].shape[0] for i in members)
    shape = (sizes[members[0]], stacks[members[0]].shape[-1])
    in_place = _eigendecomposition.divides_in_place(shape, batch)

    blocks, sketch_keys = [], []
    for i in members:
      # NOTE: with explicit mesh axes, a stack sharded along its batch axes
      # (stacked layers sharded over the layer axis) fails in these vmaps,
      # because the replicated keys do not share that sharding. Auto axes
      # work.
      matrix_keys = jax.random.split(keys[i], stacks[i].shape[0])
      row_key, sketch_key = jax.vmap(jax.random.split, out_axes=1)(matrix_keys)
      # Divided before the gather, XLA fuses the division into it. Blocks
      # that the decomposition divides in place are gathered undivided.
      stack = stacks[i] if in_place else stacks[i] / scales[i][:, None, None]
      samples[i], block = jax.vmap(
          functools.partial(_row_sampling.restrict, size=sizes[i])
      )(stack, row_key)
      blocks.append(block)
      sketch_keys.append(sketch_key)

    joined_scales = jnp.concatenate([scales[i] for i in members])
    results = decompose(
        jnp.concatenate(blocks), jnp.concatenate(sketch_keys), joined_scales,
        divided=not in_place,
    )
    offsets = np.cumsum([stacks[i].shape[0] for i in members])[:-1]
    for i, result in zip(members, jnp.split(results, offsets)):
      directions[i] = result

  return list(zip(directions, samples))


def simba(
    momentum: jax.typing.ArrayLike = 0.9,
    coarse_fraction: float = 0.5,
    coarse_rows: int | None = None,
    rank: int = 20,
    eps: jax.typing.ArrayLike = 1e-8,
    oversampling: int = 10,
    power_iterations: int = 2,
    seed: int | jax.Array = 0,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Simba's preconditioned direction, without the learning rate.

  Per parameter leaf, Simba keeps a heavy-ball sum of gradients :math:`M`,
  views it as a matrix with :math:`n` rows, samples :math:`n_\ell` of the rows
  (the coarse model :math:`A_s = R M`), and returns on those rows

  .. math::
    D_s = U \operatorname{diag}(\sigma_1^{-1}, \dots, \sigma_{k-1}^{-1})
      U^\top A_s + \sigma_k^{-1} (A_s - U U^\top A_s),

  where :math:`\sigma_i^2` are the :math:`k` leading eigenvalues of
  :math:`A_s A_s^\top` (floored so that :math:`\sigma_i \ge \epsilon`) and
  :math:`U` the eigenvectors of the first :math:`k - 1`. That is
  :math:`(A_s A_s^\top)^{-1/2} A_s` with every eigenvalue past the
  :math:`k`-th raised to the :math:`k`-th. The other rows get zero
  (prolongation :math:`P = R^\top`). Descend with
  ``optax.chain(simba(...), optax.scale(-learning_rate))``.

  The eigenvalues are never formed as squares: they come from a QR of the
  thin side of :math:`A_s` followed by a small SVD, through a randomized
  range finder (Halko et al., 2011) when that is cheaper. The computation
  runs in float32 at least, whatever the parameter dtype, and the update has
  the gradient's dtype.

  Where the paper and the authors' PyTorch code differ, this follows the
  code: the momentum has no ``(1 - momentum)`` factor and no bias
  correction, ``eps`` floors the square roots of the eigenvalues (the
  paper's floor ``m`` on eigenvalues is ``eps**2``), and ``rank`` pairs are
  computed with the last one setting the tail level. The number of sampled
  rows is ``ceil(coarse_fraction * n)``, where the code adds one.

  .. warning::
    Only the sampled rows change in a step. In data-parallel training every
    replica must have the same state (same key and count), so that all
    replicas sample the same rows. Keep the state replicated.

  Args:
    momentum: decay :math:`\beta` of the heavy-ball sum
      :math:`M \leftarrow \beta M + g`, in ``[0, 1)``.
    coarse_fraction: share of each matrix's rows sampled per step, in
      ``(0, 1]``; the paper's :math:`n_\ell = ` ``ceil(coarse_fraction * n)``.
    coarse_rows: if given, the number of rows sampled per step (capped at
      :math:`n`), an int ``>= 1``; it overrides ``coarse_fraction``.
    rank: number :math:`k` of eigenpairs computed (the paper's :math:`r`),
      an int ``>= 1``; capped at :math:`n_\ell`.
    eps: floor :math:`\epsilon \ge 0` on the square roots of the
      eigenvalues. Directions with smaller singular values are divided by
      ``eps`` instead, which bounds the step.
    oversampling: extra sketch columns of the randomized range finder, an
      int ``>= 0``.
    power_iterations: power iterations of the randomized range finder, an
      int ``>= 0``.
    seed: an int or a PRNG key (``jax.random.key``) from which every row
      sample and sketch is derived.
    mu_dtype: dtype of the momentum buffer; ``None`` uses each parameter's.
    dimension_numbers: which axes form each leaf's matrix: ``None`` (the
      last axis holds the rows), one :class:`SimbaDimensionNumbers` for all
      leaves, a tree of them (or ``None``) matching the parameters, or a
      callable from the parameters to such a tree.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`. Its
    ``update`` accepts and ignores extra keyword arguments.

  Raises:
    ValueError: a hyperparameter is out of range (at construction) or a
      leaf's dimension numbers do not fit it (at ``init``).
    TypeError: a hyperparameter has the wrong type (at construction) or a
      leaf is not a real floating-point array (at ``init``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import simba_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> w = jnp.zeros((4, 3))
    >>> tx = optax.chain(simba_optax.simba(coarse_fraction=1.0),
    ...                  optax.scale(-0.1))
    >>> state = tx.init(w)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   w = optax.apply_updates(w, updates)
    ...   print(f"{loss(w):.3f}")
    11.317
    10.654
    10.012

  References:
    Tsipinakis & Parpas, `Simba: A Scalable Bilevel Preconditioned Gradient
    Method for Fast Evasion of Flat Areas and Saddle Points
    <https://arxiv.org/abs/2309.05309>`_, 2023.

    Halko, Martinsson & Tropp, `Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix
    decompositions <https://doi.org/10.1137/090771806>`_, SIAM Review, 2011.
  """
  _validation.check_range(
      "momentum", momentum, 0.0, 1.0, high_open=True,
      hint="The paper's default is 0.9; use 0.0 for no momentum.",
  )
  coarse_fraction = _validation.check_static_fraction(
      "coarse_fraction", coarse_fraction
  )
  if coarse_rows is not None:
    coarse_rows = _validation.check_static_int(
        "coarse_rows", coarse_rows, 1,
        hint="Pass None to use coarse_fraction instead.",
    )
  rank = _validation.check_static_int("rank", rank, 1)
  _validation.check_range(
      "eps", eps, 0.0, float(np.finfo(np.float32).max),
      hint="It is a floor on singular values; the default is 1e-8.",
  )
  oversampling = _validation.check_static_int("oversampling", oversampling, 0)
  power_iterations = _validation.check_static_int(
      "power_iterations", power_iterations, 0
  )
  key_data, key_impl = _prepare_key(seed)
  # Kept on the host, so that init places the key like any other constant:
  # replicated on the mesh set with jax.set_mesh, not committed to one device.
  key_data = np.asarray(key_data)
  if mu_dtype is not None:
    try:
      mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)
    except TypeError:
      raise TypeError(
          f"simba: mu_dtype={mu_dtype!r} is not a dtype. Pass None,"
          " jnp.float32 or jnp.bfloat16, for example."
      ) from None
  if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.floating):
    raise TypeError(
        f"simba: mu_dtype={mu_dtype} is not a real floating-point dtype."
        " Pass None, jnp.float32 or jnp.bfloat16, for example."
    )
  _check_dimension_numbers_spec(dimension_numbers)

  decomposition = dict(
      rank=rank, oversampling=oversampling, power_iterations=power_iterations
  )

  def init_fn(params):
    views, _, paths = _leaf_views(params, dimension_numbers, "parameter")
    del views, paths
    mu = otu.tree_zeros_like(params, dtype=mu_dtype)
    return SimbaState(
        count=jnp.zeros([], jnp.int32),
        key=jnp.asarray(key_data),
        mu=mu,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    # Compared with the state first, so that a wrong tree or shape is
    # reported as such and not as dimension numbers that do not fit it.
    _check_gradient_tree(updates, state.mu)
    views, treedef, _ = _leaf_views(updates, dimension_numbers, "gradient")
    gradients = treedef.flatten_up_to(updates)
    buffers = treedef.flatten_up_to(state.mu)

    step_key = jax.random.fold_in(
        jax.random.wrap_key_data(state.key, impl=key_impl), state.count
    )

    new_mu, stacks, keys, sizes, scales, poisons = [], [], [], [], [], []
    for gradient, buffer, view in zip(gradients, buffers, views):
      if not _is_decomposed(view):
        new_mu.append(buffer)
        continue

      # Step 1: the heavy-ball sum, in the buffer's dtype.
      buffer = (momentum * buffer + gradient).astype(buffer.dtype)
      new_mu.append(buffer)

      # Step 2: the matrix view, in float32 at least. Each matrix is divided
      # by its largest magnitude, so that gradients of 1e-30 or 1e30 neither
      # underflow nor overflow. The direction does not depend on that scale
      # once eps is divided by it too. The poison, NaN or zero, is added to
      # the scale, so every matrix of a leaf with a NaN or an infinite entry
      # becomes all NaN, and so does its direction.
      values = buffer.astype(jnp.promote_types(buffer.dtype, jnp.float32))
      largest, poison = _largest_magnitudes(values, view)
      stacks.append(_matrix_view.to_matrices(values, view))
      scales.append(jnp.where(largest > 0, largest, 1.0) + poison)
      poisons.append(poison)
      # The index counts array leaves only, in jax.tree.leaves order.
      keys.append(jax.random.fold_in(step_key, len(keys)))
      sizes.append(
          _row_sampling.coarse_size(view.rows, coarse_fraction, coarse_rows)
      )

    # Steps 3 to 7: sample, decompose, floor, invert, prolong.
    coarse = iter(zip(
        _batched_directions(stacks, keys, sizes, scales, eps, decomposition),
        poisons,
    ))
    directions = []
    for gradient, view in zip(gradients, views):
      if not _is_decomposed(view):
        directions.append(gradient)
        continue
      (block_directions, sampled), poison = next(coarse)
      # The poison is written to the rows not sampled too. So a NaN or an
      # infinity anywhere in the momentum makes the whole update NaN, and
      # the step fails now, not when that row is next sampled.
      directions.append(
          _matrix_view.prolong_to_leaf(
              block_directions.astype(gradient.dtype), sampled, view,
              fill_value=poison,
              out_sharding=_partition.explicit_sharding(gradient),
          )
      )

    count = optax.safe_increment(state.count)
    new_state = SimbaState(
        count=count, key=state.key, mu=treedef.unflatten(new_mu)
    )
    return treedef.unflatten(directions), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_dimension_numbers_spec(spec: Any) -> None:
  """Raises ``TypeError`` unless ``spec`` can be a dimension-numbers spec."""
  if spec is None or callable(spec) and not _matrix_view.is_dimension_numbers(spec):
    return
  entries = jax.tree.leaves(
      spec, is_leaf=lambda x: x is None or _matrix_view.is_dimension_numbers(x)
  )
  for entry in entries:
    if entry is not None and not _matrix_view.is_dimension_numbers(entry):
      raise TypeError(
          "simba: dimension_numbers must be None, a SimbaDimensionNumbers, a"
          " tree of them (or None) matching the parameters, or a callable"
          f" returning one of these; it contains {entry!r}."
      )


def _largest_magnitudes(
    values: jax.Array, view: LeafView
) -> tuple[jax.Array, jax.Array]:
  """Returns each matrix's largest magnitude and the leaf's poison.

  The largest magnitudes have shape ``(batch_size,)``. The poison is NaN if
  an entry of the leaf is NaN or infinite (``x * 0`` is NaN exactly for
  those), else zero. It is a separate sum, because XLA on CPU may skip NaN
  in a max reduction. Two plain reductions take a fifth of the time of one
  variadic reduction that computes both, and less than one max reduction
  that maps NaN to infinity first.
  """
  axes = tuple(a for a in range(values.ndim) if a not in view.batch_axes)
  largest = jnp.max(jnp.abs(values), axis=axes)
  return largest.reshape(view.batch_size), jnp.sum(values * 0)


def _is_decomposed(view: _matrix_view.LeafView | None) -> bool:
  """Returns whether a leaf with this view gets a Simba direction.

  Leaves without a view and leaves without entries pass through unchanged,
  because an empty leaf has no rows to sample.
  """
  return view is not None and 0 not in view.shape


def _check_gradient_tree(gradients: Any, momentum: Any) -> None:
  """Raises ``ValueError`` unless ``gradients`` has the momentum's tree and shapes.

  The message names the leaves that are missing, unexpected or of another
  shape.
  """
  gradient_leaves, gradient_def = jax.tree_util.tree_flatten_with_path(
      gradients, is_leaf=_is_empty
  )
  buffer_leaves, buffer_def = jax.tree_util.tree_flatten_with_path(
      momentum, is_leaf=_is_empty
  )
  if gradient_def != buffer_def:
    difference = _validation.leaf_path_difference(
        momentum, gradients, is_leaf=_is_empty
    )
    if difference is None:
      difference = f"structure {gradient_def} instead of {buffer_def}"
    raise ValueError(
        "simba: the gradient tree does not match the tree of the state built"
        f" by init: {difference}. Pass gradients with the structure of the"
        " parameters given to init."
    )

  for (path, gradient), (_, buffer) in zip(gradient_leaves, buffer_leaves):
    if _is_empty(gradient) or _is_empty(buffer):
      continue
    if jnp.shape(gradient) != jnp.shape(buffer):
      raise ValueError(
          f"simba: gradient leaf {jax.tree_util.keystr(path) or '<root>'} has"
          f" shape {jnp.shape(gradient)}, but the state built by init has"
          f" shape {jnp.shape(buffer)}. Pass gradients with the shapes of the"
          " parameters given to init."
      )
