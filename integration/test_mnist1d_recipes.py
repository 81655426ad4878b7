"""MNIST-1D recipes (examples/mnist1d_recipes.py) on the real generated data:
the table's "keras Distiller" row and keras_kd's KD row train the same student.

Reference: Keras's own `keras.distillation.Distiller` with
`LogitsDistillation(temperature, loss=KLDivergence())` and
`student_loss_weight=alpha`, i.e. alpha * CE + (1 - alpha) * T^2 KL, the
formula `DistillationLoss` implements; same seed, same batches.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from examples import mnist1d_recipes as recipes


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_distiller_row_and_keras_kd_train_the_same_student(tmp_path, kind):
    settings = recipes.Settings(train_limit=256, temperature=2.0, alpha=0.3, teacher_epochs=1)
    ctx = recipes.Context(str(tmp_path), settings)
    d, teacher = ctx.data, ctx.teacher(0)
    theirs = recipes.fit(ctx, kind, 0, recipes.CE, recipes.batches(d.x_train, d.y_train, 128, 0), epochs=2,
                         distiller_teacher=teacher).model
    ours = recipes.fit(ctx, kind, 0, recipes.kd_loss(settings),
                       keras_kd.with_teacher(recipes.batches(d.x_train, d.y_train, 128, 0), teacher),
                       epochs=2).model
    # 4 Adam steps at lr 1e-2 from identical weights on identical batches: the two losses differ only by
    # Keras's probability clipping at 1e-7 inside KLDivergence, far below this tolerance.
    for theirs_w, ours_w in zip(theirs.get_weights(), ours.get_weights()):
        np.testing.assert_allclose(ours_w, theirs_w, atol=1e-4)
    logits = np.asarray(ours(d.x_test[:64], training=False))
    np.testing.assert_allclose(logits, np.asarray(theirs(d.x_test[:64], training=False)), atol=1e-3)


def test_different_inputs_row_feeds_the_teacher_the_full_signal(tmp_path):
    """The teacher of the different-inputs row sees all 40 samples; the student's element is every
    second sample of the same signal (checked against NumPy slicing)."""
    settings = recipes.Settings(train_limit=64, teacher_epochs=1)
    ctx = recipes.Context(str(tmp_path), settings)
    d, teacher = ctx.data, ctx.teacher(0)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((d.x_train, d.y_train)).batch(64), teacher,
                               placement="pipeline", student_inputs=recipes.every_second_sample)
    x, targets = next(iter(ds))
    np.testing.assert_array_equal(x.numpy(), d.x_train[:, ::2, :])
    want = np.asarray(teacher(d.x_train, training=False))
    np.testing.assert_allclose(targets.logits.numpy(), want, atol=1e-5)
