"""Grid-search the learning rate of each optimizer on the autoencoder example.

Every run starts from the same initial parameters and batch order as
``examples/autoencoder.py`` with the same seed. The winner per optimizer is the
learning rate with the lowest final train MSE, averaged over ``--seeds``. The test
MSE is reported but never used for the choice. A run whose loss becomes NaN counts as
diverged and never wins.

Run from the repository root::

    python examples/lr_grid.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python examples/lr_grid.py`: put the repository root on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    # One OpenBLAS thread per LAPACK call, for the reason given in autoencoder.py.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from examples import autoencoder
from examples import datasets

GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1)


def make_grid_optimizer(name: str, args: argparse.Namespace) -> optax.GradientTransformation:
    """Create the optimizer with its learning rate stored in the optimizer state.

    One transformation then serves every learning rate of the grid, so each optimizer's
    training step is compiled once rather than once per learning rate.
    """

    def build(learning_rate):
        return autoencoder.make_optimizer(
            name, learning_rate, coarse_fraction=args.coarse_fraction, rank=args.rank,
            eps=args.eps, seed=args.seed_for_simba,
        )

    return optax.inject_hyperparams(build)(learning_rate=args.learning_rates[0])


def with_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
    """Return ``state`` with the learning rate in its injected hyperparameters replaced."""
    hyperparams = dict(state.opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(
        learning_rate, dtype=hyperparams["learning_rate"].dtype
    )
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def run_grid(args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Train every optimizer at every learning rate for every seed and return the losses.

    The result maps optimizer, then learning rate (as text), to one entry per seed.
    """
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {f"{lr:g}": [] for lr in args.learning_rates} for name in args.optimizers
    }
    for seed in args.seeds:
        _, data, encoder_sizes = autoencoder.load_data(None, seed)
        model = autoencoder.build_model(data.x_train.shape[1], encoder_sizes)
        params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
        batch_indices = datasets.epoch_batch_indices(
            len(data.x_train), args.batch_size, args.steps, seed
        )
        args.seed_for_simba = seed
        for name in args.optimizers:
            optimizer = make_grid_optimizer(name, args)
            initial_state = TrainState.create(apply_fn=model.apply, params=params, tx=optimizer)
            for learning_rate in args.learning_rates:
                state = with_learning_rate(initial_state, learning_rate)
                _, record = autoencoder.train(
                    state, data.x_train, data.x_test, batch_indices, args.eval_every,
                    description=f"{name} lr={learning_rate:g} seed={seed}",
                    progress=not args.no_progress,
                )
                results[name][f"{learning_rate:g}"].append(
                    {
                        "seed": seed,
                        "train_mse": record.train_mse[-1],
                        "test_mse": record.test_mse[-1],
                        "wall_time_s": record.wall_time_s,
                        "compile_time_s": record.compile_time_s,
                    }
                )
    return results


def mean_final(runs: list[dict[str, float]], key: str) -> float:
    """Return the mean of ``key`` over the runs, or NaN if any run diverged."""
    values = [run[key] for run in runs]
    if not all(math.isfinite(value) for value in values):
        return math.nan
    return float(np.mean(values))


def select_learning_rates(results) -> dict[str, float]:
    """Return, per optimizer, the learning rate with the lowest mean final train MSE."""
    winners = {}
    for name, by_rate in results.items():
        finite = {
            rate: mean_final(runs, "train_mse")
            for rate, runs in by_rate.items()
            if math.isfinite(mean_final(runs, "train_mse"))
        }
        if finite:
            winners[name] = float(min(finite, key=finite.get))
    return winners


def format_grid_table(results, key: str, winners: dict[str, float]) -> str:
    """Format the mean final ``key`` per learning rate and optimizer, with winners in bold."""
    names = list(results)
    rates = list(next(iter(results.values())))
    lines = [
        "| learning rate | " + " | ".join(names) + " |",
        "| ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for rate in rates:
        cells = []
        for name in names:
            value = mean_final(results[name][rate], key)
            cell = "diverged (NaN)" if math.isnan(value) else f"{value:.5f}"
            if winners.get(name) == float(rate) and key == "train_mse":
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Grid-search learning rates for the digits autoencoder example."
    )

    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--optimizers", nargs="+", choices=autoencoder.OPTIMIZER_NAMES,
        default=list(autoencoder.OPTIMIZER_NAMES),
        help="optimizers to tune (default: simba adam sgd)",
    )
    grid.add_argument(
        "--learning-rates", nargs="+", type=float, default=list(GRID),
        help="learning rates to try (default: " + " ".join(f"{lr:g}" for lr in GRID) + ")",
    )
    grid.add_argument(
        "--seeds", nargs="+", type=int, default=[0],
        help="seeds to average over. Each sets the split, the initial parameters, "
        "the batch order and Simba's row sampling (default: 0)",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--steps", type=int, default=autoencoder.DEFAULT_STEPS,
        help=f"optimizer steps per run (default: {autoencoder.DEFAULT_STEPS})",
    )
    training.add_argument(
        "--batch-size", type=int, default=128, help="examples per step (default: 128)"
    )
    training.add_argument(
        "--eval-every", type=int, default=autoencoder.DEFAULT_EVAL_EVERY,
        help=f"steps between evaluations (default: {autoencoder.DEFAULT_EVAL_EVERY})",
    )
    training.add_argument(
        "--coarse-fraction", type=float, default=0.5,
        help="Simba's coarse_fraction (default: 0.5)",
    )
    training.add_argument("--rank", type=int, default=20, help="Simba's rank (default: 20)")
    training.add_argument("--eps", type=float, default=1e-8, help="Simba's eps (default: 1e-8)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=Path("outputs/lr_grid"),
        help="folder for lr_grid.json and lr_grid.md (default: outputs/lr_grid)",
    )
    output.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
        parser.error("--steps, --batch-size and --eval-every must be positive integers")
    if any(not rate > 0.0 for rate in args.learning_rates):
        parser.error(f"learning rates must be positive, got {args.learning_rates}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the grid, print the tables and write lr_grid.json and lr_grid.md."""
    args = parse_args(argv)
    start = time.perf_counter()
    results = run_grid(args)
    elapsed = time.perf_counter() - start
    winners = select_learning_rates(results)

    seeds = " ".join(map(str, args.seeds))
    report = "\n\n".join(
        [
            f"Mean final train MSE over seeds {seeds} after {args.steps} steps "
            "(lowest per optimizer in bold):",
            format_grid_table(results, "train_mse", winners),
            "Mean final test MSE (for information, not used for the choice):",
            format_grid_table(results, "test_mse", winners),
            "Selected learning rates: "
            + ", ".join(f"{name} {rate:g}" for name, rate in winners.items()),
            f"Grid run time: {elapsed:.0f} s on {platform.machine()}.",
        ]
    )
    print()
    print(report)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_grid.md").write_text(report + "\n")
    output = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "simba": {"coarse_fraction": args.coarse_fraction, "rank": args.rank, "eps": args.eps},
        "selected_learning_rates": winners,
        "runs": results,
        "run_time_s": elapsed,
        "environment": autoencoder.describe_environment(),
    }
    (args.out / "lr_grid.json").write_text(json.dumps(output, indent=2) + "\n")
    return output


if __name__ == "__main__":
    main()
