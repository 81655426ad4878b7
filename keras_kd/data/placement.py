"""Where `with_teacher(placement="auto")` runs the teacher.

On a machine without an accelerator the two placements run the same
computation on the same CPU cores, and what differs is overlap: in the step
the teacher's forward pass and the student's step run one after the other
(as in ``keras.distillation.Distiller``), in the tf.data pipeline the next
batches' teacher passes run while the student trains, at the cost of about a
millisecond of tf.data function overhead per batch. Measured on issue 15's
workloads (2-core CPU, 2026-12-03), the pipeline epoch relative to the step
epoch is about 0.8 for teachers of 1.4e8 to 1.1e9 multiply-adds per batch and
about 1.0 to 1.5 at 5e6 to 7e7, so "auto" picks the pipeline from
`PIPELINE_MIN_MACS` per batch on.

The rule never reads the dataset: a batch read to learn its size would be a
batch taken from the user's pipeline (a one-shot generator loses it, a seeded
reshuffling ``shuffle`` moves on to its next order). Where the batch size is
not static (``batch()`` without ``drop_remainder``), it counts
`ASSUMED_BATCH`, Keras's default batch size and smaller than most training
batches, so a teacher is moved to the pipeline only when it pays off at that
size too.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _compat

# Teacher multiply-adds per batch from which the pipeline placement pays off
# on a CPU-only machine (see the module docstring).
PIPELINE_MIN_MACS = 1e8
# The batch size counted where it is not static (Keras's default).
ASSUMED_BATCH = 32


def auto_placement(teachers, on_jax, dataset) -> str:
    """``"step"`` or ``"pipeline"``: the placement ``"auto"`` stands for.

    * JAX backend: ``"step"`` when every teacher can run in a JAX step
      (Keras 3 models), else ``"pipeline"``.
    * TensorFlow with a GPU or TPU: ``"step"`` (the pipeline would run the
      teacher on the host CPU).
    * TensorFlow on CPU only: ``"pipeline"`` when the teachers' parameter
      count times the batch size (a lower bound of their multiply-adds per
      batch: every weight is used at least once per example) reaches
      `PIPELINE_MIN_MACS`, else ``"step"``. The batch size is the static
      one, else `ASSUMED_BATCH`. Teachers without a parameter count
      (functions, unbuilt models) stay in the step.

    Args:
        teachers: the list of teacher members.
        on_jax: per member, whether it can run inside a JAX step.
        dataset: the batched ``(x, y[, sample_weight])`` dataset (only its
            ``element_spec`` is read).

    Returns:
        ``"step"`` or ``"pipeline"``.
    """
    if _compat.is_jax_backend():
        return "step" if all(on_jax) else "pipeline"
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return "step"
    params = teacher_parameters(teachers)
    if not params:
        return "step"
    batch = static_batch_size(dataset) or ASSUMED_BATCH
    return "pipeline" if params * batch >= PIPELINE_MIN_MACS else "step"


def teacher_parameters(teachers):
    """Total parameter count of the members, or None if one has none."""
    total = 0
    for teacher in teachers:
        count = getattr(teacher, "count_params", None)
        if count is None:
            return None
        try:
            total += int(count())
        except ValueError:  # an unbuilt model
            return None
    return total


def static_batch_size(dataset):
    """The static leading dimension of the first tensor of ``x`` in a dataset
    of ``(x, y[, sample_weight])`` batches, or None where it is not static."""
    flat = tf.nest.flatten(dataset.element_spec[0])
    shape = getattr(flat[0], "shape", None) if flat else None
    if not isinstance(shape, tf.TensorShape) or not shape.rank or shape[0] is None:
        return None
    return int(shape[0])
