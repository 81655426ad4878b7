"""The Keras layer that adds the feature loss to the training model.

One class per Keras flavour (a tf_keras model needs tf_keras layers), built
once and registered as ``keras_kd>FeatureAlignmentLoss`` in that flavour's
serialization, so that a saved `Aligned.model` loads after ``import keras_kd``.
The arithmetic goes through `keras_kd._ops`, so the Keras 3 layer runs on
TensorFlow and inside JAX's jitted step alike.
"""

from __future__ import annotations

from keras_kd import _compat
from keras_kd import _ops
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
        On Keras 3's JAX backend the loss is added but not logged as a metric:
        Keras cannot update a layer's metric inside JAX's stateless step
        (keras-team/keras#21639), and a metric that never updates would log 0.
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
            logged = flavour != _compat.KERAS3 or not _compat.is_jax_backend()
            self._update_metric = _compat.layer_mean_metric(self, metric_name) if logged else None

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
            ops = _ops.TF if flavour == _compat.TF_KERAS else _ops.namespace(passthrough)  # tf_keras: always TF
            weights = ops.cast(ops.convert_to_tensor(self.pair_weights), "float32")
            total = ops.constant(0.0, "float32")
            for i, fn in enumerate(self._loss_fns):
                student, teacher = rest[2 * i], rest[2 * i + 1]
                teacher = ops.stop_gradient(ops.cast(teacher, "float32"))
                values = fn(teacher, ops.cast(student, "float32"))
                total += weights[i] * ops.mean(values)
            self.add_loss(total)
            if self._update_metric is not None:
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
