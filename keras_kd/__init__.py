"""keras_kd: drop-in knowledge distillation for Keras 3 and tf_keras.

The user keeps their own ``compile`` and ``fit``; distillation enters through
the dataset (teacher targets next to the labels) and the loss.

``keras_kd.optimize`` (tfmot chains, TFLite) and ``keras_kd.tuning``
(keras-tuner searches) are imported on first use, so a plain ``import
keras_kd`` does not import tfmot or keras-tuner.
"""

import importlib as _importlib

from keras_kd.alignment import Aligned
from keras_kd.alignment import align
from keras_kd.cache import CacheCorruptedError
from keras_kd.cache import CacheMismatchError
from keras_kd.cache import TeacherLogitCache
from keras_kd.cache import cache_teacher_logits
from keras_kd.callbacks import Callback
from keras_kd.callbacks import DistillationScheduler
from keras_kd.callbacks import HardSampleReweighting
from keras_kd.callbacks import constant
from keras_kd.callbacks import cosine
from keras_kd.callbacks import linear
from keras_kd.callbacks import step
from keras_kd.data import add_example_ids
from keras_kd.data import mixup
from keras_kd.data import unlabelled
from keras_kd.data import with_teacher
from keras_kd.losses import DIVERGENCES
from keras_kd.losses import NO_LABEL
from keras_kd.losses import DecoupledKD
from keras_kd.losses import DistillationLoss
from keras_kd.losses import forward_kl
from keras_kd.losses import jensen_shannon
from keras_kd.losses import logit_huber
from keras_kd.losses import logit_mse
from keras_kd.losses import reverse_kl
from keras_kd.losses import soft_cross_entropy
from keras_kd.metrics import loss_components
from keras_kd.metrics import teacher_agreement
from keras_kd.targets import TeacherTargets

__version__ = "0.1.0"

__all__ = [
    "Aligned",
    "Callback",
    "CacheCorruptedError",
    "CacheMismatchError",
    "DIVERGENCES",
    "DecoupledKD",
    "NO_LABEL",
    "DistillationLoss",
    "DistillationHyperModel",
    "DistillationScheduler",
    "HardSampleReweighting",
    "add_example_ids",
    "mixup",
    "unlabelled",
    "align",
    "cache_teacher_logits",
    "distillation_hyperparameters",
    "constant",
    "cosine",
    "linear",
    "step",
    "TeacherLogitCache",
    "TeacherTargets",
    "forward_kl",
    "jensen_shannon",
    "logit_huber",
    "logit_mse",
    "loss_components",
    "reverse_kl",
    "soft_cross_entropy",
    "teacher_agreement",
    "optimize",
    "tuning",
    "with_teacher",
]

# Submodules imported on first use (they import tfmot / keras-tuner), and the
# public names they provide at the top level.
_LAZY_MODULES = ("optimize", "tuning")
_LAZY_NAMES = {
    "DistillationHyperModel": "tuning",
    "distillation_hyperparameters": "tuning",
}


def __getattr__(name):
    if name in _LAZY_MODULES:
        return _importlib.import_module(f"keras_kd.{name}")
    if name in _LAZY_NAMES:
        return getattr(_importlib.import_module(f"keras_kd.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'keras_kd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
