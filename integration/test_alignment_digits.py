"""End to end on scikit-learn's digits (8x8x1 images): feature alignment plus
logit distillation versus logit distillation alone, 3 seeds each.

Run with ``-s`` to see the numbers:
``.venv/bin/python -m pytest integration/test_alignment_digits.py -q -s``
"""

import time
import warnings

import numpy as np
import pytest
import keras
import tensorflow as tf

from integration.digits import load_digits_split
from keras_kd import data as data_lib
from keras_kd import losses as losses_lib
from keras_kd.alignment import align

pytestmark = pytest.mark.integration

SEEDS = (0, 1, 2)
EPOCHS = 20
BATCH = 32
LEARNING_RATE = 5e-3
# Tolerance on the 3-seed mean test accuracy. Measured on this machine, one
# student's accuracy varies by about 0.5 points across seeds, so the difference
# of two 3-seed means has a standard error of about 0.5 * sqrt(2 / 3) = 0.4
# points; 1.0 point (2.5 standard errors, 5 of the 540 test images) separates
# "alignment costs accuracy" from seed noise.
TOLERANCE = 0.010
# steps_per_execution: one call per epoch of the 40 batches (no batch-level callback here).
STEPS = 64


def digits():
    """The shared digits split (`integration/digits.py`) as 8x8x1 images."""
    x_train, x_test, y_train, y_test = load_digits_split()
    return x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1), y_train, y_test


def teacher_model(K):
    inp = K.Input((8, 8, 1))
    h = K.layers.Conv2D(32, 3, padding="same", activation="relu", name="t_conv1")(inp)
    h = K.layers.Conv2D(64, 3, padding="same", activation="relu", name="t_conv2")(h)
    h = K.layers.MaxPooling2D()(h)
    h = K.layers.Conv2D(64, 3, padding="same", activation="relu", name="t_conv3")(h)
    h = K.layers.GlobalAveragePooling2D()(h)
    return K.Model(inp, K.layers.Dense(10, name="t_logits")(h), name="teacher")


def student_model(K):
    # About 6k parameters against the teacher's 56k.
    inp = K.Input((8, 8, 1))
    h = K.layers.Conv2D(16, 3, padding="same", activation="relu", name="s_conv1")(inp)
    h = K.layers.MaxPooling2D()(h)
    h = K.layers.Conv2D(32, 3, padding="same", activation="relu", name="s_conv2")(h)
    h = K.layers.GlobalAveragePooling2D()(h)
    return K.Model(inp, K.layers.Dense(10, name="s_logits")(h), name="student")


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def test_alignment_plus_kd_at_least_as_accurate_as_kd_alone():
    K = keras
    start = time.time()
    x_train, x_test, y_train, y_test = digits()
    K.utils.set_random_seed(0)
    teacher = teacher_model(K)
    teacher.compile(
        optimizer=K.optimizers.Adam(3e-3),
        loss=K.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=STEPS,
    )
    teacher.fit(x_train, y_train, epochs=20, batch_size=BATCH, verbose=0)
    teacher.trainable = False
    teacher_acc = accuracy(teacher, x_test, y_test)
    raw = tf.data.Dataset.from_tensor_slices((x_train, y_train))

    results = {"kd": [], "kd+alignment": []}
    for seed in SEEDS:
        # Logit distillation alone, online teacher.
        K.utils.set_random_seed(seed)
        student = student_model(K)
        student.compile(
            optimizer=K.optimizers.Adam(LEARNING_RATE),
            loss=losses_lib.DistillationLoss(temperature=4.0, alpha=0.1),
            metrics=["accuracy"],
            steps_per_execution=STEPS,
        )
        train = data_lib.with_teacher(raw.shuffle(len(x_train), seed=seed).batch(BATCH), teacher)
        student.fit(train, epochs=EPOCHS, verbose=0)
        results["kd"].append(accuracy(student, x_test, y_test))

        # The same student and loss, plus attention transfer (Zagoruyko &
        # Komodakis 2017) from the teacher's last 4x4 map; teacher features
        # cached once (float16) and paired by position under shuffling.
        K.utils.set_random_seed(seed)
        student = student_model(K)
        aligned = align(student, teacher, [("s_conv2", "t_conv3")], feature_loss="attention", weight=100.0)
        aligned.model.compile(
            optimizer=K.optimizers.Adam(LEARNING_RATE),
            loss=aligned.loss(losses_lib.DistillationLoss(temperature=4.0, alpha=0.1)),
            metrics=["accuracy"],
            steps_per_execution=STEPS,
        )
        train = raw.apply(aligned.cache_features()).shuffle(len(x_train), seed=seed).batch(BATCH)
        aligned.model.fit(train, epochs=EPOCHS, verbose=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results["kd+alignment"].append(accuracy(aligned.export(), x_test, y_test))

    means = {arm: float(np.mean(values)) for arm, values in results.items()}
    print(
        f"\ndigits, teacher accuracy {teacher_acc:.4f}; student test accuracy over seeds {SEEDS}:"
        + "".join(
            f"\n  {arm:>13}: mean {means[arm]:.4f}  per seed {np.round(values, 4).tolist()}"
            for arm, values in results.items()
        )
        + f"\n  difference: {means['kd+alignment'] - means['kd']:+.4f} (tolerance {TOLERANCE}); "
        f"{time.time() - start:.0f} s"
    )
    assert teacher_acc > 0.95
    assert min(results["kd"]) > 0.85  # the students did learn
    assert means["kd+alignment"] >= means["kd"] - TOLERANCE
