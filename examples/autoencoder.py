"""Train a deep sigmoid autoencoder with Simba, Adam and SGD side by side.

The network follows Hinton & Salakhutdinov (2006, "Reducing the dimensionality of
data with neural networks", Science 313): sigmoid hidden layers, a linear code layer,
a mirrored decoder and a sigmoid output. The loss is the mean squared error over
pixels. Deep sigmoid stacks like this one have flat regions and vanishing gradients,
which is where Simba's preconditioner is meant to help.

By default the script trains on the 8x8 digits bundled with scikit-learn, so it needs
no download. ``--mnist PATH`` trains the 784-1000-500-250-30 network on a local copy
of MNIST instead (see ``examples/datasets.py`` for the accepted layouts).

Every optimizer starts from the same initial parameters and gets the same batches in
the same order. The script prints a Markdown table and writes ``results.md``,
``results.json`` and ``loss_curves.png`` to ``--out``.

Run from the repository root::

    python examples/autoencoder.py
    python examples/autoencoder.py --optimizers simba adam sgd --steps 5000
    python examples/autoencoder.py --mnist PATH/TO/mnist --steps 2000 --eval-every 250
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/autoencoder.py`: put the repository root on the path so
    # that `examples.datasets` and an uninstalled `simba_optax` can be imported.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    # jaxlib runs QR and SVD on CPU through OpenBLAS, whose default thread pool
    # competes with XLA's threads. A QR of a 500 x 30 block then took 415 ms
    # instead of 0.3 ms (OpenBLAS 0.3.30, 2-core x86_64 with other processes
    # running), and a Simba step on the MNIST network became about 100 times
    # slower. The variable must be set before NumPy loads. Set it yourself to
    # override this default.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from examples import arguments
from examples import datasets

# Encoder widths after the input. The decoder mirrors them.
# The digits network keeps the depth of the MNIST one (four encoder layers, eight
# weight layers in all) because the deep sigmoid stack is what makes the problem hard.
# Its first layer widens the input, as 784 -> 1000 does, and the widths then halve.
# The 16-unit code is a quarter of the input. A code with MNIST's share of 30/784
# would have 2 or 3 units, and the loss would then mostly measure that bottleneck
# rather than the optimizer.
DIGITS_ENCODER_SIZES = (256, 128, 64, 16)
MNIST_ENCODER_SIZES = (1000, 500, 250, 30)  # Hinton & Salakhutdinov (2006)

OPTIMIZER_NAMES = ("simba", "adam", "sgd")
SGD_MOMENTUM = 0.9

# Learning rates with the lowest final train MSE in a grid over
# {1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1} on the digits defaults, mean of
# seeds 0, 1 and 2. examples/LR_GRID.md has the grid, the command and the machine.
DIGITS_LEARNING_RATES = {"simba": 5e-2, "adam": 5e-3, "sgd": 1e-1}
# Simba's and Adam's are the values that Tsipinakis & Parpas (2023) report for this
# network. Adam's digits value 5e-3 left it on the plateau for 2000 MNIST steps (see
# examples/LR_GRID.md). SGD was not tuned on MNIST and keeps its digits value.
MNIST_LEARNING_RATES = {"simba": 5e-2, "adam": 1e-3, "sgd": 1e-1}
DEFAULT_STEPS = 3000
DEFAULT_EVAL_EVERY = 100
EVAL_BATCH_SIZE = 2048


class Autoencoder(nn.Module):
    """Mirrored dense autoencoder with sigmoid hidden units and a linear code layer.

    ``encoder_sizes`` lists the widths after the input, the last one being the code.
    The output has ``input_size`` sigmoid units, so reconstructions lie in (0, 1).
    """

    input_size: int
    encoder_sizes: Sequence[int]

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        hidden = images
        *encoder_hidden, code_size = self.encoder_sizes
        for index, width in enumerate(encoder_hidden):
            hidden = nn.sigmoid(nn.Dense(width, name=f"encoder_{index}")(hidden))
        code = nn.Dense(code_size, name="code")(hidden)

        hidden = code
        for index, width in enumerate(reversed(encoder_hidden)):
            hidden = nn.sigmoid(nn.Dense(width, name=f"decoder_{index}")(hidden))
        return nn.sigmoid(nn.Dense(self.input_size, name="output")(hidden))


def build_model(input_size: int, encoder_sizes: Sequence[int]) -> Autoencoder:
    """Build the autoencoder for ``input_size`` pixels and the given encoder widths."""
    if input_size < 1:
        raise ValueError(f"input_size must be at least 1, got {input_size}.")
    if not encoder_sizes or any(width < 1 for width in encoder_sizes):
        raise ValueError(
            f"encoder_sizes must be a non-empty list of positive widths, got {list(encoder_sizes)}."
        )
    return Autoencoder(input_size=input_size, encoder_sizes=tuple(encoder_sizes))


def load_data(
    mnist_path: Path | None, seed: int
) -> tuple[str, datasets.ImageDataset, tuple[int, ...]]:
    """Load MNIST from ``mnist_path``, or the digits split by ``seed`` when it is None.

    Returns the data set's name, the data and the default encoder widths for it.
    """
    if mnist_path is None:
        return "digits", datasets.load_digits_split(seed=seed), DIGITS_ENCODER_SIZES
    return "mnist", datasets.load_mnist(mnist_path), MNIST_ENCODER_SIZES


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    coarse_fraction: float = 0.5,
    rank: int = 20,
    eps: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Create the named optimizer as an Optax transformation that includes the step size.

    ``coarse_fraction``, ``rank``, ``eps`` and ``seed`` are used by Simba only. SGD uses
    heavy-ball momentum 0.9.
    """
    if name == "simba":
        try:
            import simba_optax
        except ImportError as error:
            raise ImportError(
                "The simba optimizer needs the simba_optax package. Install it with "
                "`pip install -e .` from the repository root, or run this script from there."
            ) from error
        return optax.chain(
            simba_optax.simba(
                coarse_fraction=coarse_fraction, rank=rank, eps=eps, seed=seed
            ),
            optax.scale_by_learning_rate(learning_rate),
        )
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=SGD_MOMENTUM)
    raise ValueError(
        f"Unknown optimizer {name!r}. Expected one of: {', '.join(OPTIMIZER_NAMES)}."
    )


def reconstruction_mse(apply_fn, params, images: jax.Array) -> jax.Array:
    """Return the mean squared reconstruction error over all pixels of ``images``."""
    reconstructions = apply_fn({"params": params}, images)
    return jnp.mean(jnp.square(reconstructions - images))


@jax.jit
def _train_chunk(
    state: TrainState, images: jax.Array, batch_indices: jax.Array
) -> tuple[TrainState, jax.Array]:
    """Run one optimizer step per row of ``batch_indices`` and return the batch losses."""

    def step(state, indices):
        batch = images[indices]
        loss, grads = jax.value_and_grad(reconstruction_mse, argnums=1)(
            state.apply_fn, state.params, batch
        )
        return state.apply_gradients(grads=grads), loss

    return jax.lax.scan(step, state, batch_indices)


@jax.jit
def _sum_squared_error(state: TrainState, images: jax.Array) -> jax.Array:
    reconstructions = state.apply_fn({"params": state.params}, images)
    return jnp.sum(jnp.square(reconstructions - images))


def evaluate_mse(state: TrainState, images: jax.Array) -> float:
    """Return the MSE over all of ``images``, evaluated in batches to bound memory."""
    total = 0.0
    for start in range(0, images.shape[0], EVAL_BATCH_SIZE):
        total += float(_sum_squared_error(state, images[start : start + EVAL_BATCH_SIZE]))
    return total / images.size


@dataclasses.dataclass
class TrainingRecord:
    """Losses and timings of one training run.

    ``wall_time_s`` covers the optimizer steps only: compilation and the evaluations
    are timed apart in ``compile_time_s`` and ``eval_time_s``.
    """

    steps: int
    eval_steps: list[int]
    train_mse: list[float]
    test_mse: list[float]
    wall_time_s: float
    compile_time_s: float
    eval_time_s: float


def train(
    state: TrainState,
    train_images: np.ndarray,
    test_images: np.ndarray,
    batch_indices: np.ndarray,
    eval_every: int,
    *,
    description: str = "train",
    progress: bool = True,
) -> tuple[TrainState, TrainingRecord]:
    """Take one step per row of ``batch_indices`` and record the train and test MSE.

    The MSE over the whole train and test sets is recorded before the first step,
    every ``eval_every`` steps, and after the last step. Steps between evaluations run
    inside one compiled ``lax.scan``.
    """
    steps = len(batch_indices)
    if eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}.")
    train_images = jnp.asarray(train_images)
    test_images = jnp.asarray(test_images)

    record = TrainingRecord(
        steps=steps, eval_steps=[], train_mse=[], test_mse=[],
        wall_time_s=0.0, compile_time_s=0.0, eval_time_s=0.0,
    )

    def record_losses(step: int) -> None:
        start = time.perf_counter()
        record.eval_steps.append(step)
        record.train_mse.append(evaluate_mse(state, train_images))
        record.test_mse.append(evaluate_mse(state, test_images))
        record.eval_time_s += time.perf_counter() - start

    record_losses(0)
    # Ahead-of-time compilation keeps the compile time out of the step timings. At
    # most two chunk lengths occur: eval_every and the remainder at the end.
    compiled_chunks = {}
    with tqdm(total=steps, desc=description, disable=not progress, leave=True) as bar:
        for chunk_start in range(0, steps, eval_every):
            chunk = jnp.asarray(batch_indices[chunk_start : chunk_start + eval_every])
            if len(chunk) not in compiled_chunks:
                start = time.perf_counter()
                compiled_chunks[len(chunk)] = _train_chunk.lower(
                    state, train_images, chunk
                ).compile()
                record.compile_time_s += time.perf_counter() - start

            start = time.perf_counter()
            state, _ = compiled_chunks[len(chunk)](state, train_images, chunk)
            jax.block_until_ready(state)
            record.wall_time_s += time.perf_counter() - start

            record_losses(chunk_start + len(chunk))
            bar.update(len(chunk))
            bar.set_postfix(train_mse=f"{record.train_mse[-1]:.5f}")
    return state, record


def format_results_table(
    records: dict[str, TrainingRecord], learning_rates: dict[str, float]
) -> str:
    """Format the final losses and timings as a Markdown table."""
    lines = [
        "| optimizer | learning rate | final train MSE | final test MSE | wall time (s) | compile (s) | steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, record in records.items():
        lines.append(
            f"| {name} | {learning_rates[name]:g} | {record.train_mse[-1]:.5f} | "
            f"{record.test_mse[-1]:.5f} | {record.wall_time_s:.1f} | "
            f"{record.compile_time_s:.1f} | {record.steps} |"
        )
    return "\n".join(lines)


def plot_loss_curves(records: dict[str, TrainingRecord], path: Path, title: str) -> None:
    """Save train (solid) and test (dashed) MSE against step, log-scale y, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, record) in enumerate(records.items()):
        color = f"C{index}"
        axes.plot(record.eval_steps, record.train_mse, color=color, label=f"{name} train")
        axes.plot(
            record.eval_steps, record.test_mse, color=color, linestyle="--",
            label=f"{name} test",
        )
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("reconstruction MSE")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def write_outputs(
    out: Path,
    table: str,
    results: dict[str, object],
    records: dict[str, TrainingRecord],
    title: str,
) -> None:
    """Write results.md, results.json and loss_curves.png into ``out``, creating it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_loss_curves(records, out / "loss_curves.png", title=title)


def describe_environment() -> dict[str, object]:
    """Return package versions and a description of the machine for results.json."""
    try:
        import simba_optax

        simba_version = getattr(simba_optax, "__version__", "unknown")
    except ImportError:
        simba_version = None
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "simba_optax": simba_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Train a deep sigmoid autoencoder (Hinton & Salakhutdinov 2006) with several "
            "optimizers from the same start and compare the reconstruction MSE."
        )
    )

    data = parser.add_argument_group("data and network")
    data.add_argument(
        "--mnist", type=Path, default=None, metavar="PATH",
        help="train the 784-1000-500-250-30 network on MNIST read from PATH (a folder "
        "of IDX files or an mnist.npz) instead of the scikit-learn digits",
    )
    data.add_argument(
        "--encoder-sizes", nargs="+", type=arguments.positive_int, default=None, metavar="WIDTH",
        help="widths of the encoder layers after the input, ending with the code layer. "
        "The decoder mirrors them (default: "
        f"{' '.join(map(str, DIGITS_ENCODER_SIZES))} for digits, "
        f"{' '.join(map(str, MNIST_ENCODER_SIZES))} for MNIST)",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--optimizers", nargs="+", choices=OPTIMIZER_NAMES, default=["simba", "adam"],
        help="optimizers to train, in this order (default: simba adam)",
    )
    for name in OPTIMIZER_NAMES:
        training.add_argument(
            f"--lr-{name}", type=arguments.positive_float, default=None, metavar="LR",
            help=f"learning rate for {name} (default: {DIGITS_LEARNING_RATES[name]:g} "
            f"on digits, {MNIST_LEARNING_RATES[name]:g} on MNIST)",
        )
    training.add_argument(
        "--steps", type=arguments.positive_int, default=DEFAULT_STEPS,
        help=f"optimizer steps per optimizer (default: {DEFAULT_STEPS})",
    )
    training.add_argument(
        "--batch-size", type=arguments.positive_int, default=128,
        help="examples per step (default: 128)",
    )
    training.add_argument(
        "--seed", type=arguments.seed, default=0,
        help="seed of the initial parameters, the batch order, the digits split and "
        "Simba's row sampling (default: 0)",
    )
    training.add_argument(
        "--eval-every", type=arguments.positive_int, default=DEFAULT_EVAL_EVERY,
        help="steps between evaluations of the MSE on the whole train and test sets "
        f"(default: {DEFAULT_EVAL_EVERY})",
    )

    simba = parser.add_argument_group("Simba")
    simba.add_argument(
        "--coarse-fraction", type=arguments.fraction, default=0.5,
        help="fraction of each parameter's rows (output units) updated per step "
        "(default: 0.5)",
    )
    simba.add_argument(
        "--rank", type=arguments.positive_int, default=20,
        help="number of leading eigenpairs in the preconditioner (default: 20)",
    )
    simba.add_argument(
        "--eps", type=arguments.non_negative_float, default=1e-8,
        help="floor on the singular values of the sampled rows (default: 1e-8)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=Path("outputs/autoencoder"),
        help="folder for results.md, results.json and loss_curves.png "
        "(default: outputs/autoencoder)",
    )
    output.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the comparison from command-line arguments and return the results.json content."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run_start = time.perf_counter()

    # Everything that can reject the settings runs before any training. A value that
    # passed argparse but not the library, a missing data file or a batch larger than
    # the data is reported as a usage error.
    try:
        default_rates = DIGITS_LEARNING_RATES if args.mnist is None else MNIST_LEARNING_RATES
        learning_rates = {}
        for name in args.optimizers:
            requested_rate = getattr(args, f"lr_{name}")
            learning_rates[name] = (
                default_rates[name] if requested_rate is None else requested_rate
            )
        optimizers = {
            name: make_optimizer(
                name, learning_rates[name], coarse_fraction=args.coarse_fraction,
                rank=args.rank, eps=args.eps, seed=args.seed,
            )
            for name in args.optimizers
        }

        dataset_name, data, encoder_sizes = load_data(args.mnist, args.seed)
        if args.encoder_sizes is not None:
            encoder_sizes = tuple(args.encoder_sizes)
        input_size = data.x_train.shape[1]
        batch_indices = datasets.epoch_batch_indices(
            len(data.x_train), args.batch_size, args.steps, args.seed
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))

    model = build_model(input_size, encoder_sizes)
    params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(params))
    layer_sizes = [input_size, *encoder_sizes, *reversed(encoder_sizes[:-1]), input_size]
    print(
        f"{dataset_name}: {len(data.x_train)} train and {len(data.x_test)} test images, "
        f"network {'-'.join(map(str, layer_sizes))} ({parameter_count} parameters), "
        f"{args.steps} steps of batch {args.batch_size}"
    )

    records = {}
    for name, optimizer in optimizers.items():
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optimizer)
        _, records[name] = train(
            state, data.x_train, data.x_test, batch_indices, args.eval_every,
            description=name, progress=not args.no_progress,
        )

    table = format_results_table(records, learning_rates)
    run_time = time.perf_counter() - run_start
    print()
    print(table)
    print(
        "\nwall time: optimizer steps only, without compilation and evaluation. "
        f"Whole run: {run_time:.1f} s."
    )

    results = {
        "dataset": dataset_name,
        "layer_sizes": layer_sizes,
        "parameter_count": int(parameter_count),
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "simba": {"coarse_fraction": args.coarse_fraction, "rank": args.rank, "eps": args.eps},
        "run_time_s": run_time,
        "environment": describe_environment(),
        "optimizers": {
            name: {"learning_rate": learning_rates[name], **dataclasses.asdict(record)}
            for name, record in records.items()
        },
    }
    title = f"{dataset_name} autoencoder {'-'.join(map(str, layer_sizes))}"
    write_outputs(args.out, table, results, records, title)
    print(f"Wrote results.md, results.json and loss_curves.png to {args.out}")
    return results

if __name__ == "__main__":
    main()
