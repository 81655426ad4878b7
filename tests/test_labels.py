"""keras_kd._labels: the one decoding of labels and predictions, against hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import _labels


def _np(t):
    return np.asarray(t.numpy())


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "float32", "float64"])
def test_sparse_ids_of_any_dtype(dtype):
    labels = tf.constant(np.array([3, 0, 9], dtype))
    ids = _labels.class_ids(labels, 10)
    assert ids.dtype == tf.int64
    np.testing.assert_array_equal(_np(ids), [3, 0, 9])


def test_trailing_one_is_squeezed_and_no_label_kept():
    ids = _labels.class_ids(tf.constant([[2], [-1], [0]]), 4, logits_rank=2)
    np.testing.assert_array_equal(_np(ids), [2, _labels.NO_LABEL, 0])
    assert _labels.NO_LABEL == -1


def test_float_labels_that_are_not_integers_are_invalid():
    ids = _labels.class_ids(tf.constant([1.0, 2.5, np.nan, -1.0, np.inf]), 4)
    np.testing.assert_array_equal(_np(ids), [1, -2, -2, -1, -2])
    valid = _labels.valid_class_ids(ids, 4)
    np.testing.assert_array_equal(_np(valid), [True, False, False, True, False])


def test_range_check_allows_exactly_no_label():
    ids = tf.constant([-3, -2, -1, 0, 3, 4], tf.int64)
    np.testing.assert_array_equal(_np(_labels.valid_class_ids(ids, 4)), [False, False, True, True, True, False])
    np.testing.assert_array_equal(
        _np(_labels.valid_class_ids(ids, 4, allow_unlabelled=False)), [False, False, False, True, True, False]
    )
    np.testing.assert_array_equal(_np(_labels.labelled(ids)), [True, True, False, True, True, True])


def test_dense_labels_argmax():
    # one-hot row -> its index; a mixup row 0.3/0.7 -> the larger share
    labels = tf.constant([[0.0, 1.0, 0.0], [0.3, 0.0, 0.7]])
    np.testing.assert_array_equal(_np(_labels.class_ids(labels, 3, logits_rank=2)), [1, 2])
    assert _labels.is_dense(labels, 3, logits_rank=2)
    assert _labels.is_dense(labels, 3)


def test_sequence_ids_are_not_dense():
    # (batch, time) ids with time == classes: the logits' rank (3) tells them apart
    labels = tf.constant([[0, 1, 2]])
    assert not _labels.is_dense(labels, 3, logits_rank=3)
    np.testing.assert_array_equal(_np(_labels.class_ids(labels, 3, logits_rank=3)), [[0, 1, 2]])


def test_binary_labels():
    labels = tf.constant([[0.0], [1.0], [0.8], [0.5], [-1.0]])
    np.testing.assert_array_equal(_np(_labels.class_ids(labels, 1, logits_rank=2)), [0, 1, 1, 0, -1])
    assert not _labels.is_dense(labels, 1, logits_rank=2)


def test_predicted_class():
    np.testing.assert_array_equal(_np(_labels.predicted_class(tf.constant([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]))), [1, 0])
    np.testing.assert_array_equal(_np(_labels.predicted_class(tf.constant([[0.3], [-0.2], [0.0]]))), [1, 0, 0])


def test_two_class_logits():
    z = tf.constant([[0.0], [2.0]])
    two = _labels.two_class_logits(z)
    np.testing.assert_allclose(_np(two), [[0.0, 0.0], [0.0, 2.0]])
    # softmax([0, 2]) = [1 - sigmoid(2), sigmoid(2)] = [0.11920292, 0.88079708]
    np.testing.assert_allclose(_np(tf.nn.softmax(two))[1], [0.11920292, 0.88079708], rtol=1e-6)


def test_inside_a_compiled_function():
    fn = tf.function(lambda y: _labels.class_ids(y, 5), jit_compile=True)
    np.testing.assert_array_equal(_np(fn(tf.constant([4.0, 1.5, -1.0]))), [4, -2, -1])
