"""`DistillationScheduler`: a `DistillationLoss`'s temperature and alpha per epoch."""

from __future__ import annotations

from keras_kd import _checks
from keras_kd.callbacks.base import Callback
from keras_kd.callbacks.base import bind_loss_state
from keras_kd.callbacks.schedules import constant


class DistillationScheduler(Callback):
    """Sets a `DistillationLoss`'s temperature and alpha at the start of each epoch.

    The loss keeps them in variables, so no recompiling is needed. The values
    used in the epoch are written to ``logs["kd_temperature"]`` and
    ``logs["kd_alpha"]``. On Keras 3 + JAX the variables are part of the
    state Keras threads through its jitted step (see `keras_kd.Callback`), so
    the new values reach the step without retracing.

    Args:
        temperature: ``None`` (leave as is), a number, or a schedule
            ``epoch -> value`` (`constant`, `linear`, `cosine`, `step`, or any
            callable).
        alpha: same, for alpha.
        loss: the `DistillationLoss`; defaults to the model's compiled loss.

    Example:

    ```python
    sched = keras_kd.DistillationScheduler(temperature=keras_kd.linear(8.0, 2.0, epochs=20),
                                           alpha=keras_kd.step([10], [0.0, 0.3]))
    student.fit(train, epochs=20, callbacks=[sched])
    ```
    """

    def __init__(self, temperature=None, alpha=None, loss=None):
        super().__init__()
        self.temperature = self._as_schedule(temperature, "temperature")
        self.alpha = self._as_schedule(alpha, "alpha")
        if self.temperature is None and self.alpha is None:
            raise ValueError("DistillationScheduler needs a `temperature` or an `alpha` schedule.")
        self.loss = loss

    @staticmethod
    def _as_schedule(value, argument):
        if value is None or callable(value):
            return value
        try:
            return constant(_checks.number(value, argument))
        except ValueError:
            raise ValueError(
                f"Expected `{argument}` to be None, a number or a callable schedule. Received: {argument}={value!r}"
            ) from None

    def set_model(self, model):
        super().set_model(model)
        if self.loss is not None:
            bind_loss_state(model, self.loss)  # JAX: the step reads this loss's values as state

    def _target(self):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if not hasattr(loss, "temperature_variable"):
            raise ValueError(
                "DistillationScheduler needs a keras_kd.DistillationLoss: compile the model with one "
                f"or pass `loss=`. Found {loss!r}."
            )
        return loss

    def on_epoch_begin(self, epoch, logs=None):
        loss = self._target()
        if self.temperature is not None:
            loss.temperature = self.temperature(epoch)  # validated by the setter
        if self.alpha is not None:
            loss.alpha = self.alpha(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            loss = self._target()
            logs["kd_temperature"] = loss.temperature
            logs["kd_alpha"] = loss.alpha

