"""Intermediate-feature distillation between models of different shapes.

`align` taps named layers of a student and a teacher, maps each student
feature into the teacher's feature space with a small trainable *projector*
(FitNets' "regressor"), and adds a feature loss between the two.
`Aligned.export` gives back the clean trained student.

How the pieces travel (the targets contract of `keras_kd.targets` is kept):

* **Teacher features ride in ``x``.** `Aligned.attach` turns each batch
  ``(x, y[, sample_weight])`` into
  ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t)[, sample_weight])``
  where ``t`` and the ``f_i`` come from one inference-mode forward pass of the
  teacher (`Aligned.feature_extractor`). ``y`` is the same `TeacherTargets`
  that `keras_kd.with_teacher` produces, so `keras_kd.DistillationLoss` and the
  user's metrics (``"accuracy"``) work unchanged.
* **The training model has one output.** `Aligned.model` is a new model of
  the student's flavour whose inputs are the student's inputs followed by one
  input per teacher feature, and whose only output is the student's logits.
  It shares the student's layers: training it trains ``student``. Inside, the
  projectors and a loss layer sit on a side branch; the loss layer adds
  ``sum_i weight_i * mean_batch(feature_loss_i)`` with ``add_loss`` (so
  ``compile`` takes the logit loss only) and logs it as the metric
  ``feature_loss`` (not on Keras 3's JAX backend, where Keras cannot update
  a layer's metric inside the stateless step), then passes the logits
  through unchanged.
* **Backends.** The feature losses and the loss layer are written once
  against `keras_kd._ops`: TensorFlow for TF tensors (both Keras flavours),
  ``jax.numpy`` inside Keras 3's jitted JAX step. On JAX, a Keras 3 teacher
  runs in tf.data through `keras_kd.data.teachers.tf_outputs` (online
  features and the feature-cache build); tf_keras models keep the pure-TF
  path in any process.
* **Clean student.** `Aligned.export` rebuilds the student from its own
  config and copies the trained weights: no projectors, no extra inputs or
  outputs, ready for tfmot and TFLite.
* **Cached features.** `Aligned.cache_features` runs the teacher once over
  the raw (unbatched, ordered) dataset and stores its logits and tapped
  features with the storage engine of `keras_kd.cache_teacher_logits`,
  pairing them with the examples by position.

Modules: `feature_losses` (per-example losses; add one to `FEATURE_LOSSES`),
`taps` (finding layers and reading their tensors), `projectors` (planning and
building the student-to-teacher maps; add a kind there), `loss_layer` (the
Keras layer holding the feature loss), `wiring` (building the models),
`datasets` (online and cached teacher features), `aligned` (`align`, `Aligned`).
"""

from keras_kd.alignment.aligned import Aligned
from keras_kd.alignment.aligned import align
from keras_kd.alignment.feature_losses import FEATURE_LOSSES
from keras_kd.alignment.feature_losses import FeatureLoss
from keras_kd.alignment.feature_losses import attention_map
from keras_kd.alignment.feature_losses import attention_transfer
from keras_kd.alignment.feature_losses import feature_cosine
from keras_kd.alignment.feature_losses import feature_l1
from keras_kd.alignment.feature_losses import feature_mse
from keras_kd.alignment.feature_losses import get_feature_loss
from keras_kd.alignment.wiring import AlignmentPair

__all__ = [
    "FEATURE_LOSSES",
    "FeatureLoss",
    "Aligned",
    "AlignmentPair",
    "align",
    "attention_map",
    "attention_transfer",
    "feature_cosine",
    "feature_l1",
    "feature_mse",
    "get_feature_loss",
]
