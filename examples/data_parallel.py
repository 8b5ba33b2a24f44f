"""Data-parallel training with Simba and ``jax.pmap`` on four host CPU devices.

Each replica computes gradients on its own slice of the batch, ``lax.pmean``
averages them, and every replica applies the same Simba update. The Simba
state (step count, key and momentum) is replicated, so every replica samples
the same rows and the replicas stay bit-identical. The script checks that
after every step and prints the loss.

Run from the repository root::

    python examples/data_parallel.py

The four devices are host CPU devices (``jax_num_cpu_devices``), so the script
runs on any machine. On GPUs or TPUs, drop that line and use the accelerators.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/data_parallel.py`: put the repository root on the
    # path so that an uninstalled `simba_optax` can be imported.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

# Must run before JAX starts its CPU backend.
jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax import lax  # pylint: disable=wrong-import-position

import simba_optax  # pylint: disable=wrong-import-position

REPLICAS = 4
STEPS = 20
PER_REPLICA_BATCH = 16


def make_problem():
    """Returns initial MLP parameters and a regression data set."""
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((REPLICAS * PER_REPLICA_BATCH, 8)).astype(np.float32)
    targets = np.sin(inputs @ rng.standard_normal((8, 4))).astype(np.float32)
    params = {
        "hidden": {
            "kernel": (rng.standard_normal((8, 32)) / np.sqrt(8)).astype(np.float32),
            "bias": np.zeros((32,), np.float32),
        },
        "out": {
            "kernel": (rng.standard_normal((32, 4)) / np.sqrt(32)).astype(np.float32),
            "bias": np.zeros((4,), np.float32),
        },
    }
    return params, inputs, targets


def loss_fn(params, inputs, targets):
    hidden = jnp.tanh(inputs @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    predictions = hidden @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((predictions - targets) ** 2)


def main() -> None:
    devices = jax.devices()[:REPLICAS]
    tx = optax.chain(
        simba_optax.simba(coarse_fraction=0.5, rank=8, seed=0),
        optax.scale(-0.05),
    )
    params, inputs, targets = make_problem()

    def step(params, state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        # The replicas must apply one gradient, so that their states agree.
        grads = lax.pmean(grads, axis_name="batch")
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, lax.pmean(loss, "batch")

    parallel_step = jax.pmap(step, axis_name="batch", devices=devices)

    def replicate(tree):
        return jax.tree.map(lambda x: np.stack([x] * REPLICAS), tree)

    # One state for all replicas: the same key and count everywhere.
    replicated_params = replicate(params)
    replicated_state = replicate(tx.init(params))
    shards = (
        inputs.reshape(REPLICAS, PER_REPLICA_BATCH, -1),
        targets.reshape(REPLICAS, PER_REPLICA_BATCH, -1),
    )

    for i in range(STEPS):
        replicated_params, replicated_state, loss = parallel_step(
            replicated_params, replicated_state, *shards
        )
        for leaf in jax.tree.leaves((replicated_params, replicated_state)):
            host = np.asarray(leaf)
            if not all(np.array_equal(host[r], host[0]) for r in range(REPLICAS)):
                sys.exit(f"data_parallel: replicas differ after step {i + 1}.")
        if i % 5 == 4 or i == 0:
            print(f"step {i + 1:3d}  loss {float(loss[0]):.4f}")
    print(f"{REPLICAS} replicas stayed bit-identical for {STEPS} steps.")


if __name__ == "__main__":
    main()
