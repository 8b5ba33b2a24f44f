"""Ten thousand compiled Simba steps on a small autoencoder of scikit-learn's digits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import simba_optax

LAYER_SIZES = (64, 32, 16, 32, 64)
STEPS = 10_000
CHUNK = 1_000
BATCH = 128


def init_params(key):
  params = {}
  for index, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
    key, subkey = jax.random.split(key)
    params[f"dense_{index}"] = {
        "kernel": jax.random.normal(subkey, (fan_in, fan_out)) / np.sqrt(fan_in),
        "bias": jnp.zeros((fan_out,)),
    }
  return params


def reconstruct(params, images):
  hidden = images
  layers = len(params)
  for index in range(layers):
    layer = params[f"dense_{index}"]
    hidden = hidden @ layer["kernel"] + layer["bias"]
    hidden = jax.nn.sigmoid(hidden) if index == layers - 1 else jnp.tanh(hidden)
  return hidden


def reconstruction_loss(params, images):
  return jnp.mean((reconstruct(params, images) - images) ** 2)


def test_ten_thousand_steps_stay_finite():
  images = jnp.asarray(load_digits().data / 16.0, jnp.float32)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=0.02, warmup_steps=200, decay_steps=STEPS,
      end_value=1e-3,
  )
  transformation = optax.chain(
      simba_optax.simba(), optax.scale_by_learning_rate(schedule)
  )
  params = init_params(jax.random.key(0))
  state = transformation.init(params)

  def train_step(carry, step):
    params, state = carry
    batch = jax.random.choice(
        jax.random.fold_in(jax.random.key(1), step), images.shape[0], (BATCH,)
    )
    loss, grads = jax.value_and_grad(reconstruction_loss)(params, images[batch])
    updates, state = transformation.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_chunk(params, state, first_step):
    steps = first_step + jnp.arange(CHUNK)
    (params, state), losses = jax.lax.scan(train_step, (params, state), steps)
    return params, state, losses

  first_loss = float(reconstruction_loss(params, images))
  full_losses = []
  for first_step in range(0, STEPS, CHUNK):
    params, state, losses = train_chunk(params, state, first_step)

    assert np.all(np.isfinite(np.asarray(losses))), f"steps from {first_step}"
    for leaf in jax.tree.leaves((params, state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert np.all(np.isfinite(np.asarray(leaf))), f"steps from {first_step}"
    full_losses.append(float(reconstruction_loss(params, images)))

  simba_state = state[0]
  assert int(simba_state.count) == STEPS
  # The loss after step 1,000 is well below the initial one, and the final
  # loss is no worse than it.
  assert full_losses[0] < 0.5 * first_loss
  assert full_losses[-1] <= full_losses[0]
