"""Pytest configuration shared by the test modules."""

import os
import sys
from pathlib import Path

# OpenBLAS runs JAX's CPU QR and SVD. Its default thread pool competes with
# XLA's threads and made one small QR a thousand times slower on 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The examples are not part of the installed package. Putting the repository root on
# the path lets tests import them as `examples.<module>`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
