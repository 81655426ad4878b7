"""The cache's three readers (whole in memory, rows zipped from memory, streamed) give the same elements.

The reference is the teacher's own ``predict`` and the raw arrays: every
reader must pair each element with its own row, after a shuffle, with
labels, sample weights, unlabelled data, top-k and ``student_inputs``.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_kd.cache import cache_teacher_logits
from keras_kd.cache import reader

N, FEATURES, CLASSES = 150, 6, 4


def model(K):
    K.utils.set_random_seed(3)
    return K.Sequential([K.Input((FEATURES,)), K.layers.Dense(8, activation="relu"), K.layers.Dense(CLASSES)])


def arrays():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    return x, rng.integers(0, CLASSES, N).astype("int32"), rng.uniform(0.5, 1.5, N).astype("float32")


@pytest.fixture(params=["whole", "rows", "stream"])
def how(request, monkeypatch):
    if request.param == "rows":  # rows in memory, elements zipped: what a dataset over 64 MiB gets
        monkeypatch.setattr(reader, "SMALL_ELEMENTS_BYTES", 0)
    return request.param


def read_all(ds):
    out = []
    for element in ds.shuffle(N, seed=4).batch(64):
        out.append([t.numpy() for t in (element[0], element[1].example_id, element[1].labels)]
                   + [element[1].logits.numpy() if element[1].logits is not None else element[1].topk_values.numpy()]
                   + [element[2].numpy() if len(element) == 3 else np.zeros(len(element[0]))]
                   + [np.full(len(element[0]), element[1].has_labels)])
    return [np.concatenate(column) for column in zip(*out)]


def test_every_reader_pairs_each_element_with_its_row(K, tmp_path, how):
    x, y, w = arrays()
    teacher = model(K)
    expected = teacher.predict(x, verbose=0)
    cache = cache_teacher_logits(
        teacher, tmp_path, dtype="float32", in_memory=how != "stream", student_inputs=lambda v: v[1:], verbose=0
    )
    xs, ids, ys, logits, ws, labelled = read_all(tf.data.Dataset.from_tensor_slices((x, y, w)).apply(cache))
    assert not np.array_equal(ids, np.arange(N))
    np.testing.assert_array_equal(xs, x[ids][:, 1:])
    np.testing.assert_array_equal(ys, y[ids])
    np.testing.assert_array_equal(ws, w[ids])
    assert labelled.all()
    np.testing.assert_allclose(logits, expected[ids], rtol=1e-5, atol=1e-5)


def test_every_reader_marks_unlabelled_data_and_keeps_top_k(K, tmp_path, how):
    x, _, _ = arrays()
    teacher = model(K)
    expected = np.sort(teacher.predict(x, verbose=0), axis=-1)[:, ::-1][:, :2]
    cache = cache_teacher_logits(teacher, tmp_path, dtype="float32", top_k=2, in_memory=how != "stream", verbose=0)
    out = tf.data.Dataset.from_tensor_slices(x).apply(cache)
    assert int(out.cardinality()) == N
    xs, ids, _, values, _, labelled = read_all(out)
    np.testing.assert_array_equal(xs, x[ids])
    assert not labelled.any()
    np.testing.assert_allclose(values, expected[ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("streamed", [False, True])
def test_zip_readers_pair_elements_of_unknown_shapes_one_by_one(K, tmp_path, monkeypatch, streamed):
    """Elements of fixed shapes are paired a batch at a time; the others element by element: the same rows."""
    monkeypatch.setattr(reader, "SMALL_ELEMENTS_BYTES", 0)
    x, y, w = arrays()
    teacher = model(K)
    expected = teacher.predict(x, verbose=0)
    unknown = tf.data.Dataset.from_tensor_slices((x, y, w)).map(
        lambda a, b, c: (tf.compat.v1.placeholder_with_default(a, [None]), b, c))
    assert unknown.element_spec[0].shape.as_list() == [None]
    out = unknown.apply(cache_teacher_logits(teacher, tmp_path, dtype="float32", in_memory=not streamed, verbose=0))
    assert out.element_spec[0].shape.as_list() == [None]
    xs, ids, ys, logits, ws, labelled = read_all(out)
    np.testing.assert_array_equal(xs, x[ids])
    np.testing.assert_array_equal(ys, y[ids])
    np.testing.assert_array_equal(ws, w[ids])
    np.testing.assert_allclose(logits, expected[ids], rtol=1e-5, atol=1e-5)
