"""The alignment feature cache (`keras_kd.Aligned.cache_features`) on keras_kd's
one storage engine.

Row ``n`` holds the teacher's logits (field ``logits``, float32) and its
tapped features (fields ``feature_0 ... feature_{P-1}``, float16 or float32)
for the ``n``-th example. It is built and opened by the same flow as the
teacher-logit cache (`keras_kd.cache.build.Build.ensure`), with every one of
its guarantees: own names and marker, locks, fresh generation names with an
atomic manifest switch, a schema-validated manifest, CRC32 of every file, a
fingerprint of the teacher's function (architecture and weights) and of
every element's inputs, and a re-run of the teacher on the first examples
when an existing cache is opened.

Used by `keras_kd.alignment` through `FeatureTable.get`, `resolve_directory`
and `MAX_BATCH_SIZE`.
"""

from typing import Optional

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd.cache import build as build_lib
from keras_kd.cache import fingerprint
from keras_kd.cache.files import resolve_directory  # noqa: F401 - part of this module's API
from keras_kd.cache.format import FLOAT16_MAX
from keras_kd.cache.format import FLOAT_DTYPES as _DTYPES
from keras_kd.cache.format import MAX_BLOCK_ROWS
from keras_kd.cache.format import MAX_ROWS
from keras_kd.cache.format import Layout
from keras_kd.cache.store import Store
from keras_kd.cache.store import Stored
from keras_kd.data import teachers as teachers_lib

FORMAT = "keras_kd.feature_cache"
MAX_BATCH_SIZE = MAX_BLOCK_ROWS  # a build batch is one stored block
_SAMPLE = 4  # first examples read twice to detect a dataset that changes between passes


def store(directory: str) -> Store:
    return Store(directory, "feature_cache", FORMAT, "features", "feature cache")


def _layout(block_rows, logits_shape, feature_shapes, dtype) -> Layout:
    fields = [("logits", "<f4", tuple(logits_shape))]
    fields += [(f"feature_{i}", _DTYPES[dtype], tuple(s)) for i, s in enumerate(feature_shapes)]
    return Layout(block_rows, fields)


def _names(num_features: int) -> list:
    return ["logits"] + [f"feature_{i}" for i in range(num_features)]


def _validate_extra(schema, m):
    fp = m["fingerprint"]
    dtype = schema.get(m, "dtype", str)
    if dtype not in _DTYPES or fp.get("dtype") != dtype:
        schema.fail("dtype", f"must be 'float16' or 'float32' and match the fingerprint, got {dtype!r:.80}")
    if schema.int(m, "count", 1, MAX_ROWS) != m["num_examples"]:
        schema.fail("count", f"must equal num_examples={m['num_examples']}")
    try:
        expected = _layout(m["layout"]["block_rows"], fp["logits_shape"], [p[2] for p in fp["pairs"]], dtype)
        ok = expected.to_json() == m["layout"]
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        schema.fail("layout", "does not match the fingerprint's logits_shape, pairs and dtype")


def _diff(old: dict, new: dict, num_examples) -> list:
    changes = []
    labels = {
        "teacher_weights": "the teacher's weights",
        "teacher_architecture": "the teacher's architecture or configuration (layers, activations, taps)",
        "pairs": "the aligned layer pairs",
        "logits_shape": "the teacher's logits shape",
        "dtype": "the feature dtype",
        "element_spec": "the dataset's element_spec",
        "student_inputs_digest": "the student's inputs (student_inputs)",
    }
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            changes.append(f"{key} changed ({label}): {str(old.get(key))[:60]} -> {str(new.get(key))[:60]}")
    if num_examples != new["count"]:
        changes.append(f"count changed (the dataset's size): {num_examples} -> {new['count']} examples")
    if old.get("inputs_digest") != new.get("inputs_digest"):
        changes.append(
            "the dataset's contents changed: the inputs `x` of its elements, or their order, are not those "
            "the cache was built from; shuffle or augment after the transform, not before"
        )
    return changes


class FeatureTable:
    """Teacher logits and features, row ``n`` for the ``n``-th example.

    Args:
        rows: a dataset of ``(logits, feature_0, ...)`` rows.
        count: number of examples.
    """

    def __init__(self, rows: tf.data.Dataset, count: int):
        self.rows, self.count = rows, count

    @classmethod
    def of(cls, stored: Stored, num_features: int) -> "FeatureTable":
        select = lambda fields: tuple(fields[n] for n in _names(num_features))  # noqa: E731
        return cls(stored.rows(select, select), stored.count)

    def dataset(self) -> tf.data.Dataset:
        """Unbatched ``(logits, feature_0, ...)`` rows, exactly ``count`` of them."""
        return self.rows.apply(tf.data.experimental.assert_cardinality(self.count))

    @classmethod
    def get(
        cls,
        aligned,
        dataset,
        directory: Optional[str],
        dtype,
        batch_size,
        on_mismatch,
        in_memory=None,
        student_digest_dataset=None,
    ):
        """The table for ``dataset``: read from ``directory`` if it matches, else computed (and stored).

        ``dataset`` yields the teacher's view ``(x, ...)``; ``student_digest_dataset``
        (optional) yields the student's ``(x, ...)``: its inputs digest joins
        the fingerprint, so a changed ``student_inputs`` is refused.
        """
        if fingerprint.changes_between_passes(dataset, _SAMPLE):
            raise ValueError(
                "The dataset given to `cache_features` yields different examples each time it is "
                "read (shuffling or random augmentation before the transform?). Cache the raw, "
                "ordered dataset and shuffle/augment after the transform."
            )
        _check_fixed_shapes(dataset)
        extractor = aligned.feature_extractor
        logits_shape = [int(d) for d in extractor.outputs[0].shape[1:]]
        feature_shapes = [[int(d) for d in t.shape[1:]] for t in extractor.outputs[1:]]
        digest, count = fingerprint.inputs_digest(dataset)
        if count == 0:
            raise ValueError("`cache_features` received an empty dataset.")
        fp = {
            "teacher_weights": fingerprint.weights_digest(aligned.teacher),
            "teacher_architecture": fingerprint.architecture_digest(extractor),
            "pairs": [[p.student_layer, p.teacher_layer, list(p.teacher_shape)] for p in aligned.pairs],
            "logits_shape": logits_shape,
            "dtype": dtype,
            "element_spec": repr(dataset.element_spec),
            "count": count,
            "inputs_digest": digest,
        }
        if student_digest_dataset is not None:
            fp["student_inputs_digest"] = fingerprint.inputs_digest(student_digest_dataset)[0]
        step = _extract_step(extractor, dataset)
        names = _names(len(feature_shapes))
        if directory is None:
            chunks = list(_produce(step, dataset, 0, count, batch_size, dtype))
            arrays = tuple(np.concatenate([c[n] for c in chunks]) for n in names)
            return cls(tf.data.Dataset.from_tensor_slices(arrays), count)
        st = store(directory)
        st.owned()
        build = build_lib.Build(
            st,
            fp,
            _layout(batch_size, logits_shape, feature_shapes, dtype),
            count,
            0,
            1,
            diff=lambda old, n: _diff(old, fp, n),
            extra=lambda lay: {"count": count, "dtype": dtype, "pairs": fp["pairs"]},
            validate_extra=_validate_extra,
            checksum=True,
            say=lambda message: None,
        )

        def probe(stored, manifest):
            rows = build_lib.probe_rows(manifest)
            x = next(iter(dataset.map(lambda x, *rest: x).take(rows).batch(rows)))
            fresh = dict(zip(names, (np.asarray(o, np.float32) for o in step(x))))
            first = stored.first_rows(rows)
            return build_lib.probe_mismatch(fresh, first, "feature cache", st.directory, rows)

        _, stored = build.ensure(
            probe=probe,
            produce=lambda start, rows, lay: _produce(step, dataset, start, rows, lay.block_rows, dtype),
            blocks_per_file=build_lib.files_of,
            on_mismatch=on_mismatch,
            in_memory=in_memory,
            refuse_foreign_files=True,
        )
        return cls.of(stored, len(feature_shapes))


def _check_fixed_shapes(dataset):
    """Refuses inputs whose shape varies between examples (rows are stored in fixed-shape blocks)."""
    x_spec = dataset.element_spec[0]
    if not _checks.fixed_shapes(x_spec):
        raise ValueError(
            "`cache_features` needs inputs `x` of one known, fixed shape per example (its rows are "
            f"stored and batched in fixed-shape blocks). Received: x spec={x_spec}. If every example has "
            "the same shape, declare it, e.g. `dataset.map(lambda x, y: (tf.ensure_shape(x, [8, 8, 1]), y))`; "
            "if shapes vary (sequences, images of several sizes), pad or crop each example to one shape "
            "first, or distil logits only with `keras_kd.cache_teacher_logits`, which handles varying shapes."
        )


def _extract_step(extractor, dataset):
    if teachers_lib.runs_on_jax(extractor):  # a Keras 3 teacher on JAX cannot run on tf.Tensors
        return teachers_lib.tf_outputs(extractor)
    x_spec = dataset.map(lambda x, *rest: x).element_spec
    spec = tf.nest.map_structure(lambda s: tf.TensorSpec((None, *s.shape), s.dtype), x_spec)

    @tf.function(input_signature=[spec], autograph=False)
    def run(x):
        return extractor(x, training=False)

    return run


def _produce(step, dataset, start, rows, batch_size, dtype):
    """Teacher outputs for rows ``start ..< start + rows`` as dicts of field arrays."""
    batches = dataset.map(lambda x, *rest: x).skip(start).take(rows).batch(batch_size).prefetch(2)
    for x in batches:
        outputs = [o.numpy() for o in step(x)]
        inputs = [t.numpy() for t in tf.nest.flatten(x) if t.dtype.is_floating]
        if not all(np.isfinite(o).all() for o in outputs + inputs):
            raise ValueError(
                "The teacher's inputs, logits or features contain NaN or Inf; refusing to cache them. "
                "Check the dataset and the teacher."
            )
        if dtype == "float16" and any(np.abs(o).max(initial=0.0) > FLOAT16_MAX for o in outputs[1:]):
            raise ValueError(
                f"The teacher's features exceed float16's range ({FLOAT16_MAX:g}). Use dtype='float32'."
            )
        arrays = {"logits": outputs[0].astype(np.float32)}
        arrays.update({f"feature_{i}": o.astype(dtype) for i, o in enumerate(outputs[1:])})
        yield arrays
