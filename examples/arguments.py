"""Command-line value types shared by the examples and the benchmarks.

Each raises ``argparse.ArgumentTypeError`` with the allowed range, so that
``argparse`` reports a bad value as a usage error naming the option.
"""

import argparse
import math

# scikit-learn accepts seeds (random_state) in [0, 2**32 - 1].
_MAX_SEED = 2**32 - 1


def _parse(text: str, kind, expected: str, is_valid):
    """Converts ``text`` with ``kind`` and raises unless ``is_valid`` accepts the value."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not is_valid(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Parses an integer of at least 1."""
    return _parse(text, int, "an integer of at least 1", lambda value: value >= 1)


def positive_float(text: str) -> float:
    """Parses a finite number greater than 0."""
    return _parse(
        text, float, "a finite number greater than 0",
        lambda value: math.isfinite(value) and value > 0.0,
    )


def non_negative_float(text: str) -> float:
    """Parses a finite number of at least 0."""
    return _parse(
        text, float, "a finite number of at least 0",
        lambda value: math.isfinite(value) and value >= 0.0,
    )


def fraction(text: str) -> float:
    """Parses a number in (0, 1]."""
    return _parse(
        text, float, "a number greater than 0 and at most 1",
        lambda value: 0.0 < value <= 1.0,
    )


def seed(text: str) -> int:
    """Parses a seed, an integer in [0, 2**32 - 1]."""
    return _parse(
        text, int, f"an integer from 0 to {_MAX_SEED}",
        lambda value: 0 <= value <= _MAX_SEED,
    )
