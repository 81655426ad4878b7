"""The data side on Keras 3's JAX backend: `TeacherTargets` through Keras's JAX data
adapter, `with_teacher` in both placements, ensembles, different inputs, a tf_keras
teacher feeding a JAX student, and `tf_callable`.

Run with ``KERAS_BACKEND=jax``. References: the NumPy Hinton formula
(`tests.reference.distillation_loss`) on ``predict`` outputs, and Keras's own
``SparseCategoricalAccuracy`` on the labels.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import targets as targets_lib
from keras_kd._jax_targets import JaxTeacherTargets
from keras_kd.data import teachers as teachers_lib
from tests import reference

pytestmark = pytest.mark.backend("jax")

N, D, C, T, ALPHA = 48, 8, 4, 2.0, 0.3


def mlp(seed, inputs=D, module=keras):
    module.utils.set_random_seed(seed)
    inp = module.Input((inputs,))
    h = module.layers.Dense(16, activation="relu")(inp)
    return module.Model(inp, module.layers.Dense(C)(h))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, D)).astype("float32"), rng.integers(0, C, N)


def batches(x, y, batch=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def evaluate(student, ds):
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=T, alpha=ALPHA), metrics=["accuracy"])
    return student.evaluate(ds, verbose=0, return_dict=True)


def keras_accuracy(y, logits):
    metric = keras.metrics.SparseCategoricalAccuracy()
    metric.update_state(y, logits)
    return float(metric.result())


def assert_hinton(result, y, student_logits, teacher_logits):
    expected = reference.distillation_loss(y, student_logits, teacher_logits, T, ALPHA)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    assert result["accuracy"] == pytest.approx(keras_accuracy(y, student_logits), abs=1e-7)


def test_the_adapter_converts_fields_and_keeps_their_names(data):
    x, y = data
    tf_targets = targets_lib.TeacherTargets(labels=tf.constant(y), logits=tf.constant(x[:, :C]),
                                            example_id=tf.range(N, dtype=tf.int64))
    # What Keras's TFDatasetAdapter.get_jax_iterator does to every batch.
    jax_targets = keras.tree.map_structure(lambda t: t.numpy(), tf_targets, none_is_leaf=False)
    assert isinstance(jax_targets, JaxTeacherTargets) and targets_lib.is_targets(jax_targets)
    np.testing.assert_array_equal(jax_targets.logits, x[:, :C])
    np.testing.assert_array_equal(jax_targets.example_id, np.arange(N))
    assert jax_targets.topk_values is None and jax_targets.kind == "dense" and jax_targets.has_labels
    # A leaf for keras.tree (single-output losses), shaped and converted like its labels...
    assert not keras.tree.is_nested(jax_targets)
    assert jax_targets.shape == y.shape and jax_targets.dtype == y.dtype
    np.testing.assert_array_equal(jnp.asarray(jax_targets), y)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(jax_targets)), y)
    # ... and a pytree for JAX, so jit sees its arrays and rebuilds it.
    assert len(jax.tree_util.tree_leaves(jax_targets)) == 3
    doubled = jax.jit(lambda t: t.replace(logits=t.logits * 2))(jax_targets)
    assert isinstance(doubled, JaxTeacherTargets)
    np.testing.assert_allclose(doubled.logits, 2 * x[:, :C])


@pytest.mark.parametrize("placement", ["pipeline", "step", "auto"])
def test_with_teacher_loss_is_hinton_and_accuracy_is_hard_label(data, placement):
    x, y = data
    teacher, student = mlp(1), mlp(2)
    ds = keras_kd.with_teacher(batches(x, y), teacher, placement=placement)
    result = evaluate(student, ds)
    assert_hinton(result, y, student.predict(x, verbose=0), teacher.predict(x, verbose=0))
    history = student.fit(ds, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_auto_runs_a_keras3_teacher_in_the_step_and_a_tf_keras_teacher_in_the_pipeline(data):
    x, y = data
    keras3 = keras_kd.with_teacher(batches(x, y), mlp(1), placement="auto")
    tfk = keras_kd.with_teacher(batches(x, y), mlp(1, module=tf_keras), placement="auto")
    assert keras3.element_spec[1].inputs is not None and keras3.element_spec[1].logits is None
    assert tfk.element_spec[1].logits is not None


def test_a_tf_keras_teacher_feeds_a_jax_student(data):
    x, y = data
    teacher, student = mlp(1, module=tf_keras), mlp(2)
    result = evaluate(student, keras_kd.with_teacher(batches(x, y), teacher))
    assert_hinton(result, y, student.predict(x, verbose=0), teacher.predict(x, verbose=0))


def test_a_tf_keras_teacher_in_the_jax_step_is_refused_naming_the_alternative(data):
    x, y = data
    ds = keras_kd.with_teacher(batches(x, y), mlp(1, module=tf_keras), placement="step")
    with pytest.raises(ValueError, match=r"JAX backend.*placement='pipeline'"):
        evaluate(mlp(2), ds)


@pytest.mark.parametrize("placement", ["pipeline", "step"])
@pytest.mark.parametrize("ensemble", ["mean_logits", "mean_probs"])
def test_ensembles(data, placement, ensemble):
    x, y = data
    members, student = [mlp(1), mlp(3)], mlp(2)
    result = evaluate(student, keras_kd.with_teacher(batches(x, y), members, placement=placement,
                                                     ensemble=ensemble))
    logits = np.stack([m.predict(x, verbose=0) for m in members]).astype(np.float64)
    if ensemble == "mean_logits":
        combined = logits.mean(0)
    else:
        combined = np.log(np.exp(reference.log_softmax(logits)).mean(0))
    assert_hinton(result, y, student.predict(x, verbose=0), combined)


def dict_teacher():
    keras.utils.set_random_seed(4)
    a, b = keras.Input((D,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(C)(h))


@pytest.mark.parametrize("placement", ["pipeline", "step"])
def test_multi_input_teacher_with_teacher_and_student_inputs(data, placement):
    x, y = data
    extra = np.random.default_rng(1).normal(size=(N, 2)).astype("float32")
    teacher, student = dict_teacher(), mlp(2, inputs=D // 2)
    ds = tf.data.Dataset.from_tensor_slices(({"a": x, "b": extra}, y)).batch(16)
    ds = keras_kd.with_teacher(ds, teacher, placement=placement,
                               student_inputs=lambda v: v["a"][:, ::2])
    result = evaluate(student, ds)
    teacher_logits = teacher.predict({"a": x, "b": extra}, verbose=0)
    assert_hinton(result, y, student.predict(x[:, ::2], verbose=0), teacher_logits)


def test_example_ids_mixup_and_unlabelled_keep_working(data):
    x, y = data
    teacher, student = mlp(1), mlp(2)
    ids = keras_kd.with_teacher(keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y))).batch(16),
                                teacher)
    assert ids.element_spec[1].example_id is not None
    assert np.isfinite(evaluate(student, ids)["loss"])
    mixed = keras_kd.with_teacher(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16).map(keras_kd.mixup(num_classes=C, seed=0)), teacher)
    assert np.isfinite(evaluate(student, mixed)["loss"])
    cut = keras_kd.with_teacher(
        batches(x, y).map(keras_kd.mixup(kind="cutmix", num_classes=C, seed=1)), teacher)
    assert np.isfinite(evaluate(student, cut)["loss"])
    transfer = keras_kd.with_teacher(keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x)).batch(16), teacher)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=T, alpha=ALPHA))
    got = student.evaluate(transfer, verbose=0, return_dict=True)["loss"]
    # No labels: the hard term is gone; what remains is the (1 - alpha) T^2 KL part.
    s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    soft = reference.divergence("kl", t / T, s / T) * T * T
    np.testing.assert_allclose(got, (1 - ALPHA) * soft.mean(), rtol=1e-5)


def test_tf_callable_runs_the_jax_teacher_in_tf_data_and_sees_new_weights(data):
    x, _ = data
    teacher = mlp(1)
    run = teachers_lib.tf_callable(teacher)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(16).map(run)
    assert ds.element_spec.shape.as_list() == [None, C] and ds.element_spec.dtype == tf.float32
    np.testing.assert_allclose(np.concatenate(list(ds.as_numpy_iterator())), teacher.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    teacher.set_weights([w * 0.5 for w in teacher.get_weights()])  # seen without rebuilding `run`
    np.testing.assert_allclose(run(tf.constant(x)).numpy(), teacher.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_tf_callable_refuses_tf_keras_models_naming_the_alternative():
    with pytest.raises(ValueError, match="tf_keras models and TensorFlow functions run in tf.data"):
        teachers_lib.tf_callable(mlp(1, module=tf_keras))


def test_a_jax_function_as_teacher_is_refused_naming_the_alternative(data):
    x, y = data

    def jax_teacher(inputs, training=False):
        return jnp.tanh(inputs)[:, :C]

    with pytest.raises(TypeError, match=r"Keras 3 model \(or layer\).*tf_callable"):
        keras_kd.with_teacher(batches(x, y), jax_teacher, placement="pipeline")


def test_new_teacher_weights_reach_the_compiled_step(data):
    # In the JAX step the teacher's weights are constants of the compiled step: a change must retrace it.
    x, y = data
    teacher, student = mlp(1), mlp(2)
    ds = keras_kd.with_teacher(batches(x, y), teacher, placement="step")
    evaluate(student, ds)
    teacher.set_weights([w * 0.5 for w in teacher.get_weights()])
    result = student.evaluate(ds, verbose=0, return_dict=True)
    assert_hinton(result, y, student.predict(x, verbose=0), teacher.predict(x, verbose=0))


def test_tf_outputs_gives_every_output_of_a_jax_model_in_tf_data(data):
    x, _ = data
    keras.utils.set_random_seed(5)
    inp = keras.Input((D,))
    hidden = keras.layers.Dense(6, activation="relu")(inp)
    model = keras.Model(inp, [keras.layers.Dense(C)(hidden), hidden])
    ds = tf.data.Dataset.from_tensor_slices(x).batch(16).map(lambda v: tuple(teachers_lib.tf_outputs(model)(v)))
    assert [s.shape.as_list() for s in ds.element_spec] == [[None, C], [None, 6]]
    got = [np.concatenate(parts) for parts in zip(*ds.as_numpy_iterator())]
    for g, e in zip(got, model.predict(x, verbose=0)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["pipeline", "step"])
def test_built_in_metrics_measure_the_labels(data, placement):
    x, y = data
    teacher, student = mlp(1), mlp(2)

    def metrics():
        return [keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="sce"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")]

    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=T, alpha=ALPHA), metrics=metrics())
    got = student.evaluate(keras_kd.with_teacher(batches(x, y), teacher, placement=placement), verbose=0,
                           return_dict=True)
    logits = student.predict(x, verbose=0)
    for metric in metrics():
        metric.update_state(y, logits)
        assert got[metric.name] == pytest.approx(float(metric.result()), rel=1e-6)
