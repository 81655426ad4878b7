"""Mid-fit hyperparameter changes take effect on every backend (TensorFlow, JAX, tf_keras).

On JAX the loss's values are jit constants unless the loss makes them otherwise
(`keras_kd.losses.values.Hyperparameter`); on TensorFlow the step reads variables. Either way the
user's own callback that sets ``loss.alpha`` between epochs must change the loss.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd.targets import TeacherTargets
from tests import reference as ref

C = 4


def _data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 3)).astype("float32")
    y, t = rng.integers(0, C, 16), rng.normal(size=(16, C)).astype("float32")
    return x, y, t, tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=t))).batch(16)


def _setter(K, loss, schedule):
    class SetEachEpoch(K.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            for target, name, values in schedule:
                setattr(loss if target == "loss" else loss.divergence, name, values[epoch])

    return SetEachEpoch()


def _student(K):
    return K.Sequential([K.Input((3,)), K.layers.Dense(C)])


@pytest.mark.parametrize("jit", [False, True])
def test_user_callback_changes_alpha_and_temperature_between_epochs(K, jit):
    x, y, t, ds = _data()
    model = _student(K)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    model.compile(optimizer=K.optimizers.SGD(0.0), loss=loss, jit_compile=jit)  # lr 0: the model stays put
    alphas, temps = [0.5, 0.0, 1.0], [2.0, 2.0, 5.0]
    history = model.fit(ds, epochs=3, verbose=0,
                        callbacks=[_setter(K, loss, [("loss", "alpha", alphas), ("loss", "temperature", temps)])])
    s = model.predict(x, verbose=0)
    want = [ref.distillation_loss(y, s, t, temp, a) for a, temp in zip(alphas, temps)]
    np.testing.assert_allclose(history.history["loss"], want, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_dkd_weights_changed_between_epochs(K, jit):
    x, y, t, ds = _data(2)
    model = _student(K)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, divergence=keras_kd.DecoupledKD(1.0, 8.0))
    model.compile(optimizer=K.optimizers.SGD(0.0), loss=loss, jit_compile=jit)
    weights = [8.0, 1.0]
    history = model.fit(ds, epochs=2, verbose=0,
                        callbacks=[_setter(K, loss, [("divergence", "non_target_weight", weights)])])
    s = model.predict(x, verbose=0)
    want = [ref.decoupled_kd(y, s, t, 2.0, 1.0, w).mean() for w in weights]
    np.testing.assert_allclose(history.history["loss"], want, rtol=1e-5)


def test_scheduler_changes_alpha_between_epochs(K):
    x, y, t, ds = _data(3)
    model = _student(K)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    model.compile(optimizer=K.optimizers.SGD(0.0), loss=loss)
    alphas = [0.9, 0.1]
    scheduler = keras_kd.DistillationScheduler(alpha=lambda epoch: alphas[epoch])
    history = model.fit(ds, epochs=2, verbose=0, callbacks=[scheduler])
    s = model.predict(x, verbose=0)
    np.testing.assert_allclose(history.history["loss"], [ref.distillation_loss(y, s, t, 2.0, a) for a in alphas],
                               rtol=1e-5)
