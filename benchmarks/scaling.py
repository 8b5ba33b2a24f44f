"""Scaling of Simba's update with the leaf size, and the cost of its approximations.

Prints tables and writes them to JSON:

1. The update of one ``N x N`` leaf for ``N`` from 256 to 8192: median time,
   compiled temporary memory over the leaf's bytes, and the fitted log-log
   slope of time against ``N``. A cost of ``n_l d (rank + oversampling)``
   gives a slope near 2; forming ``Q = A A^T`` would give 3.
2. A tall ``10^6 x 64`` leaf (an embedding table) with rows on axis 0, with
   ``coarse_rows=256`` and with the default fraction, and the same leaf with
   the default view (64 rows of 10^6 columns).
3. Row sampling's share of the update time at ``n = 10^6, n_l = 256``.
4. No ``n_l x n_l`` or ``n x n`` array in the update's jaxpr, for leaves
   where both would be large.
5. The accuracy of the randomized path against the exact formula, by number
   of power iterations, on a decaying and on a flat spectrum.

Usage:
  python benchmarks/scaling.py [--max-n 8192] [--repeats 5] [--out benchmarks/results]
"""

import os

# One OpenBLAS thread: its default pool competes with XLA's on CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import simba_optax  # noqa: E402
from simba_optax import _eigendecomposition  # noqa: E402
from simba_optax import _row_sampling  # noqa: E402


def update_function(leaf: jax.Array, **kwargs):
  tx = simba_optax.simba(momentum=0.0, **kwargs)
  state = tx.init(leaf)
  update = jax.jit(tx.update)
  return update, state


def temp_bytes(update, leaf, state) -> int:
  analysis = update.lower(leaf, state).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes)


def large_square_shapes(update, leaf, state, threshold: int) -> list[tuple[int, ...]]:
  """Returns the shapes of intermediates with two equal dims >= ``threshold``."""
  jaxpr = jax.make_jaxpr(update)(leaf, state)
  found = []

  def visit(closed):
    for equation in closed.eqns:
      for var in equation.outvars:
        shape = getattr(var.aval, "shape", ())
        if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] >= threshold:
          found.append(tuple(shape))
      for param in equation.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          visit(inner if hasattr(inner, "eqns") else inner.jaxpr)

  visit(jaxpr.jaxpr)
  return found


def square_scaling(sizes, repeats) -> dict:
  rows = []
  for n in sizes:
    leaf = jax.random.normal(jax.random.key(n), (n, n))
    update, state = update_function(leaf)
    medians = _timing.interleaved_medians(
        {"update": lambda: jax.block_until_ready(update(leaf, state))}, repeats
    )
    squares = large_square_shapes(update, leaf, state, threshold=max(n // 2, 512))
    # The leaf itself and the output are n x n; anything else is a Gram matrix.
    squares = [s for s in squares if s[-2:] != (n, n)]
    rows.append({
        "n": n,
        "median_s": medians["update"],
        "temp_over_leaf": temp_bytes(update, leaf, state) / leaf.nbytes,
        "large_square_intermediates": [list(s) for s in squares],
    })
    print(f"  N={n}: {medians['update'] * 1e3:.1f} ms", flush=True)

  log_n = np.log([r["n"] for r in rows])
  log_t = np.log([r["median_s"] for r in rows])
  slope = float(np.polyfit(log_n, log_t, 1)[0])
  # The smallest sizes are dominated by fixed overheads, so fit the top half too.
  half = len(rows) // 2
  slope_top = float(np.polyfit(log_n[half:], log_t[half:], 1)[0]) if len(rows) - half >= 2 else slope
  return {"rows": rows, "slope": slope, "slope_upper_half": slope_top}


def tall_leaf(repeats) -> dict:
  n, d = 10**6, 64
  leaf = jax.random.normal(jax.random.key(0), (n, d))
  cases = {
      "row_axis=0, coarse_rows=256": dict(
          dimension_numbers=simba_optax.SimbaDimensionNumbers(row_axis=0), coarse_rows=256),
      "row_axis=0, coarse_fraction=0.5": dict(
          dimension_numbers=simba_optax.SimbaDimensionNumbers(row_axis=0)),
      "default view (64 rows)": {},
  }
  results = {}
  for name, kwargs in cases.items():
    update, state = update_function(leaf, **kwargs)
    medians = _timing.interleaved_medians(
        {"update": lambda: jax.block_until_ready(update(leaf, state))}, repeats, warmup=1
    )
    squares = large_square_shapes(update, leaf, state, threshold=256)
    results[name] = {
        "median_s": medians["update"],
        "temp_over_leaf": temp_bytes(update, leaf, state) / leaf.nbytes,
        "large_square_intermediates": [list(s) for s in squares],
    }
    print(f"  {name}: {medians['update'] * 1e3:.1f} ms", flush=True)
  return results


def sampling_share(repeats) -> dict:
  n, d, size = 10**6, 64, 256
  leaf = jax.random.normal(jax.random.key(0), (n, d))
  update, state = update_function(
      leaf, dimension_numbers=simba_optax.SimbaDimensionNumbers(row_axis=0),
      coarse_rows=size,
  )
  sample = jax.jit(lambda key: _row_sampling.sample_rows(key, n, size))
  key = jax.random.key(1)
  medians = _timing.interleaved_medians(
      {
          "update": lambda: jax.block_until_ready(update(leaf, state)),
          "sampling": lambda: jax.block_until_ready(sample(key)),
      },
      repeats,
  )
  return {"median_s": medians, "share": medians["sampling"] / medians["update"]}


def accuracy(max_iterations: int) -> dict:
  rng = np.random.default_rng(0)
  rows, columns, rank, oversampling = 512, 768, 20, 10
  left, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
  right, _ = np.linalg.qr(rng.standard_normal((columns, rows)))
  spectra = {
      "decaying 0.9**i": 0.9 ** np.arange(rows),
      "flat (Gaussian matrix)": None,
  }
  results = {}
  for name, spectrum in spectra.items():
    if spectrum is None:
      block = rng.standard_normal((rows, columns))
    else:
      block = (left * spectrum) @ right.T
    block32 = jnp.asarray(block, jnp.float32)
    exact = np.asarray(
        _eigendecomposition._exact_direction(block32, rank, jnp.float32(1e-8)),
        np.float64,
    )
    errors = {}
    for iterations in range(max_iterations + 1):
      randomized = _eigendecomposition._randomized_directions(
          block32[None], jax.random.key(0)[None], rank, jnp.float32([1e-8]),
          oversampling, iterations,
      )[0]
      errors[iterations] = float(
          np.linalg.norm(np.asarray(randomized, np.float64) - exact) / np.linalg.norm(exact)
      )
    results[name] = errors
  return {"shape": [rows, columns], "rank": rank, "oversampling": oversampling,
          "relative_error_by_power_iterations": results}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-n", type=int, default=8192, help="largest N of the N x N leaf")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
  parser.add_argument("--skip-tall", action="store_true", help="skip the 10^6 x 64 leaf")
  parser.add_argument("--out", default="benchmarks/results", help="output folder")
  args = parser.parse_args(argv)

  report = {"machine": _timing.machine(), "command": " ".join(sys.argv)}
  sizes = [n for n in (256, 512, 1024, 2048, 4096, 8192, 16384) if n <= args.max_n]

  print("N x N leaf, default settings (n_l = N/2, rank 20, oversampling 10)")
  report["square"] = square_scaling(sizes, args.repeats)
  print(_timing.markdown_table(
      ["N", "median update (ms)", "temp memory / leaf", "n_l x n_l arrays"],
      [[r["n"], f"{r['median_s'] * 1e3:.2f}", f"{r['temp_over_leaf']:.2f}",
        len(r["large_square_intermediates"])] for r in report["square"]["rows"]],
  ))
  print(f"log-log slope of time against N: {report['square']['slope']:.2f} "
        f"(upper half: {report['square']['slope_upper_half']:.2f})")

  if not args.skip_tall:
    print("\n10^6 x 64 leaf")
    report["tall"] = tall_leaf(args.repeats)
    print(_timing.markdown_table(
        ["case", "median update (ms)", "temp memory / leaf", "large square arrays"],
        [[name, f"{r['median_s'] * 1e3:.1f}", f"{r['temp_over_leaf']:.2f}",
          len(r["large_square_intermediates"])] for name, r in report["tall"].items()],
    ))
    report["sampling"] = sampling_share(args.repeats)
    print(f"\nrow sampling at n=10^6, n_l=256: "
          f"{report['sampling']['median_s']['sampling'] * 1e3:.2f} ms, "
          f"{100 * report['sampling']['share']:.1f}% of the update")

  report["accuracy"] = accuracy(max_iterations=3)
  print("\nRandomized path against the exact formula (relative Frobenius error), "
        f"{report['accuracy']['shape']}, rank 20, oversampling 10")
  errors = report["accuracy"]["relative_error_by_power_iterations"]
  print(_timing.markdown_table(
      ["spectrum"] + [f"q={q}" for q in range(4)],
      [[name] + [f"{e:.1e}" for e in by_q.values()] for name, by_q in errors.items()],
  ))

  path = os.path.join(args.out, "scaling.json")
  _timing.write_json(path, report)
  print(f"\nwrote {path}")
  return report


if __name__ == "__main__":
  main()
