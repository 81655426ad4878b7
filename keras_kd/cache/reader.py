"""The output pipeline of the teacher-logit cache: each element with its own stored row.

Pairing is by position: the ``i``-th element of the dataset given to the
transform gets row ``i``. Without augmentation, rows are selected once (for
all rows in memory, or once per block when streaming) and zipped with the
elements; the per-element function only wraps ready tensors in
`TeacherTargets`. With augmentation, one stored view per example is chosen
per block and pass, and the element's inputs are re-created with that view's
seed, so the student sees exactly what the teacher saw.
"""

import numpy as np
import tensorflow as tf

from keras_kd import targets as targets_lib
from keras_kd.cache.teacher import seed_of


def _targets(labels, fields, top_k, example_id):
    if top_k is None:
        return targets_lib.TeacherTargets(labels=labels, logits=fields[0], example_id=example_id)
    return targets_lib.TeacherTargets(
        labels=labels, topk_values=fields[0], topk_indices=fields[1], topk_logsumexp=fields[2], example_id=example_id
    )


def _view0(top_k, cast_indices):
    """Selects the stored fields of view 0 (indices as int32) from a block or from all rows."""
    if top_k is None:
        return lambda a: (a["values"][:, 0],)
    return lambda a: (a["values"][:, 0], cast_indices(a["indices"][:, 0]), a["logsumexp"][:, 0])


def read(dataset, manifest, stored, teachers) -> tf.data.Dataset:
    """``(x, TeacherTargets[, sample_weight])`` for every element of ``dataset``, in order.

    Args:
        dataset: the labelled dataset given to the transform.
        manifest: the cache's validated manifest.
        stored: its `keras_kd.cache.store.Stored` rows.
        teachers: the `keras_kd.cache.teacher.Teachers` (augmentation and input transforms).
    """
    top_k = manifest["top_k"]
    n = int(manifest["num_examples"])
    if int(dataset.cardinality()) < 0:
        # Unknown size: fail loudly rather than pair a longer or shorter dataset.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(n))
    if teachers.augment is None:
        out = _rows(dataset, stored, top_k, n, teachers)
    else:
        out = _views(dataset, stored, top_k, n, int(manifest["layout"]["block_rows"]), int(manifest["views"]), teachers)
    return out.apply(tf.data.experimental.assert_cardinality(n))


def _rows(dataset, stored, top_k, n, teachers):
    # Measured (1,257 x 64, shuffle + batch 64): as fast as TeacherTargets
    # sliced from memory; any op per element (even an index) or splitting
    # dataset batches (batch -> zip -> unbatch) was 2.5-5x slower.
    rows = stored.rows(_view0(top_k, lambda i: i.astype(np.int32)), _view0(top_k, lambda i: tf.cast(i, tf.int32)))
    student_inputs = teachers.student_inputs

    def pair(element, fields, example_id):
        x, y, *sample_weight = element
        if student_inputs is not None:
            x = student_inputs(x)
        return (x, _targets(y, fields, top_k, example_id), *sample_weight)

    return tf.data.Dataset.zip((dataset, rows, tf.data.Dataset.range(n))).map(pair)


def _views(dataset, stored, top_k, n, rows, views, teachers):
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
        return (teachers.student_view(x, view_seed), _targets(y, fields, top_k, example_id), *sample_weight)

    return tf.data.Dataset.zip((dataset, per_example)).map(
        replay, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
