"""Checks of Simba's hyperparameters, raised when the transformation is built.

Every error names the argument, the value received, the allowed range and a
fix. Values that ``optax.inject_hyperparams`` passes as traced arrays are
only checked when they are concrete.
"""

import math
import numbers
from typing import Any

import jax
import numpy as np


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _as_float(name: str, value: Any) -> float | None:
  """Returns ``value`` as a float, or ``None`` if it is a traced array."""
  if _is_traced(value):
    return None
  if isinstance(value, bool):
    raise TypeError(f"simba: {name} must be a real number, got {value!r}.")
  try:
    array = np.asarray(value)
  except TypeError:
    array = None
  if array is None or array.shape != () or array.dtype.kind not in "iuf":
    raise TypeError(
        f"simba: {name} must be a real scalar, got {value!r}."
    )
  return float(array)


def check_range(
    name: str, value: Any, low: float, high: float, *,
    low_open: bool = False, high_open: bool = False, hint: str = "",
) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number in the range.

  Args:
    name: the argument's name, used in the message.
    value: the value to check. A traced array is accepted unchecked.
    low: lower end of the range.
    high: upper end of the range; ``math.inf`` for none.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    hint: what to do instead, appended to the message.
  """
  number = _as_float(name, value)
  if number is None:
    return
  below = number <= low if low_open else number < low
  above = number >= high if high_open else number > high
  if math.isnan(number) or below or above:
    interval = (
        f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    )
    raise ValueError(
        f"simba: {name}={value!r} is out of range; it must be in {interval}."
        f" {hint}".rstrip()
    )


def check_static_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
  """Returns ``value`` as an int after checking it is a static int >= minimum.

  Args:
    name: the argument's name, used in the message.
    value: the value to check.
    minimum: the smallest allowed value.
    hint: what to do instead, appended to the message.

  Returns:
    ``int(value)``.

  Raises:
    TypeError: if ``value`` is traced, a bool, or not an integer.
    ValueError: if ``value < minimum``.
  """
  if _is_traced(value):
    raise TypeError(
        f"simba: {name} sets array shapes, so it must be a static Python int,"
        f" got a traced value. With optax.inject_hyperparams, list {name!r} in"
        " static_args."
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    if not (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
            and np.asarray(value).dtype.kind in "iu"):
      raise TypeError(f"simba: {name} must be an int, got {value!r}.")
  number = int(value)
  if number < minimum:
    raise ValueError(
        f"simba: {name}={number} is out of range; it must be an int >="
        f" {minimum}. {hint}".rstrip()
    )
  return number


def check_static_fraction(name: str, value: Any) -> float:
  """Returns ``value`` as a float after checking it lies in ``(0, 1]``."""
  if _is_traced(value):
    raise TypeError(
        f"simba: {name} sets array shapes, so it must be a static Python"
        " float, got a traced value. With optax.inject_hyperparams, list"
        f" {name!r} in static_args."
    )
  check_range(
      name, value, 0.0, 1.0, low_open=True,
      hint="It is the share of rows sampled each step: use 1.0 for all rows.",
  )
  return float(value)


def leaf_path_difference(expected: Any, given: Any, is_leaf=None) -> str | None:
  """Names the leaves that ``given`` lacks or adds relative to ``expected``.

  Both trees are flattened with ``is_leaf``. Returns ``"missing leaves
  [...], unexpected leaves [...]"``, or ``None`` when the leaf paths agree.
  """
  def paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [jax.tree_util.keystr(path) for path, _ in leaves]

  expected_paths, given_paths = paths(expected), paths(given)
  missing = [path for path in expected_paths if path not in given_paths]
  unexpected = [path for path in given_paths if path not in expected_paths]
  if not missing and not unexpected:
    return None
  return f"missing leaves {missing}, unexpected leaves {unexpected}"
