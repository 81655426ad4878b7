"""Distillation losses: `DistillationLoss`, the divergences it compares teacher and
student with, and the pieces of one training step.

Where to change what:

* a new divergence: `divergences` (``fn(teacher_logits, student_logits)``, add
  it to `DIVERGENCES`); one that reads the labels: `label_aware`
  (subclass `LabelAwareDivergence`, as `DecoupledKD`);
* how labels are read: `keras_kd._labels` (shared with metrics and callbacks);
  the hard-label loss: `hard`;
* checks on the step's inputs (NaN teacher, positions, probabilities):
  `guards`; dense teacher logits from top-k targets: `teacher`;
* observers and weightings (the callback protocol): `hooks`;
* weights, masks, reductions, replica scaling: `reduction`;
* the analytic gradient of the common case: `fused`.
"""

from keras_kd._labels import NO_LABEL
from keras_kd.losses.divergences import DIVERGENCES
from keras_kd.losses.divergences import ZERO_MASS_SAFE
from keras_kd.losses.divergences import Divergence
from keras_kd.losses.divergences import divergence_name
from keras_kd.losses.divergences import forward_kl
from keras_kd.losses.divergences import get_divergence
from keras_kd.losses.divergences import jensen_shannon
from keras_kd.losses.divergences import logit_huber
from keras_kd.losses.divergences import logit_mse
from keras_kd.losses.divergences import reverse_kl
from keras_kd.losses.divergences import soft_cross_entropy
from keras_kd.losses.guards import nan_where_invalid
from keras_kd.losses.hard import binary_hard_loss
from keras_kd.losses.hard import default_hard_loss
from keras_kd.losses.hooks import Observer
from keras_kd.losses.hooks import StepTerms
from keras_kd.losses.hooks import Weighting
from keras_kd.losses.label_aware import DecoupledKD
from keras_kd.losses.label_aware import LabelAwareDivergence
from keras_kd.losses.label_aware import decoupled_kd
from keras_kd.losses.label_aware import is_label_aware
from keras_kd.losses.loss import DistillationLoss
from keras_kd.losses.reduction import REDUCTIONS
from keras_kd.losses.reduction import reduce_values

__all__ = [
    "DIVERGENCES",
    "DecoupledKD",
    "DistillationLoss",
    "Divergence",
    "LabelAwareDivergence",
    "NO_LABEL",
    "Observer",
    "REDUCTIONS",
    "StepTerms",
    "Weighting",
    "ZERO_MASS_SAFE",
    "binary_hard_loss",
    "decoupled_kd",
    "default_hard_loss",
    "divergence_name",
    "forward_kl",
    "get_divergence",
    "is_label_aware",
    "jensen_shannon",
    "logit_huber",
    "logit_mse",
    "nan_where_invalid",
    "reduce_values",
    "reverse_kl",
    "soft_cross_entropy",
]
