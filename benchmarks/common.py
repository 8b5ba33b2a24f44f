"""Optimizers, training loop, learning-rate grid and result files shared by the benchmarks.

Each benchmark script describes its problem as a :class:`Problem` and calls
:func:`run_benchmark`. Every optimizer starts from the same parameters and gets
the same batches for a given seed. One step function is compiled per problem and
optimizer: the learning rate is an argument of the compiled function and the
seed only enters through the initial state, so neither causes a recompilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from tqdm.auto import tqdm

import simba_optax
from benchmarks import _timing
from examples import arguments

# The paper's learning-rate grid (Tsipinakis & Parpas 2023, section 4).
PAPER_LR_GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1, 1.0)
OPTIMIZER_NAMES = ("simba", "adam", "sgd", "muon", "sophia")
# Peers from optional packages: run only when named with --optimizers.
OPTIONAL_OPTIMIZER_NAMES = ("kron",)
SGD_MOMENTUM = 0.9
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_GRID_SEED = 100  # apart from the evaluation seeds 0, 1, 2


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One optimizer configuration of a benchmark, without its learning rate.

  ``label`` names the configuration in tables, plots and learning-rate files,
  for example ``"simba"`` or ``"simba n_l=25"``. ``simba_options`` are keyword
  arguments of ``simba_optax.simba`` and apply only when ``name`` is
  ``"simba"``.
  """

  label: str
  name: str
  simba_options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Problem:
  """A training problem in the form the runner needs.

  Attributes:
    name: file stem of the result files, for example ``"least_squares_digits"``.
    title: one-line description for tables and plots.
    data: tree of arrays passed to every compiled function as an argument,
      never embedded as a constant.
    init: seed to ``(params, model_state)``; ``model_state`` is ``None`` for
      models without state such as batch statistics.
    loss: ``(params, model_state, data, batch_indices)`` to ``(loss,
      new_model_state)``. Differentiated with respect to ``params``.
    batch_indices: ``(seed, steps)`` to an int32 array of shape ``(steps,
      batch)``; full-batch problems return ``(steps, 1)`` and ignore it.
    evaluate: ``(params, model_state)`` to the metrics recorded at each
      evaluation, as Python floats. Runs on the host between compiled chunks.
    selection_metric: the metric that picks the learning rate and heads the
      tables, always a training metric. ``"train_loss"`` comes from
      ``evaluate``. ``"batch_loss"`` is the mean batch loss since the
      previous evaluation, which the runner records for every problem.
    grid_objective: jittable ``(params, model_state, data)`` to the selection
      metric, used by the grid. ``None`` when the selection metric is
      ``"batch_loss"``.
    schedule: step count to a learning-rate factor (traced), or ``None`` for
      a constant learning rate.
    plot_metrics: metrics drawn in the figure, each ``(key, axis label,
      log scale)``.
    threshold: if set, the tables report the steps and seconds until the
      selection metric first falls to this value or below.
    full_batch: every step's loss is the objective itself, so the threshold
      is checked on every step instead of at the evaluations.
    notes: chosen learning rates to lines added below the results table.
    muon_dimension_numbers: tree or callable given to ``optax.contrib.muon``
      as ``muon_weight_dimension_numbers``; ``None`` keeps Muon's default
      (every 2-D leaf).
    vectors_as_columns: pass 1-D leaves to Muon as ``(n, 1)`` matrices, so
      that Muon orthogonalises them instead of handing them to its AdamW.
    settings: facts about the problem stored in the JSON file.
  """

  name: str
  title: str
  data: Any
  init: Callable[[int], tuple[Any, Any]]
  loss: Callable[..., tuple[jax.Array, Any]]
  batch_indices: Callable[[int, int], np.ndarray]
  evaluate: Callable[[Any, Any], dict[str, float]]
  selection_metric: str = "train_loss"
  grid_objective: Callable[..., jax.Array] | None = None
  schedule: Callable[[jax.Array], jax.Array] | None = None
  plot_metrics: Sequence[tuple[str, str, bool]] = (("train_loss", "train loss", True),)
  threshold: float | None = None
  full_batch: bool = False
  notes: Callable[[dict[str, float]], list[str]] | None = None
  muon_dimension_numbers: Any = None
  vectors_as_columns: bool = False
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Optimizers


def with_vectors_as_columns(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Wrap ``tx`` so that every 1-D leaf reaches it as an ``(n, 1)`` matrix."""

  def to_columns(tree):
    return jax.tree.map(lambda x: x.reshape(-1, 1) if jnp.ndim(x) == 1 else x, tree)

  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return tx.init(to_columns(params))

  def update_fn(updates, state, params=None, **extra_args):
    columns, state = tx.update(
        to_columns(updates), state, None if params is None else to_columns(params),
        **extra_args,
    )
    return jax.tree.map(lambda c, u: c.reshape(jnp.shape(u)), columns, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build_optimizer(
    spec: OptimizerSpec,
    problem: Problem,
    learning_rate: float | jax.Array,
    seed: int,
) -> optax.GradientTransformationExtraArgs:
  """Create the optimizer of ``spec`` with its learning rate and schedule.

  The learning rate is always given as a schedule, so that the state has the
  same structure for every learning rate and for traced ones. ``seed`` sets
  the PRNG key that Simba and Sophia store in their state at ``init``.
  """
  factor = problem.schedule
  if factor is None:
    schedule = lambda count: learning_rate * jnp.ones_like(count, dtype=jnp.float32)
  else:
    schedule = lambda count: learning_rate * factor(count)

  if spec.name == "simba":
    tx = optax.chain(
        simba_optax.simba(seed=seed, **spec.simba_options),
        optax.scale_by_learning_rate(schedule),
    )
  elif spec.name == "adam":
    tx = optax.adam(schedule)
  elif spec.name == "sgd":
    tx = optax.sgd(schedule, momentum=SGD_MOMENTUM)
  elif spec.name == "muon":
    tx = contrib.muon(
        schedule, muon_weight_dimension_numbers=problem.muon_dimension_numbers
    )
    if problem.vectors_as_columns:
      tx = with_vectors_as_columns(tx)
  elif spec.name == "sophia":
    # Sophia-H: Hutchinson's estimate of the Hessian diagonal needs the
    # objective, passed to update as obj_fn. Weight decay is off as for the
    # other optimizers (optax's default is 1e-4).
    tx = contrib.sophia(
        schedule,
        weight_decay=0.0,
        hessian_diagonal_fn=contrib.hutchinson_estimator_diag_hessian(
            jax.random.PRNGKey(seed)
        ),
    )
  elif spec.name == "kron":
    tx = psgd_kron(schedule)
  else:
    names = OPTIMIZER_NAMES + OPTIONAL_OPTIMIZER_NAMES
    raise ValueError(
        f"unknown optimizer {spec.name!r}; expected one of {', '.join(names)}."
    )
  return optax.with_extra_args_support(tx)


def psgd_kron(schedule: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
  """Return PSGD Kron from the ``psgd-jax`` package with its defaults.

  Install it with ``pip install ".[psgd]"``. psgd-jax 0.2.9 imports
  ``optax._src.clipping``, which optax 0.2.8 no longer has, and uses nothing
  from it. ``optax.transforms._clipping`` is registered under that name
  when it is missing, so that the import succeeds.
  """
  try:
    importlib.import_module("optax._src.clipping")
  except ModuleNotFoundError:
    sys.modules["optax._src.clipping"] = importlib.import_module("optax.transforms._clipping")
  try:
    kron = importlib.import_module("psgd_jax.kron")
  except ModuleNotFoundError as error:
    raise ValueError(
        f"the kron optimizer needs the psgd-jax package ({error}). Install it with"
        ' pip install ".[psgd]", or leave kron out of --optimizers.'
    ) from None
  tx = kron.kron(learning_rate=schedule)

  # Its update rejects the extra arguments (obj_fn) that Sophia needs.
  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return tx.update(updates, state, params)

  return optax.GradientTransformation(tx.init, update_fn)


def standard_specs(names: Sequence[str], simba_options: dict[str, Any]) -> list[OptimizerSpec]:
  """Return one spec per optimizer name, Simba with ``simba_options``."""
  return [
      OptimizerSpec(name, name, dict(simba_options) if name == "simba" else {})
      for name in names
  ]


def muon_matrix_dimension_numbers(params: Any) -> Any:
  """Muon dimension numbers for Dense ``(in, out)`` and Conv ``(h, w, in, out)`` kernels.

  Other leaves get ``None`` and go to Muon's AdamW.
  """

  def spec(leaf):
    if leaf.ndim == 2:
      return contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    if leaf.ndim == 4:
      return contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    return None

  return jax.tree.map(spec, params)


# ---------------------------------------------------------------------------
# Training


def make_train_chunk(problem: Problem, spec: OptimizerSpec) -> Callable[..., Any]:
  """Return a function that takes one optimizer step per row of ``indices``.

  Its arguments are ``(params, model_state, opt_state, learning_rate, data,
  indices)`` and it returns the new ``(params, model_state, opt_state)`` and
  the loss of each batch, computed before that batch's update.
  """

  def train_chunk(params, model_state, opt_state, learning_rate, data, indices):
    # The seed only matters in init: update reads the key from opt_state.
    tx = build_optimizer(spec, problem, learning_rate, seed=0)

    def step(carry, batch_indices):
      params, model_state, opt_state = carry

      def objective(p):
        return problem.loss(p, model_state, data, batch_indices)

      (loss, new_model_state), grads = jax.value_and_grad(objective, has_aux=True)(params)
      updates, opt_state = tx.update(
          grads, opt_state, params, obj_fn=lambda p: objective(p)[0]
      )
      return (optax.apply_updates(params, updates), new_model_state, opt_state), loss

    (params, model_state, opt_state), losses = jax.lax.scan(
        step, (params, model_state, opt_state), indices
    )
    return params, model_state, opt_state, losses

  return train_chunk


@dataclasses.dataclass
class RunRecord:
  """Losses and timings of one run: one optimizer, learning rate and seed.

  ``train_time_s`` is the cumulative time of the compiled training chunks at
  each evaluation, without compilation and evaluation. ``seconds_per_step``
  is each chunk's time divided by its number of steps.
  """

  seed: int
  learning_rate: float
  batch_loss: list[float]
  eval_steps: list[int]
  metrics: dict[str, list[float]]
  train_time_s: list[float]
  seconds_per_step: list[float]
  compile_time_s: float
  eval_time_s: float
  diverged: bool


class ChunkCache:
  """Compiled training chunks of one problem and optimizer, by chunk length."""

  def __init__(self, problem: Problem, spec: OptimizerSpec):
    self._jitted = jax.jit(make_train_chunk(problem, spec))
    self._compiled: dict[int, Any] = {}
    self.compile_time_s = 0.0

  def compiled(self, params, model_state, opt_state, learning_rate, data, indices):
    """Return the compiled chunk for these arguments, compiling it on first use."""
    length = len(indices)
    if length not in self._compiled:
      start = time.perf_counter()
      self._compiled[length] = self._jitted.lower(
          params, model_state, opt_state, learning_rate, data, indices
      ).compile()
      self.compile_time_s += time.perf_counter() - start
    return self._compiled[length]

  def __call__(self, params, model_state, opt_state, learning_rate, data, indices):
    function = self.compiled(params, model_state, opt_state, learning_rate, data, indices)
    return function(params, model_state, opt_state, learning_rate, data, indices)


def _finite(value: float) -> bool:
  return value is not None and math.isfinite(value)


def train_run(
    problem: Problem,
    spec: OptimizerSpec,
    chunks: ChunkCache,
    learning_rate: float,
    seed: int,
    steps: int,
    eval_every: int,
    progress: bool = True,
) -> RunRecord:
  """Train one run and record its losses, metrics and timings.

  Metrics are evaluated before the first step, every ``eval_every`` steps
  and after the last. A run whose batch loss becomes NaN or infinite stops
  there and is marked diverged.
  """
  params, model_state = problem.init(seed)
  opt_state = build_optimizer(spec, problem, learning_rate, seed).init(params)
  indices = problem.batch_indices(seed, steps)
  data = problem.data
  lr = jnp.asarray(learning_rate, dtype=jnp.float32)
  compile_before = chunks.compile_time_s

  record = RunRecord(
      seed=seed, learning_rate=float(learning_rate), batch_loss=[], eval_steps=[],
      metrics={"batch_loss": []}, train_time_s=[], seconds_per_step=[],
      compile_time_s=0.0, eval_time_s=0.0, diverged=False,
  )

  def record_metrics(step: int, elapsed: float, window_losses: np.ndarray | None) -> None:
    start = time.perf_counter()
    metrics = problem.evaluate(params, model_state)
    record.eval_time_s += time.perf_counter() - start
    metrics["batch_loss"] = (
        float(np.mean(window_losses)) if window_losses is not None else math.nan
    )
    record.eval_steps.append(step)
    record.train_time_s.append(elapsed)
    for key, value in metrics.items():
      record.metrics.setdefault(key, []).append(float(value))

  record_metrics(0, 0.0, None)
  elapsed = 0.0
  description = f"{spec.label} lr={learning_rate:g} seed={seed}"
  with tqdm(total=steps, desc=description, disable=not progress, leave=False) as bar:
    for start in range(0, steps, eval_every):
      chunk = jnp.asarray(indices[start : start + eval_every])
      # Compilation happens here, outside the timed region.
      function = chunks.compiled(params, model_state, opt_state, lr, data, chunk)
      began = time.perf_counter()
      params, model_state, opt_state, losses = function(
          params, model_state, opt_state, lr, data, chunk
      )
      losses = np.asarray(jax.block_until_ready(losses), dtype=np.float64)
      spent = time.perf_counter() - began
      elapsed += spent
      record.seconds_per_step.append(spent / len(chunk))
      record.batch_loss.extend(losses.tolist())
      record_metrics(start + len(chunk), elapsed, losses)
      bar.update(len(chunk))
      bar.set_postfix({problem.selection_metric: f"{record.metrics[problem.selection_metric][-1]:.4g}"})
      if not np.all(np.isfinite(losses)):
        record.diverged = True
        break

  record.compile_time_s = chunks.compile_time_s - compile_before
  return record


def run_grid(
    problem: Problem,
    spec: OptimizerSpec,
    learning_rates: Sequence[float],
    seed: int,
    steps: int,
    eval_every: int,
    progress: bool = True,
) -> list[float]:
  """Train one run per learning rate and return each run's final selection metric.

  All runs share the seed, the initial parameters, the batches and one
  compiled chunk. A run whose batch loss turns NaN or infinite stops there
  and returns NaN.
  """
  # NOTE: the runs go one after another. Batching them with jax.vmap stalled
  # the autoencoder grid on a loaded 2-core CPU: the process sat in futex waits
  # at a few percent of one core.
  chunks = ChunkCache(problem, spec)
  indices = problem.batch_indices(seed, steps)
  objective = None if problem.grid_objective is None else jax.jit(problem.grid_objective)
  finals = []
  for learning_rate in learning_rates:
    params, model_state = problem.init(seed)
    opt_state = build_optimizer(spec, problem, learning_rate, seed).init(params)
    rate = jnp.asarray(learning_rate, dtype=jnp.float32)
    losses = np.zeros(0)
    description = f"grid {spec.label} lr={learning_rate:g}"
    with tqdm(total=steps, desc=description, disable=not progress, leave=False) as bar:
      for start in range(0, steps, eval_every):
        chunk = jnp.asarray(indices[start : start + eval_every])
        params, model_state, opt_state, losses = chunks(
            params, model_state, opt_state, rate, problem.data, chunk
        )
        losses = np.asarray(losses, dtype=np.float64)
        bar.update(len(chunk))
        if not np.all(np.isfinite(losses)):
          break

    if not np.all(np.isfinite(losses)):
      finals.append(math.nan)
    elif objective is None:
      finals.append(float(np.mean(losses)))
    else:
      value = float(objective(params, model_state, problem.data))
      finals.append(value if math.isfinite(value) else math.nan)
  return finals


# ---------------------------------------------------------------------------
# Summaries


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Return the mean and the sample standard deviation (ddof=1; 0 for one value)."""
  array = np.asarray(values, dtype=np.float64)
  if array.size == 0:
    return math.nan, math.nan
  std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
  return float(np.mean(array)), std


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
  finite = [value for value in values if _finite(value)]
  if not finite:
    return "diverged"
  mean, std = mean_std(finite)
  text = f"{mean:.{digits}g} ± {std:.2g}"
  if len(finite) < len(values):
    text += f" ({len(values) - len(finite)} diverged)"
  return text


def threshold_crossing(problem: Problem, record: RunRecord) -> tuple[int | None, float | None]:
  """Return the step and training seconds at which the selection metric first reaches the threshold.

  For a full-batch problem the check runs on every step's loss, else on the
  evaluations. Seconds are the cumulative chunk time
  up to that step, with steps inside a chunk counted at the chunk's mean.
  """
  if problem.threshold is None:
    return None, None
  if problem.full_batch:
    hits = [i for i, loss in enumerate(record.batch_loss) if loss <= problem.threshold]
    if not hits:
      return None, None
    step = hits[0]
  else:
    values = record.metrics[problem.selection_metric]
    hits = [i for i, value in enumerate(values) if value <= problem.threshold]
    if not hits:
      return None, None
    step = record.eval_steps[hits[0]]

  seconds, counted = 0.0, 0
  chunk_lengths = np.diff(record.eval_steps)
  for length, per_step in zip(chunk_lengths, record.seconds_per_step):
    take = min(int(length), step - counted)
    if take <= 0:
      break
    seconds += take * per_step
    counted += take
  return step, seconds


def summary_rows(
    problem: Problem,
    records: dict[str, list[RunRecord]],
) -> tuple[list[str], list[list[str]]]:
  """Return the header and rows of the results table: final metrics, mean ± std over seeds."""
  metric_keys = [problem.selection_metric] + [
      key for key, _, _ in problem.plot_metrics if key != problem.selection_metric
  ]
  header = ["optimizer", "learning rate", *[f"final {key}" for key in metric_keys]]
  if problem.threshold is not None:
    header += [f"steps to {problem.selection_metric} <= {problem.threshold:g}", "seconds to threshold"]
  header += ["ms per step", "train s per run", "compile s"]

  rows = []
  for label, runs in records.items():
    row = [label, f"{runs[0].learning_rate:g}"]
    for key in metric_keys:
      row.append(format_mean_std([run.metrics[key][-1] if not run.diverged else math.nan for run in runs]))
    if problem.threshold is not None:
      crossings = [threshold_crossing(problem, run) for run in runs]
      reached = [c for c in crossings if c[0] is not None]
      if reached:
        suffix = "" if len(reached) == len(runs) else f" ({len(runs) - len(reached)} of {len(runs)} never)"
        row.append(format_mean_std([c[0] for c in reached], 4) + suffix)
        row.append(format_mean_std([c[1] for c in reached], 3) + suffix)
      else:
        row += ["never", "never"]
    per_step_ms = [1e3 * float(np.median(run.seconds_per_step)) for run in runs]
    row.append(format_mean_std(per_step_ms, 3))
    row.append(format_mean_std([run.train_time_s[-1] for run in runs], 3))
    row.append(f"{runs[0].compile_time_s:.0f}")
    rows.append(row)
  return header, rows


# ---------------------------------------------------------------------------
# Files


def environment() -> dict[str, Any]:
  """Return the machine (``_timing.machine()``), package versions, XLA flags and load average."""
  import flax
  import scipy
  import sklearn

  facts = dict(_timing.machine())
  facts["versions"] = {
      "python": facts.get("python"),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "scipy": scipy.__version__,
      "scikit-learn": sklearn.__version__,
      "simba_optax": simba_optax.__version__,
  }
  facts["xla_flags"] = os.environ.get("XLA_FLAGS")
  if hasattr(os, "getloadavg"):
    facts["load_average_1_5_15_min"] = [round(value, 2) for value in os.getloadavg()]
  return facts


def _round_floats(value: Any, digits: int = 6) -> Any:
  if isinstance(value, float):
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: _round_floats(item, digits) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_round_floats(item, digits) for item in value]
  return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
  """Write compact JSON, floats at 6 significant digits and NaN as null."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_round_floats(payload), separators=(",", ":")) + "\n")


def plot_records(problem: Problem, records: dict[str, list[RunRecord]], path: Path) -> None:
  """Save each plot metric against steps (left) and training seconds (right).

  Lines are the mean over seeds; the band spans the lowest and highest seed.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = len(problem.plot_metrics)
  figure = Figure(figsize=(11, 3.6 * rows), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, 2, squeeze=False)
  for row, (key, axis_label, log_scale) in enumerate(problem.plot_metrics):
    for index, (label, runs) in enumerate(records.items()):
      complete = [run for run in runs if not run.diverged]
      if not complete:
        continue
      steps = np.asarray(complete[0].eval_steps)
      values = np.asarray([run.metrics[key] for run in complete], dtype=np.float64)
      seconds = np.mean([run.train_time_s for run in complete], axis=0)
      # The batch loss has no value at step 0, before any batch.
      defined = np.all(np.isfinite(values), axis=0)
      steps, values, seconds = steps[defined], values[:, defined], seconds[defined]
      mean = np.mean(values, axis=0)
      color = f"C{index % 10}"
      for column, x in enumerate((steps, seconds)):
        axis = axes[row][column]
        axis.plot(x, mean, color=color, label=f"{label} (lr {runs[0].learning_rate:g})")
        if len(complete) > 1:
          axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15)
    for column, x_label in enumerate(("step", "training seconds")):
      axis = axes[row][column]
      axis.set_xlabel(x_label)
      axis.set_ylabel(axis_label)
      if log_scale:
        axis.set_yscale("log")
      if problem.threshold is not None and key == problem.selection_metric:
        axis.axhline(problem.threshold, color="gray", linestyle=":", linewidth=1)
      axis.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=8)
  figure.suptitle(problem.title)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=90)


def command_line(argv: Sequence[str] | None) -> str:
  arguments = sys.argv[1:] if argv is None else list(argv)
  script = Path(sys.argv[0]).name if argv is None else "<main()>"
  return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, arguments)])


# ---------------------------------------------------------------------------
# Command line


def _learning_rate_override(text: str) -> tuple[str, float]:
  label, separator, value = text.rpartition("=")
  if not separator or not label:
    raise argparse.ArgumentTypeError(f"expected LABEL=VALUE such as simba=0.05, got {text!r}")
  return label, arguments.positive_float(value)


def add_common_arguments(
    parser: argparse.ArgumentParser, *, steps: int | None, eval_every: int | None
) -> None:
  """Add the options that every benchmark script shares.

  With ``steps=None`` the script sets ``args.steps`` and ``args.eval_every``
  itself (from epochs, for example) and the two options are left out.
  """
  runs = parser.add_argument_group("runs")
  runs.add_argument(
      "--optimizers", nargs="+", choices=OPTIMIZER_NAMES + OPTIONAL_OPTIMIZER_NAMES,
      default=list(OPTIMIZER_NAMES),
      help="optimizers to compare (default: all of %(default)s; kron needs the psgd extra)",
  )
  runs.add_argument(
      "--seeds", nargs="+", type=int, default=[0, 1, 2],
      help="seeds of the evaluation runs; each sets the initial parameters, the batch order"
      " and the optimizers' random draws (default: 0 1 2)",
  )
  if steps is not None:
    runs.add_argument("--steps", type=arguments.positive_int, default=steps,
                      help=f"optimizer steps per run (default: {steps})")
    runs.add_argument("--eval-every", type=arguments.positive_int, default=eval_every,
                      help=f"steps between evaluations (default: {eval_every})")
  runs.add_argument("--batch-size", type=arguments.positive_int, default=128,
                    help="examples per step (default: 128, as in the paper)")

  rates = parser.add_argument_group("learning rates")
  rates.add_argument(
      "--grid", action="store_true",
      help="run the learning-rate grid on --grid-seed and write NAME_lr.json, instead of the"
      " evaluation runs",
  )
  rates.add_argument(
      "--grid-values", nargs="+", type=arguments.positive_float, default=list(PAPER_LR_GRID),
      help="learning rates of the grid (default: the paper's grid "
      + " ".join(f"{lr:g}" for lr in PAPER_LR_GRID) + ")",
  )
  rates.add_argument("--grid-seed", type=int, default=DEFAULT_GRID_SEED,
                     help=f"seed of the grid runs (default: {DEFAULT_GRID_SEED})")
  rates.add_argument(
      "--lr-file", type=Path, default=None,
      help="JSON file of chosen learning rates written by --grid (default: OUT/NAME_lr.json)",
  )
  rates.add_argument(
      "--lr", nargs="+", type=_learning_rate_override, default=[], metavar="LABEL=VALUE",
      help="learning rates that replace those of the file, for example simba=0.05 adam=0.001",
  )

  simba = parser.add_argument_group("Simba")
  simba.add_argument("--rank", type=arguments.positive_int, default=20,
                     help="eigenpairs computed per matrix (default: 20)")
  simba.add_argument("--eps", type=float, default=1e-8,
                     help="floor on the singular values (default: 1e-8)")
  simba.add_argument("--coarse-fraction", type=float, default=0.5,
                     help="share of each matrix's rows sampled per step (default: 0.5)")

  output = parser.add_argument_group("output")
  output.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help="folder of the result files (default: benchmarks/results)")
  output.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def simba_options(args: argparse.Namespace) -> dict[str, Any]:
  return {"rank": args.rank, "eps": args.eps, "coarse_fraction": args.coarse_fraction}


def read_learning_rates(
    path: Path, labels: Sequence[str], overrides: Sequence[tuple[str, float]]
) -> dict[str, float]:
  """Return the learning rate of each label from ``path`` and the overrides.

  Raises:
    FileNotFoundError: a label has no override and ``path`` does not exist.
    ValueError: the file is not a learning-rate file or lacks a label.
  """
  rates = dict(overrides)
  unknown = sorted(set(rates) - set(labels))
  if unknown:
    raise ValueError(f"--lr names {unknown}, which are not among the optimizers {list(labels)}.")
  missing = [label for label in labels if label not in rates]
  if not missing:
    return rates
  if not path.is_file():
    raise FileNotFoundError(
        f"learning-rate file {str(path)!r} not found, and no --lr given for {missing}. Run the"
        " same command with --grid first, or pass --lr LABEL=VALUE for each optimizer."
    )
  try:
    chosen = json.loads(path.read_text())["chosen_learning_rates"]
  except (json.JSONDecodeError, KeyError, TypeError) as error:
    raise ValueError(
        f"{path} is not a learning-rate file written by --grid ({error!r}); expected a JSON"
        " object with 'chosen_learning_rates'."
    ) from error
  for label in missing:
    if label not in chosen or not _finite(chosen[label]):
      raise ValueError(
          f"{path} has no usable learning rate for {label!r} (it has {sorted(chosen)}); rerun"
          " --grid with this optimizer or pass --lr."
      )
    rates[label] = float(chosen[label])
  return rates


def run_benchmark(
    problem: Problem,
    specs: Sequence[OptimizerSpec],
    args: argparse.Namespace,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
  """Run the grid (``--grid``) or the evaluation runs and write the result files.

  Returns the content of the JSON file written.
  """
  labels = [spec.label for spec in specs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"optimizer labels must be unique, got {labels}.")
  lr_file = args.lr_file or args.out / f"{problem.name}_lr.json"
  command = command_line(argv)
  started = time.perf_counter()
  facts = environment()

  if args.grid:
    return _grid_benchmark(problem, specs, args, lr_file, command, started, facts)

  rates = read_learning_rates(lr_file, labels, args.lr)
  records: dict[str, list[RunRecord]] = {}
  for spec in specs:
    chunks = ChunkCache(problem, spec)
    records[spec.label] = [
        train_run(problem, spec, chunks, rates[spec.label], seed, args.steps,
                  args.eval_every, progress=not args.no_progress)
        for seed in args.seeds
    ]
    print(f"{spec.label}: done, final {problem.selection_metric} "
          + format_mean_std([run.metrics[problem.selection_metric][-1] for run in records[spec.label]]))

  header, rows = summary_rows(problem, records)
  table = _timing.markdown_table(header, rows)
  total = time.perf_counter() - started
  facts["load_average_end"] = [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None
  payload = {
      "problem": problem.name,
      "title": problem.title,
      "command": command,
      "settings": problem.settings,
      "steps": args.steps,
      "eval_every": args.eval_every,
      "batch_size": args.batch_size,
      "seeds": list(args.seeds),
      "selection_metric": problem.selection_metric,
      "threshold": problem.threshold,
      "learning_rate_source": os.path.relpath(lr_file) + (" and --lr" if args.lr else ""),
      "optimizers": {
          spec.label: {
              "name": spec.name,
              "simba_options": spec.simba_options,
              "learning_rate": rates[spec.label],
              "runs": [dataclasses.asdict(run) for run in records[spec.label]],
          }
          for spec in specs
      },
      "table": {"header": header, "rows": rows},
      "run_time_s": total,
      "machine": facts,
  }
  notes = problem.notes(rates) if problem.notes is not None else []
  payload["notes"] = notes
  write_json(args.out / f"{problem.name}.json", payload)
  plot_records(problem, records, args.out / f"{problem.name}.png")
  markdown = _results_markdown(problem, table, command, facts, total, args)
  if notes:
    markdown += "\n".join(notes) + "\n"
  (args.out / f"{problem.name}.md").write_text(markdown)
  print()
  print(table)
  print(f"\nWrote {problem.name}.json, .png and .md to {args.out} ({total:.0f} s in all).")
  return payload


def _results_markdown(problem, table, command, facts, total, args) -> str:
  load = facts.get("load_average_1_5_15_min")
  lines = [
      f"### {problem.title}",
      "",
      f"Command: `{command}`",
      "",
      f"Date {facts['date']}, {facts['platform']}, {facts['cpu_count']} CPU cores,"
      f" {facts['device']}, jax {facts['jax']}, optax {facts['optax']}."
      + (f" Load average at the start: {load[0]} (1 min)." if load else "")
      + f" Whole command: {total:.0f} s.",
      "",
      f"Mean ± standard deviation over seeds {' '.join(map(str, args.seeds))},"
      f" {args.steps} steps of batch {args.batch_size}. "
      + _rate_source_sentence(problem, args)
      + " Times are of the compiled steps on a shared machine and vary with its load.",
      "",
      table,
      "",
  ]
  return "\n".join(lines)


def _rate_source_sentence(problem: Problem, args: argparse.Namespace) -> str:
  chosen = f"chosen by the grid on {problem.selection_metric} (a training metric)"
  if not args.lr:
    return f"Learning rates {chosen}."
  given = ", ".join(label for label, _ in args.lr)
  return f"Learning rates given with --lr for {given}; any others {chosen}."


def _grid_benchmark(problem, specs, args, lr_file, command, started, facts) -> dict[str, Any]:
  values = list(args.grid_values)
  finals: dict[str, list[float]] = {}
  for spec in specs:
    finals[spec.label] = run_grid(
        problem, spec, values, args.grid_seed, args.steps, args.eval_every,
        progress=not args.no_progress,
    )

  chosen = {}
  for label, results in finals.items():
    finite = [(value, rate) for value, rate in zip(results, values) if _finite(value)]
    chosen[label] = min(finite)[1] if finite else None

  header = ["learning rate", *finals]
  rows = []
  for index, rate in enumerate(values):
    row = [f"{rate:g}"]
    for label, results in finals.items():
      value = results[index]
      cell = f"{value:.4g}" if _finite(value) else "diverged"
      row.append(f"**{cell}**" if chosen[label] == rate else cell)
    rows.append(row)
  table = _timing.markdown_table(header, rows)
  edges = [
      label for label, rate in chosen.items()
      if rate is not None and len(values) > 1 and rate in (min(values), max(values))
  ]
  total = time.perf_counter() - started
  payload = {
      "problem": problem.name,
      "command": command,
      "settings": problem.settings,
      "steps": args.steps,
      "batch_size": args.batch_size,
      "grid_seed": args.grid_seed,
      "selection_metric": problem.selection_metric,
      "grid": values,
      "final_selection_metric": finals,
      "chosen_learning_rates": chosen,
      "chosen_at_grid_edge": edges,
      "run_time_s": total,
      "machine": facts,
  }
  write_json(lr_file, payload)
  markdown = "\n".join([
      f"### Learning-rate grid: {problem.title}",
      "",
      f"Command: `{command}`",
      "",
      f"Final {problem.selection_metric} after {args.steps} steps, seed {args.grid_seed}; the"
      f" lowest per optimizer (bold) is chosen. Date {facts['date']}, {total:.0f} s.",
      "",
      table,
      "",
  ] + ([f"Chosen at the edge of the grid: {', '.join(edges)}.", ""] if edges else []))
  lr_file.with_suffix(".md").write_text(markdown)
  print()
  print(table)
  print("\nChosen: " + ", ".join(f"{label} {rate:g}" if rate else f"{label} none" for label, rate in chosen.items()))
  print(f"Wrote {lr_file} ({total:.0f} s in all).")
  return payload
