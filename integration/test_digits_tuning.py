"""keras-tuner searches over distillation on scikit-learn's digits.

* RandomSearch of 3 trials over temperature and alpha with a Keras 3 student,
  from the teacher-logit cache: the teacher runs over the training data once
  for the whole search (counted in the graph), and the best trial's
  hyperparameters rebuild a student that reproduces its score within noise.
* The same search with a tf_keras quantization-aware (QAT) student, which
  keras-tuner alone refuses, with the int8 TFLite accuracy as the objective.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import optimize
from keras_kd import tuning
from integration.digits import load_digits_split

pytestmark = pytest.mark.integration

EPOCHS = 8


@pytest.fixture(scope="module")
def teacher():
    """The trained teacher both searches distill from (trained once for the module)."""
    x_train, _, y_train, _ = load_digits_split()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    # steps_per_execution: one call per epoch of the 20 batches (no batch-level callback here).
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=32)
    model.fit(x_train, y_train, epochs=20, batch_size=64, verbose=0)
    return model


def _with_counter(teacher):
    """The teacher, its forward passes counting the examples they see."""
    seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def count(logits):
        with tf.control_dependencies([seen.assign_add(tf.cast(tf.shape(logits)[0], tf.int64))]):
            return tf.identity(logits)

    inp = keras.Input((64,))
    counted = keras.Model(inp, keras.layers.Lambda(count)(teacher(inp)))
    return counted, seen


def _build_student(hp):
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])


def test_random_search_from_the_cache_runs_the_teacher_once(tmp_path, teacher):
    x_train, x_test, y_train, y_test = load_digits_split()
    teacher, seen = _with_counter(teacher)
    cached = tf.data.Dataset.from_tensor_slices((x_train, y_train)).apply(
        keras_kd.cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    )
    train = cached.shuffle(2000, seed=0).batch(64)
    val = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
    hypermodel = tuning.DistillationHyperModel(_build_student, temperature=(1.0, 8.0), alpha=(0.0, 0.5),
                                               learning_rate=3e-3)
    tuner = tuning.RandomSearch(hypermodel, objective="val_accuracy", max_trials=3, seed=1,
                                directory=str(tmp_path), project_name="search")
    tuner.search(train, validation_data=val, epochs=EPOCHS, verbose=0)

    assert len(tuner.oracle.trials) == 3
    # One pass over the training data for the whole 3-trial search.
    assert int(seen.numpy()) == len(x_train)

    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_hp = tuner.get_best_hyperparameters(1)[0]
    assert {"kd_temperature", "kd_alpha"} <= set(best_hp.values)
    rebuilt = hypermodel.build(best_hp)
    history = hypermodel.fit(best_hp, rebuilt, train, validation_data=val, epochs=EPOCHS, verbose=0)
    # Trials are not seeded, so a rerun differs by initialisation and shuffle order:
    # on digits at 8 epochs the student's best validation accuracy varies by about
    # 1 point between runs; 3 points (16 of the 540 test images) is "within noise".
    assert max(history.history["val_accuracy"]) == pytest.approx(best_trial.score, abs=0.03)
    assert best_trial.score > 0.85
    assert int(seen.numpy()) == len(x_train)  # the rebuild read the cache too


def test_random_search_of_a_quantization_aware_tf_keras_student(tmp_path, teacher):
    x_train, x_test, y_train, y_test = load_digits_split()
    # A float student distilled first, brought to tf_keras once; each trial QAT-distills a copy.
    keras.utils.set_random_seed(1)
    float_student = _build_student(None)
    float_student.compile(keras.optimizers.Adam(3e-3), loss=keras_kd.DistillationLoss(), steps_per_execution=32)
    cached = tf.data.Dataset.from_tensor_slices((x_train, y_train)).apply(
        keras_kd.cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    )
    train = cached.shuffle(2000, seed=0).batch(64)
    float_student.fit(train, epochs=15, verbose=0)
    tf_keras_student = optimize.to_tf_keras(float_student)

    def build_qat(hp):
        return optimize.quantize_for_distillation(tf_keras_student)

    val = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)
    hypermodel = tuning.DistillationHyperModel(build_qat, temperature=(1.0, 8.0), alpha=(0.0, 0.5),
                                               learning_rate=1e-3)
    tuner = tuning.RandomSearch(
        hypermodel,
        objective=keras_kd_objective(),
        max_trials=3,
        seed=2,
        tflite_data=val,
        directory=str(tmp_path),
        project_name="qat",
    )
    tuner.search(train, validation_data=val, epochs=2, verbose=0)
    assert len(tuner.oracle.trials) == 3
    best = tuner.oracle.get_best_trials(1)[0]
    metrics = best.metrics.metrics
    assert {tuning.TFLITE_INT8_ACCURACY, tuning.TFLITE_SIZE_KIB, tuning.SIZE_ACCURACY} <= set(metrics)
    assert best.score > 0.85
    model = tuner.get_best_models(1)[0]
    assert keras_kd._compat.flavour_of(model) == "tf_keras"
    float_acc = float(np.mean(float_student.predict(x_test, verbose=0).argmax(-1) == y_test))
    print(f"float student {float_acc:.4f}, best QAT int8 TFLite {best.score:.4f}")


def keras_kd_objective():
    import keras_tuner

    return keras_tuner.Objective(tuning.TFLITE_INT8_ACCURACY, direction="max")
