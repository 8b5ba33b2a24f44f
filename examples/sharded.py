"""Train an MLP with Simba on parameters sharded over eight host CPU devices.

The devices form a ``(data=2, model=4)`` mesh with explicit axes (JAX 0.10's
``jax.sharding.AxisType.Explicit``): the batch is split over ``data`` and the
weight matrices over ``model``, Megatron-style. Simba's momentum takes each
parameter's sharding, and its step count and key are replicated. The sampled
rows are gathered across devices, but no whole parameter is. The script
prints the shardings, then the loss.

Run from the repository root::

    python examples/sharded.py

With ``AxisType.Auto`` axes the same code runs, but jit picks shardings for
values the program creates, so pass ``out_shardings`` built from
``simba_optax.partition_specs`` to keep the state sharded (see the README).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/sharded.py`: put the repository root on the path
    # so that an uninstalled `simba_optax` can be imported.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

# Must run before JAX starts its CPU backend.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import AxisType  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import simba_optax  # pylint: disable=wrong-import-position

STEPS = 10
BATCH, FEATURES, HIDDEN, OUTPUTS = 64, 32, 256, 8

PARAM_SPECS = {
    "hidden": {"kernel": P(None, "model"), "bias": P("model")},
    "out": {"kernel": P("model", None), "bias": P()},
}


def make_problem():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    targets = np.tanh(inputs @ rng.standard_normal((FEATURES, OUTPUTS))).astype(np.float32)
    params = {
        "hidden": {
            "kernel": (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
            "bias": np.zeros((HIDDEN,), np.float32),
        },
        "out": {
            "kernel": (rng.standard_normal((HIDDEN, OUTPUTS)) / np.sqrt(HIDDEN)).astype(np.float32),
            "bias": np.zeros((OUTPUTS,), np.float32),
        },
    }
    return params, inputs, targets


def loss_fn(params, inputs, targets):
    hidden = jnp.tanh(inputs @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    # The contraction runs over the sharded hidden units, so explicit mode
    # requires the sharding of the summed result.
    predictions = jnp.matmul(
        hidden, params["out"]["kernel"], out_sharding=P("data", None)
    ) + params["out"]["bias"]
    return jnp.mean((predictions - targets) ** 2)


def main() -> None:
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit)
    )
    tx = optax.chain(
        simba_optax.simba(coarse_fraction=0.5, rank=8, seed=0),
        optax.scale(-0.05),
    )
    params, inputs, targets = make_problem()

    with jax.set_mesh(mesh):
        is_spec = lambda x: isinstance(x, P)
        params = jax.device_put(
            params,
            jax.tree.map(lambda s: NamedSharding(mesh, s), PARAM_SPECS, is_leaf=is_spec),
        )
        inputs = jax.device_put(inputs, NamedSharding(mesh, P("data", None)))
        targets = jax.device_put(targets, NamedSharding(mesh, P("data", None)))
        # Explicit shardings are part of the types, so init needs no hints.
        state = jax.jit(tx.init)(params)

        simba_state = state[0]
        print(f"key: {simba_state.key.sharding.spec}  count: {simba_state.count.sharding.spec}")
        for path, mu in jax.tree_util.tree_leaves_with_path(simba_state.mu):
            name = jax.tree_util.keystr(path)
            print(f"momentum{name}: {mu.shape} {mu.sharding.spec}")

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        for i in range(STEPS):
            params, state, loss = step(params, state)
            print(f"step {i + 1:3d}  loss {float(loss):.4f}")

        # Simba's state keeps the shardings that partition_specs describes.
        expected = simba_optax.partition_specs(PARAM_SPECS)
        for spec, mu in zip(
            jax.tree.leaves(expected.mu, is_leaf=is_spec), jax.tree.leaves(state[0].mu)
        ):
            if not mu.sharding.is_equivalent_to(NamedSharding(mesh, spec), mu.ndim):
                sys.exit(f"sharded: momentum has sharding {mu.sharding.spec}, expected {spec}.")


if __name__ == "__main__":
    main()
