"""Train a small autoencoder with Simba across two processes on one machine.

Each process owns two CPU devices, and the four devices form a mesh with a
``data`` axis across the processes and a ``model`` axis within each. The batch
is split between the processes, and every weight matrix is sharded over the
``model`` axis. Simba's momentum is sharded like the parameters, and its step
count and key are replicated, so every device samples the same rows.

Run from the repository root::

    python examples/multi_process.py

This starts both processes on 127.0.0.1 with a free port, waits for them,
then repeats the training in this single process and prints the largest
difference. To start the processes yourself, give each the same coordinator
address and its own id::

    python examples/multi_process.py --process-id 0 --coordinator 127.0.0.1:PORT
    python examples/multi_process.py --process-id 1 --coordinator 127.0.0.1:PORT

CPU collectives across processes use Gloo
(``jax_cpu_collectives_implementation="gloo"``, JAX 0.10).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/multi_process.py`: put the repository root on the
    # path so that an uninstalled `simba_optax` can be imported.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import simba_optax

LOCAL_DEVICES = 2
STEPS = 6
LEARNING_RATE = 0.05
BATCH = 64
FEATURES = 16
CODE = 8

# Megatron-style sharding of the two layers over the "model" axis.
PARAM_SPECS = {
    "encoder": {"kernel": P(None, "model"), "bias": P("model")},
    "decoder": {"kernel": P("model", None), "bias": P()},
}
BATCH_SPEC = P("data", None)
PROCESS_TIMEOUT_S = 300


def make_data() -> np.ndarray:
    """Returns ``BATCH`` points near a 3-dimensional manifold in ``FEATURES`` dimensions."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((BATCH, 3))
    mixing = rng.standard_normal((3, FEATURES))
    return np.tanh(latent @ mixing).astype(np.float32)


def init_params() -> dict:
    rng = np.random.default_rng(1)
    return {
        "encoder": {
            "kernel": (rng.standard_normal((FEATURES, CODE)) / np.sqrt(FEATURES)).astype(np.float32),
            "bias": np.zeros((CODE,), np.float32),
        },
        "decoder": {
            "kernel": (rng.standard_normal((CODE, FEATURES)) / np.sqrt(CODE)).astype(np.float32),
            "bias": np.zeros((FEATURES,), np.float32),
        },
    }


def loss_fn(params, batch):
    code = jnp.tanh(batch @ params["encoder"]["kernel"] + params["encoder"]["bias"])
    reconstruction = code @ params["decoder"]["kernel"] + params["decoder"]["bias"]
    return jnp.mean((reconstruction - batch) ** 2)


def make_optimizer() -> optax.GradientTransformation:
    return optax.chain(
        simba_optax.simba(coarse_fraction=0.5, rank=4, seed=0),
        optax.scale(-LEARNING_RATE),
    )


def to_host(tree):
    """Copies a tree to NumPy, gathering arrays that span several processes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def train(mesh: Mesh | None, steps: int = STEPS) -> dict:
    """Trains for ``steps`` steps and returns the losses and the final parameters.

    With ``mesh=None`` everything runs on the default device. With a mesh, the
    parameters, the Simba state and the batch are sharded as described above.
    """
    tx = make_optimizer()
    host_params = init_params()
    data = make_data()

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    if mesh is None:
        params = jax.tree.map(jnp.asarray, host_params)
        state = tx.init(params)
        batch = jnp.asarray(data)
        train_step = jax.jit(step)
    else:
        is_spec = lambda x: isinstance(x, P)
        param_shardings = jax.tree.map(
            lambda spec: NamedSharding(mesh, spec), PARAM_SPECS, is_leaf=is_spec
        )
        # partition_specs returns the shardings of Simba's state. optax.scale
        # keeps an empty state.
        state_shardings = (
            jax.tree.map(
                lambda spec: NamedSharding(mesh, spec),
                simba_optax.partition_specs(PARAM_SPECS),
                is_leaf=is_spec,
            ),
            optax.EmptyState(),
        )
        params = jax.tree.map(
            lambda x, sharding: jax.make_array_from_callback(
                x.shape, sharding, lambda index: x[index]
            ),
            host_params, param_shardings,
        )
        state = jax.jit(tx.init, out_shardings=state_shardings)(params)

        # Each process supplies its own half of the batch.
        rows_per_process = BATCH // jax.process_count()
        first = jax.process_index() * rows_per_process
        batch = jax.make_array_from_process_local_data(
            NamedSharding(mesh, BATCH_SPEC), data[first:first + rows_per_process],
            data.shape,
        )
        train_step = jax.jit(
            step,
            out_shardings=(param_shardings, state_shardings, NamedSharding(mesh, P())),
        )

    losses = []
    for _ in range(steps):
        params, state, loss = train_step(params, state, batch)
        # The loss is replicated, so every process has a full copy.
        losses.append(float(loss.addressable_data(0)))

    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(to_host(params)):
        flat["/".join(key.key for key in path)] = np.asarray(leaf)
    return {"losses": np.asarray(losses, np.float32), "params": flat}


def run_process(args: argparse.Namespace) -> None:
    """Joins the coordinator as one process of the job and trains."""
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=PROCESS_TIMEOUT_S,
    )
    # Rows of the device grid are processes, so "data" spans the processes.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices).reshape(args.num_processes, LOCAL_DEVICES)
    mesh = Mesh(grid, ("data", "model"))

    result = train(mesh)
    if jax.process_index() == 0:
        losses = ", ".join(f"{loss:.4f}" for loss in result["losses"])
        print(f"process 0 of {jax.process_count()}: losses {losses}")
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        arrays = {f"params/{name}": value for name, value in result["params"].items()}
        np.savez(output / "multi_process.npz", losses=result["losses"], **arrays)
    jax.distributed.shutdown()


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: argparse.Namespace) -> None:
    """Starts two processes of this script, then compares with one process."""
    output = Path(args.output or tempfile.mkdtemp(prefix="simba-multi-process-"))
    coordinator = f"127.0.0.1:{free_local_port()}"
    processes = [
        subprocess.Popen([
            sys.executable, __file__, "--process-id", str(i),
            "--num-processes", "2", "--coordinator", coordinator,
            "--output", str(output),
        ])
        for i in range(2)
    ]
    try:
        for process in processes:
            process.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        sys.exit(f"multi_process: process {failed} failed; see its output above.")

    with np.load(output / "multi_process.npz") as saved:
        distributed = dict(saved)
    single = train(mesh=None)
    difference = max(
        float(np.max(np.abs(distributed[f"params/{name}"] - value)))
        for name, value in single["params"].items()
    )
    losses = ", ".join(f"{loss:.4f}" for loss in single["losses"])
    print(f"one process:  losses {losses}")
    print(f"largest parameter difference, two processes vs one: {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--process-id", type=int,
        help="id of this process, from 0; omit it to start all processes here",
    )
    parser.add_argument(
        "--num-processes", type=int, default=2, help="number of processes in the job"
    )
    parser.add_argument(
        "--coordinator", help="host:port of process 0's coordinator, for example 127.0.0.1:12345"
    )
    parser.add_argument(
        "--output", help="folder for multi_process.npz (default: a new temporary folder)"
    )
    args = parser.parse_args()
    if args.process_id is None:
        launch(args)
        return
    if args.coordinator is None or args.output is None:
        parser.error("--process-id needs --coordinator and --output")
    run_process(args)


if __name__ == "__main__":
    main()
