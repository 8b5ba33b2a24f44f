"""Saddle and plateau escape: a deep linear network started next to the saddle at the origin.

The network is a product of ``depth`` square matrices, ``P = W_1 W_2 ... W_L``,
fitted to a target ``T = A diag(s) B^T`` (``A``, ``B`` orthogonal) with whitened
inputs, so the loss is ``0.5 * ||P - T||_F^2``. All ``W = 0`` is a saddle point
(a degenerate one for ``depth >= 3``), and a start close to it gives the long
plateau that Saxe, McClelland & Ganguli (2014, "Exact solutions to the nonlinear
dynamics of learning in deep linear neural networks") solve in closed form.

The start is their decoupled one: ``W_1 = A diag(a) R_1^T``, ``W_l = R_{l-1}
diag(a) R_l^T``, ``W_L = R_{L-1} diag(a) B^T`` with random orthogonal ``R_l``
drawn from the seed and ``a = init_scale``. Each singular mode of ``P`` then
starts at ``u_0 = a^L`` and, under gradient flow, follows

    du/dt = L u^(2 - 2/L) (s - u),

so the loss at time ``t`` is ``0.5 * sum_i (s_i - u_i(t))^2`` and the time to
reach a loss threshold follows by integrating one ODE per mode. Heavy-ball
gradient descent with step ``lr`` and momentum ``beta`` moves ``lr / (1 - beta)``
units of that time per step while the steps are small, which predicts the
plateau of SGD with momentum. The notes under the table compare the prediction
with the measured steps.

The benchmark reports the steps and seconds until the loss first falls below
``threshold`` times its value at the start.

Usage:
  python benchmarks/saddle.py --grid
  python benchmarks/saddle.py
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
from scipy import integrate
from scipy import stats

from benchmarks import common
from examples import arguments


def target_matrix(width: int, largest: float, smallest: float) -> tuple[np.ndarray, ...]:
  """Return ``(T, A, s, B)`` with ``T = A diag(s) B^T``, ``s`` geometric from ``largest`` to ``smallest``.

  ``A`` and ``B`` are fixed random orthogonal matrices, the same for every seed.
  """
  singular_values = np.geomspace(largest, smallest, width)
  left = stats.ortho_group.rvs(width, random_state=1)
  right = stats.ortho_group.rvs(width, random_state=2)
  return left @ np.diag(singular_values) @ right.T, left, singular_values, right


def decoupled_start(left: np.ndarray, right: np.ndarray, depth: int, scale: float,
                    seed: int) -> list[np.ndarray]:
  """Return ``depth`` matrices whose product is ``scale**depth * A B^T``, rotated by the seed."""
  width = left.shape[0]
  rng = np.random.default_rng(seed)
  rotations = [stats.ortho_group.rvs(width, random_state=rng) for _ in range(depth - 1)]
  bases = [left, *rotations, right]
  return [scale * bases[i] @ bases[i + 1].T for i in range(depth)]


def product(weights: Sequence[jax.Array]) -> jax.Array:
  result = weights[0]
  for weight in weights[1:]:
    result = result @ weight
  return result


def loss_value(weights: Sequence[jax.Array], target: jax.Array) -> jax.Array:
  return 0.5 * jnp.sum(jnp.square(product(weights) - target))


def gradient_flow_time(singular_values: np.ndarray, depth: int, start: float,
                       threshold: float) -> float:
  """Return the gradient-flow time at which the loss first reaches ``threshold`` (absolute).

  Integrates ``d(log u)/dt = L u^(1 - 2/L) (s - u)`` for every mode from
  ``u = start``. Returns ``inf`` if the loss does not get there within the
  integration horizon.
  """
  s = np.asarray(singular_values, dtype=np.float64)

  def rates(_, log_u):
    u = np.exp(log_u)
    return depth * u ** (1.0 - 2.0 / depth) * (s - u)

  def loss_minus_threshold(_, log_u):
    return 0.5 * np.sum((s - np.exp(log_u)) ** 2) - threshold

  loss_minus_threshold.terminal = True
  loss_minus_threshold.direction = -1
  # Far enough: the slowest mode needs at most a few times 1 / (s u0^(1 - 2/L)).
  horizon = 50.0 / (s.min() * start ** (1.0 - 2.0 / depth)) if depth > 2 else (
      50.0 * math.log(s.max() / start) / s.min()
  )
  solution = integrate.solve_ivp(
      rates, (0.0, horizon), np.full_like(s, math.log(start)), events=loss_minus_threshold,
      rtol=1e-8, atol=1e-10, method="LSODA",
  )
  events = solution.t_events[0]
  return float(events[0]) if len(events) else math.inf


def build_problem(args: argparse.Namespace) -> common.Problem:
  target, left, singular_values, right = target_matrix(
      args.width, args.largest_singular_value, args.smallest_singular_value
  )
  target = jnp.asarray(target, jnp.float32)
  start_strength = args.init_scale ** args.depth
  initial_loss = 0.5 * float(np.sum((singular_values - start_strength) ** 2))
  threshold = args.threshold * initial_loss
  flow_time = gradient_flow_time(singular_values, args.depth, start_strength, threshold)

  def init(seed: int):
    weights = decoupled_start(left, right, args.depth, args.init_scale, seed)
    return {f"w{i}": jnp.asarray(w, jnp.float32) for i, w in enumerate(weights)}, None

  def ordered(params):
    return [params[f"w{i}"] for i in range(args.depth)]

  def loss(params, model_state, data, batch):
    del batch
    return loss_value(ordered(params), data["target"]), model_state

  def grid_objective(params, model_state, data):
    del model_state
    return loss_value(ordered(params), data["target"])

  evaluate_loss = jax.jit(grid_objective)

  def evaluate(params, model_state):
    return {"train_loss": float(evaluate_loss(params, model_state, {"target": target}))}

  def notes(rates: dict[str, float]) -> list[str]:
    lines = [
        f"Gradient-flow time to the threshold, from the closed-form mode dynamics: {flow_time:.4g}.",
    ]
    if "sgd" in rates:
      step = rates["sgd"] / (1.0 - common.SGD_MOMENTUM)
      lines.append(
          f"Predicted steps of SGD with momentum {common.SGD_MOMENTUM} at lr {rates['sgd']:g}"
          f" (time {step:g} per step): {flow_time / step:.4g}. The prediction holds for small"
          " steps; at large ones heavy ball overshoots and the measured count differs."
      )
    return lines

  return common.Problem(
      name=f"saddle_deep_linear_L{args.depth}",
      title=(f"Deep linear network, {args.depth} layers of {args.width} x {args.width},"
             f" start {args.init_scale:g} from the saddle"),
      data={"target": target},
      init=init,
      loss=loss,
      batch_indices=lambda seed, steps: np.zeros((steps, 1), np.int32),
      evaluate=evaluate,
      grid_objective=grid_objective,
      threshold=threshold,
      full_batch=True,
      notes=notes,
      settings={
          "depth": args.depth,
          "width": args.width,
          "init_scale": args.init_scale,
          "singular_values": singular_values.tolist(),
          "initial_loss": initial_loss,
          "threshold_fraction": args.threshold,
          "threshold_loss": threshold,
          "gradient_flow_time_to_threshold": flow_time,
      },
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Escape from the saddle at the origin of a deep linear network: steps and"
      " seconds until the loss falls below a threshold."
  )
  problem = parser.add_argument_group("problem")
  problem.add_argument("--depth", type=arguments.positive_int, default=3,
                       help="number of weight matrices, at least 2 (default: 3)")
  problem.add_argument("--width", type=arguments.positive_int, default=16,
                       help="size of the square matrices (default: 16)")
  problem.add_argument("--init-scale", type=arguments.positive_float, default=1e-3,
                       help="singular value a of each starting matrix; the product starts at"
                       " a**depth (default: 1e-3)")
  problem.add_argument("--largest-singular-value", type=arguments.positive_float, default=1.0,
                       help="largest singular value of the target (default: 1)")
  problem.add_argument("--smallest-singular-value", type=arguments.positive_float, default=0.1,
                       help="smallest singular value of the target (default: 0.1)")
  problem.add_argument("--threshold", type=arguments.positive_float, default=0.01,
                       help="escape threshold as a fraction of the starting loss (default: 0.01)")
  common.add_common_arguments(parser, steps=2000, eval_every=50)
  args = parser.parse_args(argv)
  if args.depth < 2:
    parser.error(f"--depth must be at least 2 for a saddle at the origin, got {args.depth}")
  if args.threshold >= 1.0:
    parser.error(f"--threshold must be below 1, got {args.threshold}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Run the benchmark from command-line arguments and return the JSON written."""
  args = parse_args(argv)
  problem = build_problem(args)
  print(f"{problem.title}: loss {problem.settings['initial_loss']:.4g} at the start,"
        f" threshold {problem.threshold:.4g}; gradient-flow time to it"
        f" {problem.settings['gradient_flow_time_to_threshold']:.4g}")
  specs = common.standard_specs(args.optimizers, common.simba_options(args))
  return common.run_benchmark(problem, specs, args, argv)


if __name__ == "__main__":
  main()
