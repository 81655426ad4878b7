"""Callbacks for distillation inside the user's own ``fit``.

* `HardSampleReweighting` (``reweighting.py``; signals in ``signals.py``,
  its crash-recovery file in ``backup.py``): per-example sample weights from a
  difficulty signal, read from values the training step already computes.
* `DistillationScheduler` (``scheduler.py``): changes `DistillationLoss`'s
  temperature and alpha over epochs without recompiling, with the `constant`,
  `linear`, `cosine` and `step` schedules (``schedules.py``).
* `Callback` (``base.py``): the base class of all of them, which runs in
  Keras 3 ``fit`` and tf_keras ``fit`` alike.
"""

from keras_kd.callbacks.backup import BackupCorruptedError
from keras_kd.callbacks.base import Callback
from keras_kd.callbacks.reweighting import HardSampleReweighting
from keras_kd.callbacks.scheduler import DistillationScheduler
from keras_kd.callbacks.schedules import Schedule
from keras_kd.callbacks.schedules import constant
from keras_kd.callbacks.schedules import cosine
from keras_kd.callbacks.schedules import linear
from keras_kd.callbacks.schedules import step
from keras_kd.callbacks.signals import SIGNALS
from keras_kd.callbacks.signals import normalise
from keras_kd.callbacks.signals import raw_weights
from keras_kd.callbacks.signals import signal_kl
from keras_kd.callbacks.signals import signal_student_ce
from keras_kd.callbacks.signals import signal_teacher_ce
from keras_kd.callbacks.signals import signal_teacher_entropy
from keras_kd.callbacks.signals import signal_teacher_wrong
from keras_kd.callbacks.signals import signal_wsld

__all__ = [
    "BackupCorruptedError",
    "Callback",
    "DistillationScheduler",
    "HardSampleReweighting",
    "SIGNALS",
    "Schedule",
    "constant",
    "cosine",
    "linear",
    "normalise",
    "raw_weights",
    "signal_kl",
    "signal_student_ce",
    "signal_teacher_ce",
    "signal_teacher_entropy",
    "signal_teacher_wrong",
    "signal_wsld",
    "step",
]
