"""Simba, a randomized coarse-model preconditioned gradient method, for Optax."""

from simba_optax._matrix_view import SimbaDimensionNumbers
from simba_optax._partition import partition_specs
from simba_optax._simba import SimbaState
from simba_optax._simba import simba

__version__ = "0.1.0"

__all__ = ["SimbaDimensionNumbers", "SimbaState", "partition_specs", "simba"]
