"""Simba's state through an Orbax checkpoint: a resumed run repeats an unbroken one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import simba_optax

TOTAL_STEPS = 6
SAVED_AT = 3


def make_optimizer(seed=0):
  return optax.chain(
      simba_optax.simba(coarse_fraction=0.5, rank=4, seed=seed),
      optax.scale(-0.05),
  )


def initial_params():
  rng = np.random.default_rng(2)
  return {
      "kernel": jnp.asarray(rng.standard_normal((6, 16)), jnp.float32),
      "bias": jnp.zeros((16,), jnp.float32),
  }


def batch(step):
  rng = np.random.default_rng(100 + step)
  return (
      jnp.asarray(rng.standard_normal((10, 6)), jnp.float32),
      jnp.asarray(rng.standard_normal((10, 16)), jnp.float32),
  )


def make_step(tx):
  @jax.jit
  def step(train_state, inputs, targets):
    def loss_fn(params):
      return jnp.mean((inputs @ params["kernel"] + params["bias"] - targets) ** 2)

    params, opt_state = train_state["params"], train_state["opt_state"]
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    return new_state, updates

  return step


def train(step, train_state, first, last):
  """Runs steps first..last-1 and returns the state and each step's updates."""
  updates = []
  for i in range(first, last):
    train_state, step_updates = step(train_state, *batch(i))
    updates.append(step_updates)
  return train_state, updates


def sampled_rows(update):
  """Returns the rows that moved: the last axis of the kernel, by default."""
  return np.flatnonzero(np.any(np.asarray(update["kernel"]) != 0, axis=0))


def save_and_restore(train_state, directory, target_tx):
  """Saves ``train_state``, then restores it into an abstract target."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, train_state)
  checkpointer.wait_until_finished()

  def fresh_state():
    params = initial_params()
    return {"params": params, "opt_state": target_tx.init(params)}

  target = jax.eval_shape(fresh_state)
  restored = checkpointer.restore(directory, target)
  checkpointer.close()
  return restored


def assert_trees_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@functools.cache
def unbroken_run():
  """Returns the optimizer, its compiled step, the start, and TOTAL_STEPS results."""
  tx = make_optimizer()
  step = make_step(tx)
  params = initial_params()
  start = {"params": params, "opt_state": tx.init(params)}
  final, updates = train(step, start, 0, TOTAL_STEPS)
  return step, start, final, updates


def test_orbax_resume_bit_identical(tmp_path):
  step, start, expected, expected_updates = unbroken_run()
  halfway, _ = train(step, start, 0, SAVED_AT)

  restored = save_and_restore(halfway, tmp_path / "checkpoint", make_optimizer())
  assert isinstance(restored["opt_state"][0], simba_optax.SimbaState)
  assert int(restored["opt_state"][0].count) == SAVED_AT
  assert_trees_identical(restored, halfway)

  resumed, resumed_updates = train(step, restored, SAVED_AT, TOTAL_STEPS)
  assert_trees_identical(resumed, expected)
  for offset, update in enumerate(resumed_updates):
    np.testing.assert_array_equal(
        sampled_rows(update), sampled_rows(expected_updates[SAVED_AT + offset])
    )


def test_restored_key_overrides_seed(tmp_path):
  # The key is part of the state, so a run resumed with another seed keeps
  # drawing the rows of the run that saved it.
  step, start, expected, _ = unbroken_run()
  halfway, _ = train(step, start, 0, SAVED_AT)

  other_seed = make_optimizer(seed=99)
  restored = save_and_restore(halfway, tmp_path / "checkpoint", other_seed)
  resumed, _ = train(make_step(other_seed), restored, SAVED_AT, TOTAL_STEPS)
  assert_trees_identical(resumed, expected)
