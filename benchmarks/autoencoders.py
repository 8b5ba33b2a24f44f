"""Deep autoencoders: the MNIST and CURVES networks of Hinton & Salakhutdinov (2006).

Tsipinakis & Parpas (2023), section 4.2, train both with batch 128 and report the
training mean squared error:

- MNIST: 784-1000-500-250-30 and mirror, sigmoid hidden units (2.8M parameters).
- CURVES: 784-400-200-100-50-25-6 and mirror, relu hidden units (0.8M parameters).

Here the code layer is linear and the output layer a sigmoid, so that
reconstructions lie in [0, 1] like the pixels. The loss is the mean squared error
over pixels. By default both networks train on scikit-learn's bundled digits
(8 x 8 = 64 pixels) with narrower layers of the same depth and activation, which
fit a CPU budget of minutes (see DIGITS_ENCODER_SIZES). ``--mnist PATH`` and
``--curves PATH`` train the full networks on the real sets.

Usage:
  python benchmarks/autoencoders.py --network mnist --grid
  python benchmarks/autoencoders.py --network mnist
  python benchmarks/autoencoders.py --network curves --grid
  python benchmarks/autoencoders.py --network curves
  python benchmarks/autoencoders.py --mnist PATH/TO/mnist --steps 2000 --eval-subset 5000
  python benchmarks/autoencoders.py --curves PATH/TO/digs3pts_1.mat --steps 2000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import loaders
from examples import arguments
from examples import datasets

# Encoder widths after the input; the decoder mirrors them.
PAPER_ENCODER_SIZES = {
    "mnist": (1000, 500, 250, 30),
    "curves": (400, 200, 100, 50, 25, 6),
}
# Digits versions: the depth and activations of the paper's networks, with
# widths for 64 inputs. The MNIST-shaped one is examples/autoencoder.py's
# network: the first layer widens the input as 784 -> 1000 does, the widths then
# halve, and the code is a quarter of the input. The CURVES-shaped one keeps six
# encoder layers halving from twice the input down to CURVES's 6-unit code.
DIGITS_ENCODER_SIZES = {
    "mnist": (256, 128, 64, 16),
    "curves": (128, 64, 32, 16, 8, 6),
}
ACTIVATIONS = {"mnist": "sigmoid", "curves": "relu"}
EVAL_BATCH = 2048


class Autoencoder(nn.Module):
  """Mirrored dense autoencoder: hidden ``activation``, linear code, sigmoid output."""

  input_size: int
  encoder_sizes: Sequence[int]
  activation: str

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    activation = getattr(nn, self.activation)
    *hidden_sizes, code_size = self.encoder_sizes
    hidden = images
    for index, width in enumerate(hidden_sizes):
      hidden = activation(nn.Dense(width, name=f"encoder_{index}")(hidden))
    hidden = nn.Dense(code_size, name="code")(hidden)
    for index, width in enumerate(reversed(hidden_sizes)):
      hidden = activation(nn.Dense(width, name=f"decoder_{index}")(hidden))
    return nn.sigmoid(nn.Dense(self.input_size, name="output")(hidden))


def reconstruction_mse(model: Autoencoder, params, images: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(model.apply({"params": params}, images) - images))


def build_problem(
    name: str, title: str, x_train: np.ndarray, x_test: np.ndarray, model: Autoencoder,
    batch_size: int, eval_subset: int | None,
) -> common.Problem:
  train = jnp.asarray(x_train)
  test = jnp.asarray(x_test)
  if eval_subset is not None:
    # A fixed subset: the whole MNIST train set would take a minute per evaluation on a CPU.
    rows = np.random.default_rng(0).permutation(len(x_train))[:eval_subset]
    train_eval = jnp.asarray(x_train[np.sort(rows)])
    test = test[:eval_subset]
  else:
    train_eval = train

  initialize = jax.jit(lambda key: model.init(key, train[:1])["params"])

  def init(seed: int):
    return initialize(jax.random.key(seed)), None

  def loss(params, model_state, data, batch):
    return reconstruction_mse(model, params, data["train"][batch]), model_state

  @jax.jit
  def squared_error(params, images):
    return jnp.sum(jnp.square(model.apply({"params": params}, images) - images))

  def mean_error(params, images) -> float:
    total = sum(
        float(squared_error(params, images[start : start + EVAL_BATCH]))
        for start in range(0, len(images), EVAL_BATCH)
    )
    return total / images.size

  def evaluate(params, model_state):
    del model_state
    return {"train_loss": mean_error(params, train_eval), "test_loss": mean_error(params, test)}

  def grid_objective(params, model_state, data):
    del model_state, data
    return reconstruction_mse(model, params, train_eval)

  parameter_count = sum(
      leaf.size for leaf in jax.tree.leaves(jax.eval_shape(initialize, jax.random.key(0)))
  )
  return common.Problem(
      name=name,
      title=title,
      data={"train": train},
      init=init,
      loss=loss,
      batch_indices=lambda seed, steps: datasets.epoch_batch_indices(len(x_train), batch_size, steps, seed),
      evaluate=evaluate,
      grid_objective=grid_objective,
      plot_metrics=(("train_loss", "train MSE", True), ("test_loss", "test MSE", True)),
      settings={
          "train_images": len(x_train),
          "test_images": len(x_test),
          "layer_sizes": [model.input_size, *model.encoder_sizes,
                          *reversed(model.encoder_sizes[:-1]), model.input_size],
          "activation": model.activation,
          "parameters": int(parameter_count),
          "eval_subset": eval_subset,
      },
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Deep autoencoders (Hinton & Salakhutdinov 2006) as in Tsipinakis & Parpas"
      " (2023), section 4.2: Simba against its peers on the training MSE."
  )
  data = parser.add_argument_group("data and network")
  sources = data.add_mutually_exclusive_group()
  sources.add_argument(
      "--mnist", type=Path, default=None, metavar="PATH",
      help="MNIST folder of IDX files or mnist.npz; trains the paper's MNIST network",
  )
  sources.add_argument(
      "--curves", type=Path, default=None, metavar="PATH",
      help="CURVES .mat file with arrays 'bdata' and 'bdatatest' (digs3pts_1.mat); trains the"
      " paper's CURVES network",
  )
  data.add_argument(
      "--network", choices=tuple(PAPER_ENCODER_SIZES), default=None,
      help="network shape and activation (default: curves with --curves, else mnist)",
  )
  data.add_argument(
      "--encoder-sizes", nargs="+", type=arguments.positive_int, default=None, metavar="WIDTH",
      help="encoder widths after the input, the last being the code (default: the paper's on"
      " MNIST and CURVES, DIGITS_ENCODER_SIZES on digits)",
  )
  data.add_argument(
      "--eval-subset", type=arguments.positive_int, default=None, metavar="N",
      help="evaluate the train and test MSE on the first N test images and a fixed N train"
      " images (default: all)",
  )
  common.add_common_arguments(parser, steps=600, eval_every=50)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Run the benchmark from command-line arguments and return the JSON written."""
  args = parse_args(argv)
  network = args.network or ("curves" if args.curves is not None else "mnist")
  if args.mnist is not None:
    split = datasets.load_mnist(args.mnist)
    x_train, x_test, source = split.x_train, split.x_test, "mnist"
    sizes = PAPER_ENCODER_SIZES[network]
  elif args.curves is not None:
    split = loaders.load_curves(args.curves)
    x_train, x_test, source = split.x_train, split.x_test, "curves"
    sizes = PAPER_ENCODER_SIZES[network]
  else:
    split = datasets.load_digits_split(seed=0)
    x_train, x_test, source = split.x_train, split.x_test, "digits"
    sizes = DIGITS_ENCODER_SIZES[network]
  if args.encoder_sizes is not None:
    sizes = tuple(args.encoder_sizes)

  input_size = x_train.shape[1]
  model = Autoencoder(input_size, tuple(sizes), ACTIVATIONS[network])
  layers = "-".join(map(str, [input_size, *sizes, *reversed(sizes[:-1]), input_size]))
  problem = build_problem(
      f"autoencoder_{network}_{source}",
      f"{network.upper()}-shaped autoencoder {layers} ({ACTIVATIONS[network]}) on {source}",
      x_train, x_test, model, args.batch_size, args.eval_subset,
  )
  print(f"{problem.title}: {problem.settings['parameters']} parameters,"
        f" {len(x_train)} train and {len(x_test)} test images")
  specs = common.standard_specs(args.optimizers, common.simba_options(args))
  return common.run_benchmark(problem, specs, args, argv)


if __name__ == "__main__":
  main()
