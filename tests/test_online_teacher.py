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
from keras_kd.data import placement as placement_lib
from keras_kd.data import teachers as teachers_lib
from tests import compiled
from tests import reference as ref
from tests.conftest import mlp

PLACEMENTS = ["pipeline", "step"]
# On JAX, a teacher function is a TensorFlow function (JAX code cannot run on tf.data's tensors);
# the jitted JAX step runs only Keras 3 teachers and refuses functions, naming the fix.
REFUSED_IN_JAX_STEP = r"JAX backend.*placement='pipeline'.*or a Keras 3 teacher"


def _on_jax(K):
    return K is keras and keras.backend.backend() == "jax"


def _function(K, net):
    """A teacher function around ``net``: on JAX, a TensorFlow function through the documented
    `keras_kd.data.teachers.tf_callable`."""
    if _on_jax(K):
        run = teachers_lib.tf_callable(net)
        return lambda x, training=False: run(x)
    return lambda x, training=False: net(x, training=training)


def _shared_student(K, ds, jit_compile, loss):
    """A default student compiled with ``loss`` once per flavour, ``jit_compile``, loss configuration
    and ``ds``'s element spec (`tests.compiled`), at its initial weights: the pipeline cases that use
    it change only values (the teacher's weights), so they reuse one traced (compiled) step."""
    key = ("test_online_teacher", K.__name__, jit_compile, repr(sorted(loss.get_config().items())))
    return compiled.student(key, ds.element_spec, lambda: mlp(K),
                            lambda student: student.compile("sgd", loss=loss, jit_compile=jit_compile))


def _no_activation_teacher(K):
    """A Keras model whose output layer has no activation to read (judged on its outputs)."""
    inp = K.Input((8,))
    return K.Model(inp, K.layers.Reshape((4,))(K.layers.Dense(4)(inp)))


def _softmax_teacher(K, kind):
    """A teacher whose outputs are probabilities, built one of four ways (only the one asked for
    is built: each case uses one)."""
    if kind == "callable":  # not a model: judged on its outputs (on a probe of zeros)
        net = _function(K, mlp(K))

        def callable_teacher(x, training=False):
            return tf.nn.softmax(net(x, training=training))

        return callable_teacher
    inp = K.Input((8,))
    h = K.layers.Dense(16, activation="relu")(inp)
    if kind == "no_activation":  # an output layer without activation: judged on its outputs
        return K.Model(inp, K.layers.Reshape((4,))(K.layers.Dense(4, activation="softmax")(h)))
    probabilities = {
        "dense_softmax": lambda: K.layers.Dense(4, activation="softmax")(h),
        "softmax_layer": lambda: K.layers.Softmax()(K.layers.Dense(4)(h)),
        "activation_layer": lambda: K.layers.Activation("softmax")(K.layers.Dense(4)(h)),
    }[kind]()
    return K.Model(inp, probabilities)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["dense_softmax", "softmax_layer", "activation_layer", "callable", "no_activation"])
def test_softmax_teacher_warns_once(K, toy_data, placement, kind):
    x, y, make = toy_data
    teacher = _softmax_teacher(K, kind)
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = keras_kd.with_teacher(make(), teacher, placement=placement)
        if _on_jax(K) and kind == "callable" and placement == "step":
            with pytest.raises(ValueError, match=REFUSED_IN_JAX_STEP):
                student.fit(ds, epochs=2, verbose=0)
        else:
            student.fit(ds, epochs=2, verbose=0)
    found = [w for w in caught if "softmax" in str(w.message) and "logits" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "pre-softmax" in str(found[0].message)  # says how to fix it


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logit_teacher_does_not_warn(K, toy_data, placement):
    x, y, make = toy_data
    net = mlp(K)
    for teacher in (net, _function(K, net), _no_activation_teacher(K)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras_kd.with_teacher(make(), teacher, placement=placement)
        assert not [w for w in caught if "softmax" in str(w.message)]


def test_softmax_probe_judges_callables_when_built(K, toy_data, tmp_path):
    """A callable is judged on zeros shaped like its inputs, in `with_teacher` itself (so
    warnings-as-errors and pytest.warns see it there), and iterating never runs it again."""
    from keras_kd.data.softmax import probe_inputs

    x, y, make = toy_data
    with pytest.warns(UserWarning, match="look like probabilities"):
        ds = keras_kd.with_teacher(make(), _softmax_teacher(K, "callable"), placement="step")
    # Nothing stateful was added to the pipeline: its iterator still checkpoints.
    it = iter(ds)
    next(it)
    tf.train.Checkpoint(iterator=it).save(str(tmp_path / "it"))
    # A teacher that fails on the dataset's own (static) shapes fails here, with its own error.
    def wrong_width(inputs, training=False):
        return tf.matmul(inputs, tf.ones((5, 4)))

    static = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="5"):
        keras_kd.with_teacher(static, wrong_width)
    # With a batch size the probe had to choose, a failure only skips the check (a teacher may
    # need the real batch size); the data then tells.
    def fixed_batch(inputs, training=False):
        return tf.reshape(inputs, [32, 8])[:, :4]

    keras_kd.with_teacher(make(), fixed_batch)
    # The probe: zeros of each component's dtype; an unknown batch dimension is 2, another
    # unknown dimension 1 (not exact, then).
    spec = ({"ids": tf.TensorSpec((None, 3), tf.int32), "text": tf.TensorSpec((None,), tf.string)},
            tf.TensorSpec((4, None), tf.bool))
    (probe, flags), exact = probe_inputs(spec)
    assert probe["ids"].shape == (2, 3) and probe["ids"].dtype == tf.int32 and not np.any(probe["ids"].numpy())
    assert probe["text"].numpy().tolist() == [b"", b""]
    assert flags.shape == (4, 1) and flags.dtype == tf.bool and not exact
    assert probe_inputs(tf.TensorSpec((None, 8), tf.float32))[1] is False
    assert probe_inputs(tf.TensorSpec((32, 8), tf.float32))[1] is True
    assert probe_inputs(tf.RaggedTensorSpec((None, None), tf.float32)) is None
    seq = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).map(lambda a, b: (a[:, :, None], b))
    seq = seq.map(lambda a, b: (tf.reshape(a, [tf.shape(a)[0], -1, 1]), b))  # time axis not static
    assert seq.element_spec[0].shape.as_list() == [None, None, 1]

    def needs_eight_steps(inputs, training=False):
        return tf.reshape(inputs, [-1, 8])[:, :4]

    keras_kd.with_teacher(seq, needs_eight_steps, placement="pipeline")  # the probe's 1 step fails: skipped


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
    teacher = mlp(K)
    weights = teacher.get_weights()
    weights[-1] = weights[-1] + value  # the output bias
    teacher.set_weights(weights)
    ds = keras_kd.with_teacher(make(), teacher, placement="pipeline")
    student = _shared_student(K, ds, jit_compile, keras_kd.DistillationLoss())
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
        s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
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
        np.testing.assert_allclose(rew.table.difficulty, ref.sparse_ce(y, compiled.outputs(student, x)), rtol=1e-5)
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
    s = compiled.outputs(student, x)
    t = compiled.outputs(teacher, x)
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
    want = net(np.concatenate([x["pair"][0], x["pair"][1], x["c"]], -1))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-6)
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
    s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
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


def _auto_kind(K, large):
    """The targets' kind `with_teacher`'s "auto" gives a teacher of flavour ``K``: in the
    pipeline ("dense" logits) for tf_keras teachers on JAX and, on TensorFlow without GPU/TPU, for
    large teachers; else in the step ("inputs")."""
    if keras.backend.backend() == "jax":
        return "inputs" if K is keras else "dense"
    accelerator = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    return "dense" if large and not accelerator else "inputs"


def test_default_placement_runs_a_large_teacher_in_the_pipeline_on_cpu(K, toy_data):
    # 13 * 80,500 + 4 parameters x batch 96 = 1.005e8 multiply-adds per batch, at least
    # PIPELINE_MIN_MACS: on a CPU-only TensorFlow step the teacher overlaps the student's step.
    x, y, make = toy_data
    assert 13 * 80_500 + 4 == 1_046_504 and 1_046_504 * 96 >= placement_lib.PIPELINE_MIN_MACS > 1_046_504 * 95
    teacher, student = mlp(K, hidden=80_500), mlp(K)
    static = tf.data.Dataset.from_tensor_slices((x, y)).batch(96, drop_remainder=True)
    ds = keras_kd.with_teacher(static, teacher)
    _, targets = next(iter(ds))
    assert targets.kind == _auto_kind(K, large=True)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.4))
    value = student.evaluate(ds, verbose=0)
    s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.4), rel=1e-5)
    # One example fewer per batch (95 x 1,046,504 < 1e8): the step.
    small = tf.data.Dataset.from_tensor_slices((x, y)).batch(95, drop_remainder=True)
    _, targets = next(iter(keras_kd.with_teacher(small, teacher)))
    assert targets.kind == _auto_kind(K, large=False)
    # Batch 96 without drop_remainder (not static): the rule counts 32, not 96, and reads nothing.
    assert make(batch=96).element_spec[0].shape[0] is None
    _, targets = next(iter(keras_kd.with_teacher(make(batch=96), teacher)))
    assert targets.kind == _auto_kind(K, large=False)


@pytest.mark.backend("tensorflow")
def test_auto_placement_rule(K, toy_data, monkeypatch):
    x, y, make = toy_data
    teacher = mlp(K)  # 13 * 16 + 4 = 212 parameters
    params = placement_lib.teacher_parameters([teacher])
    assert params == 212
    monkeypatch.setattr(placement_lib, "PIPELINE_MIN_MACS", 212 * 40)
    on_jax = [False]

    def static(batch):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)

    assert placement_lib.auto_placement([teacher], on_jax, static(40)) == "pipeline"
    assert placement_lib.auto_placement([teacher], on_jax, static(39)) == "step"
    assert placement_lib.auto_placement([teacher, teacher], on_jax * 2, static(20)) == "pipeline"  # summed
    # Not static: ASSUMED_BATCH (32) counts, whatever the batches hold.
    assert placement_lib.ASSUMED_BATCH == 32
    assert placement_lib.static_batch_size(make(batch=64)) is None
    assert placement_lib.auto_placement([teacher], on_jax, make(batch=64)) == "step"  # 212 * 32 < 212 * 40
    monkeypatch.setattr(placement_lib, "PIPELINE_MIN_MACS", 212 * 32)
    assert placement_lib.auto_placement([teacher], on_jax, make(batch=8)) == "pipeline"
    # Functions and unbuilt models have no parameter count: the step.
    assert placement_lib.auto_placement([lambda x, training=False: x], on_jax, static(64)) == "step"
    assert placement_lib.auto_placement([K.Sequential([K.layers.Dense(4)])], on_jax, static(64)) == "step"
    # Dict inputs: the leading dimension of the first (sorted) tensor.
    dicts = tf.data.Dataset.from_tensor_slices(({"b": x, "a": x[:, :2]}, y)).batch(24, drop_remainder=True)
    assert placement_lib.static_batch_size(dicts) == 24
    # With a GPU (or TPU) the pipeline would run the teacher on the host CPU: always the step.
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/GPU:0"] if kind == "GPU" else real(kind))
    assert placement_lib.auto_placement([teacher], on_jax, static(64)) == "step"


@pytest.mark.parametrize("kind", ["large", "callable", "no_activation"])
def test_with_teacher_reads_nothing_when_built(K, toy_data, kind):
    """Neither the placement rule nor the softmax check takes a batch from the user's pipeline:
    a one-shot generator keeps every batch and a seeded reshuffling shuffle its first order."""
    x, y, _ = toy_data
    teacher = {"large": lambda: mlp(K, hidden=2_000),  # 26,004 parameters: the rule looks at the batch
               "callable": lambda: _function(K, mlp(K)),
               "no_activation": lambda: _no_activation_teacher(K)}[kind]()
    pending = iter([(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)])  # one pass only
    one_shot = tf.data.Dataset.from_generator(
        lambda: pending, output_signature=(tf.TensorSpec((None, 8), tf.float32), tf.TensorSpec((None,), tf.int64)))
    ds = keras_kd.with_teacher(one_shot, teacher)
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in ds]), x)

    def shuffled():
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=3).batch(32)

    want = [b[0].numpy() for b in shuffled()]  # a fresh pipeline's first order
    got = [b[0].numpy() for b in keras_kd.with_teacher(shuffled(), teacher)]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_teacher_of_the_other_keras(toy_data, placement):
    import tf_keras

    x, y, make = toy_data
    for teacher_k, student_k in ((keras, tf_keras), (tf_keras, keras)):
        teacher, student = mlp(teacher_k, hidden=32), mlp(student_k)
        student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.4))
        ds = keras_kd.with_teacher(make(), teacher, placement=placement)
        if placement == "step" and _on_jax(student_k) and teacher_k is tf_keras:
            with pytest.raises(ValueError, match=REFUSED_IN_JAX_STEP):
                student.evaluate(ds, verbose=0)
            continue
        value = student.evaluate(ds, verbose=0)
        s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
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


# --- ensembles (issue 17): one student from several teachers ------------------------


def _ensemble_reference(logits, ensemble):
    """NumPy: mean of the logits, or log of the mean of the softmaxes (Hinton et al. 2015)."""
    stacked = np.stack([np.asarray(z, np.float64) for z in logits])
    if ensemble == "mean_logits":
        return stacked.mean(0)
    probs = np.exp(stacked - stacked.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.log(probs.mean(0))


_MEMBERS = {}


def _ensemble_members(K):
    """Three logit teachers (hidden 8, 16, 32), built once per flavour for the ensemble cases: they
    only read them (`with_teacher` keeps no state on a teacher), and each builds its own datasets."""
    if K.__name__ not in _MEMBERS:
        _MEMBERS[K.__name__] = [mlp(K, hidden=h) for h in (8, 16, 32)]
    return _MEMBERS[K.__name__]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("ensemble", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ensemble_targets_and_loss_equal_numpy(K, toy_data, placement, ensemble, jit_compile):
    x, y, make = toy_data
    teachers = _ensemble_members(K)
    ds = keras_kd.with_teacher(make(), teachers, placement=placement, ensemble=ensemble)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    if placement == "pipeline":  # both ensembles give the same spec: one shared student
        student = _shared_student(K, ds, jit_compile, loss)
    else:  # the in-step dataset names its own teachers (another spec)
        student = mlp(K)
        student.compile("sgd", loss=loss, jit_compile=jit_compile)
    want = _ensemble_reference([compiled.outputs(t, x) for t in teachers], ensemble)
    got = np.concatenate([targets_lib.materialize(t).logits.numpy() for _, t in ds])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    value = student.evaluate(ds, verbose=0)
    assert value == pytest.approx(ref.distillation_loss(y, compiled.outputs(student, x), want, 2.0, 0.3), rel=1e-5)
    history = student.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_one_teacher_in_a_list_is_that_teacher(K, toy_data):
    x, y, make = toy_data
    teacher = mlp(K)
    for ensemble in ("mean_logits", "mean_probs"):
        ds = keras_kd.with_teacher(make(), (teacher,), placement="pipeline", ensemble=ensemble)
        got = np.concatenate([t.logits.numpy() for _, t in ds])
        np.testing.assert_allclose(got, compiled.outputs(teacher, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ensemble_bad_inputs(K, toy_data, placement):
    x, y, make = toy_data
    with pytest.raises(ValueError, match="non-empty list"):
        keras_kd.with_teacher(make(), [], placement=placement)
    with pytest.raises(ValueError, match=r"same number of classes.*: 4.*: 5"):
        keras_kd.with_teacher(make(), [mlp(K), mlp(K, classes=5)], placement=placement)
    with pytest.raises(ValueError, match="inputs of the same shapes"):
        keras_kd.with_teacher(make(), [mlp(K), mlp(K, inputs=6)], placement=placement)
    with pytest.raises(ValueError, match=r"Expected `ensemble` to be one of .*Did you mean 'mean_probs'"):
        keras_kd.with_teacher(make(), [mlp(K), mlp(K)], placement=placement, ensemble="mean_prob")
    with pytest.raises(TypeError, match=r"`teacher\[1\]`"):
        keras_kd.with_teacher(make(), [mlp(K), "teacher.keras"], placement=placement)
    with pytest.raises(TypeError, match="teacher_inputs"):
        keras_kd.with_teacher(make(), mlp(K), placement=placement, teacher_inputs="x[:, ::2]")


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ensemble_of_callables_with_different_class_counts_is_refused(K, toy_data, placement, jit_compile):
    """Callables declare no class count: refused when traced, never broadcast (4 vs 1 class)."""
    x, y, make = toy_data
    teachers = [_function(K, mlp(K)), _function(K, mlp(K, classes=1))]
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit_compile)
    refused = REFUSED_IN_JAX_STEP if _on_jax(K) and placement == "step" else None
    with pytest.raises(ValueError, match=refused or r"same shape.*teacher 0: \(4,\), teacher 1: \(1,\)"):
        student.fit(keras_kd.with_teacher(make(), teachers, placement=placement), epochs=1, verbose=0)


# --- teacher and student on different inputs (issue 17) -----------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_student_sees_less_than_the_teacher(K, toy_data, placement, jit_compile):
    """Teacher on all 8 features, student on every second one (a lower resolution)."""
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K, inputs=4)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=3.0, alpha=0.2), jit_compile=jit_compile)
    ds = keras_kd.with_teacher(make(), teacher, placement=placement, student_inputs=lambda v: v[:, ::2])
    xb, _ = next(iter(ds))
    np.testing.assert_array_equal(xb.numpy(), x[:32, ::2])
    value = student.evaluate(ds, verbose=0)
    s, t = compiled.outputs(student, x[:, ::2]), compiled.outputs(teacher, x)
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 3.0, 0.2), rel=1e-5)
    assert np.isfinite(student.fit(ds, epochs=1, verbose=0).history["loss"]).all()


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_teacher_reads_privileged_features(K, placement, jit_compile):
    """x = {"signal", "privileged"}: the teacher gets both (concatenated), the student the signal only."""
    rng = np.random.default_rng(3)
    x = {"signal": rng.normal(size=(40, 6)).astype("float32"), "privileged": rng.normal(size=(40, 2)).astype("float32")}
    y = rng.integers(0, 4, size=40)
    teacher, student = mlp(K, inputs=8), mlp(K, inputs=6)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5), jit_compile=jit_compile)
    ds = keras_kd.with_teacher(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16), [teacher, teacher], placement=placement,
        teacher_inputs=lambda v: tf.concat([v["signal"], v["privileged"]], -1),
        student_inputs=lambda v: v["signal"])
    value = student.evaluate(ds, verbose=0)
    s = compiled.outputs(student, x["signal"])
    t = compiled.outputs(teacher, np.concatenate([x["signal"], x["privileged"]], -1))
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.5), rel=1e-5)


def test_teacher_inputs_unbatched_is_refused(K, toy_data):
    x, y, make = toy_data
    with pytest.raises(ValueError, match="after `.batch"):
        keras_kd.with_teacher(make().unbatch(), mlp(K, inputs=4), teacher_inputs=lambda v: v[::2])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_unbatched_dataset_is_refused_for_a_teacher_without_known_inputs(K, placement):
    # An unbuilt Sequential cannot tell a batch from an example; scalar labels can.
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 4
    teacher = K.Sequential([K.layers.Flatten(), K.layers.Dense(4)])
    with pytest.raises(ValueError, match=r"unbatched elements.*apply it after `\.batch"):
        keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)), teacher, placement=placement)
    # Batched, the same teacher is accepted and the loss equals the reference.
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), teacher, placement=placement)
    student = K.Sequential([K.Input((8, 8, 1)), K.layers.Flatten(), K.layers.Dense(4)])
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5))
    value = student.evaluate(ds, verbose=0)
    s, t = compiled.outputs(student, x), compiled.outputs(teacher, x)
    assert value == pytest.approx(ref.distillation_loss(y, s, t, 2.0, 0.5), rel=1e-5)


def test_unlabelled_refuses_a_batched_dataset(K):
    x = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match=r"apply `keras_kd.unlabelled` before `.batch\(\)`"):
        keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x).batch(8))
    with pytest.raises(ValueError, match=r"apply `keras_kd.unlabelled` before `.batch\(\)`"):
        keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices({"a": x, "b": x}).batch(8))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_labels_added_after_a_batch_of_known_size_are_refused_by_the_loss(K, placement, jit_compile):
    # batch(drop_remainder=True) has a known leading axis, so `unlabelled` cannot tell;
    # the loss then sees one scalar label for the whole batch and says so.
    x = np.zeros((16, 8), np.float32)
    ds = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x).batch(8, drop_remainder=True))
    student = mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit_compile)
    with pytest.raises(ValueError, match=r"one label per example.*before `.batch\(\)`"):
        student.fit(keras_kd.with_teacher(ds, mlp(K), placement=placement), verbose=0)


def test_unlabelled_warns_on_x_y_elements():
    x, y = np.zeros((6, 3), np.float32), np.arange(6)
    with pytest.warns(UserWarning, match=r"ds.map\(lambda x, y: x\)"):
        ds = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices((x, y)))
    assert len(ds.element_spec[0]) == 2  # documented: still a two-input x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float second input is an input, not labels
        keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices((x, x)))
        keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x))


# --- the in-step placement's packing map (issue 15: no Grappler run per epoch) -------


def test_pack_map_canary():
    """Private TensorFlow names `_pack_map` reads (TF 2.21): fails with the name when they change."""
    import tensorflow as tf_module

    from keras_kd.data import _pack_map

    assert _pack_map._BASE is not None, "tensorflow.python.data.ops.dataset_ops.UnaryDataset is gone"
    for module, name in ((_pack_map._structured_function, "StructuredFunctionWrapper"),
                         (_pack_map._gen_dataset_ops, "map_dataset")):
        assert hasattr(module, name), f"{module.__name__}.{name} is gone (TensorFlow {tf_module.__version__})"
    x = np.arange(24, dtype="float32").reshape(6, 4)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(6))).batch(4)

    def fn(a, b):
        return a, (b, a * 2)

    fast = _pack_map.pack_map(ds, fn)
    assert type(fast).__name__ == "_PackMapDataset", "pack_map fell back to dataset.map"
    assert fast._map_func.function.function_def.attr[_pack_map.ATTRIBUTE].b
    for got, want in zip(fast, ds.map(fn)):
        for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert fast.element_spec == ds.map(fn).element_spec
    # An int32 result (kept in device memory by such functions) takes the public map.
    slow = _pack_map.pack_map(ds, lambda a, b: (a, tf.cast(b, tf.int32)))
    assert type(slow).__name__ != "_PackMapDataset"
    assert [int(v) for _, b in slow for v in b.numpy()] == list(range(6))


@pytest.mark.parametrize("dtype", ["int32", "uint8", "int64"])
def test_step_placement_labels_keep_their_values(K, toy_data, dtype):
    """int32 labels travel as int64 (same values) in the step placement; metrics are unchanged."""
    x, y, _ = toy_data
    teacher, student = mlp(K), mlp(K)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y.astype(dtype))).batch(32), teacher)
    labels = np.concatenate([t.labels.numpy() for _, t in ds])
    np.testing.assert_array_equal(labels, y)
    assert ds.element_spec[1].labels.dtype == (tf.int64 if dtype == "int32" else tf.as_dtype(dtype))
    student.compile("sgd", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    result = student.evaluate(ds, verbose=0, return_dict=True)
    assert result["accuracy"] == pytest.approx((compiled.outputs(student, x).argmax(-1) == y).mean(), abs=1e-6)
