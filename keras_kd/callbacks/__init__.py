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

from keras_kd.callbacks.reweighting import *  # noqa: F401,F403 (transitional)
from keras_kd.callbacks.reweighting import BackupCorruptedError  # noqa: F401
from keras_kd.callbacks.reweighting import SIGNALS  # noqa: F401
