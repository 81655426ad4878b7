"""The targets contract: TeacherTargets through tf.data, tf.distribute and tf.data service."""

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import TeacherTargets
from keras_kd.targets import dense_teacher_logits


def _targets(n=8):
    return TeacherTargets(labels=np.arange(n), logits=np.eye(n, 4, dtype="float32"), example_id=np.arange(n) + 100)


def test_converts_to_labels_and_reports_their_shape():
    t = _targets()
    assert t.shape == t.labels.shape and t.dtype == tf.int64
    np.testing.assert_array_equal(tf.convert_to_tensor(t).numpy(), np.arange(8))
    np.testing.assert_array_equal(tf.convert_to_tensor(t, tf.float32).numpy(), np.arange(8, dtype="float32"))
    # The ops Keras applies to y_true act on the labels and keep the teacher.
    for op in (lambda v: tf.cast(v, tf.float32), lambda v: tf.expand_dims(v, -1),
               lambda v: tf.squeeze(tf.expand_dims(v, -1), -1)):
        out = op(t)
        assert isinstance(out, TeacherTargets)
        np.testing.assert_array_equal(out.logits.numpy(), t.logits.numpy())
    assert t.kind == "dense" and t.has_teacher
    assert TeacherTargets(labels=[1]).kind == "none"


def test_survives_shuffle_batch_unbatch_repeat():
    ds = tf.data.Dataset.from_tensor_slices((np.arange(8), _targets()))
    for x, t in ds.shuffle(8, seed=1).repeat(2).batch(3).unbatch().batch(5):
        np.testing.assert_array_equal(t.example_id.numpy(), x.numpy() + 100)
        np.testing.assert_array_equal(t.logits.numpy(), np.eye(8, 4, dtype="float32")[x.numpy()])


def test_through_tf_data_service():
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(  # noqa: F841 - keeps the worker alive
        tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher.target.split("://")[1])
    )
    ds = tf.data.Dataset.from_tensor_slices((np.arange(8), _targets())).batch(4)
    ds = ds.apply(tf.data.experimental.service.distribute(processing_mode="parallel_epochs", service=dispatcher.target))
    ids = sorted(int(i) for _, t in ds for i in t.example_id.numpy())
    assert ids == list(range(100, 108))


def test_dense_teacher_logits_bad_inputs():
    with pytest.raises(ValueError, match="carry no teacher logits"):
        dense_teacher_logits(TeacherTargets(labels=[0]), 4)
    t = TeacherTargets(labels=[0], topk_indices=[[0, 1]], topk_values=[[1.0, 0.5]], topk_logsumexp=[2.0])
    with pytest.raises(ValueError, match="topk_fill"):
        dense_teacher_logits(t, 4, topk_fill="zero")
    with pytest.raises(ValueError, match="k=2 but the student has 1"):
        dense_teacher_logits(t, 1)
