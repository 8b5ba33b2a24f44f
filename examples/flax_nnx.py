"""Train a small MLP with Simba in Flax: ``nnx.Optimizer``, then linen's ``TrainState``.

Both halves fit the same regression problem from the same data. Simba is an
``optax.GradientTransformationExtraArgs``, so ``nnx.Optimizer.update`` may pass
extra keyword arguments, such as the loss, through to it.

Run from the repository root::

    python examples/flax_nnx.py
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/flax_nnx.py`: put the repository root on the path
    # so that an uninstalled `simba_optax` can be imported.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import simba_optax

STEPS = 100
LEARNING_RATE = 0.02
FEATURES, HIDDEN, OUTPUTS = 8, 64, 2


def make_data():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((256, FEATURES)).astype(np.float32)
    targets = np.sin(inputs @ rng.standard_normal((FEATURES, OUTPUTS))).astype(np.float32)
    return jnp.asarray(inputs), jnp.asarray(targets)


def make_optimizer() -> optax.GradientTransformation:
    # The learning rate decays because Simba's direction has singular values
    # of at most one, whatever the gradient's size.
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, STEPS, alpha=0.05)
    return optax.chain(
        simba_optax.simba(coarse_fraction=0.5, rank=16, seed=0),
        optax.scale_by_learning_rate(schedule),
    )


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUTPUTS, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def train_nnx(inputs, targets) -> list[float]:
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(inputs) - targets) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, value=loss)
        return loss

    return [float(step(model, optimizer)) for _ in range(STEPS)]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(HIDDEN)(x))
        return nn.Dense(OUTPUTS)(x)


def train_linen(inputs, targets) -> list[float]:
    model = LinenMLP()
    variables = model.init(jax.random.key(0), inputs[:1])
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=make_optimizer()
    )

    @jax.jit
    def step(state):
        def loss_fn(params):
            predictions = state.apply_fn({"params": params}, inputs)
            return jnp.mean((predictions - targets) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(STEPS):
        state, loss = step(state)
        losses.append(float(loss))
    return losses


def main() -> None:
    inputs, targets = make_data()
    for name, train in (("nnx.Optimizer", train_nnx), ("linen TrainState", train_linen)):
        losses = train(inputs, targets)
        print(f"{name:17s} loss: step 1 {losses[0]:.4f}, step {STEPS} {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
