"""Command-line value types shared by the examples and the benchmarks.

Each raises ``argparse.ArgumentTypeError`` with the allowed range, so that
``argparse`` reports a bad value as a usage error naming the option.
"""

import argparse
import math

# scikit-learn accepts seeds (random_state) in [0, 2**32 - 1].
_LARGEST_SEED = 2**32 - 1


def _number(text: str, kind, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """Parses an integer of at least 1."""
    expected = "an integer of at least 1"
    value = _number(text, int, expected)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parses a finite number greater than 0."""
    expected = "a finite number greater than 0"
    value = _number(text, float, expected)
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parses a finite number of at least 0."""
    expected = "a finite number of at least 0"
    value = _number(text, float, expected)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """Parses a number in (0, 1]."""
    expected = "a number greater than 0 and at most 1"
    value = _number(text, float, expected)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def seed(text: str) -> int:
    """Parses a seed, an integer in [0, 2**32 - 1]."""
    expected = f"an integer from 0 to {_LARGEST_SEED}"
    value = _number(text, int, expected)
    if not 0 <= value <= _LARGEST_SEED:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value
