"""`keras_kd.Callback`: a callback base class for both Keras flavours."""

from keras_kd import _compat


def bind_loss_state(model, loss=None) -> None:
    """On Keras 3 + JAX, makes ``model``'s step thread the loss's hyperparameters.

    `keras_kd.DistillationLoss` keeps temperature, alpha (and a label-aware
    divergence's weights) in `keras_kd._step_state.StepState`s on JAX
    (``loss.step_states``). Bound to the model, a change between or within
    epochs reaches the next step at no cost per step; unbound, a change
    retraces the step once. No-op on TensorFlow and for tf_keras students.
    """
    if model is None or not _compat.is_jax_backend() or _compat.flavour_of(model) != _compat.KERAS3:
        return
    from keras_kd import _step_state  # noqa: PLC0415 - JAX only

    loss = loss if loss is not None else getattr(model, "loss", None)
    for state in getattr(loss, "step_states", None) or ():
        _step_state.bind(model, state)


class Callback(_compat.callback_base()):
    """Base class for callbacks that run in Keras 3 ``fit`` and tf_keras ``fit``.

    Subclass it like ``keras.callbacks.Callback`` (``on_epoch_end(self, epoch,
    logs=None)``, ``self.model``, ...). A ``keras.callbacks.Callback`` subclass
    crashes tf_keras ``fit``; this class is a tf_keras callback, which Keras 3
    ``fit`` runs too, so one callback serves students of either flavour.
    keras_kd's own callbacks derive from it.

    On Keras 3 with the JAX backend, ``set_model`` also makes the model's
    jitted step read the `keras_kd.DistillationLoss`'s hyperparameters as
    state, so ``self.model.loss.alpha = ...`` (or ``temperature``) in any hook
    takes effect from the next step without retracing. A plain
    ``keras.callbacks.Callback`` that sets them works too (each change then
    retraces the step once).

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

    def set_model(self, model):
        super().set_model(model)
        bind_loss_state(model)

    @property
    def model(self):
        """The model being trained. On Keras 3 + JAX its state is synced first, as
        ``keras.callbacks.Callback.model`` does: mid-epoch the JAX trainer holds the weights
        outside the model (``get_weights()`` in a batch hook failed, ``set_weights`` was lost)."""
        model = self.__dict__.get("_kd_model")
        if _compat.is_jax_backend() and hasattr(model, "jax_state_sync"):
            model.jax_state_sync()
        return model

    @model.setter
    def model(self, model):
        self.__dict__["_kd_model"] = model
