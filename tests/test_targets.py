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


# --- the fast decoder (eager iteration) equals TensorFlow's generic one ----------------


def _variants(n=6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return {
        "dense": TeacherTargets(labels=np.arange(n), logits=rng.normal(size=(n, 4)).astype("float16"),
                                example_id=np.arange(n) + 7),
        "topk": TeacherTargets(labels=np.eye(n, 4, dtype="float32"), topk_indices=np.zeros((n, 2), "int32"),
                               topk_values=rng.normal(size=(n, 2)).astype("float32"),
                               topk_logsumexp=np.ones(n, "float32")),
        "inputs": TeacherTargets(labels=np.arange(n), inputs=x, teacher_key="k"),
        "tuple_inputs": TeacherTargets(labels=np.arange(n), inputs=(x, x[:, :1]), teacher_key="k2"),
        "dict_inputs": TeacherTargets(labels=np.arange(n), inputs={"b": x, "a": x[:, :2] * 2}, teacher_key="k3"),
        "unlabelled": TeacherTargets(labels=np.zeros(n, "int64"), has_labels=False, example_id=np.arange(n)),
    }


def _fields(t):
    from keras_kd.targets import _FIELDS

    return {name: tf.nest.map_structure(lambda v: v.numpy() if hasattr(v, "numpy") else v, getattr(t, name))
            for name in _FIELDS}


@pytest.mark.parametrize("kind", ["dense", "topk", "inputs", "tuple_inputs", "dict_inputs", "unlabelled"])
def test_fast_decoding_equals_tensorflows_generic_decoding(kind):
    from tensorflow.python.data.util import structure

    from keras_kd import targets as targets_lib

    value = _variants()[kind]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(6), value)).shuffle(6, seed=2).batch(4)
    calls = []
    original = targets_lib.TeacherTargets.Spec._from_compatible_tensor_list

    def counting(self, tensor_list):
        calls.append(1)
        return original(self, tensor_list)

    targets_lib.TeacherTargets.Spec._from_compatible_tensor_list = counting
    try:
        batches = list(ds)  # eager iteration: decodes every batch
    finally:
        targets_lib.TeacherTargets.Spec._from_compatible_tensor_list = original
    # Canary: TensorFlow's iterator still decodes through the spec's method (else the fast path is unused).
    assert len(calls) == len(batches) == 2
    spec = ds.element_spec[1]
    assert spec._flat_tensor_specs == targets_lib._GENERIC_FLAT_SPECS.fget(spec)
    for i, (ids, fast) in enumerate(batches):
        flat = structure.to_tensor_list(ds.element_spec, (ids, fast))[1:]
        generic = targets_lib._GENERIC_FROM_TENSOR_LIST(spec, flat)
        assert type(fast) is TeacherTargets
        got, want = _fields(fast), _fields(generic)
        assert tf.nest.map_structure(lambda v: type(v).__name__, got) == tf.nest.map_structure(
            lambda v: type(v).__name__, want)
        for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
            np.testing.assert_array_equal(a, b)
        # The rebuilt value is a full TeacherTargets: its spec and its ops work.
        assert fast._type_spec == generic._type_spec
        np.testing.assert_array_equal(tf.cast(fast, tf.float32).labels.numpy(), tf.cast(generic, tf.float32).labels)


def test_fast_decoding_inside_tf_function_and_fit_structures():
    """Graph-mode iteration (what fit does) decodes through the same method."""
    value = _variants()["dict_inputs"]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(6), value)).batch(4)

    @tf.function
    def total(dataset):
        s = tf.constant(0.0)
        for _, t in dataset:
            s += tf.reduce_sum(t.inputs["b"]) + tf.reduce_sum(t.inputs["a"])
        return s

    b, a = value.inputs["b"].numpy(), value.inputs["a"].numpy()
    assert float(total(ds)) == pytest.approx(float(np.sum(b) + np.sum(a)), rel=1e-5)


def test_tuple_inputs_of_one_shape_stay_a_tuple_batched_on_axis_0():
    """Two same-shaped model inputs are two tensors, never stacked into one (batch on axis 1)."""
    a, b = np.ones((4, 3), "float32"), np.zeros((4, 3), "float32")
    t = TeacherTargets(labels=np.zeros(4), inputs=(a, b), teacher_key="k")
    assert isinstance(t.inputs, tuple) and [v.shape for v in t.inputs] == [(4, 3), (4, 3)]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(4), t)).batch(3)
    assert [s.shape.as_list() for s in ds.element_spec[1].inputs] == [[None, 3], [None, 3]]
    _, first = next(iter(ds))
    np.testing.assert_array_equal(first.inputs[1].numpy(), b[:3])
    single = TeacherTargets(labels=np.zeros(4), inputs=a, teacher_key="k")
    assert isinstance(single.inputs, tf.Tensor)
