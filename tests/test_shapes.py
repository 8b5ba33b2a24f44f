"""Simba on the leaf shapes of real networks, from scalars to a 10**6 x 64 table.

Flax modules give the shapes. Numerical checks compare float32 updates with
the float64 reference in `oracle`, within `RELATIVE_TOLERANCE`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simba_optax
from oracle import (
    coarse_row_count,
    matrix_view,
    relative_error,
    sampled_rows,
    simba_direction,
)
from simba_optax import SimbaDimensionNumbers
from simba_optax import _eigendecomposition
from simba_optax import _row_sampling

RELATIVE_TOLERANCE = 1e-4

# Rank and oversampling of most tests here: rank + oversampling exceeds every
# sampled block's smaller side, so the exact path runs.
RANK = 6
EXACT = dict(rank=RANK, oversampling=1000)


def param_shapes(module, *inputs):
  variables = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return jax.tree.map(lambda leaf: leaf.shape, variables["params"])


def random_like(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda shape: rng.standard_normal(shape).astype(np.float32),
      shapes,
      is_leaf=lambda node: isinstance(node, tuple),
  )


def first_update(grads, **hyperparameters):
  """Returns the update of the first step after `init`, with momentum 0, as NumPy."""
  transformation = simba_optax.simba(momentum=0.0, **hyperparameters)
  state = transformation.init(grads)
  update, _ = jax.jit(transformation.update)(grads, state)
  return jax.tree.map(np.asarray, update)


def assert_matrix_matches(grad_matrix, update_matrix, *, count, rank):
  """Checks one matrix: `count` non-zero rows, equal to the reference there.

  Returns the sampled rows.
  """
  assert np.all(np.isfinite(update_matrix))
  rows = sampled_rows(update_matrix)
  assert rows.size == count
  expected = simba_direction(np.asarray(grad_matrix, np.float64)[rows], rank, 1e-8)
  assert relative_error(update_matrix[rows], expected) <= RELATIVE_TOLERANCE
  return rows


@pytest.mark.parametrize("shape", [(), (1,), (128,), (1, 256)])
def test_small_leaf_shapes(shape):
  # A scalar and (1,) are 1 x 1 matrices, (128,) is 128 x 1 and (1, 256) is
  # 256 x 1: every sampled block has one column, so it is divided by its norm.
  grad = random_like({"leaf": shape}, seed=0)["leaf"]

  update = first_update(grad, **EXACT)

  assert update.shape == shape
  assert update.dtype == np.float32
  grad_matrix = matrix_view(grad)
  update_matrix = matrix_view(update)
  count = coarse_row_count(grad_matrix.shape[0])
  rows = assert_matrix_matches(grad_matrix, update_matrix, count=count, rank=RANK)
  block = grad_matrix[rows].astype(np.float64)
  assert relative_error(update_matrix[rows], block / np.linalg.norm(block)) <= RELATIVE_TOLERANCE


def test_conv_kernel_output_channels():
  # HWIO kernel (3, 3, 64, 128): rows are the 128 output channels, each of
  # 3 * 3 * 64 = 576 entries. 64 whole channels change, nothing else.
  shapes = param_shapes(nn.Conv(128, (3, 3)), jnp.zeros((1, 8, 8, 64)))
  assert shapes["kernel"] == (3, 3, 64, 128)
  grads = random_like(shapes, seed=1)

  update = first_update(grads, **EXACT)

  kernel = update["kernel"]
  assert np.count_nonzero(kernel) == 64 * 576
  changed = np.any(kernel != 0, axis=(0, 1, 2))
  assert np.count_nonzero(changed) == 64
  assert np.all(kernel[..., changed] != 0)
  assert_matrix_matches(
      matrix_view(grads["kernel"]), matrix_view(kernel), count=64, rank=RANK
  )


def attention_shapes():
  """Returns the kernel shapes of a Flax attention layer, without its biases.

  Query, key and value kernels are (embed, heads, head_dim) = (32, 4, 16).
  """
  module = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
  shapes = param_shapes(module, jnp.zeros((1, 5, 32)))
  return {name: {"kernel": layer["kernel"]} for name, layer in shapes.items()}


def per_head_dimension_numbers(params):
  """Batch axis 1 (heads) for the query, key and value kernels; defaults elsewhere."""

  def choose(path, _):
    names = [entry.key for entry in path]
    if names[-1] == "kernel" and names[0] in ("query", "key", "value"):
      return SimbaDimensionNumbers(row_axis=-1, batch_axes=(1,))
    return None

  return jax.tree_util.tree_map_with_path(choose, params)


def test_attention_heads_as_batch():
  # With the heads as a batch axis, each head's 16 x 32 matrix (head_dim
  # rows, embed columns) gets its own sample of 8 rows and its own direction.
  grads = random_like(attention_shapes(), seed=2)

  update = first_update(grads, dimension_numbers=per_head_dimension_numbers, **EXACT)

  for name in ("query", "key", "value"):
    assert update[name]["kernel"].shape == (32, 4, 16)
    heads = matrix_view(grads[name]["kernel"], row_axis=-1, batch_axes=(1,))
    head_updates = matrix_view(update[name]["kernel"], row_axis=-1, batch_axes=(1,))
    samples = {
        tuple(assert_matrix_matches(head, head_update, count=8, rank=RANK))
        for head, head_update in zip(heads, head_updates)
    }
    # Four heads share one sample with probability about C(16, 8)**-3.
    assert len(samples) > 1
  out = update["out"]["kernel"]
  assert_matrix_matches(
      matrix_view(grads["out"]["kernel"]), matrix_view(out), count=16, rank=RANK
  )


def test_attention_default_view():
  # Without batch axes the (32, 4, 16) kernel is one 16 x 128 matrix: the
  # rows are the last axis and the columns flatten (embed, heads).
  grads = random_like(attention_shapes(), seed=3)

  update = first_update(grads, **EXACT)

  kernel = update["query"]["kernel"]
  grad_matrix = matrix_view(grads["query"]["kernel"])
  assert grad_matrix.shape == (16, 128)
  np.testing.assert_array_equal(
      grad_matrix[3], grads["query"]["kernel"][:, :, 3].reshape(-1)
  )
  rows = assert_matrix_matches(grad_matrix, matrix_view(kernel), count=8, rank=RANK)
  # A sampled row changes in every head, because the heads share the matrix.
  assert np.all(kernel[:, :, rows] != 0)


class DenseBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(32)(x), None


class ScannedStack(nn.Module):
  layers: int = 4

  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(
        DenseBlock, variable_axes={"params": 0}, split_rngs={"params": True},
        length=self.layers,
    )
    x, _ = scanned()(x, None)
    return x


LAYER_AXIS = SimbaDimensionNumbers(row_axis=-1, batch_axes=(0,))


def scanned_gradients(seed):
  shapes = param_shapes(ScannedStack(), jnp.zeros((1, 32)))
  assert dense_params(shapes)["kernel"] == (4, 32, 32)
  assert dense_params(shapes)["bias"] == (4, 32)
  return random_like(shapes, seed)


def dense_params(tree):
  """Returns the scanned Dense layer's subtree, whatever name nn.scan gives it."""
  (scanned,) = tree.values()
  return scanned["Dense_0"]


@functools.cache
def layered_simba():
  return simba_optax.simba(momentum=0.0, dimension_numbers=LAYER_AXIS, **EXACT)


def test_scanned_layers_independent():
  # Perturbing layer 0's gradient changes layer 0's update only: the other
  # layers' updates are bit-identical.
  grads = scanned_gradients(seed=4)
  perturbed = jax.tree.map(np.copy, grads)
  dense_params(perturbed)["kernel"][0] *= -2.0
  dense_params(perturbed)["bias"][0] += 1.0
  transformation = layered_simba()
  update = jax.jit(transformation.update)

  before, _ = update(grads, transformation.init(grads))
  after, _ = update(perturbed, transformation.init(grads))

  for name in ("kernel", "bias"):
    first = np.asarray(dense_params(before)[name])
    second = np.asarray(dense_params(after)[name])
    assert not np.array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1:], second[1:])


def test_scanned_layers_own_keys():
  # Layer l of a leaf uses key l of jax.random.split(leaf_key, layers), split
  # again into a row key and a sketch key. The update of each layer equals
  # the direction of that layer's matrix alone with those keys.
  grads = scanned_gradients(seed=5)
  transformation = layered_simba()
  state = transformation.init(grads)

  update, _ = jax.jit(transformation.update)(grads, state)

  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(grads)]
  samples = []
  for index, name in enumerate(names):
    leaf_key = jax.random.fold_in(step_key, index)
    leaf = jax.tree.leaves(grads)[index]
    leaf_update = np.asarray(jax.tree.leaves(update)[index])
    stacks = matrix_view(leaf, row_axis=-1, batch_axes=(0,))
    updates = matrix_view(leaf_update, row_axis=-1, batch_axes=(0,))
    for layer, layer_key in enumerate(jax.random.split(leaf_key, 4)):
      row_key, sketch_key = jax.random.split(layer_key)
      sampled = np.asarray(_row_sampling.sample_rows(row_key, 32, 16))
      block = jnp.asarray(stacks[layer][sampled])
      alone = _eigendecomposition.inverse_root_direction(
          block, sketch_key, rank=RANK, eps=1e-8, oversampling=1000,
          power_iterations=2,
      )

      rows = assert_matrix_matches(stacks[layer], updates[layer], count=16, rank=RANK)
      np.testing.assert_array_equal(rows, np.sort(sampled), err_msg=f"{name} layer {layer}")
      np.testing.assert_allclose(
          updates[layer][sampled], np.asarray(alone), rtol=1e-5, atol=1e-6,
          err_msg=f"{name} layer {layer}",
      )
      samples.append(tuple(rows))
  # Eight slices of 32 rows share one sample with probability C(32, 16)**-7.
  assert len(set(samples)) > 1


# --- Long blocks, processed in pieces -----------------------------------------


def low_rank(rng, rows, columns):
  """Returns a rank-6 matrix with singular values 0.75**i.

  A sketch of 8 columns spans it exactly, so the randomized path matches the
  reference, and no singular value is near the float32 rounding level.
  """
  left, _ = np.linalg.qr(rng.standard_normal((rows, 6)))
  right, _ = np.linalg.qr(rng.standard_normal((columns, 6)))
  return (left * 0.75 ** np.arange(6)) @ right.T


@pytest.mark.parametrize(
    "matrix, hyperparameters",
    [
        # Sampled blocks 12 x 700 and 350 x 24: rank + oversampling exceeds
        # the short side, so the exact path runs.
        (lambda rng: rng.standard_normal((24, 700)), EXACT),
        (lambda rng: rng.standard_normal((700, 24)), EXACT),
        # Sampled blocks 24 x 700 and 350 x 48 with a sketch of 8 columns.
        (lambda rng: low_rank(rng, 48, 700), dict(rank=4, oversampling=4, power_iterations=1)),
        (lambda rng: low_rank(rng, 700, 48), dict(rank=4, oversampling=4, power_iterations=1)),
        (lambda rng: rng.standard_normal((700, 1)), EXACT),
        (lambda rng: np.zeros((24, 700)), EXACT),
    ],
    ids=["exact_wide", "exact_tall", "randomized_wide", "randomized_tall", "column", "zero"],
)
def test_long_block_pieces(monkeypatch, matrix, hyperparameters):
  # With 256 entries per piece these blocks are long: both paths read and
  # overwrite them in pieces, with a shorter last piece, as they do for a
  # leaf of 10**6 x 64. The result is the same formula.
  monkeypatch.setattr(_eigendecomposition, "_PIECE_ENTRIES", 256)
  grad_matrix = matrix(np.random.default_rng(7)).astype(np.float32)
  grad = np.ascontiguousarray(grad_matrix.T)
  rank = hyperparameters["rank"]

  update_matrix = matrix_view(first_update(grad, **hyperparameters))

  count = coarse_row_count(grad_matrix.shape[0])
  if not np.any(grad_matrix):
    assert np.all(update_matrix == 0.0)
    return
  assert_matrix_matches(grad_matrix, update_matrix, count=count, rank=rank)


def test_long_block_nan_poisons(monkeypatch):
  monkeypatch.setattr(_eigendecomposition, "_PIECE_ENTRIES", 256)
  grad = np.random.default_rng(8).standard_normal((700, 24)).astype(np.float32)
  grad[5, 3] = np.nan

  update = first_update(grad, **EXACT)

  assert np.all(np.isnan(update))


# --- A 10**6 x 64 leaf ----------------------------------------------------------

LARGE = (10**6, 64)


@pytest.mark.parametrize(
    "hyperparameters, rows, columns, count",
    [
        # Rows are the last axis: 32 of 64 sampled rows, each of 10**6 entries.
        ({}, 64, 10**6, 32),
        # Rows are the first axis, as for an embedding table: 256 of 10**6.
        # Oversampling 64 makes the 256 x 64 block take the exact path.
        (dict(dimension_numbers=SimbaDimensionNumbers(row_axis=0), coarse_rows=256,
              oversampling=64),
         10**6, 64, 256),
    ],
    ids=["rows_last", "rows_first"],
)
def test_large_leaf_memory(hyperparameters, rows, columns, count):
  # The compiled update needs at most the leaf's size in temporary memory,
  # beyond its arguments and results.
  transformation = simba_optax.simba(**hyperparameters)
  leaf = jax.ShapeDtypeStruct(LARGE, jnp.float32)
  state = jax.eval_shape(transformation.init, leaf)
  compiled = jax.jit(transformation.update).lower(leaf, state).compile()

  temporary = compiled.memory_analysis().temp_size_in_bytes
  assert temporary <= np.prod(LARGE) * 4

  grad = jax.random.normal(jax.random.key(6), LARGE, jnp.float32)
  update, _ = compiled(grad, transformation.init(grad))

  row_axis = hyperparameters.get("dimension_numbers", SimbaDimensionNumbers()).row_axis
  update_matrix = matrix_view(np.asarray(update), row_axis=row_axis)
  assert update_matrix.shape == (rows, columns)
  grad_matrix = matrix_view(np.asarray(grad), row_axis=row_axis)
  assert_matrix_matches(grad_matrix, update_matrix, count=count, rank=20)


@pytest.mark.parametrize("size", [256, 1024, 2048])
def test_square_leaf_memory(size):
  # The randomized path writes the direction over the sampled block a
  # quarter at a time, so the update of an N x N leaf needs at most the
  # leaf's size in temporary memory: the block is half of it.
  transformation = simba_optax.simba()
  leaf = jax.ShapeDtypeStruct((size, size), jnp.float32)
  state = jax.eval_shape(transformation.init, leaf)
  compiled = jax.jit(transformation.update).lower(leaf, state).compile()

  assert compiled.memory_analysis().temp_size_in_bytes <= size * size * 4


def test_tall_leaf_half_rows_memory():
  # Half of 10**6 rows of 64 columns take the piecewise exact path. Its QR
  # reads the block a piece at a time, without a column-major copy of it.
  transformation = simba_optax.simba(
      dimension_numbers=SimbaDimensionNumbers(row_axis=0)
  )
  leaf = jax.ShapeDtypeStruct(LARGE, jnp.float32)
  state = jax.eval_shape(transformation.init, leaf)
  compiled = jax.jit(transformation.update).lower(leaf, state).compile()

  assert compiled.memory_analysis().temp_size_in_bytes <= np.prod(LARGE) * 4


def test_empty_leaves_pass_through():
  # Leaves without entries have no rows to sample: their update is the
  # empty gradient, and the other leaves are unaffected.
  params = {
      "rows_empty": jnp.zeros((0, 4)),
      "columns_empty": jnp.zeros((4, 0)),
      "vector_empty": jnp.zeros((0,)),
      "kernel": jnp.zeros((6, 5)),
  }
  grads = dict(params, kernel=jnp.asarray(np.random.default_rng(8).normal(size=(6, 5)), jnp.float32))
  transformation = simba_optax.simba(coarse_fraction=1.0)

  updates, state = jax.jit(transformation.update)(grads, transformation.init(params))

  for name in ("rows_empty", "columns_empty", "vector_empty"):
    assert updates[name].shape == params[name].shape
    assert state.mu[name].shape == params[name].shape
  expected = simba_direction(matrix_view(np.asarray(grads["kernel"], np.float64)), 20, 1e-8)
  assert relative_error(matrix_view(np.asarray(updates["kernel"])), expected) <= RELATIVE_TOLERANCE
