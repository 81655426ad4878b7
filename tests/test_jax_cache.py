"""The teacher-logit cache on Keras 3's JAX backend: built with a JAX teacher (or
ensemble), read into a JAX student's ``fit``/``evaluate``; top-k, views,
different inputs, and the fingerprint of a JAX teacher's weights.

Run with ``KERAS_BACKEND=jax``. References: ``teacher.predict``, NumPy top-k
and the NumPy Hinton formula (`tests.reference`), Keras's accuracy on the labels.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd.cache import fingerprint
from keras_kd.cache.errors import CacheMismatchError
from tests import reference

pytestmark = pytest.mark.backend("jax")

N, D, C, T, ALPHA = 40, 8, 5, 3.0, 0.4


def mlp(seed, inputs=D):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((inputs,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    return keras.Model(inp, keras.layers.Dense(C)(h))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, D)).astype("float32"), rng.integers(0, C, N)


def cached(x, y, teacher, directory, **kwargs):
    transform = keras_kd.cache_teacher_logits(teacher, directory, dtype="float32", batch_size=16, verbose=0,
                                              **kwargs)
    return tf.data.Dataset.from_tensor_slices((x, y)).apply(transform)


def all_targets(ds):
    """(example ids, x, targets fields) of every element, in example order."""
    batch = next(iter(ds.batch(N)))
    order = np.argsort(batch[1].example_id.numpy())
    return order, batch


def evaluate(student, ds, y, student_logits, teacher_logits):
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=T, alpha=ALPHA), metrics=["accuracy"])
    result = student.evaluate(ds.batch(16), verbose=0, return_dict=True)
    expected = reference.distillation_loss(y, student_logits, teacher_logits, T, ALPHA)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(y, student_logits)
    assert result["accuracy"] == pytest.approx(float(accuracy.result()), abs=1e-7)
    assert np.isfinite(student.fit(ds.shuffle(N, seed=0).batch(16), epochs=1, verbose=0).history["loss"]).all()


def test_cache_built_by_a_jax_teacher_and_read_by_a_jax_student(data, tmp_path):
    x, y = data
    teacher, student = mlp(1), mlp(2)
    ds = cached(x, y, teacher, tmp_path)
    order, batch = all_targets(ds)
    expected = teacher.predict(x, verbose=0)
    np.testing.assert_allclose(batch[1].logits.numpy()[order], expected, rtol=1e-5, atol=1e-6)
    evaluate(student, ds, y, student.predict(x, verbose=0), expected)
    # A second use reads the files (same teacher, same data): the same targets.
    again = all_targets(cached(x, y, teacher, tmp_path))[1][1].logits.numpy()
    np.testing.assert_array_equal(np.sort(again, 0), np.sort(batch[1].logits.numpy(), 0))


@pytest.mark.parametrize("ensemble", ["mean_logits", "mean_probs"])
def test_ensemble_cache(data, tmp_path, ensemble):
    x, y = data
    members, student = [mlp(1), mlp(3)], mlp(2)
    ds = cached(x, y, members, tmp_path, ensemble=ensemble)
    logits = np.stack([m.predict(x, verbose=0) for m in members]).astype(np.float64)
    combined = logits.mean(0) if ensemble == "mean_logits" else np.log(np.exp(reference.log_softmax(logits)).mean(0))
    order, batch = all_targets(ds)
    np.testing.assert_allclose(batch[1].logits.numpy()[order], combined, rtol=1e-5, atol=1e-5)
    evaluate(student, ds, y, student.predict(x, verbose=0), combined)


def test_top_k_cache(data, tmp_path):
    x, y = data
    teacher = mlp(1)
    expected = teacher.predict(x, verbose=0).astype(np.float64)
    order, batch = all_targets(cached(x, y, teacher, tmp_path / "k2", top_k=2))
    targets = batch[1]
    top = np.sort(expected, -1)[:, ::-1][:, :2]
    np.testing.assert_allclose(targets.topk_values.numpy()[order], top, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets.topk_indices.numpy()[order], np.argsort(-expected, -1)[:, :2])
    lse = np.log(np.exp(expected).sum(-1))
    np.testing.assert_allclose(targets.topk_logsumexp.numpy()[order], lse, rtol=1e-5)
    # k = C keeps every logit: the JAX student's loss is the Hinton loss on the full teacher.
    student = mlp(2)
    evaluate(student, cached(x, y, teacher, tmp_path / "k5", top_k=C), y, student.predict(x, verbose=0), expected)


def add_noise(x, seed):
    return x + tf.random.stateless_normal(tf.shape(x), seed=seed)


def test_views_and_different_inputs(data, tmp_path):
    x, y = data
    teacher, views, seed = mlp(1), 2, 7
    ds = cached(x, y, teacher, tmp_path, augment=add_noise, views=views, seed=seed,
                student_inputs=lambda v: v[::2])
    order, batch = all_targets(ds)
    ids = batch[1].example_id.numpy()[order]
    logits = batch[1].logits.numpy()[order]
    student_x = batch[0].numpy()[order]
    # Each stored row is the teacher's logits on one of the example's documented views.
    candidates = np.stack([[add_noise(x[i], tf.constant([seed, i * views + v], tf.int64)).numpy()
                            for v in range(views)] for i in ids])
    chosen = np.array([np.flatnonzero(np.isclose(c[:, ::2], s).all(-1))[0] for c, s in zip(candidates, student_x)])
    seen = candidates[np.arange(N), chosen]
    np.testing.assert_allclose(logits, teacher.predict(seen, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_changed_jax_teacher_is_refused_and_its_digest_follows_its_weights(data, tmp_path):
    x, y = data
    teacher = mlp(1)
    digest = fingerprint.weights_digest(teacher)
    assert fingerprint.weights_digest(mlp(1)) == digest  # same weights, same digest
    next(iter(cached(x, y, teacher, tmp_path)))
    teacher.set_weights([w + 1.0 for w in teacher.get_weights()])
    assert fingerprint.weights_digest(teacher) != digest
    with pytest.raises(CacheMismatchError):
        next(iter(cached(x, y, teacher, tmp_path)))


def test_teacher_inputs(data, tmp_path):
    x, y = data
    teacher, student = mlp(1, inputs=D // 2), mlp(2)
    ds = cached(x, y, teacher, tmp_path, teacher_inputs=lambda v: v[D // 2:])
    order, batch = all_targets(ds)
    np.testing.assert_array_equal(batch[0].numpy()[order], x)  # the student sees x itself
    expected = teacher.predict(x[:, D // 2:], verbose=0)
    np.testing.assert_allclose(batch[1].logits.numpy()[order], expected, rtol=1e-5, atol=1e-6)
    evaluate(student, ds, y, student.predict(x, verbose=0), expected)
