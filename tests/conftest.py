"""Pytest configuration shared by the test modules."""

import sys
from pathlib import Path

# The examples are not part of the installed package. Putting the repository root on
# the path lets tests import them as `examples.<module>`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
