"""The tuners' figures are those of the saved model, and trials leave nothing behind.

References: the metrics each epoch logged (recorded by a callback), the saved
best model evaluated again, `evaluate_tflite` of the saved model converted
again, and counts of live Keras objects between trials.
"""

import gc

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import _compat
from keras_kd import optimize
from keras_kd import tuning


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0).astype("int64")  # 3 classes, learnable
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    raw = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    return keras_kd.with_teacher(raw, teacher, placement="pipeline").cache(), raw


def _hypermodel(K, **ranges):
    def build_student(hp):
        return K.Sequential([K.Input((8,)), K.layers.Dense(16, activation="relu"), K.layers.Dense(3)])

    ranges = {"temperature": 2.0, "alpha": 0.5, "learning_rate": 2e-2, **ranges}
    return tuning.DistillationHyperModel(build_student, **ranges)


class _Record(keras_kd.Callback):
    """Records every epoch's logs; in the chosen executions (counted across the
    deep copies keras-tuner makes, hence class attributes) or epochs, sets the
    weights to zero after every batch, so that epoch's model is the constant 0."""

    logs = []
    executions = 0
    spoil_executions = ()
    spoil_epochs = ()

    def on_train_begin(self, logs=None):
        type(self).executions += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if type(self).executions in self.spoil_executions or self._epoch in self.spoil_epochs:
            self.model.set_weights([np.zeros_like(w) for w in self.model.get_weights()])

    def on_epoch_end(self, epoch, logs=None):
        type(self).logs.append(dict(logs or {}))


def _record(spoil_executions=(), spoil_epochs=()):
    return type("Record", (_Record,), {"logs": [], "executions": 0, "spoil_executions": spoil_executions,
                                       "spoil_epochs": spoil_epochs})


def test_best_model_is_the_best_execution(K, tmp_path):
    train, _ = _data()
    record = _record(spoil_executions=(2,))
    tuner = tuning.RandomSearch(
        _hypermodel(K), objective="val_accuracy", max_trials=1, executions_per_trial=2,
        directory=str(tmp_path), project_name="p",
    )
    tuner.search(train, validation_data=train, epochs=3, verbose=0, callbacks=[record()])
    per_execution = [max(logs["val_accuracy"] for logs in record.logs[i * 3 : i * 3 + 3]) for i in range(2)]
    assert per_execution[0] > per_execution[1] + 0.2  # the second execution was spoiled
    best = tuner.get_best_models(1)[0]
    assert _compat.flavour_of(best) == K.__name__
    accuracy = best.evaluate(train, verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(max(per_execution), abs=1e-6)


def test_tflite_objectives_are_measured_on_the_saved_weights(K, tmp_path):
    train, raw = _data()
    record = _record(spoil_epochs=(3,))  # the last epoch is the worst: not the one saved
    tuner = tuning.RandomSearch(
        _hypermodel(K), objective="val_accuracy", max_trials=1, tflite_data=raw,
        directory=str(tmp_path), project_name="p",
    )
    tuner.search(train, validation_data=train, epochs=4, verbose=0, callbacks=[record()])
    trial = tuner.oracle.get_best_trials(1)[0]
    best = tuner.get_best_models(1)[0]
    flatbuffer = optimize.to_tflite(best, representative_data=raw)
    expected = optimize.evaluate_tflite(flatbuffer, raw)
    assert trial.metrics.get_last_value(tuning.TFLITE_INT8_ACCURACY) == pytest.approx(expected, abs=1e-9)
    size_kib = trial.metrics.get_last_value(tuning.TFLITE_SIZE_KIB)
    assert size_kib == pytest.approx(len(flatbuffer) / 1024, rel=0.01)
    assert expected > max(logs["val_accuracy"] for logs in record.logs[-1:]) + 0.1  # not the spoiled epoch


def test_tflite_objective_keeps_the_best_execution(K, tmp_path):
    train, raw = _data()
    record = _record(spoil_executions=(2,))  # the second (last) execution ends as the constant-0 model
    tuner = tuning.RandomSearch(
        _hypermodel(K), objective="tflite_int8_accuracy", max_trials=1, executions_per_trial=2,
        tflite_data=raw, directory=str(tmp_path), project_name="p",
    )
    tuner.search(train, validation_data=train, epochs=2, verbose=0, callbacks=[record()])
    labels = np.concatenate([y for _, y in raw.as_numpy_iterator()])
    spoiled = float(np.mean(labels == 0))  # all logits equal: argmax says class 0 for every example
    trial = tuner.oracle.get_best_trials(1)[0]
    good = 2 * trial.score - spoiled  # the score is the mean of the two executions' figures
    assert good > spoiled + 0.1
    best = tuner.get_best_models(1)[0]
    measured = optimize.evaluate_tflite(optimize.to_tflite(best, representative_data=raw), raw)
    assert measured == pytest.approx(good, abs=1e-6)  # the good execution was kept, not the last


@pytest.mark.parametrize(
    "objective, direction",
    [("tflite_int8_accuracy", "max"), ("size_accuracy", "max"), ("tflite_size_kib", "min"),
     ("val_teacher_agreement", "max")],
)
def test_string_objectives_have_their_direction(objective, direction, tmp_path):
    _, raw = _data()
    tuner = tuning.RandomSearch(_hypermodel(keras), objective=objective, max_trials=1, tflite_data=raw,
                                directory=str(tmp_path))
    assert tuner.oracle.objective.name == objective
    assert tuner.oracle.objective.direction == direction
    tuner = tuning.RandomSearch(_hypermodel(keras), [objective, "val_loss"], 1, tflite_data=raw,
                                directory=str(tmp_path), project_name="multi")
    directions = {o.name: o.direction for o in tuner.oracle.objective.objectives}
    assert directions == {objective: direction, "val_loss": "min"}


def test_reweighting_chosen_in_a_plain_build_function_is_refused(K, tmp_path):
    train, _ = _data()

    def build(hp):
        kd = tuning.distillation_hyperparameters(hp, reweighting_signal="kl")
        student = K.Sequential([K.Input((8,)), K.layers.Dense(3)])
        student.compile(kd.optimizer(K.__name__), loss=kd.loss)
        return student

    pattern = r"reweighting_signal='kl'.*DistillationHyperModel"
    with pytest.raises(keras_tuner.errors.FatalValueError, match=pattern):
        # Refused at the call: when keras-tuner first builds the model (tuner creation).
        tuner = tuning.RandomSearch(build, objective="val_loss", max_trials=1, directory=str(tmp_path))
        tuner.search(train, validation_data=train, epochs=1, verbose=0)


def _live_layers():
    return sum(1 for o in gc.get_objects() if isinstance(o, (keras.layers.Layer, tf_keras.layers.Layer)))


def test_memory_stays_flat_over_trials(K, tmp_path):
    """Three trials: the first starts beside what the tuner's creation built
    (its count differs); the second and third start after one and two
    finished trials, so a model (or graph) kept per trial shows as the third
    count above the second. More trials would only repeat that comparison."""
    train, _ = _data()
    counts, graph_ops = [], []

    class Count(keras_kd.Callback):
        def on_train_begin(self, logs=None):
            counts.append(_live_layers())
            graph_ops.append(len(tf_keras.src.backend.get_graph().get_operations()))

    hypermodel = _hypermodel(K, learning_rate=[1e-3, 2e-3, 5e-3])
    tuner = tuning.RandomSearch(hypermodel, objective="val_loss", max_trials=3, directory=str(tmp_path))
    tuner.search(train, validation_data=train, epochs=1, verbose=0, callbacks=[Count()])
    assert len(counts) == 3
    # Each trial starts with the previous trials' models gone: the same count.
    assert counts[1:] == [counts[1]] * 2, counts
    assert graph_ops[1:] == [graph_ops[1]] * 2, graph_ops
