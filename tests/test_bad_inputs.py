"""Bad input to the loss in every setting: a clear error, or (under XLA) a NaN loss, never silent training.

Every case runs in both Keras flavours (``K``), with ``jit_compile`` off and
on (XLA drops ``tf.debugging`` assertions, and is Keras 3's default on GPUs),
and, where a teacher model is involved, with both teacher placements of
`keras_kd.with_teacher`. Without XLA each bad input raises an error naming the
problem; with XLA the error is raised where the check runs outside the
compiled step (the pipeline teacher), and otherwise the loss is NaN, so
training visibly fails. A Keras 3 student on JAX behaves as under XLA with
``jit_compile`` on or off (nothing raises inside its step).
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from tests import compiled
from tests import reference as ref
from tests.conftest import mlp

JIT = pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
PLACEMENT = pytest.mark.parametrize("placement", ["step", "pipeline"])


def _data(n=32, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, classes, size=n)


def _compile(K, student, jit, loss=None):
    student.compile(K.optimizers.SGD(0.01), loss=loss or keras_kd.DistillationLoss(), jit_compile=jit)


def _fit(K, student, ds, jit, loss=None, **fit_kwargs):
    """``("error", message)`` or ``("losses", history losses)`` of one epoch."""
    _compile(K, student, jit, loss)
    return _fit_compiled(student, ds, **fit_kwargs)


def _shared_student(K, jit, ds, loss=None):
    """The default 4-class student compiled once per flavour, ``jit``, loss configuration and
    ``ds``'s element spec (`tests.compiled`), at its initial weights: the cases that use it
    change only data values (where the NaN or the bad label is), so they reuse one traced
    (under XLA, compiled) step instead of tracing a fresh student each."""
    loss = loss or keras_kd.DistillationLoss()
    key = ("test_bad_inputs", K.__name__, jit, repr(sorted(loss.get_config().items())))
    return compiled.student(key, ds.element_spec, lambda: mlp(K), lambda student: _compile(K, student, jit, loss))


def _fit_shared(K, ds, jit, loss=None):
    """`_fit` of the shared default student (`_shared_student`)."""
    return _fit_compiled(_shared_student(K, jit, ds, loss), ds)


def _fit_compiled(student, ds, **fit_kwargs):
    fit_kwargs.setdefault("epochs", 1)
    try:
        history = student.fit(ds, verbose=0, **fit_kwargs)
    except tf.errors.InvalidArgumentError as error:
        return "error", str(error)
    return "losses", history.history["loss"]


def _jax_step(K):
    """A Keras 3 student on JAX: nothing raises inside its step, with jit on or off."""
    return K.__name__ == "keras" and K.backend.backend() == "jax"


def _assert_refused(outcome, K, jit, match):
    kind, value = outcome
    if kind == "error":
        assert match in value, value
        return
    # Only XLA (which drops assertions) or JAX (nothing raises in its step, jit on or off) may get
    # this far, and then the loss is NaN.
    assert jit or _jax_step(K), f"no error without XLA; losses {value}"
    assert np.all(np.isnan(value)), f"bad input trained silently under XLA: losses {value}"


_TEACHERS = {}


def _teacher(K, nan=False, **kwargs):
    """A logits teacher (`mlp` with ``kwargs``; with ``nan``, its output kernel all NaN), built once
    per flavour and configuration for this module: the cases only read it (`with_teacher` keeps no
    state on a teacher, and each case builds its own dataset), so a fresh one per case buys nothing."""
    key = (K.__name__, nan, tuple(sorted(kwargs.items())))
    if key not in _TEACHERS:
        teacher = mlp(K, **kwargs)
        if nan:
            kernel = teacher.layers[-1].kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))
        _TEACHERS[key] = teacher
    return _TEACHERS[key]


def _nan_teacher(K):
    return _teacher(K, nan=True)


# --- non-finite teacher logits ---------------------------------------------------


@JIT
@PLACEMENT
def test_nan_teacher_never_gives_a_finite_loss(K, jit, placement):
    x, y = _data()
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _nan_teacher(K),
                               placement=placement)
    # The in-step placement's dataset names its own teacher (another spec): a fresh student there.
    outcome = _fit_shared(K, ds, jit) if placement == "pipeline" else _fit(K, mlp(K), ds, jit)
    _assert_refused(outcome, K, jit, "NaN or Inf")


@JIT
@pytest.mark.parametrize(
    "bad, divergence",
    [(np.nan, "kl"), (np.inf, "kl"), (-np.inf, "kl"), (-np.inf, "reverse_kl"), (-np.inf, "js"),
     (-np.inf, "soft_cross_entropy"), (np.nan, "mse"), (-np.inf, "huber")],
)
def test_non_finite_teacher_logits_in_targets(K, jit, bad, divergence):
    # One bad value in one class of one example (e.g. a damaged cache or array).
    x, y = _data()
    t = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    t[5, 2] = bad
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=t))).batch(16)
    _assert_refused(_fit_shared(K, ds, jit, keras_kd.DistillationLoss(divergence=divergence)), K, jit, "NaN or Inf")


@JIT
def test_non_finite_topk_targets(K, jit):
    x, y = _data()
    idx = np.tile(np.array([[0, 1]], "int32"), (32, 1))
    vals = np.ones((32, 2), "float32")
    vals[3, 0] = np.nan
    targets = TeacherTargets(labels=y, topk_indices=idx, topk_values=vals, topk_logsumexp=np.full(32, 3.0, "float32"))
    ds = tf.data.Dataset.from_tensor_slices((x, targets)).batch(16)
    _assert_refused(_fit_shared(K, ds, jit), K, jit, "NaN or Inf")


@JIT
def test_topk_logsumexp_below_its_own_topk_is_refused(K, jit):
    """An lse below logsumexp of the top-k values themselves (from other logits, e.g. a stale
    cache): the uniform fill used to clamp it and silently treat the top k as all the mass."""
    x, y = _data()
    t = np.random.default_rng(3).normal(size=(32, 4)).astype("float32") * 3
    idx = np.argsort(-t, -1)[:, :2].astype("int32")
    vals = np.take_along_axis(t, idx, -1)
    wrong_lse = (np.log(np.exp(vals.astype("float64")).sum(-1)) - 0.5).astype("float32")
    targets = TeacherTargets(labels=y, topk_indices=idx, topk_values=vals, topk_logsumexp=wrong_lse)
    ds = tf.data.Dataset.from_tensor_slices((x, targets)).batch(16)
    _assert_refused(_fit_shared(K, ds, jit), K, jit, "topk_logsumexp")


def test_topk_logsumexp_of_the_raw_logits_is_accepted():
    """Exact log-sum-exp, including k = C (lse equals the top-k's own up to rounding)."""
    t = np.random.default_rng(4).normal(size=(8, 5)).astype("float32") * 5
    s = np.random.default_rng(5).normal(size=(8, 5)).astype("float32")
    y = np.arange(8) % 5
    lse = np.log(np.exp(t.astype("float64")).sum(-1)).astype("float32")
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2)
    for k in (3, 5):
        idx = np.argsort(-t, -1)[:, :k].astype("int32")
        targets = TeacherTargets(labels=y, topk_indices=idx, topk_values=np.take_along_axis(t, idx, -1),
                                 topk_logsumexp=lse)
        got = float(loss(targets, s))
        assert np.isfinite(got)
        if k == 5:
            np.testing.assert_allclose(got, ref.distillation_loss(y, s, t, 2.0, 0.2), rtol=1e-5)
    # A confident teacher whose top-k values were stored in float16 (as the cache does by
    # default): rounding puts their log-sum-exp up to ~0.05 above the exact float32 one.
    confident = t.copy()
    confident[:, 0] = 100.37
    lse = np.log(np.exp(confident.astype("float64") - 100.37).sum(-1)) + 100.37
    idx = np.argsort(-confident, -1)[:, :1].astype("int32")
    values = np.take_along_axis(confident, idx, -1).astype("float16")
    assert np.all(np.log(np.exp(values.astype("float64") - 100.37).sum(-1)) + 100.37 > lse)  # rounded up
    targets = TeacherTargets(labels=y, topk_indices=idx, topk_values=values, topk_logsumexp=lse.astype("float32"))
    assert np.isfinite(float(loss(targets, s)))


# --- labels out of range ---------------------------------------------------------


@JIT
@PLACEMENT
@pytest.mark.parametrize("offset", [7, -5], ids=["too-large", "negative"])
def test_labels_out_of_range(K, jit, placement, offset):
    x, y = _data()
    y = y.copy()
    y[3] += offset
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K), placement=placement)
    outcome = _fit_shared(K, ds, jit) if placement == "pipeline" else _fit(K, mlp(K), ds, jit)
    _assert_refused(outcome, K, jit, "labels out of range")


@JIT
def test_labels_out_of_range_without_teacher(K, jit):
    # Validation-style data without teacher: hard loss only, still refused.
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y + 4)).batch(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-teacher warning
        _assert_refused(_fit(K, mlp(K), ds, jit), K, jit, "labels out of range")


@JIT
def test_labels_out_of_range_with_alpha_zero(K, jit):
    # alpha=0 weighs the hard term by 0: the bad label must still not vanish.
    x, y = _data()
    t = np.random.default_rng(2).normal(size=(32, 4)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y + 10, logits=t))).batch(16)
    _assert_refused(_fit(K, mlp(K), ds, jit, keras_kd.DistillationLoss(alpha=0.0)), K, jit, "labels out of range")


@JIT
@PLACEMENT
def test_binary_labels_out_of_range(K, jit, placement):
    x, _ = _data()
    y = np.random.default_rng(3).integers(0, 2, size=32).astype("float32")
    y[4] = 2.0
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K, classes=1),
                               placement=placement)
    _assert_refused(_fit(K, mlp(K, classes=1), ds, jit), K, jit, "binary labels out of range")


@JIT
@PLACEMENT
def test_label_shape_that_fits_no_convention(K, jit, placement):
    # Dense (one-hot or mixed) labels with 5 columns for a 4-class student.
    x, y = _data()
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, np.eye(5, dtype="float32")[y])).batch(16),
                               _teacher(K), placement=placement)
    with pytest.raises(ValueError, match="do not fit the student's logits"):
        _fit(K, mlp(K), ds, jit)


# --- shapes and configuration (refused while tracing, in every mode) ---------------


@JIT
@PLACEMENT
def test_class_count_mismatch(K, jit, placement):
    x, y = _data()
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K, classes=5),
                               placement=placement)
    with pytest.raises(ValueError, match=r"class counts\s+differ \(5 vs 4\)"):
        _fit(K, mlp(K), ds, jit)


@JIT
@PLACEMENT
def test_binary_student_with_two_class_teacher(K, jit, placement):
    x, _ = _data()
    y = np.random.default_rng(4).integers(0, 2, size=32)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K, classes=2),
                               placement=placement)
    with pytest.raises(ValueError, match="binary classifier: give the teacher one logit"):
        _fit(K, mlp(K, classes=1), ds, jit)


@JIT
def test_topk_without_logsumexp(K, jit):
    x, y = _data()
    targets = TeacherTargets(labels=y, topk_indices=np.zeros((32, 1), "int32"), topk_values=np.ones((32, 1), "float32"))
    with pytest.raises(ValueError, match="topk_logsumexp"):
        _fit(K, mlp(K), tf.data.Dataset.from_tensor_slices((x, targets)).batch(16), jit)


# --- suspicious but legal input: one warning ------------------------------------------


def _softmax_student(K, classes=4, activation="softmax"):
    inp = K.Input((8,))
    return K.Model(inp, K.layers.Dense(classes, activation=activation)(K.layers.Dense(16, activation="relu")(inp)))


@JIT
@PLACEMENT
@pytest.mark.parametrize("activation, classes", [("softmax", 4), ("sigmoid", 1)])
def test_student_ending_in_softmax_warns_once(K, jit, placement, activation, classes):
    x, y = _data(classes=max(classes, 2))
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K, classes=classes),
                               placement=placement)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(K, _softmax_student(K, classes, activation), ds, jit, validation_data=ds)
    ours = [w for w in caught if "expects the student's logits" in str(w.message)]
    if jit and _jax_step(K):  # README "Keras 3 on JAX": not given inside jax.jit (a tracer keeps no producer)
        assert ours == [], [str(w.message) for w in ours]
        return
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert activation.capitalize() in str(ours[0].message) and "Remove the student's final activation" in str(
        ours[0].message
    )


@JIT
def test_logits_student_does_not_warn(K, jit):
    x, y = _data()
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), _teacher(K), placement="pipeline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(K, mlp(K), ds, jit, validation_data=ds)
    assert not [w for w in caught if "keras_kd" in str(w.filename) or "DistillationLoss" in str(w.message)]


@pytest.mark.backend("tensorflow")  # given while TF traces the training step (README: TF-only on JAX)
@JIT
def test_training_without_teacher_warns_once_per_fit(K, jit):
    x, y = _data()
    plain = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)  # 4 batches, a partial last one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, losses = _fit(K, mlp(K), plain, jit, loss=keras_kd.DistillationLoss(alpha=0.3), epochs=2)
    ours = [w for w in caught if "carry no teacher" in str(w.message)]
    assert kind == "losses" and len(ours) == 1, [str(w.message) for w in caught]
    assert "keras_kd.with_teacher" in str(ours[0].message)


@JIT
@PLACEMENT
def test_validation_without_teacher_is_silent_and_hard_label(K, jit, placement):
    x, y = _data()
    teacher, student = _teacher(K), mlp(K)
    train = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), teacher, placement=placement)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, _ = _fit(K, student, train, jit, loss=keras_kd.DistillationLoss(alpha=0.3), validation_data=val)
    assert kind == "losses"
    assert not [w for w in caught if "carry no teacher" in str(w.message)]
    # Validation loss is the hard-label cross-entropy alone (NumPy reference).
    result = student.evaluate(val, verbose=0, return_dict=True)
    s = compiled.outputs(student, x)
    assert result["loss"] == pytest.approx(ref.sparse_ce(y, s).mean(), rel=1e-4)


# --- label dtypes: as plain Keras accepts them ------------------------------------------


@JIT
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint32", "int32", "float32"])
def test_any_integer_label_dtype(K, jit, dtype):
    x, y = _data()
    t = np.random.default_rng(5).normal(size=(32, 4)).astype("float32")
    student = mlp(K)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.4)
    student.compile("sgd", loss=loss, metrics=["accuracy", keras_kd.teacher_agreement], jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y.astype(dtype), logits=t))).batch(32)
    result = student.evaluate(ds, verbose=0, return_dict=True)
    s = compiled.outputs(student, x)
    assert result["loss"] == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.4), rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(s.argmax(-1) == y), abs=1e-6)
    student.fit(ds, epochs=1, verbose=0)  # and it trains


@pytest.mark.backend("tensorflow")  # once per tf.function trace of the training step (TF-only on JAX)
@JIT
def test_training_without_teacher_warns_at_each_traced_step(K, jit):
    """The documented rule: once per traced training step. A second ``fit`` reuses the
    traced step (no warning); a new ``compile`` traces again and warns again."""
    x, y = _data()
    plain = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    student = mlp(K)

    def warnings_of(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [w for w in caught if "carry no teacher" in str(w.message)]

    assert len(warnings_of(lambda: _fit(K, student, plain, jit))) == 1
    assert warnings_of(lambda: student.fit(plain, epochs=1, verbose=0)) == []
    assert len(warnings_of(lambda: _fit(K, student, plain, jit))) == 1  # recompiled: traced again


# --- teacher positions that TensorFlow would broadcast -------------------------------


@pytest.mark.parametrize(
    "teacher_shape, student_shape",
    [((4, 5), (4, 4, 5)), ((1, 5), (4, 5)), ((4, 1, 5), (4, 3, 5)), ((4, 3, 5), (4, 5))],
    ids=["per-sequence-teacher", "one-row-teacher", "one-step-teacher", "sequence-teacher"],
)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_teacher_positions_must_match_the_students(teacher_shape, student_shape, form):
    """A (4, 5) teacher against a (4, 4, 5) sequence student used to broadcast silently."""
    t = np.random.default_rng(6).normal(size=teacher_shape).astype("float32")
    s = np.random.default_rng(7).normal(size=student_shape).astype("float32")
    labels = np.zeros(student_shape[:-1], "int64")
    if form == "dense":
        targets = TeacherTargets(labels=labels, logits=t)
    else:
        idx = np.argsort(-t, -1)[..., :2].astype("int32")
        targets = TeacherTargets(labels=labels, topk_indices=idx, topk_values=np.take_along_axis(t, idx, -1),
                                 topk_logsumexp=np.log(np.exp(t).sum(-1)))
    with pytest.raises(ValueError, match=r"agree on every axis but the last"):
        keras_kd.DistillationLoss()(targets, s)


@JIT
def test_per_sequence_teacher_for_a_sequence_student_in_fit(K, jit):
    tokens = np.random.default_rng(8).integers(1, 9, (8, 8))
    labels = np.random.default_rng(9).integers(0, 5, (8, 8))
    inp = K.Input((8,), dtype="int32")
    student = K.Model(inp, K.layers.Dense(5)(K.layers.Embedding(10, 4)(inp)))
    teacher_logits = np.random.default_rng(10).normal(size=(8, 5)).astype("float32")  # one row per sequence
    ds = tf.data.Dataset.from_tensor_slices((tokens, TeacherTargets(labels=labels, logits=teacher_logits))).batch(8)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit)
    with pytest.raises(ValueError, match=r"agree on every axis but the last"):
        student.fit(ds, epochs=1, verbose=0)


# --- issue 17: ensembles, label-aware divergences, transfer sets, mixup -----------------


def _batched(x, y, batch=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _as_callable(model):
    """A teacher without declared shapes: the checks that need them run while tracing."""
    return lambda inputs, training=False: model(inputs, training=training)


@PLACEMENT
@pytest.mark.parametrize("empty", [[], ()], ids=["list", "tuple"])
def test_empty_list_of_teachers(K, placement, empty):
    x, y = _data()
    with pytest.raises(ValueError, match=r"Expected `teacher` to be a Keras model or a non-empty list of models"):
        keras_kd.with_teacher(_batched(x, y), empty, placement=placement)


@PLACEMENT
def test_ensemble_member_that_is_not_a_model(K, placement):
    x, y = _data()
    with pytest.raises(TypeError, match=r"Expected `teacher\[1\]` to be a Keras model or callable"):
        keras_kd.with_teacher(_batched(x, y), [_teacher(K), "teacher.keras"], placement=placement)


_MISMATCHED_ENSEMBLES = pytest.mark.parametrize(
    "first, second, listed",
    [
        (dict(classes=4, name="four"), dict(classes=5, name="five"),
         r"teacher 0 \('four'\): 4, teacher 1 \('five'\): 5"),
        (dict(inputs=8, name="narrow"), dict(inputs=9, name="wide"),
         r"teacher 0 \('narrow'\): \(8,\), teacher 1 \('wide'\): \(9,\)"),
    ],
    ids=["class-counts", "input-shapes"],
)


@PLACEMENT
@_MISMATCHED_ENSEMBLES
def test_ensemble_of_teachers_that_disagree(K, placement, first, second, listed):
    # Members with different class counts or input shapes: every member listed.
    x, y = _data()
    with pytest.raises(ValueError, match=listed):
        keras_kd.with_teacher(_batched(x, y), [mlp(K, **first), mlp(K, **second)], placement=placement)


@JIT
@PLACEMENT
def test_ensemble_of_callables_with_different_class_counts(K, jit, placement):
    # Callables declare no shapes: refused while tracing (the pipeline map or the step), in every mode.
    x, y = _data()
    teachers = [_as_callable(mlp(K, classes=4)), _as_callable(mlp(K, classes=5))]
    if _jax_step(K):  # JAX: a Python function teacher is refused in both placements, naming the alternative
        error, match = {"step": (ValueError, r"Use placement='pipeline'"),
                        "pipeline": (TypeError, r"ran JAX code on a tf.Tensor.*Give a Keras 3 model")}[placement]
        with pytest.raises(error, match=match):
            _fit(K, mlp(K), keras_kd.with_teacher(_batched(x, y), teachers, placement=placement), jit)
        return
    with pytest.raises(ValueError, match=r"same shape \(the same classes\)"):
        ds = keras_kd.with_teacher(_batched(x, y), teachers, placement=placement)
        _fit(K, mlp(K), ds, jit)


@PLACEMENT
@pytest.mark.parametrize("ensemble", ["mean", "Mean_Logits", None, 1])
def test_unknown_ensemble(K, placement, ensemble):
    x, y = _data()
    with pytest.raises(ValueError, match=r"Expected `ensemble` to be one of \('mean_logits', 'mean_probs'\)"):
        keras_kd.with_teacher(_batched(x, y), [mlp(K), mlp(K)], placement=placement, ensemble=ensemble)


@JIT
@PLACEMENT
def test_dkd_on_unlabelled_examples(K, jit, placement):
    # A transfer set (x, NO_LABEL): DKD has no target class there. Refused (NaN under XLA).
    x, _ = _data()
    ds = keras_kd.with_teacher(keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x)).batch(16), _teacher(K),
                               placement=placement)
    _assert_refused(_fit(K, mlp(K), ds, jit, keras_kd.DistillationLoss(divergence="dkd")), K, jit, "label")


@JIT
@PLACEMENT
def test_dkd_on_a_mix_of_labelled_and_unlabelled_examples(K, jit, placement):
    x, y = _data()
    labelled = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    transfer = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x)).map(lambda a, b: (a, tf.cast(b, tf.int64)))
    ds = keras_kd.with_teacher(labelled.concatenate(transfer).shuffle(64, seed=0).batch(16), _teacher(K),
                               placement=placement)
    _assert_refused(_fit(K, mlp(K), ds, jit, keras_kd.DistillationLoss(divergence="dkd")), K, jit, "label")


@JIT
def test_dkd_on_unlabelled_cache(K, jit, tmp_path):
    # The cache of x alone marks the targets unlabelled (has_labels=False): DKD refuses while tracing.
    x, _ = _data()
    teacher = mlp(K)
    cached = tf.data.Dataset.from_tensor_slices(x).apply(keras_kd.cache_teacher_logits(teacher, str(tmp_path)))
    with pytest.raises(ValueError, match="label"):
        _fit(K, mlp(K), cached.batch(16), jit, keras_kd.DistillationLoss(divergence="dkd"))


@JIT
@PLACEMENT
def test_dkd_with_dense_labels_of_the_wrong_class_count(K, jit, placement):
    x, y = _data()
    ds = keras_kd.with_teacher(_batched(x, np.eye(5, dtype="float32")[y]), _teacher(K), placement=placement)
    with pytest.raises(ValueError, match="do not fit the student's logits"):
        _fit(K, mlp(K), ds, jit, keras_kd.DistillationLoss(divergence="dkd"))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_of_sparse_labels_without_num_classes(kind):
    x, y = _data()
    with pytest.raises(ValueError, match="num_classes"):
        _batched(x, y).map(keras_kd.mixup(0.2, kind=kind))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_num_classes_that_disagree_with_dense_labels(kind):
    x, y = _data()
    with pytest.raises(ValueError, match=r"dense labels with 4 classes but num_classes=5"):
        _batched(x, np.eye(4, dtype="float32")[y]).map(keras_kd.mixup(0.2, num_classes=5, kind=kind))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("bad", [4, -1], ids=["too-large", "NO_LABEL"])  # keras_kd.NO_LABEL == -1
def test_mixup_of_class_ids_outside_num_classes(kind, bad):
    # tf.one_hot would give such a label an all-zero row: no hard term, silently.
    x, y = _data()
    y = y.copy()
    y[5] = bad
    ds = _batched(x, y).map(keras_kd.mixup(0.2, num_classes=4, kind=kind, seed=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class ids must be in \[0, 4\)"):
        list(ds)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("bad", [2.5, np.nan], ids=["fractional", "NaN"])
def test_mixup_of_float_labels_that_are_not_whole_numbers(kind, bad):
    # A cast would truncate 2.5 to class 2 silently; the loss refuses such labels, and so does mixup.
    x, y = _data()
    y = y.astype("float32")
    y[5] = bad
    ds = _batched(x, y).map(keras_kd.mixup(0.2, num_classes=4, kind=kind, seed=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="float labels must be whole numbers"):
        list(ds)


@JIT
@PLACEMENT
def test_unlabelled_after_batch(K, jit, placement):
    # One NO_LABEL per batch instead of one per example (used to be an IndexError in fit).
    x, _ = _data()
    with pytest.raises(ValueError, match=r"apply `keras_kd.unlabelled` before `.batch\(\)`"):
        keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x).batch(16))
    # A batch of known size hides it from `unlabelled`: the loss refuses the scalar labels.
    ds = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x).batch(16, drop_remainder=True))
    with pytest.raises(ValueError, match=r"one label per example.*before `.batch\(\)`"):
        _fit(K, mlp(K), keras_kd.with_teacher(ds, _teacher(K), placement=placement), jit)


@PLACEMENT
def test_unbatched_dataset_for_a_teacher_without_known_inputs(K, placement):
    # An unbuilt Sequential cannot tell; the scalar labels do (used to fail in fit with an IndexError).
    x, y = _data()
    teacher = K.Sequential([K.layers.Dense(4)])
    with pytest.raises(ValueError, match=r"unbatched elements.*after `\.batch"):
        keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)), teacher, placement=placement)


@JIT
@PLACEMENT
def test_mixup_with_num_classes_other_than_the_students(K, jit, placement):
    # mixup(num_classes=5) for a 4-class student: the mixed (B, 5) labels fit no convention.
    x, y = _data()
    ds = _batched(x, y).map(keras_kd.mixup(0.2, num_classes=5, seed=0))
    with pytest.raises(ValueError, match="do not fit the student's logits"):
        _fit(K, mlp(K), keras_kd.with_teacher(ds, _teacher(K), placement=placement), jit)


@JIT
@PLACEMENT
def test_mixup_after_with_teacher(K, jit, placement):
    # The teacher must see the mixed batch: mixup after with_teacher is refused.
    x, y = _data()
    ds = keras_kd.with_teacher(_batched(x, y), _teacher(K), placement=placement)
    with pytest.raises(ValueError, match="already carry teacher targets"):
        ds.map(keras_kd.mixup(0.2, num_classes=4))


@PLACEMENT
@pytest.mark.parametrize("argument", ["teacher_inputs", "student_inputs"])
def test_input_transforms_that_are_not_functions(K, placement, argument):
    x, y = _data()
    with pytest.raises(TypeError, match=rf"Expected `{argument}` to be None or a function of x"):
        keras_kd.with_teacher(_batched(x, y), _teacher(K), placement=placement, **{argument: "x[:, ::2]"})


def test_dkd_with_renormalized_topk_targets():
    # DKD is infinite where the teacher gives a class no mass: refused at construction.
    with pytest.raises(ValueError, match=r"divergence='dkd' is infinite or undefined .* topk_fill='renormalize'"):
        keras_kd.DistillationLoss(divergence="dkd", topk_fill="renormalize")


# --- the same refusals from the teacher-logit cache ---------------------------------------


def _cache(teacher, tmp_path, **kwargs):
    x, y = _data()
    return list(tf.data.Dataset.from_tensor_slices((x, y)).apply(
        keras_kd.cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0, **kwargs)))


@pytest.mark.parametrize("empty", [[], ()], ids=["list", "tuple"])
def test_cache_of_an_empty_list_of_teachers(empty, tmp_path):
    with pytest.raises(ValueError, match=r"Expected `teacher` to be a Keras model or a non-empty list of models"):
        _cache(empty, tmp_path)
    assert not (tmp_path / "cache").exists()


@_MISMATCHED_ENSEMBLES
def test_cache_of_teachers_that_disagree(K, tmp_path, first, second, listed):
    with pytest.raises(ValueError, match=listed):
        _cache([mlp(K, **first), mlp(K, **second)], tmp_path)


@pytest.mark.parametrize("ensemble", ["mean", None])
def test_cache_with_an_unknown_ensemble(K, ensemble, tmp_path):
    with pytest.raises(ValueError, match=r"Expected `ensemble` to be one of \('mean_logits', 'mean_probs'\)"):
        _cache([mlp(K), mlp(K)], tmp_path, ensemble=ensemble)


def test_cache_refuses_an_ensemble_with_one_changed_member(K, tmp_path):
    a, b = mlp(K, name="a"), mlp(K, name="b")
    _cache([a, b], tmp_path)
    b.layers[-1].kernel.assign(b.layers[-1].kernel + 1.0)
    with pytest.raises(keras_kd.CacheMismatchError, match=r"teacher\[1\]'s weights changed"):
        _cache([a, b], tmp_path)


def _tapped(K, name):
    inp = K.Input((8,))
    return K.Model(inp, K.layers.Dense(4)(K.layers.Dense(16, name="h")(inp)), name=name)


@pytest.mark.parametrize("argument", ["teacher_inputs", "student_inputs"])
def test_align_input_transforms_that_are_not_functions(K, argument):
    with pytest.raises(TypeError, match=rf"Expected `{argument}` to be None or a function of the dataset's `x`"):
        keras_kd.align(_tapped(K, "s"), _tapped(K, "t"), pairs=[("h", "h")], **{argument: "x[:, ::2]"})


def test_align_with_an_ensemble_of_teachers(K):
    # Features are tapped from one teacher: a list is refused with the ensemble alternatives named.
    with pytest.raises(TypeError, match=r"Expected `teacher` to be one Keras model.*ensemble="):
        keras_kd.align(_tapped(K, "s"), [_tapped(K, "t1"), _tapped(K, "t2")], pairs=[("h", "h")])
