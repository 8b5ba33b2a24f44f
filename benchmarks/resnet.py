"""Generalisation: a residual CNN trained with a learning-rate schedule, test accuracy per epoch.

Tsipinakis & Parpas (2023), section 4.3, train ResNet-110 on CIFAR-10 for 60
epochs with the learning rate divided by 5 at epochs 30 and 40, and ResNet-9 on
CIFAR-100 with cosine annealing. This script trains a CIFAR-style ResNet of
depth ``6n + 2`` (He et al. 2016: three stages of 16, 32 and 64 channels with
``n`` basic blocks each, batch normalisation, global average pooling) with the
same kind of schedule, scaled to the number of epochs:

- ``step``: the learning rate is divided by 5 after half of the epochs and
  again after two thirds (30 and 40 of 60);
- ``cosine``: cosine decay per step down to 0.02 times the initial value
  (the paper's floor for Simba on ResNet-9).

Default data: scikit-learn's digits as 8 x 8 x 1 images (1437 train, 360 test)
with ResNet-8 at half width (8, 16 and 32 channels), which fits a CPU budget. ``--cifar PATH`` reads the CIFAR-10 python batches instead. There
is no data augmentation, unlike the paper's CIFAR runs.

The learning rate is chosen on the mean training batch loss of the last epoch;
the test split is only reported.

Usage:
  python benchmarks/resnet.py --grid
  python benchmarks/resnet.py
  python benchmarks/resnet.py --cifar PATH/TO/cifar-10-batches-py --depth 110 --epochs 60
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks import loaders
from examples import arguments
from examples import datasets

STEP_DECAY_FACTOR = 0.2  # divide by 5, as in the paper
COSINE_FLOOR = 0.02
EVAL_BATCH = 1000
NUM_CLASSES = 10


class BasicBlock(nn.Module):
  """Two 3 x 3 convolutions with batch normalisation and a shortcut."""

  channels: int
  strides: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.channels, (3, 3), self.strides, padding="SAME", use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.channels, (1, 1), self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet of depth ``6 * blocks_per_stage + 2``; its stages have ``width``, twice and four times as many channels."""

  blocks_per_stage: int
  width: int = 16
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    stage_channels = (self.width, 2 * self.width, 4 * self.width)
    x = nn.Conv(stage_channels[0], (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, channels in enumerate(stage_channels):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(channels, strides)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make_schedule(kind: str, epochs: int, steps_per_epoch: int):
  """Return the learning-rate factor as a function of the step count."""
  if kind == "constant":
    return None
  if kind == "step":
    first, second = epochs // 2, (2 * epochs) // 3

    def step_decay(count):
      epoch = count // steps_per_epoch
      return jnp.where(epoch >= first, STEP_DECAY_FACTOR, 1.0) * jnp.where(
          epoch >= second, STEP_DECAY_FACTOR, 1.0
      )

    return step_decay
  if kind == "cosine":
    return optax.cosine_decay_schedule(1.0, epochs * steps_per_epoch, alpha=COSINE_FLOOR)
  raise ValueError(f"unknown schedule {kind!r}; expected step, cosine or constant.")


def build_problem(name: str, title: str, split: loaders.ImageSplit, depth: int, width: int,
                  batch_size: int, schedule) -> common.Problem:
  model = ResNet(blocks_per_stage=(depth - 2) // 6, width=width)
  x_train, y_train = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
  x_test, y_test = jnp.asarray(split.x_test), jnp.asarray(split.y_test)

  initialize = jax.jit(lambda key: model.init(key, x_train[:1], train=False))

  def init(seed: int):
    variables = initialize(jax.random.key(seed))
    return variables["params"], variables["batch_stats"]

  def loss(params, batch_stats, data, batch):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, data["x"][batch], train=True,
        mutable=["batch_stats"],
    )
    value = optax.softmax_cross_entropy_with_integer_labels(logits, data["y"][batch]).mean()
    return value, updates["batch_stats"]

  @jax.jit
  def test_sums(params, batch_stats, images, labels):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, axis=-1) == labels)

  def evaluate(params, batch_stats):
    total_loss, correct = 0.0, 0
    for start in range(0, len(x_test), EVAL_BATCH):
      batch_loss, batch_correct = test_sums(
          params, batch_stats, x_test[start : start + EVAL_BATCH], y_test[start : start + EVAL_BATCH]
      )
      total_loss += float(batch_loss)
      correct += int(batch_correct)
    return {"test_loss": total_loss / len(x_test), "test_accuracy": 100.0 * correct / len(x_test)}

  shapes = jax.eval_shape(initialize, jax.random.key(0))["params"]
  parameters = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  return common.Problem(
      name=name,
      title=title,
      data={"x": x_train, "y": y_train},
      init=init,
      loss=loss,
      batch_indices=lambda seed, steps: datasets.epoch_batch_indices(len(x_train), batch_size, steps, seed),
      evaluate=evaluate,
      selection_metric="batch_loss",
      schedule=schedule,
      plot_metrics=(
          ("batch_loss", "train loss (mean over the epoch's batches)", True),
          ("test_accuracy", "test accuracy (%)", False),
      ),
      muon_dimension_numbers=common.muon_matrix_dimension_numbers,
      settings={
          "depth": depth,
          "width": width,
          "parameters": int(parameters),
          "train_images": len(split.x_train),
          "test_images": len(split.x_test),
          "image_shape": list(split.x_train.shape[1:]),
      },
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Residual CNN with a learning-rate schedule (Tsipinakis & Parpas 2023,"
      " section 4.3): train loss and test accuracy per epoch."
  )
  data = parser.add_argument_group("data and network")
  data.add_argument(
      "--cifar", type=Path, default=None, metavar="PATH",
      help="CIFAR-10 python batches folder (data_batch_1..5, test_batch) (default:"
      " scikit-learn's digits as 8 x 8 x 1 images)",
  )
  data.add_argument("--depth", type=arguments.positive_int, default=8,
                    help="ResNet depth 6n + 2: 8, 14, 20, 56, 110 ... (default: 8)")
  data.add_argument(
      "--width", type=arguments.positive_int, default=None,
      help="channels of the first stage; the others have 2 and 4 times as many (default: 16"
      " on CIFAR-10 as in He et al., 8 on digits)",
  )
  data.add_argument("--epochs", type=arguments.positive_int, default=12,
                    help="training epochs (default: 12)")
  data.add_argument(
      "--schedule", choices=("step", "cosine", "constant"), default="step",
      help="learning-rate schedule: step divides by 5 at 1/2 and 2/3 of the epochs, cosine"
      f" decays to {COSINE_FLOOR:g} times the initial value (default: step)",
  )
  common.add_common_arguments(parser, steps=None, eval_every=None)
  args = parser.parse_args(argv)
  if (args.depth - 2) % 6 != 0 or args.depth < 8:
    parser.error(f"--depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {args.depth}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Run the benchmark from command-line arguments and return the JSON written."""
  args = parse_args(argv)
  if args.cifar is None:
    split, source = loaders.digits_images(), "digits"
    width = args.width or 8
  else:
    split, source = loaders.load_cifar10(args.cifar), "cifar10"
    width = args.width or 16
  steps_per_epoch = len(split.x_train) // args.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
        f"batch size {args.batch_size} is larger than the {len(split.x_train)} training images;"
        " pass a smaller --batch-size."
    )
  args.steps = args.epochs * steps_per_epoch
  args.eval_every = steps_per_epoch

  problem = build_problem(
      f"resnet{args.depth}_{source}",
      f"ResNet-{args.depth} (width {width}) on {source}, {args.epochs} epochs,"
      f" {args.schedule} schedule",
      split, args.depth, width, args.batch_size, make_schedule(args.schedule, args.epochs, steps_per_epoch),
  )
  problem.settings.update(epochs=args.epochs, schedule=args.schedule, steps_per_epoch=steps_per_epoch)
  print(f"{problem.title}: {problem.settings['parameters']} parameters,"
        f" {steps_per_epoch} steps per epoch")
  specs = common.standard_specs(args.optimizers, common.simba_options(args))
  return common.run_benchmark(problem, specs, args, argv)


if __name__ == "__main__":
  main()
