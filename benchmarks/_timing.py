"""Timing and environment helpers shared by the benchmark scripts."""

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax


def machine() -> dict[str, Any]:
  """Returns the facts about this run that a reader needs to compare figures."""
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "processor": platform.machine(),
      "cpu_count": os.cpu_count(),
      "device": f"{device.platform}:{device.device_kind}",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
  }


def interleaved_medians(
    functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
  """Times each function ``repeats`` times, taking turns, and returns medians.

  Taking turns spreads background load on a shared machine over all
  candidates, so the ratios between medians are fairer than the figures.

  Args:
    functions: name to a zero-argument callable that blocks until its
      result is ready.
    repeats: timed calls per function, after ``warmup`` untimed ones.
    warmup: untimed calls per function (compilation happens here).

  Returns:
    Name to the median wall time of one call, in seconds.
  """
  for function in functions.values():
    for _ in range(warmup):
      function()

  samples: dict[str, list[float]] = {name: [] for name in functions}
  for _ in range(repeats):
    for name, function in functions.items():
      start = time.perf_counter()
      function()
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in samples.items()}


def write_json(path: str, payload: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as handle:
    json.dump(payload, handle, indent=2, sort_keys=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)
