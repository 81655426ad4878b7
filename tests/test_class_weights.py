"""Class weights with distillation targets, on both Keras 3 backends.

On TensorFlow `fit(class_weight=...)` weights each example by its label's class
weight. On JAX, Keras refuses it for distillation targets ("`class_weight` is
only supported for Models with a single output": there the targets are a
pytree, so Keras's adapter sees several outputs); the README's recipe, a
per-example weight from the labels in the dataset, gives the same loss on both.
Reference: `tests/reference.py`'s Hinton loss with per-example weights,
sum(w * l) / N (Keras's "sum_over_batch_size"; equal batches, learning rate 0).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import _compat
from tests import reference as ref

CLASS_WEIGHT = {0: 3.0, 1: 1.0, 2: 0.5, 3: 1.0, 4: 2.0}
T, ALPHA = 3.0, 0.4


def _setup():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 5, 64)
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5)])
    student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5)])
    student.compile(keras.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss(temperature=T, alpha=ALPHA))
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), teacher)
    weights = np.array([CLASS_WEIGHT[int(c)] for c in y])
    want = ref.distillation_loss(y, np.asarray(student(x)), np.asarray(teacher(x)), T, ALPHA, weights=weights)
    return student, ds, want


def test_class_weights_as_sample_weights_equal_the_weighted_reference():
    student, ds, want = _setup()
    table = tf.constant([CLASS_WEIGHT[c] for c in range(5)])
    weighted = ds.map(lambda x, targets: (x, targets, tf.gather(table, targets.labels)))
    got = student.fit(weighted, verbose=0).history["loss"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_fit_class_weight_on_tensorflow_and_refused_by_keras_on_jax():
    student, ds, want = _setup()
    if _compat.is_jax_backend():
        with pytest.raises(ValueError, match="class_weight"):
            student.fit(ds, class_weight=CLASS_WEIGHT, verbose=0)
    else:
        got = student.fit(ds, class_weight=CLASS_WEIGHT, verbose=0).history["loss"][0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
