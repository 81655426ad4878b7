"""HardSampleReweighting, DistillationScheduler and schedules, both flavours."""

import copy
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import callbacks as cb
from keras_kd.callbacks import table as table_lib
from tests import reference as ref
from tests.conftest import mlp

NO_LABEL = keras_kd.NO_LABEL


def _logits(seed, shape):
    return (np.random.default_rng(seed).normal(size=shape) * 2).astype("float32")


# --- signals against NumPy ------------------------------------------------------


def test_signals_match_numpy():
    t, s = _logits(1, (7, 5)), _logits(2, (7, 5))
    y = np.array([0, 1, 2, 3, 4, 0, 1])
    soft = np.arange(7, dtype="float32")
    ce_s, ce_t = ref.sparse_ce(y, s), ref.sparse_ce(y, t)
    p_t = np.exp(ref.log_softmax(t))
    want = {
        "kl": soft,
        "student_ce": ce_s,
        "teacher_ce": ce_t,
        "wsld": 1 - np.exp(-ce_s / ce_t),
        "teacher_wrong": (t.argmax(-1) != y).astype(float),
        "teacher_entropy": -(p_t * np.log(p_t)).sum(-1),
    }
    assert set(want) == set(cb.SIGNALS)
    for name, fn in cb.SIGNALS.items():
        np.testing.assert_allclose(np.asarray(fn(y, t, s, soft)), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        # One-hot labels give the same values.
        np.testing.assert_allclose(
            np.asarray(fn(np.eye(5, dtype="float32")[y], t, s, soft)), want[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_sequence_signals_average_time_steps():
    t, s = _logits(3, (2, 3, 4)), _logits(4, (2, 3, 4))
    y = np.array([[0, 1, 2], [3, 0, 1]])
    got = np.asarray(cb.signal_student_ce(y, t, s, None))
    np.testing.assert_allclose(got, ref.sparse_ce(y, s).mean(-1), rtol=1e-5)


def test_raw_weights_and_normalise():
    d = np.array([1.0, 2.0, 3.0, 6.0])
    # (d / mean d) ** strength with mean 3: [1/3, 2/3, 1, 2]
    np.testing.assert_allclose(cb.raw_weights("kl", d, 1.0), [1 / 3, 2 / 3, 1, 2], rtol=1e-4)
    np.testing.assert_allclose(cb.raw_weights("kl", d, 0.0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(cb.raw_weights("teacher_wrong", np.array([0.0, 1.0]), 2.0), [1.0, math.exp(-2)])
    w = cb.normalise(np.array([1.0, 1.0, 1.0, 9.0]), clip=(0.2, 2.0))
    # mean 3 -> [1/3, 1/3, 1/3, 3] -> clipped high at 2
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 2.0])


def test_signals_on_mixed_dense_labels():
    """Mixed (mixup) labels (B, K): cross-entropies against the mixed
    distribution, teacher_wrong against its argmax."""
    t, s = _logits(5, (6, 4)), _logits(6, (6, 4))
    y = np.random.default_rng(7).dirichlet(np.ones(4), size=6).astype("float32")
    soft = np.arange(6, dtype="float32")
    ce_s = -(y * ref.log_softmax(s)).sum(-1)
    ce_t = -(y * ref.log_softmax(t)).sum(-1)
    want = {
        "student_ce": ce_s,
        "teacher_ce": ce_t,
        "wsld": 1 - np.exp(-ce_s / ce_t),
        "teacher_wrong": (t.argmax(-1) != y.argmax(-1)).astype(float),
    }
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(cb.SIGNALS[name](y, t, s, soft)), value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32"])
def test_label_signals_skip_unlabelled_examples(dtype):
    """NO_LABEL examples get NaN from the label-based signals (their rows stay
    untouched), the others their usual value; label-free signals ignore labels."""
    t, s = _logits(8, (5, 3)), _logits(9, (5, 3))
    y = np.array([0, NO_LABEL, 2, NO_LABEL, 1]).astype(dtype)
    has = y != NO_LABEL
    ids = np.where(has, y, 0).astype(int)
    soft = np.arange(5, dtype="float32")
    ce_s, ce_t = ref.sparse_ce(ids, s), ref.sparse_ce(ids, t)
    want = {
        "student_ce": ce_s,
        "teacher_ce": ce_t,
        "wsld": 1 - np.exp(-ce_s / ce_t),
        "teacher_wrong": (t.argmax(-1) != ids).astype(float),
    }
    for name in cb.SIGNALS:
        got = np.asarray(cb.SIGNALS[name](y, t, s, soft))
        if name in want:
            assert np.isnan(got[~has]).all(), name
            np.testing.assert_allclose(got[has], want[name][has], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert np.isfinite(got).all(), name
    # Binary (one logit): NO_LABEL is skipped too.
    z_t, z_s = _logits(10, (4, 1)), _logits(11, (4, 1))
    yb = np.array([1.0, NO_LABEL, 0.0, 1.0], "float32")
    wrong = np.asarray(cb.signal_teacher_wrong(yb, z_t, z_s, None))
    assert np.isnan(wrong[1])
    np.testing.assert_array_equal(wrong[[0, 2, 3]], ((z_t[:, 0] > 0) != (yb > 0.5))[[0, 2, 3]].astype(float))


def test_unlabelled_examples_keep_weight_one_in_fit(K):
    """A labelled set mixed with NO_LABEL examples: student_ce reweights the
    labelled ones only; the unlabelled keep weight 1 and stay out of the
    teacher-wrong share."""
    n = 48
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = rng.integers(0, 4, size=n)
    y[::3] = NO_LABEL
    has = y != NO_LABEL
    ds = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y)))
    teacher, student = mlp(K), mlp(K)
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5))
    rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=1, momentum=0.5, clip=(0.1, 10.0))
    history = student.fit(keras_kd.with_teacher(rew.attach(ds).batch(16), teacher), epochs=2, verbose=0,
                          callbacks=[rew])
    np.testing.assert_array_equal(rew.table.seen, has)
    d = ref.sparse_ce(y[has], student.predict(x[has], verbose=0))
    np.testing.assert_allclose(rew.table.difficulty[has], d, rtol=1e-5)
    weights = rew.table.weights.numpy()
    np.testing.assert_array_equal(weights[~has], 1.0)
    np.testing.assert_allclose(weights[has], cb.normalise(cb.raw_weights("student_ce", d, 1.0), (0.1, 10.0)),
                               rtol=1e-5)
    t = teacher.predict(x, verbose=0)
    assert history.history["kd_teacher_wrong_share"][-1] == pytest.approx((t.argmax(-1) != y)[has].mean())


def test_public_callback_base_runs_in_both_flavours(K, toy_data):
    """keras_kd.Callback subclasses run in the fit of either flavour and write into logs."""
    x, y, make = toy_data
    student = mlp(K)
    student.compile(K.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")

    class Epochs(keras_kd.Callback):
        def on_train_begin(self, logs=None):
            self.seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append((epoch, self.model is student))
            logs["seen_epoch"] = float(epoch)

    probe = Epochs()
    history = student.fit(make(batch=16), epochs=2, verbose=0, callbacks=[probe])
    assert probe.seen == [(0, True), (1, True)]
    assert history.history["seen_epoch"] == [0.0, 1.0]


# --- the dataset hook -------------------------------------------------------------


def _ids_dataset(n=40, weights=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = rng.integers(0, 4, size=n)
    parts = (x, y) if weights is None else (x, y, weights)
    return x, y, keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices(parts))


def test_add_example_ids_and_attach_multiply_user_weights():
    user = np.linspace(0.5, 2.0, 40).astype("float32")
    x, y, ds = _ids_dataset(weights=user)
    rew = keras_kd.HardSampleReweighting()
    attached = rew.attach(ds)
    table = np.linspace(0.1, 4.0, 40).astype("float32")
    rew.table.weights.assign(table)
    for i, (xb, targets, w) in enumerate(attached.batch(40)):
        np.testing.assert_array_equal(targets.example_id.numpy(), np.arange(40))
        np.testing.assert_array_equal(targets.labels.numpy(), y)
        np.testing.assert_allclose(w.numpy(), table * user, rtol=1e-6)


def test_attach_bad_inputs():
    x, y, ds = _ids_dataset()
    plain = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match="add_example_ids"):
        keras_kd.HardSampleReweighting().attach(plain)
    with pytest.raises(ValueError, match="num_examples=30 but the dataset has 40"):
        keras_kd.HardSampleReweighting(num_examples=30).attach(ds)
    with pytest.raises(ValueError, match="infinite"):
        keras_kd.HardSampleReweighting().attach(ds.repeat())
    unlabelled = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices(x))
    with pytest.raises(ValueError, match="needs labels"):
        keras_kd.HardSampleReweighting(signal="teacher_wrong").attach(unlabelled)
    keras_kd.HardSampleReweighting(signal="teacher_entropy").attach(unlabelled)  # fine without labels
    with pytest.raises(ValueError, match="num_examples"):
        keras_kd.HardSampleReweighting().attach(ds.filter(lambda *e: True))
    with pytest.raises(ValueError, match="attach"):
        keras_kd.HardSampleReweighting().table  # noqa: B018


def test_ids_outside_the_table_fail():
    x, y, ds = _ids_dataset()
    rew = keras_kd.HardSampleReweighting(num_examples=10)
    shifted = ds.batch(40).map(lambda xb, t: (xb, t.replace(example_id=t.example_id + 5)))
    attached = rew.attach(shifted)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the weight table"):
        list(attached)


@pytest.mark.parametrize("jit", [False, True])
def test_training_ids_outside_the_table_never_train_silently(K, jit):
    """Without `attach`, a table smaller than the data (a wrong `num_examples`)
    must not weigh examples with another example's row: an error in the step
    without XLA; under XLA, where assertions vanish (and on JAX, where nothing
    raises inside jit), a NaN loss and then an error at the epoch's end that
    names the cause."""
    x, y, ds = _ids_dataset(n=48)
    teacher = mlp(K)
    student = mlp(K)
    student.compile(K.optimizers.SGD(0.01), loss=keras_kd.DistillationLoss(), jit_compile=jit)
    rew = keras_kd.HardSampleReweighting(signal="kl", num_examples=10)
    data = keras_kd.with_teacher(ds.batch(16), teacher)

    class EpochLoss(K.callbacks.Callback):  # runs before `rew` at the epoch's end
        def on_epoch_end(self, epoch, logs=None):
            self.loss = logs["loss"]

    spy = EpochLoss()
    on_jax = K is keras and keras.backend.backend() == "jax"
    want = "outside the HardSampleReweighting table of 10 examples"
    if jit or on_jax:
        with pytest.raises(ValueError, match=want) as raised:
            student.fit(data, epochs=2, verbose=0, callbacks=[spy, rew])
        assert "num_examples" in str(raised.value) and "epoch 1" in str(raised.value)
        assert not math.isfinite(spy.loss)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match=want) as raised:
            student.fit(data, epochs=2, verbose=0, callbacks=[spy, rew])
        assert "num_examples" in str(raised.value)
    # The examples' rows never took the stray ids' values: only ids 0-9 are in the table.
    assert rew.table.stats.shape == (10, 2) and rew.table.weights.numpy().shape == (10,)
    assert np.isfinite(rew.table.weights.numpy()).all()


def test_the_table_of_an_epoch_with_stray_ids_keeps_the_examples_rows_apart():
    """Ids outside the table write the table's spare row (reported by `flush`),
    never an example's: the rows of ids 0-9 read what those examples wrote."""
    rew = keras_kd.HardSampleReweighting(signal="kl", num_examples=10)
    table = rew.table
    ids = tf.constant([0, 3, 12, -1, 9], tf.int64)
    rows = table_lib.table_rows(ids, 10)
    np.testing.assert_array_equal(rows.numpy(), [0, 3, 10, 10, 9])
    fresh = np.array([[1.0, 0.0], [2.0, 1.0], [7.0, 1.0], [8.0, 0.0], [3.0, 0.0]], np.float32)
    table.step_pending.scatter_update(tf.IndexedSlices(tf.constant(fresh), rows))
    stats = table.flush()
    assert table.strays
    np.testing.assert_array_equal(stats[[0, 3, 9]], fresh[[0, 1, 4]])
    assert np.isnan(stats[[1, 2, 4, 5, 6, 7, 8]]).all()
    assert np.isnan(table.step_weights.numpy()[10]) and (table.weights.numpy() == 1.0).all()
    table.flush()
    assert not table.strays  # cleared with the pending values


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"signal": "loss"}, "signal"),
        ({"strength": float("nan")}, "strength"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"clip": (2.0, 5.0)}, "clip"),
        ({"clip": (0.1,)}, "clip"),
        ({"momentum": 1.0}, "momentum"),
        ({"num_examples": 0}, "num_examples"),
        # bool is not an int (True == 1 would make a one-row table).
        ({"num_examples": True}, "Expected `num_examples` to be None or a positive integer. Received: num_examples=True"),
        ({"warmup_epochs": True}, "warmup_epochs"),
        ({"warmup_epochs": 1.0}, "warmup_epochs"),
        ({"strength": True}, "strength"),
        ({"clip": ("0.1", 5.0)}, "clip"),
        ({"clip": (0.2, float("inf"))}, "clip"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.HardSampleReweighting(**kwargs)


# --- in fit -----------------------------------------------------------------------


def _fit_with_reweighting(K, rew, epochs=3, **fit_kwargs):
    x, y, ds = _ids_dataset(n=48)
    teacher, student = mlp(K), mlp(K)
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5))
    train = keras_kd.with_teacher(rew.attach(ds).batch(16), teacher)
    history = student.fit(train, epochs=epochs, verbose=0, callbacks=[rew], **fit_kwargs)
    return x, y, teacher, student, history


def test_records_ema_of_training_step_values(K):
    """With a frozen student (lr=0) every epoch sees the same signal d: the EMA
    stays d, and the weights are normalise(raw(d)) from the warm-up on."""
    rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=2, momentum=0.5, clip=(0.1, 10.0))
    x, y, teacher, student, history = _fit_with_reweighting(K, rew, epochs=3)
    d = ref.sparse_ce(y, student.predict(x, verbose=0))
    np.testing.assert_allclose(rew.table.difficulty, d, rtol=1e-5)
    want = cb.normalise(cb.raw_weights("student_ce", d, 1.0), (0.1, 10.0))
    np.testing.assert_allclose(rew.table.weights.numpy(), want, rtol=1e-5)
    # Logged per epoch; weights uniform during the warm-up epoch.
    assert history.history["kd_weight_max"][0] == pytest.approx(1.0)
    assert history.history["kd_weight_max"][-1] == pytest.approx(want.max(), rel=1e-5)
    assert history.history["kd_weight_share_above_2"][-1] == pytest.approx((want > 2).mean())
    t = teacher.predict(x, verbose=0)
    assert history.history["kd_teacher_wrong_share"][-1] == pytest.approx((t.argmax(-1) != y).mean())


def _entropy(logits):
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return -(np.exp(log_p) * log_p).sum(-1)


@pytest.mark.parametrize("weights", ["attach", "in the step"])
def test_smooths_across_epochs_with_the_last_value_of_each_epoch(K, weights):
    """The per-example table is an EMA over epochs, written from NumPy: epoch e
    shows the teacher's logits scaled by c_e (a tf.Variable that a callback
    sets), so the teacher-entropy signal and the teacher's argmax change every
    epoch. Each epoch also passes every example twice (the second pass scaled
    by 3): only the last value of an epoch counts. Mid-epoch, the table already
    shows the values of the examples seen so far in that epoch."""
    n, batch, momentum = 24, 8, 0.6
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = rng.integers(0, 4, size=n)
    t = _logits(8, (n, 4))
    scales = [1.0, -2.0, 0.5]
    phase = tf.Variable(1.0)

    def targets(scale):
        def make(x_, y_, t_, i):
            return x_, keras_kd.TeacherTargets(labels=y_, logits=t_ * scale * phase, example_id=i)
        return make

    base = tf.data.Dataset.from_tensor_slices((x, y, t, np.arange(n, dtype="int64")))
    rew = keras_kd.HardSampleReweighting(signal="teacher_entropy", momentum=momentum, warmup_epochs=0,
                                         num_examples=None if weights == "attach" else n)
    hook = rew.attach if weights == "attach" else (lambda passes: passes)
    ds = hook(base.map(targets(1.0))).concatenate(hook(base.map(targets(3.0)))).batch(batch)
    seen = []

    class Phase(keras_kd.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            phase.assign(scales[epoch])

        def on_train_batch_end(self, step, logs=None):
            if step == 0:
                seen.append(int(rew.table.seen.sum()))

    student = mlp(K)
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5))
    student.fit(ds, epochs=3, verbose=0, callbacks=[Phase(), rew])

    d = w = None
    for c in scales:  # the epoch's last value: the second pass, 3 * c * t
        d_e, w_e = _entropy(3.0 * c * t.astype("float64")), ((3.0 * c * t).argmax(-1) != y).astype(float)
        d = d_e if d is None else momentum * d + (1 - momentum) * d_e
        w = w_e if w is None else 0.5 * w + 0.5 * w_e
    np.testing.assert_allclose(rew.table.difficulty, d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rew.table.teacher_wrong, w, atol=1e-6)
    np.testing.assert_allclose(rew.get_state()["stats"], np.stack([d, w], 1), rtol=1e-5, atol=1e-6)
    assert seen == [batch, n, n]  # epoch 1: the first batch's rows; later epochs: every row
    want = cb.normalise(cb.raw_weights("teacher_entropy", d, 1.0), rew.clip)
    np.testing.assert_allclose(rew.table.weights.numpy(), want, rtol=1e-5)


def test_refits_reuse_the_hooked_step_and_other_fits_get_a_plain_one(K):
    """A second fit with the same callback reuses the step traced with its hooks
    (TensorFlow: no retrace per fit); a fit without the callback trains with a
    step without them (the table is neither read nor written); after a
    recompile the step is traced again with the new loss."""
    x, y, ds = _ids_dataset(n=48)
    ds = keras_kd.with_teacher(ds.batch(16), mlp(K))
    student = mlp(K)
    student.compile(K.optimizers.SGD(0.1), loss=keras_kd.DistillationLoss())
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=48)
    steps = []

    class Probe(keras_kd.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(self.model.train_function)

    student.fit(ds, epochs=1, verbose=0, callbacks=[rew, Probe()])
    assert student.train_function is not steps[0]  # the plain step is back
    student.fit(ds, epochs=1, verbose=0, callbacks=[rew, Probe()])
    tensorflow_step = not (K is keras and keras.backend.backend() == "jax")
    if tensorflow_step:
        assert steps[1] is steps[0]  # reused, not traced again
    table = rew.get_state()
    student.fit(ds, epochs=2, verbose=0, callbacks=[Probe()])
    assert steps[2] is not steps[1] and not student.loss.observers and not student.loss.weightings
    np.testing.assert_array_equal(rew.get_state()["stats"], table["stats"])  # nothing recorded
    np.testing.assert_array_equal(rew.get_state()["weights"], table["weights"])
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
    student.fit(ds, epochs=1, verbose=0, callbacks=[rew, Probe()])
    if tensorflow_step:
        assert steps[4] is not steps[1]  # a new loss: traced again
    assert rew.table.seen.all() and not np.array_equal(rew.get_state()["stats"], table["stats"])
    assert rew.table.weights.numpy().std() > 0
    # Without the callback the step is unweighted: with lr = 0, the fit's loss is evaluate's.
    history = student.fit(ds, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(student.evaluate(ds, verbose=0), rel=1e-5)


def test_validation_with_sample_weights_and_in_step_weights(K):
    """Validation batches that carry their own sample weights, with the table's
    weights applied in the step: validation is weighted by its own weights only."""
    x, y, train = _ids_dataset(n=48)
    sw = np.linspace(0.5, 2.0, 12).astype("float32")
    _, _, val = _ids_dataset(n=12, weights=sw)
    teacher, student = mlp(K), mlp(K)
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=48)
    rew.set_state({"weights": np.linspace(0.2, 5.0, 48), "stats": np.full((48, 2), np.nan)})
    val = keras_kd.with_teacher(val.batch(6), teacher)
    history = student.fit(keras_kd.with_teacher(train.batch(16), teacher), epochs=1, verbose=0,
                          callbacks=[rew], validation_data=val)
    assert history.history["val_loss"][0] == pytest.approx(student.evaluate(val, verbose=0), rel=1e-5)


# On JAX the raised fit's hooks and bound state stay until the next fit with the callback.
@pytest.mark.backend("tensorflow")
@pytest.mark.parametrize("jit", [False, True])
def test_a_fit_that_raised_leaves_no_hooks_for_the_next_fit(K, jit):
    """Keras skips on_train_end when a fit raises (here: KeyboardInterrupt in a
    batch hook). The next fit without the callback must still be unweighted and
    leave the table alone, also when it reuses the model's step or retraces it."""
    x, y, ds = _ids_dataset(n=48)
    ds = keras_kd.with_teacher(ds.batch(16), mlp(K))
    student = mlp(K)
    kd = keras_kd.DistillationLoss()
    student.compile(K.optimizers.SGD(0.0), loss=kd, jit_compile=jit)
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=48)
    rew.set_state({"weights": np.linspace(0.2, 5.0, 48), "stats": np.full((48, 2), np.nan)})

    class Interrupt(keras_kd.Callback):
        def on_train_batch_end(self, step, logs=None):
            if step == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        student.fit(ds, epochs=1, verbose=0, callbacks=[rew, Interrupt()])
    table = rew.get_state()
    want = student.evaluate(ds, verbose=0)  # unweighted: no hook runs in evaluate
    history = student.fit(ds, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(want, rel=1e-5)
    assert not kd.observers and not kd.weightings
    np.testing.assert_array_equal(rew.get_state()["stats"], table["stats"])
    # A recompile with the same loss object traces a new step: still without the hooks.
    student.compile(K.optimizers.SGD(0.0), loss=kd, jit_compile=jit)
    history = student.fit(ds, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(want, rel=1e-5)
    # The callback itself still works afterwards.
    student.fit(ds, epochs=1, verbose=0, callbacks=[rew])
    assert rew.table.seen.all()


def test_validation_does_not_touch_the_table(K):
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0)
    x, y, ds = _ids_dataset(n=48)
    teacher, student = mlp(K), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    # Validation examples carry ids too (0..11) but with shifted inputs.
    val = keras_kd.with_teacher(keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x[:12] + 50, y[:12]))).batch(6), teacher)
    train = keras_kd.with_teacher(rew.attach(ds).batch(16), teacher)
    student.fit(train, epochs=1, verbose=0, callbacks=[rew], validation_data=val)
    before = rew.table.difficulty.copy()
    student.evaluate(val, verbose=0)
    np.testing.assert_array_equal(rew.table.difficulty, before)
    # Recomputing the training examples' signal from the final student matches.
    assert rew.table.seen.all()


# TensorFlow only: a JAX step cannot tell, and there the callback's own
# on_test_begin/on_test_end decide (documented in HardSampleReweighting).
@pytest.mark.backend("tensorflow")
@pytest.mark.parametrize("jit", [False, True])
def test_evaluate_inside_another_callback_neither_records_nor_is_weighted(K, jit):
    """A `model.evaluate` that another callback runs mid-`fit` (this callback sees
    no `on_test_begin`) is a validation step too: the table is unchanged by it
    (against the same fit without it) and its loss is unweighted, even for
    validation ids outside the table (in-step weights, `num_examples=`)."""
    x, y, ds = _ids_dataset(n=48)
    teacher = mlp(K)
    # Validation ids 100..111: outside the table of 48.
    val = keras_kd.with_teacher(
        tf.data.Dataset.from_tensor_slices(
            (x[:12] + 5.0, keras_kd.TeacherTargets(labels=y[:12], example_id=np.arange(100, 112)))
        ).batch(6),
        teacher,
    )
    kd = keras_kd.DistillationLoss()

    class EvaluateEachEpoch(K.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.seen = self.model.evaluate(val, verbose=0)

    tables, start = {}, None
    for extra in (False, True):
        student = mlp(K)
        start = start or student.get_weights()
        student.set_weights(start)
        student.compile(K.optimizers.SGD(0.05), loss=kd, jit_compile=jit)
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=48)
        other = EvaluateEachEpoch()
        callbacks = [rew, other] if extra else [rew]
        student.fit(keras_kd.with_teacher(ds.batch(16), teacher), epochs=2, verbose=0, callbacks=callbacks)
        tables[extra] = rew.get_state()
    np.testing.assert_array_equal(tables[True]["stats"], tables[False]["stats"])
    np.testing.assert_array_equal(tables[True]["weights"], tables[False]["weights"])
    # Unweighted: the same value as evaluating the final student without the callback.
    assert other.seen == pytest.approx(student.evaluate(val, verbose=0), rel=1e-5)


def test_backup_restores_the_same_weights(K, tmp_path):
    """A fit resuming after epoch 2 with the model state that wrote the backup
    (what BackupAndRestore gives) gets the same table; a new run does not."""
    rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, backup_dir=str(tmp_path))
    x, y, teacher, student, history = _fit_with_reweighting(K, rew, epochs=2)
    saved = rew.get_state()
    rew._save_state(1)  # what on_epoch_end(1) wrote (the successful fit then removed it)

    def fresh(model):
        other = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, backup_dir=str(tmp_path))
        _, _, ds = _ids_dataset(n=48)
        other.attach(ds)
        model.compile("sgd", loss=keras_kd.DistillationLoss())
        other.set_model(model)
        other.on_train_begin()
        return other

    resumed = fresh(student)  # the same weights, as BackupAndRestore restores them
    resumed.on_epoch_begin(2)
    for key, value in saved.items():
        np.testing.assert_array_equal(resumed.get_state()[key], value)
    resumed.on_train_end()
    rew._save_state(1)
    new_run = fresh(mlp(K))  # other weights, first epoch 0: a new run
    new_run.on_epoch_begin(0)
    np.testing.assert_array_equal(new_run.get_state()["weights"], np.ones(48, np.float32))
    new_run.on_train_end()


def test_with_backup_and_restore_resumes(K, tmp_path):
    """A run interrupted by an exception resumes (BackupAndRestore) with the saved table."""
    x, y, ds = _ids_dataset(n=48)
    teacher = mlp(K)

    class Crash(K.callbacks.Callback if K is not keras else keras_kd.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    def run(callbacks):
        rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, backup_dir=str(tmp_path / "rew"))
        student = mlp(K)
        student.compile("sgd", loss=keras_kd.DistillationLoss())
        train = keras_kd.with_teacher(rew.attach(ds).batch(16), teacher)
        backup = K.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        return rew, student.fit(train, epochs=4, verbose=0, callbacks=[rew, backup, *callbacks])

    with pytest.raises(RuntimeError, match="crash"):
        run([Crash()])
    crashed = np.load(tmp_path / "rew" / "hard_sample_reweighting.npz")
    rew, history = run([])
    assert len(history.epoch) < 4  # resumed, not restarted
    assert int(crashed["epoch"]) == 1
    assert rew.table.seen.all()


def test_deepcopy_shares_the_table():
    _, _, ds = _ids_dataset()
    rew = keras_kd.HardSampleReweighting()
    rew.attach(ds)
    clone = copy.deepcopy(rew)
    assert clone.table is rew.table


def test_requires_distillation_loss(K):
    rew = keras_kd.HardSampleReweighting()
    x, y, ds = _ids_dataset(n=48)
    student = mlp(K)
    student.compile("sgd", loss=K.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="DistillationLoss"):
        student.fit(rew.attach(ds).batch(16), epochs=1, verbose=0, callbacks=[rew])


def test_scoring_pass(K):
    x, y, ds = _ids_dataset(n=48)
    teacher, student = mlp(K), mlp(K)
    scoring = keras_kd.with_teacher(ds.batch(16), teacher)
    rew = keras_kd.HardSampleReweighting(signal="teacher_entropy", warmup_epochs=0, scoring_data=scoring)
    student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
    student.fit(keras_kd.with_teacher(rew.attach(ds).batch(16), teacher), epochs=1, verbose=0, callbacks=[rew])
    p = np.exp(ref.log_softmax(teacher.predict(x, verbose=0)))
    np.testing.assert_allclose(rew.table.difficulty, -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_histogram_png(K, tmp_path):
    rew = keras_kd.HardSampleReweighting(warmup_epochs=0, histogram_dir=str(tmp_path))
    _fit_with_reweighting(K, rew, epochs=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["weights_epoch_001.png", "weights_epoch_002.png"]
    assert (tmp_path / files[0]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.backend("tensorflow")  # tf.distribute runs TensorFlow models only
@pytest.mark.parametrize("weights", ["attach", "in the step"])
def test_mirrored_strategy(K, weights):
    """Both replicas write their halves of every batch into the one table, also
    when the table is created inside `fit`'s strategy scope (in-step weights,
    `num_examples=`), where a mirrored table would keep one replica's half."""
    x, y, ds = _ids_dataset(n=48)
    teacher = mlp(K)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        student = mlp(K)
        student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
    if weights == "attach":
        rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, momentum=0.0)
        data = rew.attach(ds)
    else:
        rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, momentum=0.0, num_examples=48)
        data = ds
    student.fit(keras_kd.with_teacher(data.batch(16), teacher), epochs=1, verbose=0, callbacks=[rew])
    np.testing.assert_allclose(rew.table.difficulty, ref.sparse_ce(y, student.predict(x, verbose=0)), rtol=1e-5)
    assert rew.table.seen.all()


# --- schedules ----------------------------------------------------------------------


def test_schedules():
    assert [keras_kd.constant(2.0)(e) for e in range(2)] == [2.0, 2.0]
    assert [keras_kd.linear(8.0, 2.0, 4)(e) for e in range(5)] == [8.0, 6.0, 4.0, 2.0, 2.0]
    cos = keras_kd.cosine(4.0, 0.0, 3)
    assert [cos(e) for e in range(3)] == pytest.approx([4.0, 2.0, 0.0])
    assert [keras_kd.step([2, 4], [0.0, 0.3, 0.5])(e) for e in range(6)] == [0.0, 0.0, 0.3, 0.3, 0.5, 0.5]
    with pytest.raises(ValueError, match="boundaries"):
        keras_kd.step([2], [1.0])
    with pytest.raises(ValueError, match="epochs"):
        keras_kd.linear(1.0, 2.0, 0)
    with pytest.raises(ValueError, match="Expected `epochs` to be a positive integer. Received: epochs=True"):
        keras_kd.cosine(1.0, 2.0, True)
    with pytest.raises(ValueError, match="start"):
        keras_kd.linear("8", 2.0, 3)
    with pytest.raises(ValueError, match="alpha"):
        keras_kd.DistillationScheduler(alpha=True)


def test_scheduler_changes_loss_without_recompiling(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    kd = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0)
    student.compile(K.optimizers.SGD(0.0), loss=kd)
    seen = []

    class Probe(keras_kd.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs["loss"])

    sched = keras_kd.DistillationScheduler(temperature=keras_kd.step([1], [1.0, 3.0]), alpha=lambda e: 0.0)
    history = student.fit(keras_kd.with_teacher(make(batch=96), teacher), epochs=2, verbose=0, callbacks=[sched, Probe()])
    assert history.history["kd_temperature"] == [1.0, 3.0]
    s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    assert seen[1] == pytest.approx(ref.distillation_loss(y, s, t, 3.0, 0.0), rel=1e-5)


def test_scheduler_bad_inputs(K):
    with pytest.raises(ValueError, match="temperature"):
        keras_kd.DistillationScheduler(temperature="hot")
    with pytest.raises(ValueError, match="needs"):
        keras_kd.DistillationScheduler()
    student = mlp(K)
    student.compile("sgd", loss=K.losses.MeanSquaredError())
    sched = keras_kd.DistillationScheduler(temperature=2.0)
    sched.set_model(student)
    with pytest.raises(ValueError, match="DistillationLoss"):
        sched.on_epoch_begin(0)
    kd = keras_kd.DistillationLoss()
    with pytest.raises(ValueError, match="temperature"):
        keras_kd.DistillationScheduler(temperature=lambda e: -1.0, loss=kd).on_epoch_begin(0)


def test_weights_applied_in_the_step_without_attach(K):
    """Without `attach`, the loss multiplies the table's weights in: the same loss
    as the dataset hook, and validation stays unweighted."""
    x, y, ds = _ids_dataset(n=48)
    teacher = mlp(K)
    table = np.linspace(0.2, 3.0, 48).astype("float32")
    values = {}
    for mode in ("attach", "step"):
        student = mlp(K)
        student.set_weights([np.full_like(w, 0.1) for w in student.get_weights()])
        student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=100, num_examples=48)
        data = rew.attach(ds.batch(48)) if mode == "attach" else ds.batch(48)
        rew.table.weights.assign(table)
        history = student.fit(keras_kd.with_teacher(data, teacher), epochs=1, verbose=0, callbacks=[rew],
                              validation_data=keras_kd.with_teacher(ds.batch(48), teacher))
        values[mode] = (history.history["loss"][0], history.history["val_loss"][0])
    assert values["step"][0] == pytest.approx(values["attach"][0], rel=1e-5)
    assert values["step"][1] == pytest.approx(values["attach"][1], rel=1e-5)
