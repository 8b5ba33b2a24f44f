"""Non-linear least squares: min_x mean_i (b_i - 1 / (1 + exp(a_i . x)))^2 with b_i in {0, 1}.

The problem of Tsipinakis & Parpas (2023), section 4.1, which is non-convex and
has flat regions where the sigmoid saturates. The parameter ``x`` is one vector
of ``n`` coordinates, started at the origin as in the paper's Figure 4. Simba
views a vector of shape ``(n,)`` as an ``(n, 1)`` matrix whose rows are the
coordinates, so ``coarse_rows=250`` samples 250 of Gisette's 5000 coordinates
per step and ``Q = A_s A_s^T`` is 250 x 250, the paper's setting.

``Q`` then has rank one, so ``rank`` and ``eps`` play no part: the step is the
momentum on the sampled coordinates divided by its norm, and the other
coordinates stay put.

Default data: scikit-learn's bundled digits, label 1 for digits 0 to 4
(1797 examples, 64 features in [0, 1]). ``--svmlight PATH`` reads Gisette or
any binary set in libsvm format instead.

Usage:
  python benchmarks/least_squares.py --grid     # learning-rate grid, writes the lr file
  python benchmarks/least_squares.py            # evaluation runs, 3 seeds
  python benchmarks/least_squares.py --svmlight PATH/TO/gisette_scale --grid
  python benchmarks/least_squares.py --svmlight PATH/TO/gisette_scale
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import loaders
from examples import datasets

# The paper's Figure 4 on Gisette (n = 5000): 25 and 250 rows, 10% and 50%.
GISETTE_COARSE_SIZES = ("25", "250", "0.1", "0.5")
# The same shares of the rows for any n: 25/5000, 250/5000, 10% and 50%.
RELATIVE_COARSE_SIZES = ("0.005", "0.05", "0.1", "0.5")
PAPER_SIMBA_EPS = 1e-12  # the paper's setting for this problem


def objective(x: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
  """Return mean((b - 1 / (1 + exp(A x)))^2); 1 / (1 + exp(z)) is sigmoid(-z)."""
  return jnp.mean(jnp.square(labels - jax.nn.sigmoid(-(features @ x))))


def coarse_options(token: str, rows: int) -> tuple[str, dict[str, float | int]]:
  """Return the label and Simba options of one coarse size: an int of rows or a fraction in (0, 1]."""
  try:
    if "." in token or "e" in token.lower():
      fraction = float(token)
      if not 0.0 < fraction <= 1.0:
        raise ValueError
      sampled = max(1, min(rows, math.ceil(fraction * rows)))
      return f"simba n_l={sampled} ({fraction:g}n)", {"coarse_fraction": fraction}
    count = int(token)
    if count < 1:
      raise ValueError
  except ValueError:
    raise ValueError(
        f"coarse size {token!r} is neither a row count >= 1 nor a fraction in (0, 1]."
    ) from None
  return f"simba n_l={min(count, rows)}", {"coarse_rows": count}


def build_problem(data: loaders.BinaryDataset, name: str, title: str, batch_size: int,
                  init: str) -> common.Problem:
  features = jnp.asarray(data.features)
  labels = jnp.asarray(data.labels)
  examples, dimension = data.features.shape

  def init_fn(seed: int):
    if init == "zero":
      return jnp.zeros((dimension,), jnp.float32), None
    scale = 1.0 / math.sqrt(dimension)
    return scale * jax.random.normal(jax.random.key(seed), (dimension,)), None

  def loss(x, model_state, arrays, batch):
    return objective(x, arrays["features"][batch], arrays["labels"][batch]), model_state

  def grid_objective(x, model_state, arrays):
    del model_state
    return objective(x, arrays["features"], arrays["labels"])

  full_objective = jax.jit(grid_objective)

  def evaluate(x, model_state):
    return {"train_loss": float(full_objective(x, model_state, {"features": features, "labels": labels}))}

  return common.Problem(
      name=name,
      title=title,
      data={"features": features, "labels": labels},
      init=init_fn,
      loss=loss,
      batch_indices=lambda seed, steps: datasets.epoch_batch_indices(examples, batch_size, steps, seed),
      evaluate=evaluate,
      grid_objective=grid_objective,
      vectors_as_columns=True,
      settings={
          "examples": examples,
          "features": dimension,
          "positive_share": float(np.mean(data.labels)),
          "init": init,
      },
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Non-linear least squares (Tsipinakis & Parpas 2023, section 4.1) with Simba"
      " and its peers, and Simba's coarse-size sweep (their Figure 4)."
  )
  data = parser.add_argument_group("data")
  data.add_argument(
      "--svmlight", type=Path, default=None, metavar="PATH",
      help="binary data set in svmlight/libsvm format, such as Gisette's gisette_scale"
      " (default: scikit-learn's digits, digit < 5)",
  )
  data.add_argument(
      "--init", choices=("zero", "normal"), default="zero",
      help="initial x: the origin as in the paper, or N(0, 1/n) from the seed (default: zero)",
  )
  data.add_argument(
      "--coarse-sizes", nargs="+", default=None, metavar="SIZE",
      help="Simba's coarse sizes: an int is a row count (coarse_rows), a number with a point is"
      " a fraction of the rows (default: 25 250 0.1 0.5 with --svmlight, else"
      " 0.005 0.05 0.1 0.5)",
  )
  common.add_common_arguments(parser, steps=2000, eval_every=20)
  parser.set_defaults(eps=PAPER_SIMBA_EPS)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Run the benchmark from command-line arguments and return the JSON written."""
  args = parse_args(argv)
  if args.svmlight is None:
    data = loaders.digits_binary()
    name, source = "least_squares_digits", "digits (digit < 5)"
    sizes = args.coarse_sizes or list(RELATIVE_COARSE_SIZES)
  else:
    data = loaders.load_svmlight_binary(args.svmlight)
    name, source = f"least_squares_{args.svmlight.stem}", args.svmlight.name
    sizes = args.coarse_sizes or list(GISETTE_COARSE_SIZES)

  examples, dimension = data.features.shape
  print(f"{source}: {examples} examples, {dimension} features, x started at {args.init}")
  problem = build_problem(
      data, name, f"Non-linear least squares on {source}, {examples} x {dimension}",
      args.batch_size, args.init,
  )

  specs = []
  for name_ in args.optimizers:
    if name_ != "simba":
      specs.append(common.OptimizerSpec(name_, name_))
      continue
    for token in sizes:
      label, coarse = coarse_options(token, dimension)
      specs.append(common.OptimizerSpec(
          label, "simba", {"rank": args.rank, "eps": args.eps, **coarse}
      ))
  problem.settings["coarse_sizes"] = list(sizes)
  return common.run_benchmark(problem, specs, args, argv)


if __name__ == "__main__":
  main()
