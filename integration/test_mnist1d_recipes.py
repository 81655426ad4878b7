"""MNIST-1D recipes (examples/mnist1d_recipes.py) on the real generated data:
the table's "keras Distiller" row and keras_kd's KD row train the same student,
and a compiled student trained again (`fit(reuse=True)`, the other seeds)
trains exactly as a new one.

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


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """One generated data set and one teacher (1 epoch) for every test here; 256 training examples,
    2 epochs per row."""
    settings = recipes.Settings(train_limit=256, temperature=2.0, alpha=0.3, teacher_epochs=1, epochs=2)
    context = recipes.Context(str(tmp_path_factory.mktemp("mnist1d_recipes")), settings)
    context.teacher(0)
    return context


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_distiller_row_and_keras_kd_train_the_same_student(ctx, kind):
    settings, d, teacher = ctx.settings, ctx.data, ctx.teacher(0)
    theirs = recipes.fit(ctx, kind, 0, recipes.CE, recipes.batches(d.x_train, d.y_train, 128, 0), epochs=2,
                         distiller_teacher=teacher, reuse=False).model
    ours = recipes.fit(ctx, kind, 0, recipes.kd_loss(settings),
                       keras_kd.with_teacher(recipes.batches(d.x_train, d.y_train, 128, 0), teacher),
                       epochs=2, reuse=False).model
    # 4 Adam steps at lr 1e-2 from identical weights on identical batches: the two losses differ only by
    # Keras's probability clipping at 1e-7 inside KLDivergence, far below this tolerance.
    for theirs_w, ours_w in zip(theirs.get_weights(), ours.get_weights()):
        np.testing.assert_allclose(ours_w, theirs_w, atol=1e-4)
    logits = np.asarray(ours(d.x_test[:64], training=False))
    np.testing.assert_allclose(logits, np.asarray(theirs(d.x_test[:64], training=False)), atol=1e-3)


def test_different_inputs_row_feeds_the_teacher_the_full_signal(ctx):
    """The teacher of the different-inputs row sees all 40 samples; the student's element is every
    second sample of the same signal (checked against NumPy slicing)."""
    d, teacher = ctx.data, ctx.teacher(0)
    x_train, y_train = d.x_train[:64], d.y_train[:64]
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(64), teacher,
                               placement="pipeline", student_inputs=recipes.every_second_sample)
    x, targets = next(iter(ds))
    np.testing.assert_array_equal(x.numpy(), x_train[:, ::2, :])
    want = np.asarray(teacher(x_train, training=False))
    np.testing.assert_allclose(targets.logits.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("row", ["kd_cache", "distiller"])
def test_a_reused_compiled_student_trains_as_a_new_one(ctx, row):
    """`fit(reuse=True)` trains seed 1 on the compiled model seed 0 left behind (its weights reset to
    seed 1's initial weights, the optimizer to its state before any step); a new model trained on
    the same batches ends with the same weights (to float rounding; a missed reset, of Adam's moments
    or step count, or of a weight, moves them by orders of magnitude more)."""
    settings = ctx.settings
    first = getattr(recipes, row)(ctx, "cnn", 0, False)
    again = getattr(recipes, row)(ctx, "cnn", 1, False)
    assert again.model is first.model  # the compiled student was reused
    d = ctx.data
    if row == "kd_cache":
        train = recipes.shuffle_batch(ctx.cached("teacher0", ctx.teacher(0), recipes._raw(ctx)), 1, settings.batch)
        new = recipes.fit(ctx, "cnn", 1, recipes.kd_loss(settings), train, reuse=False)
    else:
        new = recipes.fit(ctx, "cnn", 1, recipes.CE, recipes.batches(d.x_train, d.y_train, settings.batch, 1),
                          distiller_teacher=ctx.teacher(0), reuse=False)
    assert new.model is not again.model
    for reused_w, new_w in zip(again.model.get_weights(), new.model.get_weights()):
        np.testing.assert_allclose(reused_w, new_w, rtol=0, atol=1e-6)
