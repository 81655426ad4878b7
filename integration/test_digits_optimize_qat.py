"""End to end on scikit-learn's digits: distill, quantize-aware train, deploy as TFLite int8.

The teachers, caches and test split are those of `test_digits_optimize.py`
(`digits_optimize.train_teachers`: three seeds, a tf_keras MLP 64-256-256-10
per seed, its logits cached with `keras_kd.cache_teacher_logits`).

(b) QAT with distillation, converted to TFLite int8. A float student
    (64-256-256-10, big enough that its 86k weights dominate the file) is
    distilled on all training examples, then fine-tuned quantization-aware
    with the same loss for a few epochs and converted.
(c) A Keras 3 student distilled in Keras 3, converted with `to_tf_keras`,
    QAT-distilled and converted to TFLite int8.

Run: ``.venv/bin/python -m pytest integration/test_digits_optimize_qat.py -s -q``
(``-s`` prints the table the README quotes).
"""

import numpy as np
import pytest
import tf_keras

from keras_kd import optimize
from integration.digits_optimize import SEEDS, STEPS, TEST, X_TEST, accuracy, kd_loss, mlp, qat_distill
from integration.digits_optimize import train_teachers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return train_teachers(tmp_path_factory)


def test_qat_distilled_tflite_int8_close_to_float_and_smaller(teachers):
    float_acc, int8_acc, keras_acc, ratios = [], [], [], []
    for seed in SEEDS:
        t = teachers[seed]
        tf_keras.utils.set_random_seed(seed)
        student = mlp(tf_keras, [256, 256], "student")
        student.compile(
            tf_keras.optimizers.Adam(1e-3), loss=kd_loss(), metrics=["accuracy"], steps_per_execution=STEPS
        )
        student.fit(t["all"].shuffle(2000, seed=seed).batch(64), epochs=30, verbose=0)
        float_bytes = optimize.to_tflite(student, int8=False)
        float_acc.append(optimize.evaluate_tflite(float_bytes, TEST))
        keras_acc.append(accuracy(student))

        qat = qat_distill(student, t["all"], t["all_cache"])
        int8_bytes = optimize.to_tflite(qat)
        int8_acc.append(optimize.evaluate_tflite(int8_bytes, TEST))
        ratios.append(optimize.file_size(float_bytes) / optimize.file_size(int8_bytes))
    print(
        "\n(b) distilled student 64-256-256-10, 3-seed mean test accuracy: float Keras %.4f, float TFLite "
        "%.4f, QAT+KD int8 TFLite %.4f (per seed %s vs %s); file %d -> %d bytes (%.2fx smaller)"
        % (
            np.mean(keras_acc),
            np.mean(float_acc),
            np.mean(int8_acc),
            np.round(float_acc, 4),
            np.round(int8_acc, 4),
            optimize.file_size(float_bytes),
            optimize.file_size(int8_bytes),
            np.mean(ratios),
        )
    )
    # Within 1 percentage point of the float distilled student on the 3-seed
    # mean (5.4 test examples); per seed 2 points, since one seed's 540
    # examples move in steps of 0.19 points and QAT may land either side.
    assert np.mean(int8_acc) >= np.mean(float_acc) - 0.01
    assert min(np.subtract(int8_acc, float_acc)) >= -0.02
    # int8 weights take a quarter of float32's bytes; the flatbuffer's own
    # overhead (graph, quantization parameters) keeps the ratio under 4.
    assert min(ratios) >= 3.0


def test_keras3_student_to_tf_keras_qat_to_tflite(teachers):
    import keras

    float_acc, int8_acc = [], []
    for seed in SEEDS:
        t = teachers[seed]
        keras.utils.set_random_seed(seed)
        student = mlp(keras, [256, 256], "student")
        student.compile(
            keras.optimizers.Adam(1e-3), loss=kd_loss(), metrics=["accuracy"], steps_per_execution=STEPS
        )
        student.fit(t["all"].shuffle(2000, seed=seed).batch(64), epochs=30, verbose=0)
        float_acc.append(accuracy(student))

        converted = optimize.to_tf_keras(student)
        np.testing.assert_allclose(
            converted.predict(X_TEST, verbose=0), student.predict(X_TEST, verbose=0), atol=1e-5
        )
        qat = qat_distill(converted, t["all"], t["all_cache"])
        int8_acc.append(optimize.evaluate_tflite(optimize.to_tflite(qat), TEST))
    print(
        "\n(c) Keras 3 student -> to_tf_keras -> QAT+KD -> TFLite int8, 3-seed mean test accuracy: "
        "Keras 3 float %.4f, int8 TFLite %.4f (per seed %s vs %s)"
        % (np.mean(float_acc), np.mean(int8_acc), np.round(float_acc, 4), np.round(int8_acc, 4))
    )
    # Same tolerance as (b): the chain after `to_tf_keras` is the same.
    assert np.mean(int8_acc) >= np.mean(float_acc) - 0.01
