"""DistillationLoss and with_teacher inside the user's own compile/fit, both flavours."""


import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from tests import reference as ref
from tests.conftest import mlp


def _batches(ds):
    return [tuple(e) for e in ds]


@pytest.mark.parametrize("placement", ["pipeline", "step"])
def test_with_teacher_attaches_teacher_logits_of_the_same_batch(K, toy_data, placement):
    x, y, make = toy_data
    teacher = mlp(K, hidden=32)
    ds = keras_kd.with_teacher(make(batch=32), teacher, placement=placement)
    want = teacher.predict(x, verbose=0)
    for i, (xb, targets) in enumerate(ds):
        assert isinstance(targets, TeacherTargets)
        np.testing.assert_array_equal(targets.labels.numpy(), y[i * 32 : (i + 1) * 32])
        np.testing.assert_array_equal(xb.numpy(), x[i * 32 : (i + 1) * 32])
        if placement == "pipeline":
            np.testing.assert_allclose(targets.logits.numpy(), want[i * 32 : (i + 1) * 32], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(targets.inputs.numpy(), xb.numpy())


def test_with_teacher_keeps_sample_weight(K, toy_data):
    x, y, make = toy_data
    w = np.linspace(0.0, 2.0, len(x)).astype("float32")
    ds = keras_kd.with_teacher(make(batch=48, sample_weight=w), mlp(K))
    xb, targets, wb = next(iter(ds))
    np.testing.assert_array_equal(wb.numpy(), w[:48])


def test_evaluate_loss_and_metrics_match_references(K, toy_data):
    """The user's own metrics report hard-label values; the loss equals the NumPy formula."""
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    w = np.random.default_rng(1).uniform(0.1, 2.0, len(x)).astype("float32")
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.3)
    student.compile(
        optimizer="sgd",
        loss=loss,
        metrics=["accuracy", K.metrics.SparseCategoricalAccuracy(name="sca"), keras_kd.teacher_agreement],
    )
    ds = keras_kd.with_teacher(make(batch=96, sample_weight=w), teacher)
    result = student.evaluate(ds, verbose=0, return_dict=True)
    s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    # `metrics=` are unweighted in Keras (`weighted_metrics=` take the weights).
    acc = np.mean(s.argmax(-1) == y)
    assert result["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert result["sca"] == pytest.approx(acc, abs=1e-6)
    assert result["teacher_agreement"] == pytest.approx(np.mean(s.argmax(-1) == t.argmax(-1)), abs=1e-6)
    assert result["loss"] == pytest.approx(ref.distillation_loss(y, s, t, 3.0, 0.3, weights=w), rel=1e-5)


def test_one_hot_labels_with_accuracy(K, toy_data):
    x, y, _ = toy_data
    teacher, student = mlp(K), mlp(K)
    onehot = np.eye(4, dtype="float32")[y]
    student.compile("sgd", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, onehot)).batch(96), teacher)
    result = student.evaluate(ds, verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx((student.predict(x, verbose=0).argmax(-1) == y).mean(), abs=1e-6)


@pytest.mark.parametrize("placement", ["pipeline", "step"])
def test_fit_trains_towards_teacher(K, toy_data, placement):
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0)
    student.compile(K.optimizers.Adam(0.01), loss=kd, metrics=[keras_kd.teacher_agreement, *keras_kd.loss_components(kd)])
    history = student.fit(keras_kd.with_teacher(make(), teacher, placement=placement), epochs=25, verbose=0)
    soft = history.history["kd_soft"]
    assert soft[-1] < 0.5 * soft[0]
    # A random teacher on random data: agreement starts near chance (1/4).
    assert history.history["teacher_agreement"][-1] > 0.7


def test_step_placement_equals_pipeline_loss(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5))
    a = student.evaluate(keras_kd.with_teacher(make(), teacher, placement="pipeline"), verbose=0)
    b = student.evaluate(keras_kd.with_teacher(make(), teacher, placement="step"), verbose=0)
    assert a == pytest.approx(b, rel=1e-5)


def test_step_placement_runs_teacher_once_per_traced_step(K, toy_data):
    """The loss and every metric read the same teacher logits: one teacher call per trace."""
    x, y, make = toy_data
    net, calls = mlp(K), []

    def teacher(inputs, training=False):
        calls.append(training)
        return net(inputs, training=training)

    student = mlp(K)
    kd = keras_kd.DistillationLoss()
    student.compile("sgd", loss=kd, metrics=[keras_kd.teacher_agreement, *keras_kd.loss_components(kd)])
    ds = keras_kd.with_teacher(make(), teacher, placement="step")
    # A callable teacher is checked once (softmax outputs?), eagerly, on a probe of zeros shaped
    # like the inputs (nothing is read from the dataset); iterating it never calls the teacher.
    assert calls == [False]
    list(ds)
    assert calls == [False]
    calls.clear()
    if K is keras and keras.backend.backend() == "jax":
        # A function cannot run in the jitted JAX step (its weights would be baked in unseen):
        # refused, naming the fix. A Keras 3 teacher runs there; count its `call` per trace.
        refused = mlp(K)  # a separate student: Keras's JAX fit leaves a failed fit's model unusable
        refused.compile("sgd", loss=kd)
        with pytest.raises(ValueError, match=r"JAX backend.*placement='pipeline'.*or a Keras 3 teacher"):
            refused.fit(ds, epochs=1, verbose=0)

        class Count(keras.layers.Layer):
            def call(self, inputs, training=False):
                calls.append(training)
                return inputs

        ds = keras_kd.with_teacher(make(), keras.Sequential([Count(), net]), placement="step")
        calls.clear()
    student.fit(ds, epochs=2, verbose=0)
    traces = len(calls)
    student.fit(ds, epochs=1, verbose=0)
    assert len(calls) == traces  # no retracing, and not called per batch in Python
    assert 1 <= traces <= 2  # one call per trace (Keras may trace the step twice)
    assert calls == [False] * traces  # inference mode


def test_validation_without_teacher_reports_hard_loss(K, toy_data):
    x, y, make = toy_data
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    value = student.evaluate(make(), verbose=0, return_dict=True)["loss"]
    assert value == pytest.approx(ref.sparse_ce(y, student.predict(x, verbose=0)).mean(), rel=1e-5)


def test_sequence_logits_with_padding_mask(K):
    """(batch, time, classes) logits from an Embedding(mask_zero=True) model: padded steps count for nothing."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 9, size=(6, 5))
    tokens[0, 3:] = 0
    tokens[2, 1:] = 0
    labels = rng.integers(0, 3, size=(6, 5))

    def seq_model():
        inp = K.Input((5,), dtype="int32")
        h = K.layers.Embedding(10, 4, mask_zero=True)(inp)
        return K.Model(inp, K.layers.Dense(3)(h))

    teacher, student = seq_model(), seq_model()
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.4))
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((tokens, labels)).batch(6), teacher)
    got = student.evaluate(ds, verbose=0)
    s, t = student.predict(tokens, verbose=0), teacher.predict(tokens, verbose=0)
    want = ref.distillation_loss(labels, s, t, 2.0, 0.4, mask=(tokens != 0).astype(float))
    assert got == pytest.approx(want, rel=1e-5)


# --- bad input: a clear error, never silent training ---------------------------


def test_class_count_mismatch_names_both_shapes(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K, classes=5), mlp(K, classes=4)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    with pytest.raises(ValueError, match=r"Teacher logits have shape .*5.* student's logits have shape .*4"):
        student.fit(keras_kd.with_teacher(make(), teacher), epochs=1, verbose=0)


@pytest.mark.backend("tensorflow")  # TF runtime assertion; jitted JAX steps give NaN, as under XLA
def test_nan_teacher_logits_fail_loudly(K, toy_data):
    x, y, make = toy_data
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    bad = make().map(lambda xb, yb: (xb, TeacherTargets(labels=yb, logits=tf.fill([tf.shape(xb)[0], 4], np.nan))))
    with pytest.raises(tf.errors.InvalidArgumentError, match="teacher logits contain NaN or Inf"):
        student.fit(bad, epochs=1, verbose=0)


@pytest.mark.backend("tensorflow")  # TF runtime assertion; jitted JAX steps give NaN, as under XLA
def test_labels_out_of_range_fail(K, toy_data):
    x, y, _ = toy_data
    teacher, student = mlp(K), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y + 3)).batch(32), teacher)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels out of range"):
        student.fit(ds, epochs=1, verbose=0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("source", ["with_teacher", "cache"])
def test_a_plain_keras_loss_given_teacher_targets_warns_that_the_teacher_is_ignored(K, toy_data, tmp_path, jit, source):
    """A built-in Keras loss (or a loss function) reads only the labels of teacher targets: training
    with it distils nothing, so it warns. `DistillationLoss` does not, nor does a metric, nor (on
    TensorFlow) evaluating."""
    x, y, make = toy_data
    teacher = mlp(K)
    if source == "cache":
        data = tf.data.Dataset.from_tensor_slices((x, y)).apply(
            keras_kd.cache_teacher_logits(teacher, str(tmp_path / "c"), verbose=0)).batch(32)
    else:
        data = keras_kd.with_teacher(make(), teacher)
    on_jax = K is keras and keras.backend.backend() == "jax"

    def warnings_of(loss, run):
        student = mlp(K)
        student.compile(K.optimizers.SGD(0.01), loss=loss, metrics=["accuracy"], jit_compile=jit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(student)
        return [str(w.message) for w in caught if "distils nothing" in str(w.message)]

    def fit(student):
        student.fit(data, epochs=1, verbose=0)

    def evaluate(student):
        student.evaluate(data, verbose=0)

    plain = K.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = warnings_of(plain, fit)
    assert got and "keras_kd.DistillationLoss" in got[0] and "ignored" in got[0]
    assert warnings_of(lambda t, p: K.losses.sparse_categorical_crossentropy(t, p, from_logits=True), fit)
    assert not warnings_of(keras_kd.DistillationLoss(), fit)

    def with_metrics(student):  # metrics that call Keras's loss functions read the labels, as intended
        student.compile(K.optimizers.SGD(0.01), loss=keras_kd.DistillationLoss(), jit_compile=jit, metrics=[
            K.metrics.SparseCategoricalCrossentropy(from_logits=True), K.metrics.SparseCategoricalAccuracy()])
        fit(student)
        evaluate(student)

    assert not warnings_of(keras_kd.DistillationLoss(), with_metrics)
    assert not warnings_of(keras_kd.DistillationLoss(hard_loss=K.losses.SparseCategoricalCrossentropy(from_logits=True)),
                           fit)
    if not on_jax:  # JAX's jitted step tells no training step from an evaluation one
        assert not warnings_of(plain, evaluate)
    # Labels without a teacher (plain `(x, y)`) are the usual case for a plain loss: no warning.
    assert not warnings_of(plain, lambda student: student.fit(make(), epochs=1, verbose=0))


def test_with_teacher_bad_inputs(K, toy_data):
    x, y, make = toy_data
    teacher = mlp(K)
    with pytest.raises(ValueError, match="after `.batch"):
        keras_kd.with_teacher(make().unbatch(), teacher)
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices(x).batch(4), teacher)
    with pytest.raises(ValueError, match="placement"):
        keras_kd.with_teacher(make(), teacher, placement="gpu")
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        keras_kd.with_teacher((x, y), teacher)
    with pytest.raises(ValueError, match="once"):
        keras_kd.with_teacher(keras_kd.with_teacher(make(), teacher), teacher)


# --- saving ----------------------------------------------------------------------


def _formats(K):
    return ["model.keras"] if K is keras else ["model.keras", "model.h5", "savedmodel"]


def test_save_and_load_keeps_loss_config(K, toy_data, tmp_path):
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    loss = keras_kd.DistillationLoss(temperature=5.0, alpha=0.2, divergence="js")
    student.compile("adam", loss=loss, metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(make(), teacher), epochs=1, verbose=0)
    for name in _formats(K):
        path = str(tmp_path / name)
        student.save(path)
        loaded = K.models.load_model(path)
        restored = loaded.loss
        if isinstance(restored, dict) or not isinstance(restored, keras_kd.DistillationLoss):
            restored = getattr(loaded, "compiled_loss", None)._user_losses if hasattr(loaded, "compiled_loss") else restored
        assert isinstance(restored, keras_kd.DistillationLoss), (name, restored)
        assert restored.get_config() == loss.get_config(), name
        np.testing.assert_allclose(loaded.predict(x, verbose=0), student.predict(x, verbose=0), rtol=1e-6)
        # The loaded model keeps training with its restored loss.
        loaded.fit(keras_kd.with_teacher(make(), teacher), epochs=1, verbose=0)


# --- distribution and precision ----------------------------------------------------


@pytest.mark.backend("tensorflow")  # tf.distribute.MirroredStrategy
def test_mirrored_strategy_gradients_equal_single_device(K, toy_data):
    """One SGD step (lr=1) over 2 replicas moves the weights exactly as on one device."""
    x, y, make = toy_data
    assert len(tf.config.list_logical_devices("CPU")) >= 2
    teacher = mlp(K, hidden=32)
    w = np.random.default_rng(3).uniform(0.2, 2.0, len(x)).astype("float32")
    init = mlp(K).get_weights()

    def one_step(strategy):
        with strategy.scope():
            student = mlp(K)
            student.set_weights(init)
            student.compile(K.optimizers.SGD(1.0), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
        student.fit(keras_kd.with_teacher(make(batch=96, sample_weight=w), teacher), epochs=1, verbose=0, shuffle=False)
        return student.get_weights()

    single = one_step(tf.distribute.get_strategy())
    mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    for a, b, c in zip(single, mirrored, init):
        assert not np.allclose(a, c)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_precision_student(toy_data):
    x, y, make = toy_data
    teacher = mlp(keras, hidden=32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        student = mlp(keras)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert student.outputs[0].dtype == "float16"
    loss = keras_kd.DistillationLoss(temperature=4.0, alpha=0.3)
    student.compile("adam", loss=loss)
    value = student.evaluate(keras_kd.with_teacher(make(batch=96), teacher), verbose=0)
    s = student.predict(x, verbose=0).astype("float32")
    t = teacher.predict(x, verbose=0)
    # float16 logits: agreement to float16 precision.
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 4.0, 0.3), rel=2e-3)
    history = student.fit(keras_kd.with_teacher(make(), teacher), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
