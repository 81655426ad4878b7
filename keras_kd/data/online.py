"""The online teacher: `with_teacher` attaches the teacher's logits to every batch.

Each batch the student sees gets the teacher's logits for exactly that batch,
computed in the tf.data pipeline or inside the training step.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional

import tensorflow as tf

from keras_kd import _checks
from keras_kd import targets as targets_lib
from keras_kd.data import _pack_map
from keras_kd.data import placement as placement_lib
from keras_kd.data import teachers as teachers_lib
from keras_kd.data.softmax import warn_if_softmax

_PLACEMENTS = ("auto", "pipeline", "step")
_keys = itertools.count()
_NON_FINITE = (
    "keras_kd.with_teacher: the teacher's logits contain NaN or Inf (placement='pipeline'). "
    "Check the teacher's weights and the inputs it received; DistillationLoss would otherwise "
    "train on them."
)


def with_teacher(
    dataset: tf.data.Dataset,
    teacher,
    *,
    placement: str = "auto",
    output_index=0,
    num_parallel_calls: Optional[int] = tf.data.AUTOTUNE,
    ensemble: str = "mean_logits",
    teacher_inputs: Optional[Callable] = None,
    student_inputs: Optional[Callable] = None,
) -> tf.data.Dataset:
    """Attaches the online teacher's logits to every batch of a dataset.

    Each ``(x, y[, sample_weight])`` batch becomes
    ``(x, TeacherTargets(labels=y, logits=teacher(x, training=False))[, sample_weight])``:
    the teacher runs in inference mode on exactly the batch the student sees,
    so shuffling and augmentation before this transform stay consistent.
    ``x`` and ``sample_weight`` are passed through unchanged, and the user's
    metrics still see ``y``.

    Several teachers (an ensemble, Hinton et al. 2015): pass a list of models.
    Each runs on the same batch; ``ensemble="mean_logits"`` attaches the mean
    of their logits, ``"mean_probs"`` attaches ``log(mean_i softmax(t_i))``,
    the ensemble's predictive distribution as logits.

    Teacher and student on different inputs (a teacher at a higher resolution,
    or with privileged features, Lopez-Paz et al. 2016): the teacher(s) receive
    ``teacher_inputs(x)`` and the element's model input becomes
    ``student_inputs(x)``. Both run in the tf.data pipeline (so they may be any
    TensorFlow function of the batch) in either placement: with
    ``placement="step"`` the step receives ``student_inputs(x)`` as its model
    input and ``teacher_inputs(x)`` inside the targets, where the in-step
    teacher reads it. Augment (e.g. `keras_kd.mixup`) before this transform
    and both views come from the same augmented ``x``.

    Where the teacher runs (``placement``):

    * ``"auto"`` (default): on the JAX backend ``"step"``, except for
      teachers that cannot run in a JAX step (tf_keras models, TensorFlow
      callables): ``"pipeline"`` there. The step placement runs the Keras 3
      teacher inside the student's jitted step on the student's device, with
      no host round trip, where the pipeline placement would copy every
      batch's logits from the device to tf.data and back. On TensorFlow
      ``"step"`` too, except on a machine without GPU or TPU for a large
      teacher: parameters times batch size (a lower bound of its
      multiply-adds per batch) of at least
      `keras_kd.data.placement.PIPELINE_MIN_MACS` (1e8). There both
      placements run on the same CPU cores, and the pipeline computes the
      next batches' logits while the student trains (epochs 0.8x the step
      placement's for such teachers on issue 15's workloads, 2-core CPU)
      instead of after it; for small teachers its tf.data overhead per batch
      costs more than the overlap gives. "auto" reads no batch: where the
      batch size is not static (no ``drop_remainder``) it counts
      `keras_kd.data.placement.ASSUMED_BATCH` (32). Teachers without a
      parameter count (functions, unbuilt models) stay in the step.
      Pass ``"step"`` or ``"pipeline"`` to force either.
    * ``"step"``: the batch carries ``x`` and the teacher runs inside
      the student's training step, on the same device as the student (the
      GPU/TPU when there is one), under ``tf.stop_gradient``, once per batch
      however many losses and metrics read it; it compiles with the step
      under ``jit_compile=True`` (Keras 3's default on GPUs). Inputs of any
      structure (dicts, tuples, nested) reach the teacher as the dataset
      holds them. Such a dataset works only in the process that built it
      (the teacher is looked up by a key); the teacher is held as long as the
      dataset (or one derived from it) is alive, then released. On the JAX
      backend a Keras 3 teacher runs as ``stateless_call`` in the jitted step
      (its weights are constants of that compiled step); a tf_keras student
      in the same process still gets the TensorFlow teacher path.
    * ``"pipeline"``: the teacher runs inside the tf.data pipeline and the
      batch carries its logits. tf.data executes its functions on the host
      CPU, so on a GPU/TPU machine the teacher then runs on the **CPU**, even
      though the student trains on the accelerator. Use it to inspect the
      logits, or to move teacher work off a busy accelerator. Running outside
      the compiled step, it checks every batch of logits: NaN or Inf raise
      ``InvalidArgumentError`` there, whatever ``jit_compile`` is. On the JAX
      backend a Keras 3 teacher runs through `keras_kd.data.teachers.tf_callable`
      (a ``tf.numpy_function`` around its jitted ``stateless_call``), on
      JAX's default device.
    * For many epochs, cache the logits instead (`cache_teacher_logits`): the
      teacher runs once, batched with ``predict`` on the accelerator, and every
      epoch costs what training the student alone costs.

    Why ``"step"`` for small teachers: its traced step has fewer ops than
    ``keras.distillation.Distiller``'s (311 against 475 on the small
    workload of issue 15; ``benchmarks/profile_step.py``: 1.4 against 1.8 ms
    of CPU per step), it needs no free core, and its packing map costs no
    graph optimisation per epoch. ``make bench`` gives the epoch ratios to
    ``Distiller`` for both placements.

    The teacher's output is checked once for probabilities (a final
    softmax, which `DistillationLoss` would soften again): from the output
    layer's activation for a Keras model, else from its outputs on a probe
    of zeros shaped like the teacher's inputs (nothing is read from
    ``dataset``); a softmax teacher warns.

    Args:
        dataset: a **batched** ``tf.data.Dataset`` of ``(x, y)`` or
            ``(x, y, sample_weight)``.
        teacher: a Keras 3 or tf_keras model that outputs logits (or any
            callable ``teacher(x, training=False)``), or a non-empty list or
            tuple of them (an ensemble: same classes, same input shapes).
        placement: ``"auto"``, ``"step"`` or ``"pipeline"``, see above.
            Defaults to "auto".
        output_index: which output holds the logits when the teacher has
            several. Defaults to 0.
        num_parallel_calls: parallelism of the map that runs the teacher with
            ``placement="pipeline"``; ``None`` runs batches one at a time. The
            step placement's map only packs tensors and always runs
            sequentially. Defaults to ``tf.data.AUTOTUNE``: the next batches
            are prepared while the student trains.
        ensemble: how an ensemble's logits combine: ``"mean_logits"`` or
            ``"mean_probs"``. Ignored for one teacher. Defaults to
            "mean_logits".
        teacher_inputs: a function ``x -> inputs`` of the teacher(s), or
            None for ``x`` itself. Defaults to None.
        student_inputs: a function ``x -> inputs`` of the student (the
            element's new ``x``), or None for ``x`` itself. Defaults to None.

    Returns:
        A dataset for ``student.fit`` with `keras_kd.DistillationLoss`.

    Raises:
        ValueError: for elements that are not ``(x, y[, sample_weight])``, an
            unbatched dataset, an unknown placement or ensemble rule, an empty
            list of teachers, or ensemble members with different class counts
            or input shapes.
        TypeError: for a teacher, ``teacher_inputs`` or ``student_inputs``
            that is not callable, a ``dataset`` that is not a tf.data.Dataset,
            or, on the JAX backend, a teacher function that runs JAX code
            (give a Keras 3 model or layer).
        ValueError: while tracing the JAX step, with ``placement="step"``
            and a tf_keras teacher or a TensorFlow function (they cannot run
            inside a JAX step: use ``"pipeline"`` or ``"auto"``).
        tf.errors.InvalidArgumentError: while iterating, with
            ``placement="pipeline"``, for teacher logits with NaN or Inf.

    Warns:
        UserWarning: once, when the teacher outputs probabilities.

    Example:

    ```python
    student.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(train_ds.batch(64), teacher), epochs=10)

    # Three teachers; the student sees every second sample of the signal.
    ds = keras_kd.with_teacher(train_ds.batch(64), [t1, t2, t3], ensemble="mean_probs",
                               student_inputs=lambda x: x[:, ::2])
    ```
    """
    _checks.require_dataset(dataset, hint="Wrap arrays with tf.data.Dataset.from_tensor_slices((x, y)).batch(n).")
    placement = _checks.one_of(placement, "placement", _PLACEMENTS)
    teachers, ensemble = teachers_lib.teacher_members(teacher, output_index, ensemble)
    for name, fn in (("teacher_inputs", teacher_inputs), ("student_inputs", student_inputs)):
        if fn is not None and not callable(fn):
            raise TypeError(f"Expected `{name}` to be None or a function of x. Received: {name}={fn!r}")
    x_spec, y_spec, _ = _checks.split_element(dataset.element_spec)
    has_targets = isinstance(y_spec, targets_lib.TeacherTargets.Spec)
    if targets_lib.carries_teacher(y_spec):
        raise ValueError("The dataset already carries teacher targets; apply `with_teacher` once.")

    teacher_view = teacher_inputs or (lambda x: x)
    student_view = student_inputs or (lambda x: x)
    views = dataset.map(lambda x, *rest: teacher_view(x)) if teacher_inputs is not None else None
    t_spec = views.element_spec if views is not None else x_spec
    # The labels decide when the teacher cannot (unbuilt Sequential, callables).
    labels_spec = y_spec.labels if has_targets else y_spec
    if _checks.is_batched(t_spec, teachers[0], labels_spec) is False:
        shapes = ", ".join(str(s.shape) for s in tf.nest.flatten(t_spec))
        labels_shape = getattr(labels_spec, "shape", None)
        raise ValueError(
            f"`with_teacher` received unbatched elements (the teacher's inputs have shapes {shapes}, "
            f"the labels shape {labels_shape}: one label per element, not one per example). It runs "
            "the teacher on the batch the student sees: apply it after `.batch(...)`; for "
            "`keras_kd.unlabelled` data, apply `keras_kd.unlabelled` before `.batch()`."
        )
    on_jax = [teachers_lib.runs_on_jax(t) for t in teachers]
    if placement == "auto":
        placement = placement_lib.auto_placement(teachers, on_jax, dataset)
    run = teachers_lib.teacher_function(teachers, output_index, ensemble)

    warn_if_softmax(teachers, output_index, lambda t, inputs: teachers_lib.member_logits(t, inputs, output_index),
                    t_spec)

    def as_targets(y):
        # Keep what an earlier transform attached (example ids, has_labels).
        return y if has_targets else targets_lib.TeacherTargets(labels=y)

    if placement == "pipeline":

        def attach(x, y, *sample_weight):
            # tf.data runs outside the (possibly XLA-compiled) step, so this
            # check always runs; CheckNumerics costs one pass over the logits.
            logits = tf.debugging.assert_all_finite(run(teacher_view(x)), _NON_FINITE)
            return (student_view(x), as_targets(y).replace(logits=logits), *sample_weight)

    else:
        # The targets carry the teacher's inputs flattened (any nesting:
        # dicts, tuples), and the teacher gets them back in their structure.
        structure = t_spec
        nested = tf.nest.is_nested(structure)

        if all(on_jax):
            teachers_lib.build_unbuilt(teachers, t_spec)  # its variables become the step's inputs
        jax_run = teachers_lib.jax_function(teachers, output_index, ensemble) if all(on_jax) else None

        def run_step(inputs):
            if nested:
                inputs = tf.nest.pack_sequence_as(structure, list(inputs))
            if isinstance(tf.nest.flatten(inputs)[0], tf.Tensor):
                return run(inputs)  # a TensorFlow step (a tf_keras student, or Keras 3 on TensorFlow)
            if jax_run is None:
                raise ValueError(
                    "keras_kd.with_teacher(placement='step'): on the JAX backend the teacher runs inside "
                    "the student's jitted JAX step, where tf_keras models and TensorFlow functions cannot "
                    "run. Use placement='pipeline' (or 'auto', which picks it for such teachers), or a "
                    "Keras 3 teacher."
                )
            return jax_run(inputs)

        key = f"teacher-{next(_keys)}-{id(teachers[0])}"
        if jax_run is not None:
            run_step.refresh = jax_run.refresh  # see `teachers.jax_function`
        targets_lib.register_teacher(run_step, key)

        packing_only = teacher_inputs is None and student_inputs is None

        def attach(x, y, *sample_weight):
            t_x = teacher_view(x)
            inputs = tuple(tf.nest.flatten(t_x)) if nested else t_x
            targets = as_targets(y)
            if packing_only and targets.labels.dtype == tf.int32:
                # int64 (same values): an int32 output would cost the fast
                # packing map (see `_pack_map`); every consumer casts labels.
                targets = targets.with_labels(tf.cast(targets.labels, tf.int64))
            return (student_view(x), targets.replace(inputs=inputs, teacher_key=key), *sample_weight)

    if placement == "step" and packing_only:
        # The map only packs tensors: sequential (cheaper than a parallel
        # map's thread hand-offs) and instantiated without Grappler per epoch.
        result = _pack_map.pack_map(dataset, attach)
    elif num_parallel_calls is None or placement == "step":
        result = dataset.map(attach)
    else:
        result = dataset.map(attach, num_parallel_calls=num_parallel_calls, deterministic=True)
    if placement == "step":
        # The registry holds the teacher only as long as this dataset (or one
        # derived from it, which references it) is alive.
        weakref.finalize(result, targets_lib.unregister_teacher, key)
    return result
