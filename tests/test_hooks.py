"""The loss's per-example hooks: observers and weightings run exactly once per step.

`DistillationLoss.components` and `terms` are pure; observers see the dense
teacher logits the loss used, whatever form the targets had; metrics compiled
next to the loss never re-run them (they once corrupted the reweighting table).
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from tests import compiled
from tests import reference as ref
from tests.conftest import mlp

JIT = pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])


class _Counter:
    """An observer that counts its calls inside the step and keeps the last teacher logits."""

    def __init__(self, shape):
        self.calls = tf.Variable(0, dtype=tf.int64)
        self.last = tf.Variable(tf.zeros(shape), shape=tf.TensorShape(None))

    def __call__(self, targets, student_logits, hard, soft):
        self.calls.assign_add(1)
        self.last.assign(targets.logits)


def _metrics(kd):
    return ["accuracy", keras_kd.teacher_agreement, *keras_kd.loss_components(kd)]


@pytest.mark.backend("tensorflow")  # the observer updates tf.Variables, which a jitted JAX step cannot run
@JIT
def test_observer_runs_once_per_step_whatever_the_metrics(K, jit, toy_data):
    x, y, make = toy_data
    kd = keras_kd.DistillationLoss()
    counter = _Counter((32, 4))
    kd.add_observer(counter)
    student = mlp(K)
    student.compile("sgd", loss=kd, metrics=_metrics(kd), jit_compile=jit)
    ds = keras_kd.with_teacher(make(batch=32), mlp(K), placement="pipeline")
    student.fit(ds, epochs=2, verbose=0)
    assert int(counter.calls.numpy()) == 2 * 3  # 2 epochs x 3 steps, not once per metric
    student.evaluate(ds, verbose=0)
    assert int(counter.calls.numpy()) == 2 * 3 + 3  # and once per validation step


def test_components_and_terms_are_pure():
    kd = keras_kd.DistillationLoss()
    counter = _Counter((2, 3))
    kd.add_observer(counter)
    targets = TeacherTargets(labels=[0, 1], logits=np.ones((2, 3), "float32"))
    s = np.zeros((2, 3), "float32")
    kd.components(targets, s)
    kd.terms(targets, s)
    kd.call(targets, s)
    assert int(counter.calls.numpy()) == 0
    kd(targets, s)
    assert int(counter.calls.numpy()) == 1


def _reweighted_table(K, toy_data, extra_metrics):
    x, y, _ = toy_data
    K.utils.set_random_seed(3)
    teacher, student = mlp(K, hidden=32), mlp(K)
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2)
    metrics = _metrics(kd) if extra_metrics else ["accuracy"]
    student.compile(K.optimizers.SGD(0.05), loss=kd, metrics=metrics)
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, num_examples=len(x))
    raw = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y))).batch(32)
    student.fit(keras_kd.with_teacher(raw, teacher, placement="pipeline"), epochs=3, verbose=0, callbacks=[rew])
    return rew.table.stats.numpy(), rew.table.weights.numpy()


def test_reweighting_table_does_not_depend_on_compiled_metrics(K, toy_data):
    stats, weights = _reweighted_table(K, toy_data, extra_metrics=False)
    stats_m, weights_m = _reweighted_table(K, toy_data, extra_metrics=True)
    np.testing.assert_allclose(stats_m, stats, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(weights_m, weights, rtol=1e-6, atol=1e-7)


# --- observers see the dense teacher logits the loss used ----------------------------


def _uniform_fill(idx, vals, lse, classes):
    """NumPy: top-k logits in place, every other class log((exp(lse) - sum exp(top-k)) / (C - k))."""
    vals = vals.astype(np.float64)
    tail = np.log(np.exp(lse.astype(np.float64)) - np.exp(vals).sum(-1)) - np.log(classes - idx.shape[-1])
    dense = np.repeat(tail[:, None], classes, axis=1)
    np.put_along_axis(dense, idx, vals, -1)
    return dense


def test_observer_gets_dense_logits_from_topk_targets():
    t = np.random.default_rng(0).normal(size=(5, 6)).astype("float32") * 2
    idx = np.argsort(-t, -1)[:, :2].astype("int32")
    vals = np.take_along_axis(t, idx, -1)
    lse = np.log(np.exp(t.astype(np.float64)).sum(-1)).astype("float32")
    seen = {}
    kd = keras_kd.DistillationLoss()
    kd.add_observer(lambda targets, s, hard, soft: seen.update(logits=targets.logits, topk=targets.topk_values))
    kd(TeacherTargets(labels=np.zeros(5, int), topk_indices=idx, topk_values=vals, topk_logsumexp=lse),
       np.zeros((5, 6), "float32"))
    assert seen["topk"] is None
    np.testing.assert_allclose(seen["logits"].numpy(), _uniform_fill(idx, vals, lse, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.backend("tensorflow")  # the observer updates tf.Variables, which a jitted JAX step cannot run
def test_observer_gets_the_in_step_teachers_logits(K, toy_data):
    x, y, make = toy_data
    teacher = mlp(K, hidden=32)
    kd = keras_kd.DistillationLoss()
    counter = _Counter((96, 4))
    kd.add_observer(counter)
    student = mlp(K)
    student.compile("sgd", loss=kd)
    student.evaluate(keras_kd.with_teacher(make(batch=96), teacher, placement="step"), verbose=0)
    np.testing.assert_allclose(counter.last.numpy(), compiled.outputs(teacher, x), rtol=1e-5, atol=1e-5)


@JIT
def test_hard_sample_reweighting_with_a_topk_cache(K, jit, toy_data, tmp_path):
    x, y, _ = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    cached = raw.apply(keras_kd.cache_teacher_logits(teacher, str(tmp_path / "c"), top_k=2, verbose=0))
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2)
    student.compile("sgd", loss=kd, metrics=[keras_kd.teacher_agreement, *keras_kd.loss_components(kd)],
                    jit_compile=jit)
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, num_examples=len(x))
    history = student.fit(cached.shuffle(96, seed=0).batch(32), epochs=3, verbose=0, callbacks=[rew])
    assert np.all(np.isfinite(history.history["loss"]))
    stats = rew.table.stats.numpy()
    assert np.all(np.isfinite(stats[:, 0]))  # every example was recorded
    weights = rew.table.weights.numpy()
    assert weights.mean() == pytest.approx(1.0, abs=0.05) and weights.std() > 0  # clipping moves the mean


# --- teacher_agreement without a teacher: the student's accuracy -----------------------


def test_teacher_agreement_without_teacher_is_accuracy(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), metrics=["accuracy", keras_kd.teacher_agreement])
    train = keras_kd.with_teacher(make(batch=32), teacher, placement="pipeline")
    history = student.fit(train, validation_data=make(batch=32), epochs=1, verbose=0)
    acc = np.mean(compiled.outputs(student, x).argmax(-1) == y)
    assert history.history["val_teacher_agreement"][0] == pytest.approx(acc, abs=1e-6)
    assert history.history["val_teacher_agreement"][0] == pytest.approx(history.history["val_accuracy"][0], abs=1e-6)


@pytest.mark.parametrize("labels", ["sparse", "column", "one_hot", "uint8"])
def test_teacher_agreement_label_forms(labels):
    s = np.random.default_rng(1).normal(size=(20, 5)).astype("float32")
    y = np.random.default_rng(2).integers(0, 5, size=20)
    given = {"sparse": y, "column": y[:, None], "one_hot": np.eye(5, dtype="float32")[y], "uint8": y.astype("uint8")}
    want = (s.argmax(-1) == y).astype("float32")
    np.testing.assert_array_equal(np.asarray(keras_kd.teacher_agreement(given[labels], s)), want)  # tf or jax array
    np.testing.assert_array_equal(np.asarray(keras_kd.teacher_agreement(TeacherTargets(labels=given[labels]), s)), want)


def test_teacher_agreement_binary():
    s = np.array([[1.0], [-2.0], [0.5], [-0.1]], "float32")
    t = np.array([[2.0], [1.0], [-1.0], [-3.0]], "float32")
    y = np.array([1, 1, 1, 0])
    # Student class = s > 0: [1, 0, 1, 0]; teacher [1, 1, 0, 0]; labels [1, 1, 1, 0].
    np.testing.assert_array_equal(np.asarray(keras_kd.teacher_agreement(TeacherTargets(labels=y, logits=t), s)),
                                  [1, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(keras_kd.teacher_agreement(y, s)), [1, 0, 1, 1])


def test_teacher_agreement_unlabelled_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="neither teacher targets nor labels"):
        keras_kd.teacher_agreement(TeacherTargets(labels=[0, 0], has_labels=False), np.zeros((2, 3), "float32"))


def test_binary_student_trains_and_evaluates_against_reference(K):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    teacher, student = mlp(K, classes=1, hidden=32), mlp(K, classes=1)
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    student.compile(K.optimizers.Adam(0.01), loss=kd, metrics=[keras_kd.teacher_agreement])
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(64), teacher, placement="pipeline")
    result = student.evaluate(ds, verbose=0, return_dict=True)
    s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
    assert result["loss"] == pytest.approx(ref.binary_distillation_loss(y, s, t, 2.0, 0.3), rel=1e-5)
    assert result["teacher_agreement"] == pytest.approx(np.mean((s > 0) == (t > 0)), abs=1e-6)
    before = result["loss"]
    student.fit(ds, epochs=20, verbose=0)
    assert student.evaluate(ds, verbose=0, return_dict=True)["loss"] < before


# --- the documented protocol (keras_kd.losses.hooks) ---------------------------------------


def test_registry_is_explicit_and_read_only():
    kd = keras_kd.DistillationLoss()
    observer, weighting = (lambda *a: None), (lambda targets: tf.ones(tf.shape(targets.example_id)))
    kd.add_observer(observer)
    kd.add_observer(observer)  # registered once
    kd.add_weighting(weighting)
    assert kd.observers == (observer,) and kd.weightings == (weighting,)
    kd.remove_observer(lambda *a: None)  # absent: no-op
    kd.remove_observer(observer)
    kd.remove_weighting(weighting)
    assert kd.observers == () and kd.weightings == ()
    with pytest.raises(ValueError, match="callable"):
        kd.add_observer("not a function")


@pytest.mark.backend("tensorflow")  # the observer updates tf.Variables, which a jitted JAX step cannot run
def test_hooks_join_the_step_when_it_is_retraced(K, toy_data):
    # Documented: hooks are part of the traced step; added after tracing, they run from the next retrace on.
    x, y, make = toy_data
    kd = keras_kd.DistillationLoss()
    student = mlp(K)
    student.compile("sgd", loss=kd)
    ds = keras_kd.with_teacher(make(batch=32), mlp(K), placement="pipeline")
    student.fit(ds, epochs=1, verbose=0)
    counter = _Counter((32, 4))
    kd.add_observer(counter)
    student.make_train_function(force=True)
    student.fit(ds, epochs=1, verbose=0)
    assert int(counter.calls.numpy()) == 3


def test_weighting_runs_once_per_step_and_scales_the_loss(toy_data):
    x, y, _ = toy_data
    t = np.random.default_rng(4).normal(size=(6, 4)).astype("float32")
    s = np.random.default_rng(5).normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 1, 2, 3, 0, 1])
    calls = []

    def double_first_half(targets):
        calls.append(1)
        return tf.constant([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])

    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    kd.add_weighting(double_first_half)
    targets = TeacherTargets(labels=labels, logits=t, example_id=np.arange(6))
    got = float(kd(targets, s))
    assert len(calls) == 1
    want = ref.distillation_loss(labels, s, t, 2.0, 0.3, weights=[2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    kd.components(targets, s)  # pure: no weighting call
    assert len(calls) == 1
