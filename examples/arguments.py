"""Command-line value types shared by the examples and the benchmarks."""

import argparse


def positive_int(text: str) -> int:
    """Parses an integer of at least 1, for ``argparse`` ``type=``."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parses a number greater than 0, for ``argparse`` ``type=``."""
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text!r}")
    return value
