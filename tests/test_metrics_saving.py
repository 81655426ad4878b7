"""A model compiled with `keras_kd.loss_components` saves, loads and evaluates the same."""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from tests.conftest import mlp


def _compiled_student(K, toy_data):
    x, y, make = toy_data
    teacher = mlp(K, name="teacher")
    student = mlp(K, name="student")
    kd = keras_kd.DistillationLoss(temperature=3.0, alpha=0.25)
    student.compile(K.optimizers.SGD(0.0), loss=kd, metrics=["accuracy", *keras_kd.loss_components(kd)])
    ds = keras_kd.with_teacher(make(), teacher)
    return student, kd, ds


def _reference_components(kd, student, ds):
    """Mean hard and distillation terms over the dataset, computed with the loss itself."""
    hard, soft = [], []
    for x, targets in ds:
        h, s = kd.components(targets, tf.constant(np.asarray(student(x))))
        hard.append(np.asarray(h))
        soft.append(np.asarray(s))
    return np.concatenate(hard).mean(), np.concatenate(soft).mean()


def test_metric_names_and_values(K, toy_data):
    student, kd, ds = _compiled_student(K, toy_data)
    logs = student.evaluate(ds, verbose=0, return_dict=True)
    assert {"kd_hard", "kd_soft"} <= set(logs)
    hard, soft = _reference_components(kd, student, ds)
    np.testing.assert_allclose(np.asarray(logs["kd_hard"]), hard, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logs["kd_soft"]), soft, rtol=1e-5)
    # loss = alpha * hard + (1 - alpha) * soft
    np.testing.assert_allclose(np.asarray(logs["loss"]), 0.25 * hard + 0.75 * soft, rtol=1e-5)


def test_saved_model_loads_and_evaluates_the_same(K, toy_data, tmp_path):
    student, kd, ds = _compiled_student(K, toy_data)
    before = student.evaluate(ds, verbose=0, return_dict=True)
    path = str(tmp_path / ("student.keras" if K.__name__ == "keras" else "student.h5"))
    student.save(path)
    loaded = K.models.load_model(path)
    after = loaded.evaluate(ds, verbose=0, return_dict=True)
    assert set(after) == set(before)
    for name in ("loss", "kd_hard", "kd_soft"):
        np.testing.assert_allclose(np.asarray(after[name]), np.asarray(before[name]), rtol=1e-6, err_msg=name)


def test_changed_hyperparameters_are_saved(toy_data, tmp_path):
    """The metrics' loss is saved with its current temperature."""
    import keras

    student, kd, ds = _compiled_student(keras, toy_data)
    kd.temperature = 2.0
    before = student.evaluate(ds, verbose=0, return_dict=True)
    student.save(str(tmp_path / "s.keras"))
    after = keras.models.load_model(str(tmp_path / "s.keras")).evaluate(ds, verbose=0, return_dict=True)
    np.testing.assert_allclose(np.asarray(after["kd_soft"]), np.asarray(before["kd_soft"]), rtol=1e-6)


def test_component_config_round_trip():
    kd = keras_kd.DistillationLoss(temperature=4.0, alpha=0.3)
    hard, soft = keras_kd.loss_components(kd)
    assert (hard.__name__, soft.__name__) == ("kd_hard", "kd_soft")
    copy = type(soft).from_config(soft.get_config())
    assert copy.__name__ == "kd_soft"
    assert copy.loss.temperature == 4.0 and copy.loss.alpha == pytest.approx(0.3)
    with pytest.raises(ValueError, match="component"):
        type(soft)(kd, "both")


def test_loaded_metrics_follow_the_loaded_loss(toy_data, tmp_path):
    """After loading, the metrics read the model's own loss: changing it changes them."""
    import keras

    student, kd, ds = _compiled_student(keras, toy_data)
    student.save(str(tmp_path / "s.keras"))
    loaded = keras.models.load_model(str(tmp_path / "s.keras"))
    at_3 = loaded.evaluate(ds, verbose=0, return_dict=True)
    loaded.loss.temperature = 2.0
    kd.temperature = 2.0
    at_2 = loaded.evaluate(ds, verbose=0, return_dict=True)
    expected = student.evaluate(ds, verbose=0, return_dict=True)
    assert not np.isclose(np.asarray(at_2["kd_soft"]), np.asarray(at_3["kd_soft"]))
    np.testing.assert_allclose(np.asarray(at_2["kd_soft"]), np.asarray(expected["kd_soft"]), rtol=1e-6)
