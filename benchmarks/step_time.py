"""Step time of Simba against Adam and Muon, measured in one process.

Prints four tables and writes them to JSON:

1. A jitted training step (forward, backward, update) of the MNIST deep
   autoencoder, 784-1000-500-250-30 and mirror, sigmoid, batch 128, float32:
   Simba's median step time over Adam's.
2. The update alone: Simba over Adam and over Muon.
3. A deep MLP of equal hidden layers: Simba with equal-shape blocks batched
   into one computation against one computation per leaf, with the number of
   compiled linear-algebra calls of each.
4. Optimizer state bytes over parameter bytes.

Usage:
  python benchmarks/step_time.py [--repeats 20] [--out benchmarks/results]
"""

import os

# One OpenBLAS thread: its default pool competes with XLA's on CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import simba_optax  # noqa: E402
from simba_optax import _simba  # noqa: E402

MNIST_WIDTHS = (784, 1000, 500, 250, 30)

# The defaults, and two cheaper settings: half the sampled rows (the paper
# sweeps n_l in its Figure 4) and one power iteration instead of two.
SIMBA_VARIANTS = {
    "simba": {},
    "simba coarse_fraction=0.25": {"coarse_fraction": 0.25},
    "simba power_iterations=1": {"power_iterations": 1},
}


def init_mlp(key: jax.Array, widths: tuple[int, ...]) -> list[dict[str, jax.Array]]:
  layers = []
  for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
    scale = 1.0 / np.sqrt(fan_in)
    kernel = scale * jax.random.normal(jax.random.fold_in(key, i), (fan_in, fan_out))
    layers.append({"kernel": kernel, "bias": jnp.zeros((fan_out,))})
  return layers


def autoencoder_widths(encoder: tuple[int, ...]) -> tuple[int, ...]:
  return encoder + encoder[-2::-1]


def mlp_loss(params, inputs, activation=jax.nn.sigmoid):
  hidden = inputs
  for i, layer in enumerate(params):
    hidden = hidden @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      hidden = activation(hidden)
  return jnp.mean((jax.nn.sigmoid(hidden) - inputs) ** 2)


def make_step(tx: optax.GradientTransformation, loss=mlp_loss):
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def compile_and_count(step, *args) -> tuple[int, float]:
  """Compiles ``step`` and returns its linear-algebra calls and the seconds taken."""
  start = time.perf_counter()
  text = step.lower(*args).compile().as_text()
  seconds = time.perf_counter() - start
  return len(re.findall(r"custom_call_target=\"(?:lapack|cusolver|cu_|hip)", text)), seconds


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def blocker(function, *args):
  def call():
    jax.block_until_ready(function(*args))

  return call


def full_step_table(repeats: int) -> dict:
  key = jax.random.key(0)
  params = init_mlp(key, autoencoder_widths(MNIST_WIDTHS))
  batch = jax.random.uniform(jax.random.key(1), (128, 784))
  optimizers = {"adam": optax.adam(1e-3)}
  for name, settings in SIMBA_VARIANTS.items():
    optimizers[name] = optax.chain(simba_optax.simba(**settings), optax.scale(-0.05))
  steps = {}
  for name, tx in optimizers.items():
    step = make_step(tx)
    steps[name] = blocker(step, params, tx.init(params), batch)
  medians = _timing.interleaved_medians(steps, repeats)
  return {
      "median_s": medians,
      "settings": SIMBA_VARIANTS,
      "ratio_over_adam": {
          name: medians[name] / medians["adam"] for name in SIMBA_VARIANTS
      },
      "ratio_simba_over_adam": medians["simba"] / medians["adam"],
  }


def update_only_table(repeats: int) -> dict:
  params = init_mlp(jax.random.key(0), autoencoder_widths(MNIST_WIDTHS))
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p) + 1e-2 * p, params)
  optimizers = {
      "adam": optax.adam(1e-3),
      "muon": optax.contrib.muon(1e-3),
      "simba": simba_optax.simba(),
  }
  updates = {}
  for name, tx in optimizers.items():
    update = jax.jit(tx.update)
    updates[name] = blocker(update, grads, tx.init(params), params)
  medians = _timing.interleaved_medians(updates, repeats)
  return {
      "median_s": medians,
      "ratio_simba_over_adam": medians["simba"] / medians["adam"],
      "ratio_simba_over_muon": medians["simba"] / medians["muon"],
  }


def batching_table(repeats: int, layers: int, width: int) -> dict:
  params = init_mlp(jax.random.key(0), (width,) * (layers + 1))
  batch = jax.random.uniform(jax.random.key(1), (128, width))
  loss = functools.partial(mlp_loss, activation=jnp.tanh)
  tx = optax.chain(simba_optax.simba(), optax.scale(-0.01))
  state = tx.init(params)

  results, steps = {}, {}
  for grouped in (True, False):
    name = "batched" if grouped else "per_leaf"
    _simba.GROUP_EQUAL_SHAPES = grouped
    step = make_step(tx, loss)
    calls, seconds = compile_and_count(step, params, state, batch)
    results[name] = {"linear_algebra_calls": calls, "compile_s": seconds}
    jax.block_until_ready(step(params, state, batch))
    steps[name] = blocker(step, params, state, batch)
  _simba.GROUP_EQUAL_SHAPES = True

  medians = _timing.interleaved_medians(steps, repeats)
  for name, median in medians.items():
    results[name]["median_s"] = median
  results["ratio_batched_over_per_leaf"] = medians["batched"] / medians["per_leaf"]
  return results


def memory_table() -> dict:
  params = init_mlp(jax.random.key(0), autoencoder_widths(MNIST_WIDTHS))
  rows = {}
  for name, tx in {"simba": simba_optax.simba(), "adam": optax.adam(1e-3)}.items():
    rows[name] = tree_bytes(tx.init(params)) / tree_bytes(params)
  return {"state_bytes_over_param_bytes": rows}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
  parser.add_argument("--layers", type=int, default=24, help="layers of the deep MLP")
  parser.add_argument("--width", type=int, default=256, help="width of the deep MLP")
  parser.add_argument("--out", default="benchmarks/results", help="output folder")
  args = parser.parse_args(argv)

  report = {"machine": _timing.machine(), "command": " ".join(sys.argv)}
  report["full_step"] = full_step_table(args.repeats)
  print("\nMNIST autoencoder, jitted train step, batch 128, float32")
  print(_timing.markdown_table(
      ["optimizer", "median step (ms)"],
      [[k, f"{v * 1e3:.1f}"] for k, v in report["full_step"]["median_s"].items()],
  ))
  for name, ratio in report["full_step"]["ratio_over_adam"].items():
    print(f"{name} / adam: {ratio:.2f}")

  report["update_only"] = update_only_table(args.repeats)
  print("\nUpdate only")
  print(_timing.markdown_table(
      ["optimizer", "median update (ms)"],
      [[k, f"{v * 1e3:.1f}"] for k, v in report["update_only"]["median_s"].items()],
  ))
  print(f"Simba / Adam: {report['update_only']['ratio_simba_over_adam']:.2f}, "
        f"Simba / Muon: {report['update_only']['ratio_simba_over_muon']:.2f}")

  report["batching"] = batching_table(args.repeats, args.layers, args.width)
  print(f"\n{args.layers}-layer MLP of width {args.width}, train step")
  print(_timing.markdown_table(
      ["blocks", "linear-algebra calls", "compile (s)", "median step (ms)"],
      [[name, report["batching"][name]["linear_algebra_calls"],
        f"{report['batching'][name]['compile_s']:.1f}",
        f"{report['batching'][name]['median_s'] * 1e3:.1f}"]
       for name in ("batched", "per_leaf")],
  ))
  print(f"batched / per leaf: {report['batching']['ratio_batched_over_per_leaf']:.2f}")

  report["memory"] = memory_table()
  print("\nOptimizer state bytes / parameter bytes")
  print(_timing.markdown_table(
      ["optimizer", "ratio"],
      [[k, f"{v:.3f}"] for k, v in report["memory"]["state_bytes_over_param_bytes"].items()],
  ))

  path = os.path.join(args.out, "step_time.json")
  _timing.write_json(path, report)
  print(f"\nwrote {path}")
  return report


if __name__ == "__main__":
  main()
