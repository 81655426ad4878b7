"""The digits split the integration tests share with the demo (`examples/digits.py`)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # scripts run from this folder (multiworker_job.py) import it too
    sys.path.insert(0, _ROOT)

from examples.digits import load_digits_split  # noqa: E402

__all__ = ["load_digits_split"]
