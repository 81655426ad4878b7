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
from keras_kd import targets as targets_lib
from keras_kd.alignment.taps import compatible_shapes
from keras_kd.alignment.taps import feature_shape
from keras_kd.alignment.taps import fmt_shape
from keras_kd.cache import features as _feature_cache
from keras_kd.cache import fingerprint
from keras_kd.data import teachers as teachers_lib


def check_elements(dataset, argument="dataset"):
    """The element spec of a ``(x, y[, sample_weight])`` dataset without teacher targets."""
    _checks.require_dataset(dataset, argument)
    spec = dataset.element_spec
    _, y_spec, _ = _checks.split_element(spec)
    if targets_lib.carries_teacher(y_spec):
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


def _identity(x):
    return x


def _view_spec(dataset, fn, argument, per):
    """The spec of ``fn(x)`` over the dataset's ``x`` (traced, not run), or of ``x`` itself."""
    x_spec = dataset.element_spec[0]
    if fn is None:
        return x_spec
    try:
        return dataset.map(lambda x, *rest: fn(x)).element_spec
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, tf.errors.OpError) as e:
        raise ValueError(
            f"`{argument}` failed on the dataset's `x` (spec {x_spec}): {type(e).__name__}: {e}. It receives "
            f"`x` as the dataset holds it here, {per}, and returns the model's inputs."
        ) from e


def _check_fits(model, spec, batched, argument, role, given):
    """Refuses a view whose tensors cannot feed ``model`` (count, or shapes of tensors/lists)."""
    inputs, specs = model.inputs, tf.nest.flatten(spec)
    what = f"`{argument}(x)`" if given else f"`x` itself (no `{argument}` given)"
    fix = (
        f"Make `{argument}` return the {role}'s inputs."
        if given
        else f"Pass `{argument}=fn` to `align` to give the {role} its own inputs."
    )
    if len(specs) != len(inputs):
        raise ValueError(
            f"{what} gives {len(specs)} tensor(s), but the {role} {model.name!r} takes {len(inputs)} "
            f"input(s). {fix}"
        )
    if isinstance(spec, dict):  # matched by name inside the model; only the count is checked here
        return
    for s, t in zip(specs, inputs):
        if s.shape.rank is None:
            continue
        got = tuple(s.shape)[1:] if batched else tuple(s.shape)
        want = feature_shape(t)
        if not compatible_shapes(got, want):
            raise ValueError(
                f"{what} gives inputs of shape {fmt_shape(got, batch=False)} per example, but the {role} "
                f"{model.name!r} takes {fmt_shape(want, batch=False)}. {fix}"
            )


def views(aligned, dataset, batched: bool):
    """``(teacher view fn, student view fn)`` after checking both views fit their models."""
    per = "a batch (in `attach`)" if batched else "one example (in `cache_features`)"
    t_spec = _view_spec(dataset, aligned.teacher_inputs, "teacher_inputs", per)
    if batched and _checks.is_batched(t_spec, aligned.teacher) is False:
        raise ValueError(
            f"`attach` received unbatched elements (teacher input spec {t_spec}). It runs the teacher on "
            "the batch the student sees: apply it after `.batch(...)`, or use "
            "`cache_features` on the unbatched dataset."
        )
    if not batched and _checks.is_batched(t_spec, aligned.teacher):
        raise ValueError(
            f"`cache_features` received batched elements (teacher input spec {t_spec}). Apply it to the "
            "raw, unbatched dataset, then shuffle and batch the result."
        )
    if aligned.teacher_inputs is not None or aligned.student_inputs is not None:
        # `align` could not compare the two models' inputs: check each view here.
        s_spec = _view_spec(dataset, aligned.student_inputs, "student_inputs", per)
        given = aligned.teacher_inputs is not None, aligned.student_inputs is not None
        _check_fits(aligned.teacher, t_spec, batched, "teacher_inputs", "teacher", given[0])
        _check_fits(aligned.student, s_spec, batched, "student_inputs", "student", given[1])
    return aligned.teacher_inputs or _identity, aligned.student_inputs or _identity


def teacher_outputs(extractor):
    """``x -> [logits, f_1, ..., f_P]`` as TF tensors, for ``dataset.map``.

    A Keras 3 teacher in a JAX process cannot run on ``tf.Tensor``s: it runs
    through `keras_kd.data.teachers.tf_outputs` (a ``tf.numpy_function``
    around its jitted stateless call, all outputs from one call).
    """
    if not teachers_lib.runs_on_jax(extractor):
        return lambda x: extractor(x, training=False)
    return teachers_lib.tf_outputs(extractor)


def attach(aligned, dataset, num_parallel_calls=None):
    """`Aligned.attach`: the online teacher's logits and features on every batch."""
    check_elements(dataset)
    teacher_view, student_view = views(aligned, dataset, batched=True)
    extract = teacher_outputs(aligned.feature_extractor)

    def run(x, y, *sample_weight):
        logits, *features = extract(teacher_view(x))
        return pack(student_view(x), y, sample_weight, logits, features)

    if num_parallel_calls is None:
        return dataset.map(run)
    return dataset.map(run, num_parallel_calls=num_parallel_calls, deterministic=True)


def check_cache_options(directory, dtype, batch_size, on_mismatch, in_memory):
    """Checks `Aligned.cache_features`'s options; returns the resolved directory (or None)."""
    _checks.one_of(dtype, "dtype", ("float16", "float32"))
    if _checks.positive_int(batch_size, "batch_size") > _feature_cache.MAX_BATCH_SIZE:
        raise ValueError(
            f"Expected `batch_size` <= {_feature_cache.MAX_BATCH_SIZE}. Received: batch_size={batch_size!r}"
        )
    _checks.one_of(on_mismatch, "on_mismatch", ("error", "rebuild"))
    _checks.one_of(in_memory, "in_memory", (None, True, False))
    return None if directory is None else _feature_cache.resolve_directory(directory, "feature cache")


def cache_transform(aligned, directory, dtype, batch_size, on_mismatch, in_memory):
    """`Aligned.cache_features`'s ``dataset -> dataset`` transform (options already checked)."""

    def transform(dataset):
        check_elements(dataset)
        teacher_view, student_view = views(aligned, dataset, batched=False)
        cardinality = int(dataset.cardinality())
        if cardinality == int(tf.data.INFINITE_CARDINALITY):
            raise ValueError(
                "`cache_features` received an infinite dataset (e.g. after `.repeat()`). Apply it "
                "before `.repeat()`."
            )
        # The store sees the teacher's view: its fingerprint digests teacher_inputs(x) of every
        # element, and the teacher re-runs on that view when a stored cache is opened. With input
        # functions, the student's view joins the fingerprint too.
        teacher_ds, student_ds = dataset, None
        if aligned.teacher_inputs is not None or aligned.student_inputs is not None:
            teacher_ds = dataset.map(lambda x, *rest: (teacher_view(x), *rest))
            student_ds = dataset.map(lambda x, *rest: (student_view(x), *rest))
            if fingerprint.sample_digest(student_ds, 4) != fingerprint.sample_digest(student_ds, 4):
                raise ValueError(
                    "`student_inputs` gives different inputs each time the dataset is read (random "
                    "augmentation?). With `cache_features` it must be deterministic (its outputs are in the "
                    "cache's fingerprint); augment the student's view after the transform, e.g. "
                    "`cached.map(lambda x, y: ((augment(x[0]), *x[1:]), y))`."
                )
        table = _feature_cache.FeatureTable.get(
            aligned, teacher_ds, directory, dtype, batch_size, on_mismatch, in_memory,
            student_digest_dataset=student_ds,
        )  # fmt: skip
        if cardinality < 0:
            # Unknown size: fail loudly rather than pair a longer or shorter dataset.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(table.count))

        def pair(position, element):
            (x, y, *sample_weight), (logits, *features) = element
            return pack(student_view(x), y, sample_weight, logits, features, example_id=position)

        out = tf.data.Dataset.zip((dataset, table.dataset())).enumerate().map(pair)
        return out.apply(tf.data.experimental.assert_cardinality(table.count))

    return transform
