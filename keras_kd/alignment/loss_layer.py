"""The Keras layer that adds the feature loss to the training model.

One class per Keras flavour (a tf_keras model needs tf_keras layers), built
once and registered as ``keras_kd>FeatureAlignmentLoss`` in that flavour's
serialization, so that a saved `Aligned.model` loads after ``import keras_kd``.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _compat
from keras_kd.alignment.feature_losses import get_feature_loss


_LOSS_LAYER_CLASSES: dict = {}


def loss_layer_class(flavour):
    """The ``FeatureAlignmentLoss`` layer class of a Keras flavour."""
    if flavour in _LOSS_LAYER_CLASSES:
        return _LOSS_LAYER_CLASSES[flavour]
    keras_module = _compat.module(flavour)

    class FeatureAlignmentLoss(keras_module.layers.Layer):
        """Adds ``sum_i w_i * mean_batch(loss_i(t_i, s_i))`` and passes its first input through.

        Called on ``[passthrough, s_1, t_1, ..., s_P, t_P]``. The weights are a
        non-trainable variable (``pair_weights``) that callbacks may change.
        """

        def __init__(self, feature_losses, weights, metric_name="feature_loss", **kwargs):
            kwargs["dtype"] = "float32"
            super().__init__(**kwargs)
            # Names, callables, or serialized callables (from a config).
            feature_losses = [_compat.deserialize(f) if isinstance(f, dict) else f for f in feature_losses]
            self._loss_fns = [get_feature_loss(f) for f in feature_losses]
            self.feature_losses = list(feature_losses)
            self.initial_weights = [float(w) for w in weights]
            self.metric_name = metric_name
            self._update_metric = _compat.layer_mean_metric(self, metric_name)

        def build(self, input_shape):
            self.pair_weights = self.add_weight(
                name="pair_weights",
                shape=(len(self.initial_weights),),
                initializer=keras_module.initializers.Constant(self.initial_weights),
                trainable=False,
            )
            self.built = True

        def call(self, inputs):
            passthrough, rest = inputs[0], inputs[1:]
            total = tf.constant(0.0, tf.float32)
            for i, fn in enumerate(self._loss_fns):
                student, teacher = rest[2 * i], rest[2 * i + 1]
                values = fn(tf.stop_gradient(tf.cast(teacher, tf.float32)), tf.cast(student, tf.float32))
                total += tf.cast(self.pair_weights[i], tf.float32) * tf.reduce_mean(values)
            self.add_loss(total)
            self._update_metric(total)
            return passthrough

        def compute_output_shape(self, input_shape):
            return input_shape[0]

        def get_config(self):
            config = super().get_config()
            config.update(
                feature_losses=[
                    f if isinstance(f, str) else _compat.serialize(f) for f in self.feature_losses
                ],
                weights=list(self.initial_weights),
                metric_name=self.metric_name,
            )
            return config

    keras_module.saving.register_keras_serializable(package="keras_kd")(FeatureAlignmentLoss)
    _LOSS_LAYER_CLASSES[flavour] = FeatureAlignmentLoss
    return FeatureAlignmentLoss


def is_loss_layer(layer) -> bool:
    """Whether ``layer`` is a ``FeatureAlignmentLoss`` (of either flavour)."""
    return any(isinstance(layer, cls) for cls in _LOSS_LAYER_CLASSES.values())


# Both flavours are registered at import, so that a saved `Aligned.model`
# loads in a fresh process after `import keras_kd`.
for _flavour in (_compat.KERAS3, _compat.TF_KERAS):
    loss_layer_class(_flavour)
