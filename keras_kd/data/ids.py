"""Example ids and unlabelled data: what each example carries besides its inputs."""

import warnings

import tensorflow as tf

from keras_kd import _checks
from keras_kd import _labels
from keras_kd import targets as targets_lib


def add_example_ids(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Numbers the examples of an **unbatched** dataset by position.

    ``(x, y[, sample_weight])`` becomes
    ``(x, TeacherTargets(labels=y, example_id=i)[, sample_weight])`` with
    ``i = 0, 1, ...`` in dataset order; a dataset of ``x`` alone (unlabelled
    data) becomes ``(x, TeacherTargets(labels=0, has_labels=False, example_id=i))``.
    Apply it before shuffling; `with_teacher` keeps the ids, and
    `keras_kd.HardSampleReweighting` reads them. (The teacher-logit cache adds
    ids itself.)

    Example:

    ```python
    ds = keras_kd.add_example_ids(raw_ds)       # unbatched (x, y)
    ds = rew.attach(ds).shuffle(10_000).batch(64)
    student.fit(keras_kd.with_teacher(ds, teacher), callbacks=[rew])
    ```
    """
    _checks.require_dataset(dataset)
    spec = dataset.element_spec
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        if isinstance(spec[1], targets_lib.TeacherTargets.Spec):
            raise ValueError("The dataset already carries TeacherTargets; add example ids before other transforms.")

        def number(i, element):
            x, y, *sample_weight = element
            return (x, targets_lib.TeacherTargets(labels=y, example_id=i), *sample_weight)

    else:

        def number(i, x):
            placeholder = tf.zeros([], tf.int64)
            return x, targets_lib.TeacherTargets(labels=placeholder, example_id=i, has_labels=False)

    return dataset.enumerate().map(number)


def unlabelled(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Marks every example of a dataset of inputs as unlabelled: ``x -> (x, NO_LABEL)``.

    For transfer sets (Hinton et al. 2015; Ba & Caruana 2014): extra inputs
    without labels that the student learns from through the teacher alone.
    `keras_kd.DistillationLoss` gives such examples no hard-label term (only
    the distillation term), so they can be mixed with labelled data, e.g. with
    ``tf.data.Dataset.sample_from_datasets``. Each element is taken as ``x``
    whatever its structure (a tuple is a multi-input ``x``); to drop the
    labels of ``(x, y)`` elements, map first: ``ds.map(lambda x, y: x)``
    (a 2-tuple whose second part looks like labels, integer of rank 0 or 1,
    warns).

    The label is the scalar `keras_kd.NO_LABEL` (``-1``, ``int64``), one per
    element: apply this **before** ``.batch(...)``, and give the labelled data
    ``int64`` labels too to mix the two (``tf.cast(y, tf.int64)``).

    Args:
        dataset: an unbatched ``tf.data.Dataset`` of inputs ``x``.

    Returns:
        A dataset of ``(x, NO_LABEL)``.

    Raises:
        TypeError: if ``dataset`` is not a tf.data.Dataset.
        ValueError: if ``dataset`` is batched, as far as its spec tells
            (every input starts with an axis of unknown size, what
            ``.batch()`` gives): one label per batch is not one per example.

    Warns:
        UserWarning: when the elements are 2-tuples whose second part looks
            like labels (an integer tensor of rank 0 or 1): they become a
            two-input ``x``.

    Example:

    ```python
    extra = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x_extra))
    labelled = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    mixed = tf.data.Dataset.sample_from_datasets([labelled, extra], seed=0)
    ds = keras_kd.with_teacher(mixed.shuffle(10_000).batch(64), teacher)
    ```
    """
    _checks.require_dataset(dataset)
    spec = dataset.element_spec
    leaves = tf.nest.flatten(spec)
    if leaves and all(isinstance(s, tf.TensorSpec) and s.shape.rank and s.shape[0] is None for s in leaves):
        shapes = ", ".join(str(s.shape) for s in leaves)
        raise ValueError(
            f"`keras_kd.unlabelled` received batched elements (inputs of shapes {shapes}); it gives one "
            "label per element, and the loss needs one label per example: apply `keras_kd.unlabelled` "
            "before `.batch()`, e.g. keras_kd.unlabelled(raw_ds).batch(64)."
        )
    if (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], tf.TensorSpec)
            and spec[1].dtype.is_integer and spec[1].shape.rank is not None and spec[1].shape.rank <= 1):
        warnings.warn(
            f"`keras_kd.unlabelled` received (x, y)-like elements (second part {spec[1]}, which looks like "
            "labels); it makes each element a two-input x. To drop the labels, map first: "
            "keras_kd.unlabelled(ds.map(lambda x, y: x)).",
            UserWarning,
            stacklevel=2,
        )
    return dataset.map(lambda *x: (x[0] if len(x) == 1 else x, tf.constant(_labels.NO_LABEL, tf.int64)))

