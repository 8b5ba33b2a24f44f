"""Simba in Flax: linen's TrainState and nnx.Optimizer match a plain Optax loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import simba_optax

STEPS = 3
IN_FEATURES, OUT_FEATURES = 3, 4


def initial_params():
  rng = np.random.default_rng(0)
  return {
      "kernel": rng.standard_normal((IN_FEATURES, OUT_FEATURES)).astype(np.float32),
      "bias": np.full((OUT_FEATURES,), 0.1, np.float32),
  }


def make_batch():
  rng = np.random.default_rng(1)
  inputs = rng.standard_normal((8, IN_FEATURES)).astype(np.float32)
  targets = rng.standard_normal((8, OUT_FEATURES)).astype(np.float32)
  return jnp.asarray(inputs), jnp.asarray(targets)


def make_optimizer():
  return optax.chain(
      simba_optax.simba(coarse_fraction=0.5, seed=11), optax.scale(-0.1)
  )


def dense_loss(params, inputs, targets):
  predictions = inputs @ params["kernel"] + params["bias"]
  return jnp.mean((predictions - targets) ** 2)


@functools.cache
def optax_reference():
  """Returns the parameters and Simba state after STEPS plain Optax steps."""
  tx = make_optimizer()
  params = jax.tree.map(jnp.asarray, initial_params())
  state = tx.init(params)
  inputs, targets = make_batch()

  @jax.jit
  def step(params, state):
    grads = jax.grad(dense_loss)(params, inputs, targets)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state)
  return params, state[0]


def test_linen_train_state_matches_optax():
  model = nn.Dense(OUT_FEATURES)
  inputs, targets = make_batch()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=initial_params(), tx=make_optimizer()
  )

  @jax.jit
  def step(state):
    def loss_fn(params):
      predictions = state.apply_fn({"params": params}, inputs)
      return jnp.mean((predictions - targets) ** 2)

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  for _ in range(STEPS):
    state = step(state)

  expected_params, expected_simba = optax_reference()
  assert int(state.step) == STEPS
  assert isinstance(state.opt_state[0], simba_optax.SimbaState)
  assert int(state.opt_state[0].count) == STEPS
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        state.params[name], expected_params[name], rtol=1e-6, atol=1e-7,
        err_msg=name,
    )
    np.testing.assert_allclose(
        state.opt_state[0].mu[name], expected_simba.mu[name], rtol=1e-6,
        err_msg=name,
    )


def test_nnx_optimizer_matches_optax():
  params = initial_params()
  model = nnx.Linear(
      IN_FEATURES, OUT_FEATURES,
      kernel_init=lambda key, shape, dtype: jnp.asarray(params["kernel"], dtype),
      bias_init=lambda key, shape, dtype: jnp.asarray(params["bias"], dtype),
      rngs=nnx.Rngs(0),
  )
  optimizer = nnx.Optimizer(model, make_optimizer(), wrt=nnx.Param)
  inputs, targets = make_batch()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(inputs) - targets) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    # nnx passes extra keyword arguments on to the transformation's update.
    optimizer.update(model, grads, value=loss)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(STEPS)]

  expected_params, expected_simba = optax_reference()
  found = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == STEPS
  simba_state = optimizer.opt_state[0]
  assert int(simba_state.count[...]) == STEPS
  np.testing.assert_array_equal(simba_state.key[...], expected_simba.key)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        found[name], expected_params[name], rtol=1e-6, atol=1e-7, err_msg=name
    )
    np.testing.assert_allclose(
        simba_state.mu[name][...], expected_simba.mu[name], rtol=1e-6,
        err_msg=name,
    )
