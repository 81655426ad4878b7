"""TeacherTargets' tf.data encoding: the tensor fields travel as one tensor, bit for bit.

Every case compares what tf.data gives back with the TeacherTargets that went in
(field by field, dtypes and bits exact), and checks how many tensors the encoding uses.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from keras_kd import targets as targets_lib

# tf.data's encoding of TeacherTargets: TensorFlow code whatever Keras 3's backend is, so the
# TensorFlow job runs it (the JAX job ran the same code again; JAX batches: tests/test_jax_data.py).
pytestmark = pytest.mark.backend("tensorflow")

N = 6
BIG = 2**62 + 12345  # ids near 2**62: an int64 round trip must keep every bit
INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]


def _bits(array):
    """The bytes of ``array`` (NaN payloads and -0.0 compare exactly)."""
    return np.ascontiguousarray(np.asarray(array)).view(np.uint8)


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
        if isinstance(b, (np.ndarray, np.generic)):  # arrays and the scalars of unbatched fields
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(_bits(a), _bits(b))
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
    """Shuffled, batched, unbatched and rebatched, eagerly and in a tf.function: equal to the rows that went in.

    ``packed``: how many fields travel in the packed tensor (0: the default encoding).
    """
    ds = tf.data.Dataset.from_tensor_slices((np.arange(N), value))
    element = ds.element_spec[1]
    default = len(element._component_specs)  # one tensor per field leaf
    assert targets_lib.TeacherTargets.__batch_encoder__.packs(element) is bool(packed)
    for batched in (ds.shuffle(N, seed=3).batch(4), ds.batch(4).unbatch().shuffle(N, seed=1).batch(5),
                    ds.batch(2).unbatch(), ds.batch(4).rebatch(2), ds.batch(3).rebatch([1, 2])):
        spec = batched.element_spec[1]
        assert spec.__batch_encoder__.packs(spec) is bool(packed)
        assert _n_tensors(spec) == default - packed + bool(packed)
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


INT_LABELS = INT_DTYPES + ["uint64"]
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _extremes(dtype, n=N):
    """Integers at the dtype's limits, built in the dtype (no float round trip)."""
    info = np.iinfo(dtype)
    return np.array([info.min, info.max, 0, 1, info.max - 1, 3][:n], dtype=dtype)


def _special(dtype, shape=(N, 4)):
    """Floats of ``dtype`` with NaN payloads (signalling too), +-Inf, -0.0 and subnormals, from their bits."""
    size = tf.as_dtype(dtype).size
    bits = np.random.default_rng(2).integers(0, 2 ** (8 * size), size=shape, dtype=f"uint{8 * size}")
    exponent = {2: 0x7C00 if dtype == "float16" else 0x7F80, 4: 0x7F800000, 8: 0x7FF0000000000000}[size]
    sign = 1 << (8 * size - 1)
    bits.flat[:6] = [exponent | 1, exponent | 3 | sign, exponent, exponent | sign, sign, 1]  # NaNs, Inf, -0.0, tiny
    return tf.bitcast(tf.constant(bits), tf.as_dtype(dtype))


@pytest.mark.parametrize("logits_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dtype", INT_LABELS)
def test_every_integer_and_float_dtype_travels_bit_exact_in_one_tensor(dtype, logits_dtype):
    ids = np.array([2**62 + 12345, 2**63 - 1, -(2**63), -1, 0, 2**31], "int64")
    value = TeacherTargets(labels=_extremes(dtype), logits=_special(logits_dtype), example_id=ids)
    spec = tf.data.Dataset.from_tensor_slices(value).batch(2).element_spec
    # One tensor in the logits' dtype: labels widened to it (or bitcast), 4 logits, the int64 id.
    size = tf.as_dtype(logits_dtype).size
    label_width = max(1, np.dtype(dtype).itemsize // size)
    assert [(s.shape.as_list(), s.dtype) for s in spec._flat_tensor_specs] == [
        ([None, label_width + 4 + 8 // size], tf.as_dtype(logits_dtype))]
    _round_trips(value, packed=3)


@pytest.mark.parametrize("lse_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("values_dtype", FLOAT_DTYPES)
def test_topk_fields_of_mixed_float_dtypes_travel_in_the_narrowest(values_dtype, lse_dtype):
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), topk_indices=_extremes("int32").reshape(N, 1) + np.zeros((N, 3), "int32"),
                           topk_values=_special(values_dtype, (N, 3)), topk_logsumexp=_special(lse_dtype, (N,)),
                           example_id=np.arange(N) + BIG)
    spec = tf.data.Dataset.from_tensor_slices(value).batch(2).element_spec
    narrowest = min([values_dtype, lse_dtype], key=lambda d: tf.as_dtype(d).size)
    assert [s.dtype for s in spec._flat_tensor_specs] == [tf.as_dtype(narrowest)]
    _round_trips(value, packed=5)


def test_ids_at_the_int64_limits_are_exact():
    ids = np.array([2**62, 2**62 + 1, 2**63 - 1, -(2**63), 2**31, 2**31 + 1], "int64")
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=ids)
    got = next(iter(tf.data.Dataset.from_tensor_slices(value).batch(N)))
    assert got.example_id.dtype == tf.int64 and got.example_id.numpy().tolist() == ids.tolist()


@pytest.mark.parametrize("kind", ["float_one_hot", "no_ids", "rank_mismatch", "int32_ids", "bool", "uint64",
                                  "unlabelled", "topk", "sequence", "inputs", "ids_only", "labels_only",
                                  "complex"])
def test_every_layout_round_trips(kind):
    labels = np.arange(N, dtype="int32") % 4
    ids = np.arange(N, dtype="int64") + BIG
    x = np.random.default_rng(1).normal(size=(N, 3)).astype("float32")
    value, packed = {
        "float_one_hot": (TeacherTargets(labels=np.eye(N, 4, dtype="float32"), logits=_logits(), example_id=ids), 3),
        # The in-memory targets of the cache without ids: one tensor too.
        "no_ids": (TeacherTargets(labels=labels, logits=_logits()), 2),
        # Per-time-step labels with per-example ids: flattened after the batch axis.
        "rank_mismatch": (TeacherTargets(labels=labels[:, None], logits=_logits(), example_id=ids), 3),
        "int32_ids": (TeacherTargets(labels=labels, logits=_logits(), example_id=np.arange(N, dtype="int32") + 2**30),
                      3),
        # bool has no exact bitcast: the default encoding.
        "bool": (TeacherTargets(labels=labels > 1, logits=_logits(), example_id=ids), 0),
        "uint64": (TeacherTargets(labels=_extremes("uint64"), logits=_logits(), example_id=ids), 3),
        "unlabelled": (TeacherTargets(labels=np.zeros(N, "int64"), has_labels=False, logits=_logits(),
                                      example_id=ids), 3),
        "topk": (TeacherTargets(labels=labels, topk_indices=np.zeros((N, 2), "int32"),
                                topk_values=_logits((N, 2)).astype("float32"),
                                topk_logsumexp=np.ones(N, "float32"), example_id=ids), 5),
        "sequence": (TeacherTargets(labels=np.arange(N * 3, dtype="int32").reshape(N, 3),
                                    logits=_logits((N, 3, 4)), example_id=np.arange(N * 3).reshape(N, 3) + BIG),
                     3),
        # In-step inputs keep their own tensors; labels and ids share the int64 one.
        "inputs": (TeacherTargets(labels=labels, inputs={"b": x, "a": x[:, :1] * 2}, teacher_key="enc",
                                  example_id=ids), 2),
        "ids_only": (TeacherTargets(labels=labels.astype("uint8"), example_id=ids), 2),
        # One field alone gains nothing: the default encoding.
        "labels_only": (TeacherTargets(labels=labels), 0),
        "complex": (TeacherTargets(labels=labels, logits=_logits().astype("complex64"), example_id=ids), 0),
    }[kind]
    _round_trips(value, packed)


@pytest.mark.parametrize("shapes", [
    {"labels": [None], "logits": None},  # unknown rank
    {"labels": [None], "logits": [None, None]},  # classes unknown: the width would vary
    {"labels": [3], "logits": [4, 10]},  # leading axes disagree
])
def test_specs_the_packing_cannot_hold_keep_the_default_encoding(shapes):
    spec = TeacherTargets.Spec(labels=tf.TensorSpec(shapes["labels"], tf.int32),
                               logits=tf.TensorSpec(shapes["logits"], tf.float32),
                               topk_indices=None, topk_values=None, topk_logsumexp=None, inputs=None,
                               teacher_key="", example_id=tf.TensorSpec(shapes["labels"], tf.int64), has_labels=True)
    assert not spec.__batch_encoder__.packs(spec)
    assert spec._flat_tensor_specs == targets_lib._GENERIC_FLAT_SPECS.fget(spec)
    assert len(spec._flat_tensor_specs) == 3


def test_a_scalar_field_refuses_to_be_unbatched():
    """As TensorFlow's default encoding does: the packed tensor must never be split along its fields."""
    value = TeacherTargets(labels=tf.constant(3), logits=tf.constant([1.0, 2.0]), example_id=tf.constant(7, tf.int64))
    with pytest.raises(ValueError):
        tf.data.Dataset.from_tensors(value).unbatch()


def test_ragged_fields_are_refused_by_the_type():
    """TeacherTargets' fields are dense tensors: ragged values never reach the encoding."""
    with pytest.raises(TypeError, match="labels: expected a Tensor"):
        TeacherTargets(labels=tf.ragged.constant([[1, 2], [3]]), example_id=[0, 1])


def test_fast_and_generic_decoders_agree_on_the_packed_tensor():
    value = TeacherTargets(labels=_extremes("int8"), logits=_special("float32"), example_id=np.arange(N) + BIG)
    ds = tf.data.Dataset.from_tensor_slices(value).batch(4)
    spec = ds.element_spec
    encoder = spec.__batch_encoder__
    flat = list(encoder.encode(spec, value))
    assert len(flat) == 1 and flat[0].dtype == tf.float32 and flat[0].shape == (N, 1 + 4 + 2)
    fast = spec._from_compatible_tensor_list(flat)  # eager: the NumPy split
    generic = targets_lib._GENERIC_FROM_TENSOR_LIST(spec, flat)  # TensorFlow's path through the encoder
    _assert_same(fast, value)
    _assert_same(generic, value)
    graph = tf.function(lambda p: tuple(tf.nest.flatten(spec._from_compatible_tensor_list([p]),
                                                        expand_composites=True)))(flat[0])  # graph: split
    want = tf.nest.flatten(value, expand_composites=True)
    assert [_bits(g.numpy()).tolist() for g in graph] == [_bits(w.numpy()).tolist() for w in want]
    # The encoder's own round trip (what tf.data's to/from tensor list do).
    _assert_same(encoder.decode(spec, encoder.encode(spec, fast)), value)


def test_eager_split_gives_tensors_on_the_packed_tensors_device():
    """Canary for ``tf.__internal__.EagerTensor(array, device, dtype enum)``, the eager split's constructor."""
    value = TeacherTargets(labels=np.array([3, 4], "uint16"), logits=np.ones((2, 2), "float16"),
                           example_id=np.array([BIG, BIG + 1]))
    spec = tf.type_spec_from_value(value)
    packing = spec.__batch_encoder__.packing(spec)
    packed = packing.encode([value.labels, value.logits, value.example_id])
    labels, logits, ids = packing.decode(packed)
    assert isinstance(labels, tf.__internal__.EagerTensor) and labels.device == packed.device
    assert labels.dtype == tf.uint16 and labels.numpy().tolist() == [3, 4]
    assert ids.numpy().tolist() == [BIG, BIG + 1] and logits.dtype == tf.float16
    # The new tensors own their data: ops on them work and leave the source alone.
    assert (labels + 1).numpy().tolist() == [4, 5] and (logits * 2).numpy().tolist() == [[2, 2], [2, 2]]
    assert packed.dtype == tf.float16 and tf.bitcast(packed, tf.uint16).numpy()[0, 0] == 3


def test_elements_of_the_cache_and_of_in_memory_targets_have_as_many_tensors_as_x_y(tmp_path):
    """Canary of issue 15: a distillation element (x, targets) is 2 tf.data tensors, as (x, y) is."""
    import keras

    x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
    y = np.arange(40, dtype="int32") % 3
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    teacher = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    memory = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=teacher.predict(x, verbose=0))))
    for top_k in (None, 2):
        cached = raw.apply(keras_kd.cache_teacher_logits(teacher, tmp_path / str(top_k), top_k=top_k, verbose=0))
        for ds in (cached, cached.batch(8), memory.batch(8), raw.batch(8)):
            assert len(tf.nest.flatten(ds.element_spec)) == 2
            assert sum(len(s._flat_tensor_specs) for s in tf.nest.flatten(ds.element_spec)) == 2
        batch = next(iter(cached.batch(40)))[1]
        assert batch.example_id.numpy().tolist() == list(range(40)) and batch.labels.numpy().tolist() == y.tolist()


def test_padded_batch_is_refused_as_for_any_extension_type():
    """tf.data pads plain tensors only (as before packing): a loud TypeError, never a wrong batch."""
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), logits=_logits(), example_id=np.arange(N) + BIG)
    with pytest.raises(TypeError, match="only supported for datasets that produce tensor elements"):
        tf.data.Dataset.from_tensor_slices(value).padded_batch(4)


@pytest.mark.parametrize("top_k", [False, True])
def test_distributed_dataset_and_empty_value(top_k):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    teacher = ({"topk_indices": np.zeros((N, 2), "int32"), "topk_values": _special("float32", (N, 2)),
                "topk_logsumexp": _special("float16", (N,))} if top_k else {"logits": _special("bfloat16")})
    value = TeacherTargets(labels=np.arange(N, dtype="int32"), example_id=np.arange(N) + BIG, **teacher)
    ds = tf.data.Dataset.from_tensor_slices(value).batch(4)
    assert len(ds.element_spec._flat_tensor_specs) == 1
    seen = []
    for batch in strategy.experimental_distribute_dataset(ds):
        local = strategy.experimental_local_results(batch)[0]
        assert local.labels.dtype == tf.int32
        seen += (local.example_id.numpy() - BIG).tolist()
        _assert_same(local, _take(value, local.labels))
    assert sorted(seen) == list(range(N))

    # In a replica's step (graph decoding on the replica's device).
    @tf.function
    def step(iterator):
        def replica(t):
            return t.example_id - tf.cast(t.labels, tf.int64), tf.bitcast(tf.nest.flatten(teacher and (
                t.logits if not top_k else t.topk_values))[0], tf.uint8)
        return strategy.run(replica, args=(next(iterator),))

    diff, bits = step(iter(strategy.experimental_distribute_dataset(ds)))
    assert strategy.experimental_local_results(diff)[0].numpy().tolist() == [BIG] * 4
    want = value.topk_values if top_k else value.logits
    np.testing.assert_array_equal(strategy.experimental_local_results(bits)[0].numpy().reshape(4, -1),
                                  _bits(want.numpy()[:4]))
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
