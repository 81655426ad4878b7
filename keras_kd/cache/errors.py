"""The cache's errors (one class per failure) and its user-facing warning."""

import os
import sys
import warnings

import tensorflow as tf


class CacheMismatchError(ValueError):
    """The cache in a directory was built for another teacher, dataset or settings."""


class CacheCorruptedError(ValueError):
    """A cache file is missing, truncated, fails its checksum or breaks the schema."""


class ProbeMismatch(CacheMismatchError):
    """The teacher, re-run on the first examples, disagrees with the stored rows
    although the fingerprint matches (a rebuild then takes fresh names)."""


def warn(message: str):
    """Warns at the first caller outside keras_kd and TensorFlow (the user's line)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tf_dir = os.path.dirname(os.path.abspath(tf.__file__))
    level, frame = 1, sys._getframe(1)  # noqa: SLF001
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not (filename.startswith(here) or filename.startswith(tf_dir)):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)
