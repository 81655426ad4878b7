"""Example ids: number the examples of a dataset for per-example reweighting."""

import tensorflow as tf

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
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"Expected `dataset` to be a tf.data.Dataset. Received: {type(dataset).__name__}.")
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
