"""`keras_kd.Callback`: a callback base class for both Keras flavours."""

from keras_kd import _compat


class Callback(_compat.callback_base()):
    """Base class for callbacks that run in Keras 3 ``fit`` and tf_keras ``fit``.

    Subclass it like ``keras.callbacks.Callback`` (``on_epoch_end(self, epoch,
    logs=None)``, ``self.model``, ...). A ``keras.callbacks.Callback`` subclass
    crashes tf_keras ``fit``; this class is a tf_keras callback, which Keras 3
    ``fit`` runs too, so one callback serves students of either flavour.
    keras_kd's own callbacks derive from it.

    Example:

    ```python
    class EpochTimer(keras_kd.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs["epoch_seconds"] = time.perf_counter() - self.start

    student.fit(train, epochs=3, callbacks=[EpochTimer()])
    ```
    """
