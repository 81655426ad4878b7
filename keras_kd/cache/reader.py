"""The output pipeline of the teacher-logit cache: each element with its own stored row.

Pairing is by position: the ``i``-th element of the dataset given to the
transform gets row ``i``. Without augmentation, rows are selected once (for
all rows in memory, or once per block when streaming) and zipped with the
elements; the pairing function only wraps ready tensors in `TeacherTargets`
(a batch at a time where the elements have fixed shapes). With augmentation,
one stored view per example is chosen per block and pass, and the element's
inputs are re-created with that view's seed, so the student sees exactly what
the teacher saw.
"""

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import targets as targets_lib
from keras_kd.cache.teacher import seed_of

# A dataset whose elements (inputs, labels, weights) total at most this many
# bytes is held whole in memory with its targets when its rows are.
SMALL_ELEMENTS_BYTES = 64 << 20
_READ_BATCH = 1024


def _targets(labels, fields, top_k, example_id, labelled):
    if top_k is None:
        return targets_lib.TeacherTargets(
            labels=labels, logits=fields[0], example_id=example_id, has_labels=labelled
        )
    return targets_lib.TeacherTargets(
        labels=labels,
        topk_values=fields[0],
        topk_indices=fields[1],
        topk_logsumexp=fields[2],
        example_id=example_id,
        has_labels=labelled,
    )


def _view0(top_k, cast_indices):
    """Selects the stored fields of view 0 (indices as int32) from a block or from all rows."""
    if top_k is None:
        return lambda a: (a["values"][:, 0],)
    return lambda a: (a["values"][:, 0], cast_indices(a["indices"][:, 0]), a["logsumexp"][:, 0])


def read(dataset, manifest, stored, teachers, labelled=True) -> tf.data.Dataset:
    """``(x, TeacherTargets[, sample_weight])`` for every element of ``dataset``, in order.

    Three readers, chosen automatically:

    - without augmentation, rows held in memory and elements of fixed shapes
      totalling at most `SMALL_ELEMENTS_BYTES`: the elements are read once and
      the output is ``from_tensor_slices`` of them with their targets (an
      epoch then costs what iterating in-memory arrays costs);
    - without augmentation otherwise: the stored rows zipped with the elements;
    - with augmentation: one stored view per example and pass, its inputs replayed.

    Args:
        dataset: the labelled dataset given to the transform.
        manifest: the cache's validated manifest.
        stored: its `keras_kd.cache.store.Stored` rows.
        teachers: the `keras_kd.cache.teacher.Teachers` (augmentation and input transforms).
        labelled: False for unlabelled data (targets with ``has_labels=False``).
    """
    top_k = manifest["top_k"]
    n = int(manifest["num_examples"])
    if int(dataset.cardinality()) < 0:
        # Unknown size: fail loudly rather than pair a longer or shorter dataset.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(n))
    if teachers.augment is not None:
        rows = int(manifest["layout"]["block_rows"])
        out = _views(dataset, stored, top_k, n, rows, int(manifest["views"]), teachers, labelled)
    else:
        if teachers.student_inputs is not None:
            student_inputs = teachers.student_inputs
            dataset = dataset.map(lambda x, *rest: (student_inputs(x), *rest))
        out = None
        if stored.in_memory and _small(dataset.element_spec, n):
            out = _in_memory(dataset, stored, top_k, n, labelled)
        if out is None:
            out = _rows(dataset, stored, top_k, n, labelled)
    if int(out.cardinality()) != n:
        out = out.apply(tf.data.experimental.assert_cardinality(n))
    return out


def _small(spec, n) -> bool:
    """Whether the elements are numeric tensors of fixed shapes, at most `SMALL_ELEMENTS_BYTES` in all."""
    if not _checks.fixed_shapes(spec):
        return False
    flat = tf.nest.flatten(spec)
    if not all(s.dtype.is_numpy_compatible and s.dtype != tf.string for s in flat):
        return False
    per_example = sum(s.shape.num_elements() * s.dtype.size for s in flat)
    return per_example * n <= SMALL_ELEMENTS_BYTES


def _in_memory(dataset, stored, top_k, n, labelled):
    """The whole output from memory: the elements read once, sliced with their targets."""
    spec = dataset.element_spec
    parts = [[] for _ in tf.nest.flatten(spec)]
    for batch in dataset.batch(_READ_BATCH).prefetch(2):
        for part, t in zip(parts, tf.nest.flatten(batch)):
            part.append(t.numpy())
    arrays = [np.concatenate(p) for p in parts]
    if len(arrays[0]) != n:
        return None  # the size changed since the fingerprint pass: the zip reader asserts it
    x, y, *sample_weight = tf.nest.pack_sequence_as(spec, arrays)
    fields = _view0(top_k, lambda i: i.astype(np.int32))(stored.arrays)
    targets = _targets(y, fields, top_k, np.arange(n, dtype=np.int64), labelled)
    return tf.data.Dataset.from_tensor_slices((x, targets, *sample_weight))


def _rows(dataset, stored, top_k, n, labelled):
    rows = stored.rows(
        _view0(top_k, lambda i: i.astype(np.int32)), _view0(top_k, lambda i: tf.cast(i, tf.int32))
    )

    def pair(element, fields, example_id):
        x, y, *sample_weight = element
        return (x, _targets(y, fields, top_k, example_id, labelled), *sample_weight)

    # Example ids from a zipped `range`: measured cheaper than computing them per block.
    parts = (dataset, rows, tf.data.Dataset.range(n))
    if not _checks.fixed_shapes(dataset.element_spec):
        return tf.data.Dataset.zip(parts).map(pair)
    # Packing the targets into one tensor (`targets._TargetsBatchEncoder`) is
    # ops, and a map with ops runs a function per element where a map that
    # only rearranges its tensors is short-circuited. Measured (4,000 x 40,
    # iterating shuffle + batch 128, process CPU / raw): packed per element
    # 15x, packed a batch at a time 2.2x, TensorFlow's 4-tensor encoding per
    # element 1.8x (before packing, the batchwise pairing measured 2.5-5x
    # against that short-circuited map). Elements of fixed shapes are paired
    # a batch at a time; the others keep the per-element map.
    return tf.data.Dataset.zip(tuple(part.batch(_READ_BATCH) for part in parts)).map(pair).unbatch()


def _views(dataset, stored, top_k, n, rows, views, teachers, labelled):
    seed = teachers.seed
    blocks = tf.data.Dataset.zip((tf.data.Dataset.range(stored.num_blocks), stored.blocks()))
    # One key per block and pass: a new choice of views on every pass (epoch), reproducible from `seed`.
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def per_block(block, key):
        """The chosen view's fields and seed for each example of one block."""
        block_id, fields = block
        count = tf.minimum(tf.cast(rows, tf.int64), n - block_id * rows)
        example_id = block_id * rows + tf.range(count)
        view = tf.random.stateless_uniform(
            tf.reshape(count, [1]), seed=tf.stack([key, block_id]), minval=0, maxval=views, dtype=tf.int64
        )
        chosen = {k: tf.gather(v[:count], view, batch_dims=1) for k, v in fields.items()}
        if top_k is None:
            picked = (chosen["values"],)
        else:
            picked = (chosen["values"], tf.cast(chosen["indices"], tf.int32), chosen["logsumexp"])
        return picked, example_id, seed_of(seed, example_id, view, views)

    per_example = tf.data.Dataset.zip((blocks, keys)).map(per_block).unbatch()

    def replay(element, chosen):
        (x, y, *sample_weight), (fields, example_id, view_seed) = element, chosen
        targets = _targets(y, fields, top_k, example_id, labelled)
        return (teachers.student_view(x, view_seed), targets, *sample_weight)

    return tf.data.Dataset.zip((dataset, per_example)).map(
        replay, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
