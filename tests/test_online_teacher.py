"""with_teacher: bad teachers refused or warned about, multi-input teachers, XLA,
and the in-step registry's lifetime. Both flavours, both placements."""

import gc
import warnings
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import targets as targets_lib
from tests import reference as ref
from tests.conftest import mlp

PLACEMENTS = ["pipeline", "step"]


def _softmax_teachers(K):
    """Teachers whose outputs are probabilities, each built differently."""
    inp = K.Input((8,))
    h = K.layers.Dense(16, activation="relu")(inp)
    dense_softmax = K.Model(inp, K.layers.Dense(4, activation="softmax")(h))
    softmax_layer = K.Model(inp, K.layers.Softmax()(K.layers.Dense(4)(h)))
    activation_layer = K.Model(inp, K.layers.Activation("softmax")(K.layers.Dense(4)(h)))
    net = mlp(K)

    def callable_teacher(x, training=False):  # not a model: judged on the first batch
        return tf.nn.softmax(net(x, training=training))

    return {
        "dense_softmax": dense_softmax,
        "softmax_layer": softmax_layer,
        "activation_layer": activation_layer,
        "callable": callable_teacher,
    }


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["dense_softmax", "softmax_layer", "activation_layer", "callable"])
def test_softmax_teacher_warns_once(K, toy_data, placement, kind):
    x, y, make = toy_data
    teacher = _softmax_teachers(K)[kind]
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = keras_kd.with_teacher(make(), teacher, placement=placement)
        student.fit(ds, epochs=2, verbose=0)
    found = [w for w in caught if "softmax" in str(w.message) and "logits" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "pre-softmax" in str(found[0].message)  # says how to fix it


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logit_teacher_does_not_warn(K, toy_data, placement):
    x, y, make = toy_data
    net = mlp(K)
    for teacher in (net, lambda inputs, training=False: net(inputs, training=training)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras_kd.with_teacher(make(), teacher, placement=placement)
        assert not [w for w in caught if "softmax" in str(w.message)]


def test_probabilities_heuristic():
    from keras_kd.data.softmax import _looks_like_probabilities

    assert _looks_like_probabilities(np.array([[0.25, 0.75], [1.0, 0.0]]))
    assert not _looks_like_probabilities(np.array([[0.25, 0.70]]))  # rows do not sum to 1
    assert not _looks_like_probabilities(np.array([[-0.5, 1.5]]))  # outside [0, 1]
    assert not _looks_like_probabilities(np.array([[1.0]]))  # one logit: a sigmoid/binary model
    assert not _looks_like_probabilities(np.array([[np.nan, 1.0]]))


# --- non-finite teacher logits, pipeline placement, with and without XLA ----------


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_pipeline_non_finite_teacher_logits_raise(K, toy_data, jit_compile, value):
    """The teacher runs in tf.data, outside the compiled step: the check always runs."""
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    weights = teacher.get_weights()
    weights[-1] = weights[-1] + value  # the output bias
    teacher.set_weights(weights)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit_compile)
    ds = keras_kd.with_teacher(make(), teacher, placement="pipeline")
    with pytest.raises(tf.errors.InvalidArgumentError, match="teacher's logits contain NaN or Inf"):
        student.fit(ds, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="teacher's logits contain NaN or Inf"):
        student.evaluate(ds, verbose=0)


# --- XLA: the in-step teacher and reweighting compile and give the same loss -------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_jit_compile_step_matches_reference(K, toy_data, placement):
    x, y, make = toy_data
    teacher = mlp(K, hidden=32)
    init = mlp(K).get_weights()
    results = {}
    for jit_compile in (False, True):
        student = mlp(K)
        student.set_weights(init)
        student.compile(K.optimizers.SGD(0.1), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3),
                        jit_compile=jit_compile)
        ds = keras_kd.with_teacher(make(), teacher, placement=placement)
        value = student.evaluate(ds, verbose=0)
        s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
        assert value == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.3), rel=1e-5)
        student.fit(ds, epochs=2, verbose=0, shuffle=False)
        results[jit_compile] = student.get_weights()
    for a, b in zip(results[False], results[True]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["attach", "step"])
def test_jit_compile_reweighting_matches_eager_step(K, mode):
    """HardSampleReweighting under XLA records the same table as without."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype("float32")
    y = rng.integers(0, 4, size=48)
    teacher = mlp(K, hidden=32)
    init = mlp(K).get_weights()
    tables = {}
    for jit_compile in (False, True):
        student = mlp(K)
        student.set_weights(init)
        student.compile(K.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss(), jit_compile=jit_compile)
        ids = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y)))
        if mode == "attach":
            rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, momentum=0.0)
            ds = rew.attach(ids).batch(16)
        else:
            rew = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0, momentum=0.0, num_examples=48)
            ds = ids.batch(16)
        history = student.fit(keras_kd.with_teacher(ds, teacher), epochs=2, verbose=0, callbacks=[rew])
        # Frozen student: the recorded signal is its cross-entropy (NumPy).
        np.testing.assert_allclose(rew.table.difficulty, ref.sparse_ce(y, student.predict(x, verbose=0)), rtol=1e-5)
        tables[jit_compile] = (rew.table.weights.numpy(), history.history["loss"])
    np.testing.assert_allclose(tables[False][0], tables[True][0], rtol=1e-5)
    np.testing.assert_allclose(tables[False][1], tables[True][1], rtol=1e-5)


# --- multi-input teachers -------------------------------------------------------


def _two_input_models(K, structure):
    def build(seed):
        K.utils.set_random_seed(seed)
        a, b = K.Input((3,), name="a"), K.Input((2,), name="b")
        h = K.layers.Dense(8, activation="relu")(K.layers.Concatenate()([a, b]))
        inputs = {"a": a, "b": b} if structure == "dict" else [a, b]
        return K.Model(inputs, K.layers.Dense(4)(h))

    return build(1), build(2)


@pytest.mark.parametrize("structure", ["dict", "tuple"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_multi_input_teacher_step_equals_pipeline(K, structure, jit_compile):
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 3)).astype("float32"), rng.normal(size=(40, 2)).astype("float32")
    y = rng.integers(0, 4, size=40)
    x = {"a": a, "b": b} if structure == "dict" else (a, b)
    teacher, student = _two_input_models(K, structure)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=3.0, alpha=0.2), jit_compile=jit_compile)

    def data(placement):
        return keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), teacher, placement=placement)

    pipeline, step = (student.evaluate(data(p), verbose=0) for p in PLACEMENTS)
    s = student.predict(x, verbose=0)
    t = teacher.predict(x, verbose=0)
    assert pipeline == pytest.approx(ref.distillation_loss(y, s, t, 3.0, 0.2), rel=1e-5)
    assert step == pytest.approx(pipeline, rel=1e-6)
    history = student.fit(data("step"), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_nested_inputs_reach_the_teacher_in_their_structure(K):
    seen = []
    net = mlp(K, inputs=5)

    def teacher(inputs, training=False):
        seen.append(inputs)
        return net(tf.concat([inputs["pair"][0], inputs["pair"][1], inputs["c"]], -1))

    x = {"pair": (np.ones((4, 2), "float32"), np.zeros((4, 2), "float32")), "c": np.ones((4, 1), "float32")}
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, np.zeros(4, "int64"))).batch(4), teacher,
                               placement="step")
    _, targets = next(iter(ds))
    logits = targets_lib.materialize(targets).logits
    np.testing.assert_allclose(logits.numpy(), net(np.concatenate([x["pair"][0], x["pair"][1], x["c"]], -1)).numpy(),
                               rtol=1e-6)
    assert set(seen[-1]) == {"pair", "c"} and len(seen[-1]["pair"]) == 2


# --- the in-step registry lives as long as the dataset -----------------------------


def test_step_teacher_is_released_with_the_dataset(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    teacher_ref = weakref.ref(teacher)
    before = len(targets_lib._TEACHERS)
    ds = keras_kd.with_teacher(make(), teacher, placement="step").prefetch(2)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    student.fit(ds, epochs=1, verbose=0)
    assert len(targets_lib._TEACHERS) == before + 1
    del teacher, ds
    gc.collect()
    assert len(targets_lib._TEACHERS) == before
    assert teacher_ref() is None
    # The student still works on new data (its next dataset registers its own teacher).
    student.fit(keras_kd.with_teacher(make(), mlp(K), placement="step"), epochs=1, verbose=0)


def test_derived_datasets_keep_the_teacher(K, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    derived = keras_kd.with_teacher(make(), teacher, placement="step").map(lambda xb, t: (xb, t)).prefetch(1)
    gc.collect()
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    value = student.evaluate(derived, verbose=0)
    s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 4.0, 0.1), rel=1e-5)


def test_unknown_teacher_key_is_a_clear_error(K, toy_data):
    x, y, make = toy_data
    targets = keras_kd.TeacherTargets(labels=tf.constant(y[:4]), inputs=tf.constant(x[:4]), teacher_key="gone")
    with pytest.raises(ValueError, match="No teacher is registered"):
        targets_lib.materialize(targets)


# --- the default placement, and teachers of the other Keras ------------------------


def test_default_placement_runs_the_teacher_in_the_step(K, toy_data):
    x, y, make = toy_data
    _, targets = next(iter(keras_kd.with_teacher(make(), mlp(K))))
    assert targets.kind == "inputs" and targets.logits is None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_teacher_of_the_other_keras(toy_data, placement):
    import tf_keras

    x, y, make = toy_data
    for teacher_k, student_k in ((keras, tf_keras), (tf_keras, keras)):
        teacher, student = mlp(teacher_k, hidden=32), mlp(student_k)
        student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.4))
        value = student.evaluate(keras_kd.with_teacher(make(), teacher, placement=placement), verbose=0)
        s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
        assert value == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.4), rel=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_step_non_finite_teacher_logits_never_train_silently(K, toy_data, jit_compile, value):
    """In the step, XLA drops assertions: the loss must then be non-finite, never a number."""
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    weights = teacher.get_weights()
    weights[-1] = weights[-1] + value
    teacher.set_weights(weights)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit_compile)
    ds = keras_kd.with_teacher(make(), teacher, placement="step")
    try:
        history = student.fit(ds, epochs=1, verbose=0)
    except tf.errors.InvalidArgumentError as e:
        assert "teacher logits" in str(e)
    else:
        assert not np.isfinite(history.history["loss"]).any()
