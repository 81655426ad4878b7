"""The dataset side of `Aligned`: teacher logits and features next to each example.

Each ``(x, y[, sample_weight])`` becomes
``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t)[, sample_weight])``:
the teacher features ride in ``x`` (they are inputs of `Aligned.model`), the
logits in the `keras_kd.targets` contract, so `keras_kd.DistillationLoss` and
the user's metrics work unchanged. `attach` runs the teacher online on each
batch; `cache_transform` pairs stored rows of the feature cache by position.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _checks
from keras_kd import _feature_cache
from keras_kd import _storage
from keras_kd import targets as targets_lib


def check_elements(dataset, argument="dataset"):
    """The element spec of a ``(x, y[, sample_weight])`` dataset without teacher targets."""
    _checks.require_dataset(dataset, argument)
    spec = dataset.element_spec
    _, y_spec, _ = _checks.split_element(spec)
    if isinstance(y_spec, targets_lib.TeacherTargets.Spec) and (
        y_spec.logits is not None or y_spec.topk_values is not None or y_spec.inputs is not None
    ):
        raise ValueError(
            "The dataset already carries teacher targets. Give `attach`/`cache_features` the "
            "dataset without teacher (plain (x, y), or with example ids only): they add the "
            "teacher's logits and features together."
        )
    return spec


def pack(x, y, sample_weight, logits, features, example_id=None):
    """One element for `Aligned.model`: student inputs and teacher features, then targets."""
    flat = tuple(tf.nest.flatten(x))
    feats = tuple(tf.cast(f, tf.float32) for f in features)
    logits = tf.cast(logits, tf.float32)
    if targets_lib.is_targets(y):  # e.g. example ids from `add_example_ids`: keep them
        targets = y.replace(logits=logits)
    else:
        targets = targets_lib.TeacherTargets(labels=y, logits=logits, example_id=example_id)
    return (flat + feats, targets, *sample_weight)


def attach(aligned, dataset, num_parallel_calls=None):
    """`Aligned.attach`: the online teacher's logits and features on every batch."""
    spec = check_elements(dataset)
    if _checks.is_batched(spec[0], aligned.teacher) is False:
        raise ValueError(
            f"`attach` received unbatched elements (x spec {spec[0]}). It runs the teacher on "
            "the batch the student sees: apply it after `.batch(...)`, or use "
            "`cache_features` on the unbatched dataset."
        )
    extractor = aligned.feature_extractor

    def run(x, y, *sample_weight):
        logits, *features = extractor(x, training=False)
        return pack(x, y, sample_weight, logits, features)

    if num_parallel_calls is None:
        return dataset.map(run)
    return dataset.map(run, num_parallel_calls=num_parallel_calls, deterministic=True)


def check_cache_options(directory, dtype, batch_size, on_mismatch, in_memory):
    """Checks `Aligned.cache_features`'s options; returns the resolved directory (or None)."""
    _checks.one_of(dtype, "dtype", ("float16", "float32"))
    if _checks.positive_int(batch_size, "batch_size") > _storage.MAX_BLOCK_ROWS:
        raise ValueError(
            f"Expected `batch_size` <= {_storage.MAX_BLOCK_ROWS}. Received: batch_size={batch_size!r}"
        )
    _checks.one_of(on_mismatch, "on_mismatch", ("error", "rebuild"))
    _checks.one_of(in_memory, "in_memory", (None, True, False))
    return None if directory is None else _storage.resolve_directory(directory, "feature cache")


def cache_transform(aligned, directory, dtype, batch_size, on_mismatch, in_memory):
    """`Aligned.cache_features`'s ``dataset -> dataset`` transform (options already checked)."""

    def transform(dataset):
        spec = check_elements(dataset)
        if _checks.is_batched(spec[0], aligned.teacher):
            raise ValueError(
                f"`cache_features` received batched elements (x spec {spec[0]}). Apply it to the "
                "raw, unbatched dataset, then shuffle and batch the result."
            )
        cardinality = int(dataset.cardinality())
        if cardinality == int(tf.data.INFINITE_CARDINALITY):
            raise ValueError(
                "`cache_features` received an infinite dataset (e.g. after `.repeat()`). Apply it "
                "before `.repeat()`."
            )
        table = _feature_cache.FeatureTable.get(
            aligned, dataset, directory, dtype, batch_size, on_mismatch, in_memory
        )
        if cardinality < 0:
            # Unknown size: fail loudly rather than pair a longer or shorter dataset.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(table.count))

        def pair(position, element):
            (x, y, *sample_weight), (logits, *features) = element
            return pack(x, y, sample_weight, logits, features, example_id=position)

        out = tf.data.Dataset.zip((dataset, table.dataset())).enumerate().map(pair)
        return out.apply(tf.data.experimental.assert_cardinality(table.count))

    return transform
