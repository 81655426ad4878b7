"""TeacherTargets' tf.data encoding: integer labels and example ids travel as one int64 tensor.

Every case compares what tf.data gives back with the TeacherTargets that went in
(field by field, dtypes exact), and checks how many tensors the encoding uses.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import TeacherTargets
from keras_kd import targets as targets_lib

N = 6
BIG = 2**62 + 12345  # ids near 2**62: an int64 round trip must keep every bit
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]


def _logits(shape=(N, 4)):
    return np.random.default_rng(0).normal(size=shape).astype("float16")


def _fields(t):
    return {name: tf.nest.map_structure(lambda v: v.numpy() if hasattr(v, "numpy") else v, getattr(t, name))
            for name in targets_lib._FIELDS}


def _assert_same(got, want):
    assert type(got) is TeacherTargets
    g, w = _fields(got), _fields(want)
    assert tf.nest.map_structure(type, g) == tf.nest.map_structure(type, w)
    for a, b in zip(tf.nest.flatten(g), tf.nest.flatten(w)):
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    assert got.labels.dtype == want.labels.dtype
    assert (got.example_id is None) == (want.example_id is None)
    assert got.example_id is None or got.example_id.dtype == want.example_id.dtype


_TENSOR_FIELDS = ("labels", "logits", "topk_indices", "topk_values", "topk_logsumexp", "inputs", "example_id")


def _take(value, index):
    """The rows ``index`` of every tensor field (the reference for a shuffled batch)."""
    return value.replace(**{name: tf.nest.map_structure(lambda v: tf.gather(v, index), getattr(value, name))
                            for name in _TENSOR_FIELDS if getattr(value, name) is not None})


def _unbatched(value, i):
    return value.replace(**{name: tf.nest.map_structure(lambda v: v[i], getattr(value, name))
                            for name in _TENSOR_FIELDS if getattr(value, name) is not None})


def _n_tensors(spec):
    return len(spec._flat_tensor_specs)


def _round_trips(value, packed):
    """Shuffled, batched, unbatched and rebatched, eagerly and in a tf.function: equal to the rows that went in."""
    ds = tf.data.Dataset.from_tensor_slices((np.arange(N), value))
    element = ds.element_spec[1]
    default = len(element._component_specs)  # one tensor per field leaf
    assert targets_lib.TeacherTargets.__batch_encoder__.packs(element) is packed
    for batched in (ds.shuffle(N, seed=3).batch(4), ds.batch(4).unbatch().shuffle(N, seed=1).batch(5),
                    ds.batch(2).unbatch()):
        spec = batched.element_spec[1]
        assert spec.__batch_encoder__.packs(spec) is packed
        assert _n_tensors(spec) == default - packed
        for ids, got in batched:
            _assert_same(got, _take(value, ids) if ids.shape.rank else _unbatched(value, int(ids)))

    # Graph decoding (what fit does): the same values.
    @tf.function
    def collect(dataset):
        out = tf.TensorArray(tf.int64, size=0, dynamic_size=True)
        for ids, t in dataset:
            row = tf.cast(t.labels, tf.int64) if t.labels.dtype.is_integer else tf.zeros_like(ids)
            row = tf.reshape(row, [tf.shape(ids)[0], -1])[:, 0]
            ident = tf.cast(t.example_id, tf.int64) if t.example_id is not None else ids
            ident = tf.reshape(ident, [tf.shape(ids)[0], -1])[:, 0]
            out = out.write(out.size(), tf.stack([ids, row, ident], 1))
        return out.concat()

    rows = collect(ds.shuffle(N, seed=5).batch(4)).numpy()
    labels = value.labels.numpy().reshape(N, -1)[:, 0].astype("int64") if value.labels.dtype.is_integer else 0
    np.testing.assert_array_equal(rows[:, 1], (np.zeros(N, "int64") + labels)[rows[:, 0]])
    if value.example_id is not None:
        ids = value.example_id.numpy().reshape(N, -1)[:, 0].astype("int64")
        np.testing.assert_array_equal(rows[:, 2], ids[rows[:, 0]])


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_labels_pack_with_ids_and_keep_their_dtype(dtype):
    info = np.iinfo(dtype)
    labels = np.array([info.min, info.max, 0, 1, info.max - 1, 3]).astype(dtype)
    value = TeacherTargets(labels=labels, logits=_logits(), example_id=np.arange(N, dtype="int64") + BIG)
    spec = tf.data.Dataset.from_tensor_slices(value).batch(2).element_spec
    # One int64 tensor for labels and ids, then the logits: 2 tensors instead of 3.
    assert [(s.shape.as_list(), s.dtype) for s in spec._flat_tensor_specs] == [
        ([None, 2], tf.int64), ([None, 4], tf.float16)]
    _round_trips(value, packed=True)


def test_ids_at_the_int64_limits_are_exact():
    ids = np.array([2**62, 2**62 + 1, 2**63 - 1, -(2**63), 2**31, 2**31 + 1], "int64")
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=ids)
    got = next(iter(tf.data.Dataset.from_tensor_slices(value).batch(N)))
    assert got.example_id.dtype == tf.int64 and got.example_id.numpy().tolist() == ids.tolist()


@pytest.mark.parametrize("kind", ["float_one_hot", "no_ids", "rank_mismatch", "int32_ids", "bool", "uint64",
                                  "unlabelled", "topk", "sequence", "inputs"])
def test_every_layout_round_trips(kind):
    labels = np.arange(N, dtype="int32") % 4
    ids = np.arange(N, dtype="int64") + BIG
    x = np.random.default_rng(1).normal(size=(N, 3)).astype("float32")
    value, packed = {
        "float_one_hot": (TeacherTargets(labels=np.eye(N, 4, dtype="float32"), logits=_logits(), example_id=ids),
                          False),
        "no_ids": (TeacherTargets(labels=labels, logits=_logits()), False),
        "rank_mismatch": (TeacherTargets(labels=labels[:, None], logits=_logits(), example_id=ids), False),
        "int32_ids": (TeacherTargets(labels=labels, logits=_logits(), example_id=np.arange(N, dtype="int32") + 2**30), True),
        "bool": (TeacherTargets(labels=labels > 1, logits=_logits(), example_id=ids), False),
        "uint64": (TeacherTargets(labels=labels.astype("uint64"), logits=_logits(), example_id=ids), False),
        "unlabelled": (TeacherTargets(labels=np.zeros(N, "int64"), has_labels=False, logits=_logits(),
                                      example_id=ids), True),
        "topk": (TeacherTargets(labels=labels, topk_indices=np.zeros((N, 2), "int32"),
                                topk_values=_logits((N, 2)).astype("float32"),
                                topk_logsumexp=np.ones(N, "float32"), example_id=ids), True),
        # Per-time-step labels with per-time-step ids: same rank, packed.
        "sequence": (TeacherTargets(labels=np.arange(N * 3, dtype="int32").reshape(N, 3),
                                    logits=_logits((N, 3, 4)), example_id=np.arange(N * 3).reshape(N, 3) + BIG),
                     True),
        "inputs": (TeacherTargets(labels=labels, inputs={"b": x, "a": x[:, :1] * 2}, teacher_key="enc",
                                  example_id=ids), True),
    }[kind]
    _round_trips(value, packed)


def test_ragged_fields_are_refused_by_the_type():
    """TeacherTargets' fields are dense tensors: ragged values never reach the encoding."""
    with pytest.raises(TypeError, match="labels: expected a Tensor"):
        TeacherTargets(labels=tf.ragged.constant([[1, 2], [3]]), example_id=[0, 1])


def test_fast_and_generic_decoders_agree_on_the_packed_tensor():
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=np.arange(N) + BIG)
    ds = tf.data.Dataset.from_tensor_slices(value).batch(4)
    spec = ds.element_spec
    packed = tf.constant(np.stack([np.arange(4), np.arange(4) + BIG], -1))
    flat = [packed, tf.constant(_logits((4, 4)))]
    fast = spec._from_compatible_tensor_list(flat)  # eager: the NumPy split
    generic = targets_lib._GENERIC_FROM_TENSOR_LIST(spec, flat)  # TensorFlow's path through the encoder
    _assert_same(fast, generic)
    graph = tf.function(lambda p, z: spec._from_compatible_tensor_list([p, z]).example_id)(*flat)  # graph: unstack
    np.testing.assert_array_equal(graph.numpy(), np.arange(4) + BIG)
    # The encoder's own round trip (what tf.data's to/from tensor list do).
    encoded = spec.__batch_encoder__.encode(spec, fast)
    _assert_same(spec.__batch_encoder__.decode(spec, encoded), fast)


def test_eager_split_gives_tensors_on_the_packed_tensors_device():
    """Canary for ``tf.__internal__.EagerTensor(array, device, dtype enum)``, the eager split's constructor."""
    packed = tf.constant([[3, BIG], [4, BIG + 1]], tf.int64)
    labels, ids = targets_lib._unpack(packed, tf.uint16, tf.int64)
    assert isinstance(labels, tf.__internal__.EagerTensor) and labels.device == packed.device
    assert labels.dtype == tf.uint16 and labels.numpy().tolist() == [3, 4]
    assert ids.numpy().tolist() == [BIG, BIG + 1]
    # The new tensors own their data: ops on them work and leave the source alone.
    assert (labels + 1).numpy().tolist() == [4, 5] and packed.numpy()[0, 0] == 3


def test_padded_batch_is_refused_as_for_any_extension_type():
    """tf.data pads plain tensors only (as before packing): a loud TypeError, never a wrong batch."""
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=np.arange(N) + BIG)
    with pytest.raises(TypeError, match="only supported for datasets that produce tensor elements"):
        tf.data.Dataset.from_tensor_slices(value).padded_batch(4)


def test_distributed_dataset_and_empty_value():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=np.arange(N) + BIG)
    ds = tf.data.Dataset.from_tensor_slices(value).batch(4)
    seen = []
    for batch in strategy.experimental_distribute_dataset(ds):
        local = strategy.experimental_local_results(batch)[0]
        assert local.labels.dtype == tf.int32
        seen += (local.example_id.numpy() - BIG).tolist()
        np.testing.assert_array_equal(local.labels.numpy(), local.example_id.numpy() - BIG)
    assert sorted(seen) == list(range(N))
    empty = ds.element_spec._create_empty_value()
    assert empty.labels.dtype == tf.int32 and empty.example_id.shape == (0,)


def test_saved_model_signature_with_packed_spec(tmp_path):
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=np.arange(N) + BIG)
    spec = tf.data.Dataset.from_tensor_slices(value).batch(3).element_spec
    module = tf.Module()
    module.f = tf.function(lambda t: t.example_id - tf.cast(t.labels, tf.int64), input_signature=[spec])
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.f(value).numpy(), np.full(N, BIG))
    # The dataset's element spec survives the structure coder (tf.data service, SavedModel) with its encoding.
    from tensorflow.python.saved_model import nested_structure_coder

    decoded = nested_structure_coder.decode_proto(nested_structure_coder.encode_structure(spec))
    assert decoded == spec and decoded._flat_tensor_specs == spec._flat_tensor_specs
