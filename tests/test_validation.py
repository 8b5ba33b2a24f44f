"""Bad hyperparameters and leaves raise clear errors before any tracing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import simba_optax
from simba_optax import SimbaDimensionNumbers


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(momentum=1.0), r"momentum=1\.0 .*\[0, 1\)"),
        (dict(momentum=-0.1), r"momentum=-0\.1 .*\[0, 1\)"),
        (dict(momentum=float("nan")), r"momentum=nan .*\[0, 1\)"),
        (dict(coarse_fraction=0.0), r"coarse_fraction=0\.0 .*\(0, 1\]"),
        (dict(coarse_fraction=1.5), r"coarse_fraction=1\.5 .*\(0, 1\]"),
        (dict(coarse_rows=0), r"coarse_rows=0 .*>= 1"),
        (dict(rank=0), r"rank=0 .*>= 1"),
        (dict(eps=-1e-8), r"eps=-1e-08 .*\[0,"),
        (dict(eps=float("inf")), r"eps=inf .*\[0,"),
        (dict(oversampling=-1), r"oversampling=-1 .*>= 0"),
        (dict(power_iterations=-2), r"power_iterations=-2 .*>= 0"),
        (dict(seed=2**64), r"seed=18446744073709551616 .*64 bits"),
    ],
)
def test_out_of_range_hyperparameter(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    simba_optax.simba(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(coarse_rows="8"), "coarse_rows"),
        (dict(oversampling=1.0), "oversampling"),
        (dict(momentum="0.9"), "momentum"),
        (dict(eps=[1e-8]), "eps"),
        (dict(seed=1.5), "seed"),
        (dict(seed="0"), "seed"),
        (dict(mu_dtype=jnp.int32), "mu_dtype"),
        (dict(mu_dtype="not_a_dtype"), "mu_dtype='not_a_dtype' is not a dtype"),
        (dict(dimension_numbers=3), "dimension_numbers"),
        (dict(dimension_numbers={"w": (1, 0)}), "dimension_numbers"),
    ],
)
def test_wrong_hyperparameter_type(kwargs, name):
  with pytest.raises(TypeError, match=name):
    simba_optax.simba(**kwargs)


def test_seed_key_array_rejected():
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(ValueError, match="single PRNG key"):
    simba_optax.simba(seed=keys)


def test_valid_edges_accepted():
  simba_optax.simba(momentum=0.0, coarse_fraction=1.0, eps=0.0)
  simba_optax.simba(coarse_rows=1, rank=1, oversampling=0, power_iterations=0)
  simba_optax.simba(momentum=np.float32(0.5), eps=jnp.asarray(1e-6))
  simba_optax.simba(seed=jax.random.PRNGKey(3))
  simba_optax.simba(seed=np.int64(3), mu_dtype=jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64])
def test_non_float_leaf_rejected(dtype):
  params = {"dense": {"kernel": jnp.zeros((3, 4), dtype)}}
  tx = simba_optax.simba()
  with pytest.raises(TypeError, match=re.escape("['dense']['kernel']")):
    tx.init(params)


@pytest.mark.parametrize(
    "dims, pattern",
    [
        (SimbaDimensionNumbers(row_axis=3), r"row_axis=3 .*\[-3, 3\)"),
        (SimbaDimensionNumbers(row_axis=-4), r"row_axis=-4 .*\[-3, 3\)"),
        (SimbaDimensionNumbers(batch_axes=(5,)), r"batch_axes entry=5"),
        (SimbaDimensionNumbers(row_axis=0, batch_axes=(0,)), r"also in"),
        (SimbaDimensionNumbers(batch_axes=(0, -3)), r"repeats an axis"),
    ],
)
def test_bad_axes_for_leaf(dims, pattern):
  params = {"stack": jnp.zeros((2, 3, 4))}
  tx = simba_optax.simba(dimension_numbers=dims)
  with pytest.raises(ValueError, match=pattern) as info:
    tx.init(params)
  assert "['stack']" in str(info.value)


def test_scalar_with_batch_axes_rejected():
  tx = simba_optax.simba(dimension_numbers=SimbaDimensionNumbers(batch_axes=(0,)))
  with pytest.raises(ValueError, match="scalar"):
    tx.init({"scale": jnp.zeros(())})


def test_dimension_tree_mismatch():
  params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}
  tx = simba_optax.simba(dimension_numbers={"a": SimbaDimensionNumbers()})
  with pytest.raises(ValueError, match="does not match the parameters") as info:
    tx.init(params)

  assert "missing leaves [\"['b']\"]" in str(info.value)


def test_dimension_tree_extra_leaf_named():
  params = {"a": jnp.zeros((3, 4))}
  tx = simba_optax.simba(dimension_numbers={"a": None, "x": SimbaDimensionNumbers()})
  with pytest.raises(ValueError, match="does not match the parameters") as info:
    tx.init(params)

  assert "unexpected leaves [\"['x']\"]" in str(info.value)


def test_dimension_callable_checked_at_init():
  tx = simba_optax.simba(
      dimension_numbers=lambda p: jax.tree.map(
          lambda _: SimbaDimensionNumbers(row_axis=7), p
      )
  )
  with pytest.raises(ValueError, match="row_axis=7"):
    tx.init({"w": jnp.zeros((3, 4))})


def test_traced_rank_names_static_args():
  def build(rank):
    return simba_optax.simba(rank=rank)

  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda r: build(r).init(jnp.zeros(3)))(4)


def test_gradient_tree_mismatch():
  tx = simba_optax.simba()
  state = tx.init({"w": jnp.zeros((3, 4))})
  with pytest.raises(ValueError, match="does not match the tree of the state"):
    tx.update({"v": jnp.zeros((3, 4))}, state)


def test_gradient_shape_mismatch():
  tx = simba_optax.simba()
  state = tx.init({"w": jnp.zeros((3, 4))})
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(4, 3\)"):
    tx.update({"w": jnp.zeros((4, 3))}, state)


def test_integer_gradient_rejected():
  tx = simba_optax.simba()
  state = tx.init({"w": jnp.zeros((3, 4))})
  with pytest.raises(TypeError, match=r"\['w'\] has dtype int32"):
    tx.update({"w": jnp.zeros((3, 4), jnp.int32)}, state)


def test_inject_hyperparams_static_shape_args():
  tx = optax.inject_hyperparams(
      simba_optax.simba,
      static_args=("coarse_fraction", "coarse_rows", "rank", "oversampling",
                   "power_iterations", "seed", "mu_dtype", "dimension_numbers"),
  )(momentum=0.5, eps=1e-6, rank=2)
  params = {"w": jnp.ones((5, 4))}
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(params, state)
  assert jnp.all(jnp.isfinite(updates["w"]))
