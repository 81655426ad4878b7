"""Distill, then prune and quantize: tfmot chains down to a TFLite int8 model.

Distillation is a loss and a dataset (`keras_kd.DistillationLoss`,
`keras_kd.with_teacher`, `keras_kd.cache_teacher_logits`), so it composes
with tensorflow-model-optimization (tfmot) the way any loss does: tfmot wraps
the student, the user compiles the wrapped model with `DistillationLoss` and
fits it on the teacher's targets. This module holds the thin glue around that:

* **Bridge.** tfmot 0.8 wraps only tf_keras (Keras 2) models. `to_tf_keras`
  rebuilds a Keras 3 Functional or Sequential student of built-in layers as a
  tf_keras model with the same weights (outputs equal to float32 rounding),
  and says which layers cannot come over; `to_keras3` brings a trained float
  tf_keras student back.
* **Pruning.** `prune_for_distillation` wraps a copy of the student with
  ``prune_low_magnitude`` and a ``PolynomialDecay`` schedule and returns it
  with the callbacks ``fit`` needs (``UpdatePruningStep``); `strip` removes
  the wrappers for deployment and `sparsity` reports what was achieved.
* **Quantization-aware training.** `quantize_for_distillation` gives the QAT
  model: whole-model ``quantize_model``, partial quantization of chosen
  layers (``quantize_annotate_layer`` + ``quantize_apply``), or
  prune-preserving QAT (PQAT, ``Default8BitPrunePreserveQuantizeScheme``).
* **Deployment.** `to_tflite` converts (int8 weights and activations for QAT
  models; post-training full-integer quantization with calibration data for
  float models), `evaluate_tflite` measures accuracy with the LiteRT
  interpreter, `file_size` measures the artefacts.

What composes with distillation (each row is exercised in
``tests/test_optimize.py`` or ``integration/test_digits_optimize.py``):

* prune + `DistillationLoss` (online `with_teacher` or cached teacher) with
  `HardSampleReweighting`: works; ``UpdatePruningStep`` sits beside keras_kd's
  callbacks in one ``callbacks`` list.
* QAT (whole model, or chosen layers) + `DistillationLoss`: works; the
  teacher's logits stay float32, only the student is fake-quantized.
* prune -> `strip` -> PQAT + `DistillationLoss` -> TFLite int8: works; the
  zeros survive QAT and conversion.
* Keras 3 student -> `to_tf_keras` -> any of the above: works for built-in
  layers; a float result comes back with `to_keras3`.
* pruned or QAT model -> `to_keras3`: no. tfmot's wrappers exist only in
  tf_keras: `strip` a pruned model first; deploy a QAT model with
  `to_tflite`.
* Alignment (`keras_kd.alignment.align`), either order:

  - align, train, ``aligned.export()``, then prune or quantize the clean
    student and train it with `DistillationLoss` (logit distillation);
  - or wrap first and align the wrapped model (tap the wrapped layer names,
    ``prune_low_magnitude_<name>`` or ``quant_<name>``): ``aligned.model``
    shares the wrappers, so feature targets train the pruned or
    quantization-aware student (pass the pruning callbacks to its ``fit``).
    Deploy the wrapped model itself (`strip` / `to_tflite`):
    ``aligned.export()`` rebuilds the student from its config and cannot
    rebuild tfmot wrappers.

Example:

```python
from keras_kd import optimize

student = optimize.to_tf_keras(keras3_student)       # tfmot needs tf_keras
pruned, callbacks = optimize.prune_for_distillation(
    student, target_sparsity=0.75, end_step=steps_per_epoch * 20, teacher=cache)
pruned.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
pruned.fit(train, epochs=25, callbacks=callbacks)
sparse = optimize.strip(pruned)
qat = optimize.quantize_for_distillation(sparse, preserve_sparsity=True)
qat.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
qat.fit(train, epochs=5)
tflite = optimize.to_tflite(qat, path="student_int8.tflite")
print(optimize.evaluate_tflite(tflite, test_ds), optimize.file_size(tflite))
```
"""

from __future__ import annotations

import contextlib
import gzip
import io
import numbers
import os
import re
import tempfile
import warnings
from typing import Any, Iterable, NamedTuple, Optional, Union

import numpy as np
import tensorflow as tf

from keras_kd import _compat
from keras_kd import targets as targets_lib
from keras_kd._bridge import _TFMOT_PRUNE_WRAPPERS
from keras_kd._bridge import _TFMOT_QUANT_WRAPPERS
from keras_kd._bridge import _is_tfmot_layer
from keras_kd._bridge import _qualname
from keras_kd._bridge import _walk_layers
from keras_kd._bridge import to_keras3
from keras_kd._bridge import to_tf_keras

__all__ = [
    "Pruning",
    "TFLiteConversionError",
    "check_num_classes",
    "evaluate_tflite",
    "file_size",
    "prune_for_distillation",
    "quantize_for_distillation",
    "sparsity",
    "strip",
    "to_keras3",
    "to_tf_keras",
    "to_tflite",
]

# ---------------------------------------------------------------------------
# Checks shared by the tfmot helpers
# ---------------------------------------------------------------------------


def _tfmot():
    return _compat.import_tfmot()


def _require_tf_keras_graph(model, argument: str, what: str):
    _compat.check_model(model, argument)
    if _compat.flavour_of(model) == _compat.KERAS3:
        raise TypeError(
            f"`{what}` needs a tf_keras model: tensorflow-model-optimization wraps only tf_keras "
            f"(Keras 2) models. Received a Keras 3 model ({model.name!r}). Convert it first with "
            f"`{argument} = keras_kd.optimize.to_tf_keras({argument})` (and back with "
            "`keras_kd.optimize.to_keras3` after `strip`)."
        )
    if _compat.graph_of(model) is None:
        raise TypeError(
            f"`{what}` needs a Functional or Sequential model: tfmot wraps the layers of a layer "
            f"graph, and `{argument}` ({model.name!r}, {type(model).__name__}) is a subclassed "
            "model (or a Sequential model that was never built). Write it as a Functional model "
            "(`keras.Model(inputs, outputs)`) or build the Sequential model on an `Input`."
        )


def _has_wrappers(model, names) -> list:
    return [path for path, layer in _walk_layers(model) if _is_tfmot_layer(layer, names)]


def _custom_objects(model, extra=None) -> dict:
    """The model's own custom layer classes by name (tfmot rebuilds models from
    their config, which needs them), plus the user's ``custom_objects``."""
    found = {
        type(layer).__name__: type(layer)
        for _, layer in _walk_layers(model)
        if not _compat.is_builtin(layer)
        and not type(layer).__module__.startswith("tensorflow_model_optimization")
    }
    found.update(extra or {})
    return found


def _clone(model):
    """A copy of a tf_keras model with the same weights, sharing nothing."""
    tfmot = _tfmot()
    tfk = _compat.tf_keras()
    scope = tfmot.quantization.keras.quantize_scope(_custom_objects(model))
    with tfmot.sparsity.keras.prune_scope(), scope:
        clone = tfk.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _selector(layers, model, argument):
    """A predicate over layers from names, classes, layer objects or a callable."""
    if layers is None:
        return None
    if callable(layers) and not isinstance(layers, type):
        return layers
    if isinstance(layers, (str, type)) or not isinstance(layers, Iterable):
        layers = [layers]
    layers = list(layers)
    classes = tuple(x for x in layers if isinstance(x, type))
    names = set()
    for x in layers:
        if isinstance(x, str):
            names.add(x)
        elif not isinstance(x, type):
            names.add(getattr(x, "name", repr(x)))  # layer objects match by name: tfmot wraps a copy
    known = {layer.name for layer in model.layers}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(
            f"Expected `{argument}` to name layers of the model. Unknown: {unknown}. "
            f"The model's layers are: {sorted(known)}."
        )
    return lambda layer: layer.name in names or isinstance(layer, classes)


def _model_classes(model) -> Optional[int]:
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return None
    try:
        last = tuple(outputs[0].shape)[-1]  # TensorShape (tf_keras) or tuple (Keras 3)
    except (TypeError, ValueError, IndexError):  # unknown rank
        return None
    return None if last is None else int(last)


def check_num_classes(student, teacher):
    """Checks that the student outputs as many classes as the teacher.

    Distillation compares the student's logits with the teacher's class by
    class, so the counts must match. `DistillationLoss` finds a mismatch only
    when the first batch is traced; this finds it before any training, with
    both counts in the message.

    Args:
        student: a Keras 3 or tf_keras model (its first output is the logits).
        teacher: the teacher model, a teacher-logit cache (the object returned
            by `keras_kd.cache_teacher_logits`, or its directory; the cache's
            manifest records the class count), or an int class count.

    Returns:
        The class count.

    Raises:
        ValueError: if the counts differ, or a cache directory holds no
            finished cache.

    Example:

    ```python
    cache = keras_kd.cache_teacher_logits(teacher, "cache/digits")
    train = raw.apply(cache)
    keras_kd.optimize.check_num_classes(student, cache)
    ```
    """
    _compat.check_model(student, "student")
    student_classes = _model_classes(student)
    where = None
    if isinstance(teacher, bool):
        raise TypeError(
            f"Expected `teacher` to be a model, a cache or a class count. Received: teacher={teacher!r}"
        )
    if isinstance(teacher, numbers.Integral):
        teacher_classes, where = int(teacher), "the teacher"
    elif _compat.is_model(teacher):
        teacher_classes, where = _model_classes(teacher), f"the teacher {teacher.name!r}"
    elif isinstance(teacher, (str, os.PathLike)) or hasattr(teacher, "directory"):
        directory = teacher if isinstance(teacher, (str, os.PathLike)) else teacher.directory
        teacher_classes = getattr(teacher, "num_classes", None)
        if teacher_classes is None:
            from keras_kd import cache as cache_lib

            try:
                teacher_classes = cache_lib.read_manifest(directory)["num_classes"]
            except FileNotFoundError as e:
                raise ValueError(
                    f"Cannot check the student's class count against the teacher-logit cache at "
                    f"{os.fspath(directory)!r}: it has not been built yet. Apply it to the dataset "
                    "first (`ds.apply(cache)`)."
                ) from e
        where = f"the teacher-logit cache at {os.fspath(directory)!r}"
    else:
        raise TypeError(
            "Expected `teacher` to be a Keras model, a teacher-logit cache (or its directory) or an "
            f"int class count. Received: teacher={teacher!r} of type {type(teacher).__name__}."
        )
    if student_classes is not None and teacher_classes is not None and student_classes != teacher_classes:
        raise ValueError(
            f"The student {student.name!r} outputs {student_classes} classes but {where} has "
            f"{teacher_classes} classes: distillation compares logits class by class. Give the "
            f"student a {teacher_classes}-unit logit layer (or distill from a teacher with "
            f"{student_classes} classes)."
        )
    return teacher_classes if teacher_classes is not None else student_classes


# ---------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------


class Pruning(NamedTuple):
    """What `prune_for_distillation` returns: unpack it as ``model, callbacks``.

    Attributes:
        model: the tf_keras model with ``prune_low_magnitude`` wrappers, to
            compile with `keras_kd.DistillationLoss` and fit.
        callbacks: the callbacks its ``fit`` needs (``UpdatePruningStep``,
            and ``PruningSummaries`` with ``log_dir``); add keras_kd's own
            callbacks to this list.
    """

    model: Any
    callbacks: list


def _pruning_support(layer, tfmot) -> Optional[str]:
    """Why tfmot cannot prune ``layer``, or None if it can."""
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    if _is_tfmot_layer(layer, _TFMOT_PRUNE_WRAPPERS) or _compat.is_input_layer(layer):
        return None
    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer) or hasattr(layer, "get_prunable_weights"):
        return None
    if _compat.is_model(layer):
        return None  # tfmot recurses into nested models; their layers are checked
    if prune_registry.PruneRegistry.supports(layer):
        return None
    if not _compat.is_builtin(layer):
        return (
            f"custom layer class `{_qualname(layer)}`: tfmot prunes the built-in layers of its "
            "registry and layers that implement `tfmot.sparsity.keras.PrunableLayer` "
            "(`get_prunable_weights`)"
        )
    return (
        f"tfmot's pruning registry has no entry for the built-in layer `{type(layer).__name__}` "
        "(for recurrent layers: an unsupported cell)"
    )


def _unsupported(model, select, why) -> list:
    problems = []
    for path, layer in _walk_layers(model):
        if select is not None and not _compat.is_model(layer) and not select(layer):
            continue
        reason = why(layer)
        if reason:
            problems.append(f"  - {path} ({type(layer).__name__}): {reason}")
    return problems


def _schedule_steps(begin_step, end_step, frequency):
    """``(begin_step, frequency)`` for tfmot's schedule: the last mask update on ``end_step``.

    tfmot updates the masks at ``begin_step + k * frequency`` up to ``end_step``.
    With ``frequency=None``, the span is cut into 16 equal updates (every step
    for spans under 16): ``frequency = span // 16``; when the span is not a
    multiple of it, the first update moves ``span % frequency`` steps later (fewer
    than ``frequency``), so that the last one lands exactly on ``end_step``.
    """
    span = end_step - begin_step
    if frequency is None:
        frequency = max(1, span // 16)
        return begin_step + span % frequency, frequency
    if isinstance(frequency, bool) or not isinstance(frequency, numbers.Integral) or frequency < 1:
        raise ValueError(f"Expected `frequency` to be an int >= 1. Received: frequency={frequency!r}")
    if span % frequency:
        raise ValueError(
            "Expected `end_step - begin_step` to be a multiple of `frequency`: tfmot updates the "
            "masks only every `frequency` steps, so the last update would fall before end_step and "
            "the model would stop short of target_sparsity. Received: "
            f"begin_step={begin_step}, end_step={end_step}, frequency={frequency}."
        )
    return begin_step, int(frequency)


def prune_for_distillation(
    student,
    target_sparsity: float = 0.75,
    *,
    end_step: int,
    begin_step: int = 0,
    initial_sparsity: float = 0.0,
    power: int = 3,
    frequency: Optional[int] = None,
    layers=None,
    block_size=(1, 1),
    block_pooling_type: str = "AVG",
    teacher=None,
    log_dir: Optional[str] = None,
) -> Pruning:
    """Wraps a copy of the student for magnitude pruning during distillation.

    A thin layer over tfmot: ``prune_low_magnitude`` with a
    ``PolynomialDecay`` schedule from ``initial_sparsity`` at ``begin_step``
    to ``target_sparsity`` at ``end_step`` (cubic by default, Zhu & Gupta
    2017), on the whole model or on the chosen ``layers``. Compile the result
    with `keras_kd.DistillationLoss` and fit it on teacher targets (online or
    cached) with the returned callbacks next to your own, e.g.
    `keras_kd.HardSampleReweighting`. Then `strip` it.

    Unlike tfmot's own ``prune_low_magnitude``, which wraps the model's own
    layer objects (training the wrapped model then changes, and zeroes, the
    original), this wraps a copy: ``student`` is left alone. Load its
    weights before calling this.

    Steps count training batches: with ``n`` batches per epoch, pruning
    reaches ``target_sparsity`` after ``end_step`` batches; train at least
    that long (a few more epochs let the remaining weights recover). The
    masks are updated every ``frequency`` steps; ``end_step - begin_step``
    must be a multiple of it so that the last update lands on ``end_step``.

    Args:
        student: a tf_keras Functional or Sequential model (convert a Keras 3
            model with `to_tf_keras` first).
        target_sparsity: fraction of weights set to zero in each pruned
            layer at the end, in ``[0, 1)``. Defaults to 0.75.
        end_step: the step at which ``target_sparsity`` is reached.
        begin_step: the step pruning starts. Defaults to 0.
        initial_sparsity: sparsity at ``begin_step``. Defaults to 0.0.
        power: exponent of the polynomial decay. Defaults to 3.
        frequency: steps between mask updates; None picks 16 updates
            (``frequency = (end_step - begin_step) // 16``, every step for
            shorter spans) ending exactly at ``end_step``: when the span is
            not a multiple of that, the first update comes ``span %
            frequency`` steps after ``begin_step``. Defaults to None.
        layers: prune only these layers (names, classes, layer objects, or a
            predicate ``fn(layer) -> bool``); None prunes every layer.
            Defaults to None.
        block_size: ``(height, width)`` of the blocks pruned together (for
            hardware that exploits block sparsity). Defaults to (1, 1).
        block_pooling_type: ``"AVG"`` or ``"MAX"``, how a block's magnitude
            is pooled. Defaults to "AVG".
        teacher: optional teacher model, teacher-logit cache or class count;
            checked with `check_num_classes` before anything is built.
            Defaults to None.
        log_dir: if set, also return tfmot's ``PruningSummaries`` writing
            per-layer sparsity to TensorBoard there. Defaults to None.

    Returns:
        A `Pruning` ``(model, callbacks)``.

    Raises:
        TypeError: for a Keras 3 model (convert it first) or a subclassed
            model.
        ValueError: for arguments out of range, unknown layer names, layers
            tfmot cannot prune (each listed with the reason), or a student
            whose class count differs from the teacher's.

    Example:

    ```python
    pruned, callbacks = keras_kd.optimize.prune_for_distillation(
        student, target_sparsity=0.75, end_step=steps_per_epoch * 20)
    pruned.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    pruned.fit(keras_kd.with_teacher(train, teacher), epochs=25,
               callbacks=callbacks + [reweighting])
    sparse_student = keras_kd.optimize.strip(pruned)
    ```

    References:
        Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
        pruning for model compression", 2017.
    """
    _require_tf_keras_graph(student, "student", "prune_for_distillation")
    for value, argument, low, high, closed_high in (
        (target_sparsity, "target_sparsity", 0.0, 1.0, False),
        (initial_sparsity, "initial_sparsity", 0.0, 1.0, False),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value < high:
            raise ValueError(f"Expected `{argument}` in [0, 1). Received: {argument}={value!r}")
    if initial_sparsity > target_sparsity:
        raise ValueError(
            "Expected `initial_sparsity` <= `target_sparsity`. Received: "
            f"initial_sparsity={initial_sparsity}, target_sparsity={target_sparsity}"
        )
    for value, argument in ((begin_step, "begin_step"), (end_step, "end_step")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"Expected `{argument}` to be an int >= 0. Received: {argument}={value!r}")
        if value < 0:
            raise ValueError(
                f"Expected `{argument}` to be an int >= 0. Received: {argument}={value!r}. A negative "
                "step count usually comes from `dataset.cardinality()`, which is -1 "
                "(tf.data.INFINITE_CARDINALITY) for a repeated dataset and -2 "
                "(tf.data.UNKNOWN_CARDINALITY) after `filter`, `flat_map` and the like. Count the "
                "batches once (`steps_per_epoch = sum(1 for _ in dataset)`) or declare them "
                "(`dataset.apply(tf.data.experimental.assert_cardinality(n))`), and pass "
                f"`{argument}=steps_per_epoch * epochs`."
            )
    if end_step <= begin_step:
        raise ValueError(
            f"Expected `end_step` > `begin_step`. Received: begin_step={begin_step}, end_step={end_step}"
        )
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or power <= 0:
        raise ValueError(f"Expected `power` > 0. Received: power={power!r}")
    if block_pooling_type not in ("AVG", "MAX"):
        raise ValueError(
            "Expected `block_pooling_type` to be 'AVG' or 'MAX'. "
            f"Received: block_pooling_type={block_pooling_type!r}"
        )
    schedule_begin, frequency = _schedule_steps(begin_step, end_step, frequency)
    if teacher is not None:
        check_num_classes(student, teacher)
    select = _selector(layers, student, "layers")
    tfmot = _tfmot()
    problems = _unsupported(student, select, lambda layer: _pruning_support(layer, tfmot))
    if problems:
        fix = "Implement `tfmot.sparsity.keras.PrunableLayer` for custom layers"
        if select is None:
            fix += ", or prune only the other layers with `layers=[...]`"
        raise ValueError(
            f"tfmot cannot prune {len(problems)} layer(s) of `student` ({student.name!r}):\n"
            + "\n".join(problems)
            + f"\n{fix}."
        )
    sparsity_lib = tfmot.sparsity.keras
    params = dict(
        pruning_schedule=sparsity_lib.PolynomialDecay(
            initial_sparsity=float(initial_sparsity),
            final_sparsity=float(target_sparsity),
            begin_step=int(schedule_begin),
            end_step=int(end_step),
            power=power,
            frequency=frequency,
        ),
        block_size=tuple(block_size),
        block_pooling_type=block_pooling_type,
    )
    dense = [
        f"  - {path} ({type(layer).__name__}): {', '.join(kernels)}"
        for path, layer in _walk_layers(student)
        if not _compat.is_model(layer) and (select is None or select(layer))
        for kernels in [_unpruned_kernels(layer)]
        if kernels
    ]
    if dense:
        warnings.warn(
            f"tfmot will not prune these kernels of `student` ({student.name!r}); they stay dense "
            "(tfmot's pruning registry prunes no weight of DepthwiseConv layers and only the "
            "pointwise kernel of SeparableConv layers):\n" + "\n".join(dense) + "\n"
            "`keras_kd.optimize.sparsity` reports only the kernels tfmot prunes.",
            stacklevel=2,
        )
    copy = _clone(student)
    if select is None:
        pruned = sparsity_lib.prune_low_magnitude(copy, **params)
    else:
        tfk = _compat.tf_keras()

        def wrap(layer):
            if select(layer) and not _is_tfmot_layer(layer, _TFMOT_PRUNE_WRAPPERS):
                return sparsity_lib.prune_low_magnitude(layer, **params)
            return layer

        with sparsity_lib.prune_scope():
            pruned = tfk.models.clone_model(copy, clone_function=wrap)
    callbacks = [sparsity_lib.UpdatePruningStep()]
    if log_dir is not None:
        callbacks.append(sparsity_lib.PruningSummaries(log_dir=os.fspath(log_dir)))
    return Pruning(pruned, callbacks)


def strip(model):
    """Removes tfmot's pruning wrappers: the deployable sparse model.

    ``tfmot.sparsity.keras.strip_pruning`` on a copy: the result shares no
    layers with ``model`` (training ``model`` further does not change it), is
    not compiled, and keeps the pruned (zeroed) weights. Models without
    pruning wrappers come back as an equal copy, so stripping twice is safe.
    Quantization-aware layers are kept (a QAT model is deployed with
    `to_tflite`).

    Args:
        model: a tf_keras model, e.g. the model of `prune_for_distillation`.

    Returns:
        A new tf_keras model without pruning wrappers.

    Raises:
        TypeError: for a Keras 3 or subclassed model.

    Example:

    ```python
    sparse_student = keras_kd.optimize.strip(pruned)
    print(keras_kd.optimize.sparsity(sparse_student))
    ```
    """
    _require_tf_keras_graph(model, "model", "strip")
    tfmot = _tfmot()
    with tfmot.quantization.keras.quantize_scope():
        stripped = tfmot.sparsity.keras.strip_pruning(model)
    return _clone(stripped)


_KERNEL = re.compile(r"(^|_)kernel$|^embeddings$")


def _unwrapped(layer):
    wrappers = _TFMOT_PRUNE_WRAPPERS + _TFMOT_QUANT_WRAPPERS
    while hasattr(layer, "layer") and _is_tfmot_layer(layer, wrappers):
        layer = layer.layer
    return layer


def _prunable_weights(layer) -> Optional[list]:
    """The weights tfmot prunes in ``layer`` (either flavour), by tfmot's own
    registry; ``None`` for layers tfmot cannot prune."""
    if _is_tfmot_layer(layer, _TFMOT_PRUNE_WRAPPERS):
        return [weight for weight, _, _ in getattr(layer, "pruning_vars", [])]
    inner = _unwrapped(layer)
    found = _prunable_attributes(inner)
    if found is None or inner is layer:
        return None if found is None else [w for w, _ in found]
    # Inside a quantization wrapper the layer's attributes are fake-quantized
    # tensors; the wrapper tracks the variables themselves.
    variables = {w.name.split(":")[0].split("/")[-1]: w for w in layer.weights}
    return [
        w if isinstance(w, tf.Variable) else variables[name]
        for w, name in found
        if isinstance(w, tf.Variable) or name in variables
    ]


def _prunable_attributes(layer) -> Optional[list]:
    """``(value, attribute name)`` of what tfmot prunes in an unwrapped layer."""
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    if hasattr(layer, "get_prunable_weights") and not _compat.is_model(layer):
        return [(w, w.name.split(":")[0].split("/")[-1]) for w in layer.get_prunable_weights()]
    registry = prune_registry.PruneRegistry
    klass = None
    if _compat.is_builtin(layer):
        klass = _compat.builtin_layer_class(_compat.TF_KERAS, type(layer).__name__)
    if klass is None:
        return None
    if klass in registry._RNN_LAYERS:
        cells = getattr(layer.cell, "cells", [layer.cell])
        names = {c.__name__: n for c, n in registry._RNN_CELLS_WEIGHTS_MAP.items()}
        if any(type(cell).__name__ not in names for cell in cells):
            return None
        return [(getattr(cell, n), n) for cell in cells for n in names[type(cell).__name__]]
    if klass not in registry._LAYERS_WEIGHTS_MAP:
        return None
    found = []
    for path in registry._LAYERS_WEIGHTS_MAP[klass]:
        obj = layer
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            found.append((obj, path.split(".")[-1]))
    return found


def _unpruned_kernels(layer) -> list:
    """Names of ``layer``'s kernels that tfmot leaves dense when it prunes the layer."""
    pruned = {id(w) for w in _prunable_weights(layer) or []}
    return [
        w.name.split(":")[0].split("/")[-1]
        for w in _unwrapped(layer).weights
        if _KERNEL.search(w.name.split(":")[0].split("/")[-1]) and id(w) not in pruned
    ]


def sparsity(model) -> dict:
    """Fraction of zeros in the kernels that tfmot prunes, per layer.

    Counts exactly the weights tfmot's pruning registry prunes in each layer
    (``kernel`` of ``Dense`` and convolutions, ``pointwise_kernel`` of
    ``SeparableConv*``, ``kernel`` and ``recurrent_kernel`` of ``LSTM``,
    ``GRU`` and ``SimpleRNN``, ``embeddings``, the four projection kernels of
    ``MultiHeadAttention``, or a `PrunableLayer`'s ``get_prunable_weights``).
    Layers tfmot never prunes (``DepthwiseConv2D``, normalization, pooling,
    ...) and the kernels it leaves dense (a ``SeparableConv*``'s
    ``depthwise_kernel``) are left out, so a pruned model reports its target
    sparsity. Works on models with pruning or quantization wrappers (reported
    under the wrapped layer's name, so the names match before and after
    `strip`), on stripped models and on Keras 3 models; nested layers are
    reported as ``"outer/inner"``.

    Args:
        model: a Keras 3 or tf_keras model.

    Returns:
        ``{layer name: fraction of zeros in its prunable kernels}``.

    Example:

    ```python
    >>> keras_kd.optimize.sparsity(keras_kd.optimize.strip(pruned))
    {'dense': 0.75, 'dense_1': 0.75}
    ```
    """
    _compat.check_model(model, "model")
    _tfmot()
    report = {}
    for path, layer in _walk_layers(model):
        if _compat.is_model(layer):
            continue
        zeros = total = 0
        for weight in _prunable_weights(layer) or []:
            values = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
            zeros += int(np.sum(values == 0))
            total += values.size
        if total:
            name = _unwrapped(layer).name
            key = path.rsplit("/", 1)[0] + "/" + name if "/" in path else name
            report[key] = zeros / total
    return report


# ---------------------------------------------------------------------------
# Quantization-aware training
# ---------------------------------------------------------------------------


_NESTED_QAT = (
    "a model nested inside the student: tfmot quantizes the layers of one flat "
    "Functional or Sequential model; rebuild it without nesting"
)


def _quantize_reason(layer) -> str:
    if not _compat.is_builtin(layer):
        return (
            f"custom layer class `{_qualname(layer)}`: tfmot's 8-bit scheme quantizes the built-in "
            "layers it knows; give this layer a `tfmot.quantization.keras.QuantizeConfig` "
            "(`quantize_annotate_layer(layer, quantize_config=...)` inside `quantize_scope`)"
        )
    return (
        f"tfmot's 8-bit quantization registry does not support the built-in layer "
        f"`{type(layer).__name__}` in this position or configuration (tfmot's `quantize_model` "
        "refuses it too); quantize the other layers, or give it a "
        "`tfmot.quantization.keras.QuantizeConfig`"
    )


def quantize_for_distillation(
    student,
    *,
    layers=None,
    preserve_sparsity: bool = False,
    scheme=None,
    teacher=None,
    custom_objects: Optional[dict] = None,
):
    """A quantization-aware (QAT) copy of the student, to train with distillation.

    Thin over tfmot, three ways:

    * whole model (default): ``tfmot.quantization.keras.quantize_model``;
    * chosen layers (``layers=``): ``quantize_annotate_layer`` on those
      layers, then ``quantize_apply``; the rest stays float (and stays float
      in TFLite), except that tfmot also quantizes the output of a float
      layer that feeds a quantized one;
    * prune-preserving QAT (``preserve_sparsity=True``, for a pruned and
      `strip`-ped student): ``quantize_apply`` with
      ``Default8BitPrunePreserveQuantizeScheme``, which keeps the zeros of
      the pruned kernels through QAT (Sparsity-aware quantization, tfmot's
      collaborative optimization).

    The QAT model simulates int8 weights and activations in training
    (fake-quant ops) and outputs float logits, so compile it with
    `keras_kd.DistillationLoss` and fit it on the same teacher targets as the
    float student, usually for a few epochs starting from the trained float
    student. Convert it with `to_tflite` for a real int8 model. The float
    weights are copied, but the activation ranges start empty and are
    learned in training: an untrained QAT model outputs zeros.

    Args:
        student: a tf_keras Functional or Sequential model (convert a Keras 3
            model with `to_tf_keras`) without pruning wrappers (`strip`
            first). Its weights are copied; it is left alone.
        layers: quantize only these layers (names, classes, layer objects or
            a predicate ``fn(layer) -> bool``); None quantizes the whole
            model. Defaults to None.
        preserve_sparsity: use the prune-preserving scheme. Defaults to False.
        scheme: a ``tfmot.quantization.keras.QuantizeScheme`` to use instead
            of the default 8-bit one (not with ``preserve_sparsity``).
            Defaults to None.
        teacher: optional teacher model, teacher-logit cache or class count,
            checked with `check_num_classes`. Defaults to None.
        custom_objects: custom objects tfmot needs to rebuild the model from
            its config (it does so inside ``quantize_apply``), such as custom
            activations or ``QuantizeConfig`` classes. The model's own custom
            layer classes are found automatically. Defaults to None.

    Returns:
        A new tf_keras model with tfmot quantization wrappers, not compiled.

    Raises:
        TypeError: for a Keras 3 or subclassed model.
        ValueError: for a model that still has pruning wrappers or is
            already quantization-aware, unknown layer names, layers tfmot
            cannot quantize (each listed with the reason), or a student whose
            class count differs from the teacher's.

    Example:

    ```python
    qat = keras_kd.optimize.quantize_for_distillation(float_student)
    qat.compile(tf_keras.optimizers.Adam(1e-4),
                loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    qat.fit(train, epochs=5)
    tflite_bytes = keras_kd.optimize.to_tflite(qat)
    ```

    References:
        Jacob et al., "Quantization and Training of Neural Networks for
        Efficient Integer-Arithmetic-Only Inference", CVPR 2018.
    """
    _require_tf_keras_graph(student, "student", "quantize_for_distillation")
    pruned = _has_wrappers(student, _TFMOT_PRUNE_WRAPPERS)
    if pruned:
        raise ValueError(
            f"`student` ({student.name!r}) still has tfmot pruning wrappers ({pruned[:3]}...). "
            "Strip them first: `quantize_for_distillation(keras_kd.optimize.strip(pruned), "
            "preserve_sparsity=True)`."
        )
    quantized = _has_wrappers(student, ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"))
    if quantized:
        raise ValueError(
            f"`student` ({student.name!r}) is already quantization-aware ({quantized[:3]}): "
            "quantize the float student once."
        )
    if not isinstance(preserve_sparsity, bool):
        raise ValueError(
            f"Expected `preserve_sparsity` to be a bool. Received: preserve_sparsity={preserve_sparsity!r}"
        )
    if teacher is not None:
        check_num_classes(student, teacher)
    tfmot = _tfmot()
    qk = tfmot.quantization.keras
    if preserve_sparsity:
        if scheme is not None:
            raise ValueError("Pass either `scheme` or `preserve_sparsity=True`, not both.")
        scheme = qk.collab_opts.Default8BitPrunePreserveQuantizeScheme()
    elif scheme is None:
        scheme = qk.default_8bit.Default8BitQuantizeScheme()
        sparse = {name: value for name, value in sparsity(student).items() if value >= 0.3}
        if sparse:
            figures = ", ".join(f"{name}: {value:.2f}" for name, value in list(sparse.items())[:5])
            warnings.warn(
                f"`student` ({student.name!r}) has sparse kernels ({figures} zeros; pruned?), but "
                "the default 8-bit scheme trains every weight, so quantization-aware training fills "
                "the zeros in again. Pass `preserve_sparsity=True` to keep them.",
                stacklevel=2,
            )
    elif not isinstance(scheme, qk.QuantizeScheme):
        raise ValueError(
            f"Expected `scheme` to be a tfmot.quantization.keras.QuantizeScheme. Received: scheme={scheme!r}"
        )
    select = _selector(layers, student, "layers")
    nested = [
        f"  - {path} ({type(layer).__name__}): {_NESTED_QAT}"
        for path, layer in _walk_layers(student)
        if _compat.is_model(layer)
    ]
    if nested:
        raise ValueError(
            f"tfmot cannot quantize {len(nested)} layer(s) of `student` ({student.name!r}):\n"
            + "\n".join(nested)
        )
    hint = "" if select is not None else "\nQuantize only the other layers with `layers=[...]`."
    scope = qk.quantize_scope(_custom_objects(student, custom_objects))
    copy = _clone(student)
    with scope:
        problems = _quantize_problems(copy, select, scheme)
        if problems:
            raise ValueError(
                f"tfmot cannot quantize {len(problems)} layer(s) of `student` ({student.name!r}):\n"
                + "\n".join(problems)
                + hint
            )
        if select is None:
            annotated = qk.quantize_annotate_model(copy)
        else:
            tfk = _compat.tf_keras()

            def annotate(layer):
                return qk.quantize_annotate_layer(layer) if select(layer) else layer

            annotated = tfk.models.clone_model(copy, clone_function=annotate)
            annotated.set_weights(copy.get_weights())
        try:
            return qk.quantize_apply(annotated, scheme)
        except RuntimeError as e:  # "Layer <name>:<class> is not supported. ..."
            match = re.match(r"Layer (\S+?):", str(e))
            if match is None:
                raise ValueError(f"tfmot could not quantize `student` ({student.name!r}): {e}") from e
            name = match.group(1)
            layer = next((x for x in copy.layers if x.name == name), None)
            reason = _quantize_reason(layer) if layer is not None else str(e)
            kind = type(layer).__name__ if layer is not None else "layer"
            raise ValueError(
                f"tfmot cannot quantize 1 layer(s) of `student` ({student.name!r}):\n"
                f"  - {name} ({kind}): {reason}{hint}"
            ) from e
        except ValueError as e:
            if "activations" in str(e):
                raise ValueError(_activation_refusal(copy, student) + hint) from e
            raise ValueError(f"tfmot could not quantize `student` ({student.name!r}): {e}") from e


def _activation_refusal(model, student) -> str:
    """tfmot's "Only some Keras activations ... are supported", with the layers named."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_aware_activation

    aware = quantize_aware_activation.QuantizeAwareActivation
    supported = sorted(aware._PRE_QUANT_ACTIVATIONS | aware._POST_QUANT_ACTIVATIONS)
    found = [
        f"  - {layer.name} ({type(layer).__name__}): activation "
        f"{getattr(layer.activation, '__name__', layer.activation)!r}"
        for layer in model.layers
        if type(layer).__name__ != "Activation"
        and callable(getattr(layer, "activation", None))
        and getattr(layer.activation, "__name__", None) not in supported
    ]
    return (
        f"tfmot cannot quantize the activation of {len(found) or 'some'} layer(s) of `student` "
        f"({student.name!r}):\n" + "\n".join(found) + "\n"
        f"tfmot's QAT quantizes only these activations inside a layer: {supported} (a Keras 3 "
        "'hard_sigmoid' comes over from `to_tf_keras` as `keras3_hard_sigmoid`, its meaning, "
        "which tfmot does not know either). Use one of them, or give the layer a "
        "`tfmot.quantization.keras.QuantizeConfig`."
    )


def _quantize_problems(model, select, scheme) -> list:
    """The layers tfmot's ``quantize_apply`` would refuse, each with the reason.

    Mirrors ``quantize_apply`` with tfmot's own pieces: the layers to annotate,
    the scheme's layout transform (which, e.g., folds ``Conv2D`` +
    ``BatchNormalization`` + ``ReLU`` into patterns the registry supports),
    then the registry, layer by layer. Unlike ``quantize_apply``, which stops
    at the first refused layer, this lists every one. Models that already
    carry the user's own ``QuantizeAnnotate`` wrappers are left to tfmot.
    """
    if _has_wrappers(model, ("QuantizeAnnotate",)):
        return []
    layer_map = {
        layer.name: {"quantize_config": None}
        for layer in model.layers
        if not _compat.is_input_layer(layer) and (select is None or select(layer))
    }
    for input_layer in model._input_layers:
        if any(node.outbound_layer.name in layer_map for node in input_layer._outbound_nodes):
            layer_map[input_layer.name] = {}
    transformed, layer_map = scheme.get_layout_transformer().apply(model, layer_map)
    registry = scheme.get_quantize_registry()
    problems = []
    for layer in transformed.layers:
        if _compat.is_input_layer(layer) or layer.name not in layer_map:
            continue
        if _is_tfmot_layer(layer, _TFMOT_QUANT_WRAPPERS) or layer_map[layer.name].get("quantize_config"):
            continue
        if not registry.supports(layer):
            problems.append(f"  - {layer.name} ({type(layer).__name__}): {_quantize_reason(layer)}")
    return problems


# ---------------------------------------------------------------------------
# TFLite
# ---------------------------------------------------------------------------


class TFLiteConversionError(ValueError):
    """The TFLite converter refused the model; the message says why."""


_IO_DTYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


def _is_qat(model) -> bool:
    return bool(_has_wrappers(model, ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")))


def _input_tensors(model):
    inputs = getattr(model, "inputs", None)
    return list(inputs) if inputs else []


def _numpy_x(element):
    """``x`` of an element ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def _representative(data, model, limit):
    """A TFLite ``representative_dataset`` callable from a dataset, array or callable."""
    if callable(data) and not isinstance(data, tf.data.Dataset):
        return data
    inputs = _input_tensors(model)
    if len(inputs) != 1:
        raise ValueError(
            "`representative_data` as a dataset or array needs a single-input model; for "
            f"{len(inputs)} inputs pass a callable yielding lists of input arrays, as "
            "`tf.lite.TFLiteConverter.representative_dataset` takes."
        )
    rank = len(inputs[0].shape)
    dtype = tf.as_dtype(inputs[0].dtype).as_numpy_dtype
    if isinstance(data, tf.data.Dataset):
        spec = _numpy_x(data.element_spec)
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                "Expected `representative_data` elements whose x is one tensor. "
                f"Received element_spec={data.element_spec}."
            )
        expected = [None if d is None else int(d) for d in inputs[0].shape[1:]]
        dims = spec.shape.as_list()[1:] if spec.shape.rank == rank else spec.shape.as_list()
        if spec.shape.rank not in (rank, rank - 1) or any(
            e is not None and d is not None and e != d for e, d in zip(expected, dims)
        ):
            raise ValueError(
                f"The model takes inputs of shape {[None] + expected}; `representative_data`'s x has "
                f"shape {spec.shape} (batched or not). Pass the model's training inputs."
            )
        ds = data.map(lambda *e: _numpy_x(e) if len(e) > 1 else e[0])
        if spec.shape.rank == rank:
            ds = ds.unbatch()

        def generate():
            for x in ds.take(limit).as_numpy_iterator():
                yield [np.asarray(x, dtype)[None]]

        return generate
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = data[0]  # (x, y[, sample_weight]) arrays, as evaluate_tflite takes them
    try:
        array = np.asarray(data, dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Expected `representative_data` to be a tf.data.Dataset, an array of inputs, an "
            f"(x, y) tuple of arrays or a callable. Received: {type(data).__name__} ({error})."
        ) from None
    if array.ndim == rank - 1:
        array = array[None]
    expected = [None if d is None else int(d) for d in inputs[0].shape[1:]]
    if array.ndim != rank or any(e not in (None, d) for e, d in zip(expected, array.shape[1:])):
        raise ValueError(
            f"The model takes inputs of shape {[None] + expected}; `representative_data` has shape "
            f"{list(array.shape)}. Pass the inputs (a batch of examples) or an (x, y) tuple."
        )

    def generate_array():
        for x in array[:limit]:
            yield [np.asarray(x, dtype)[None]]

    return generate_array


def _conversion_reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines()]
    select = [line.split(":", 1)[1].strip() for line in lines if line.startswith("TF Select ops:")]
    if select:
        return (
            f"the model uses TensorFlow ops that have no TFLite builtin kernel: {select[0]}. Replace "
            "the layers that use them with layers TFLite supports, or convert with "
            "`tf.lite.TFLiteConverter` and `SELECT_TF_OPS` (a larger runtime, not int8)"
        )
    errors = [
        re.sub(r"^.*?error: ", "", line) for line in lines if "error:" in line and not line.startswith("loc(")
    ]
    errors = [e for e in errors if e and not e.startswith("failed while converting")]
    if errors:
        return errors[0]
    return next((line for line in lines if line), "unknown converter error")


def to_tflite(
    model,
    representative_data=None,
    *,
    int8: bool = True,
    io_dtype: str = "float32",
    path: Optional[Union[str, os.PathLike]] = None,
    num_calibration_examples: int = 256,
) -> bytes:
    """Converts a student to a TFLite flatbuffer, int8 by default.

    * A quantization-aware model (`quantize_for_distillation`) with
      ``int8=True``: ``TFLiteConverter`` with ``Optimize.DEFAULT`` turns its
      fake-quant ops into int8 weights and activations with the ranges
      learned in QAT. ``representative_data`` is optional (used only to
      calibrate what QAT did not cover).
    * A float model (Keras 3 or tf_keras, e.g. a stripped pruned model) with
      ``int8=True``: post-training full-integer quantization; needs
      ``representative_data`` to calibrate activation ranges, and every op
      must have an int8 kernel (``TFLITE_BUILTINS_INT8``).
    * ``int8=False``: a float32 model (the baseline to compare sizes and
      accuracy with).

    Args:
        model: a Keras 3 or tf_keras model (no pruning wrappers: `strip`).
        representative_data: calibration inputs: a ``tf.data.Dataset`` of
            ``x`` or ``(x, y[, sample_weight])``, batched or not, an array of
            inputs, an ``(x, y)`` tuple of arrays, or a callable as ``TFLiteConverter.representative_dataset``
            takes. The first ``num_calibration_examples`` examples are used.
            Defaults to None.
        int8: quantize to int8. Defaults to True.
        io_dtype: type of the model's input and output tensors: ``"float32"``
            (quantize/dequantize inside the model, a drop-in replacement) or
            ``"int8"``/``"uint8"`` (fully integer, for accelerators and
            microcontrollers; `evaluate_tflite` applies the scales).
            Defaults to "float32".
        path: if set, the flatbuffer is also written there. Defaults to None.
        num_calibration_examples: examples read from ``representative_data``.
            Defaults to 256.

    Returns:
        The TFLite flatbuffer as ``bytes``.

    Raises:
        ValueError: for a model with pruning wrappers, int8 conversion of a
            float model without ``representative_data``, a bad ``io_dtype``.
        TFLiteConversionError: when the converter fails, saying why (e.g.
            which ops TFLite has no kernel for).

    Example:

    ```python
    int8_bytes = keras_kd.optimize.to_tflite(qat, path="student_int8.tflite")
    float_bytes = keras_kd.optimize.to_tflite(float_student, int8=False)
    ```
    """
    _compat.check_model(model, "model")
    if io_dtype not in _IO_DTYPES:
        raise ValueError(f"Expected `io_dtype` in {sorted(_IO_DTYPES)}. Received: io_dtype={io_dtype!r}")
    if not int8 and io_dtype != "float32":
        raise ValueError(
            f"`io_dtype={io_dtype!r}` needs int8=True: a float model has float inputs and outputs."
        )
    count = num_calibration_examples
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"Expected `num_calibration_examples` >= 1. Received: num_calibration_examples={count!r}"
        )
    flavour = _compat.flavour_of(model)
    qat = False
    if flavour == _compat.TF_KERAS:
        if _has_wrappers(model, _TFMOT_PRUNE_WRAPPERS):
            raise ValueError(
                f"`model` ({model.name!r}) still has tfmot pruning wrappers (masks and step counters "
                "would be exported): convert `keras_kd.optimize.strip(model)` instead."
            )
        qat = _is_qat(model)
    if int8 and not qat and representative_data is None:
        raise ValueError(
            f"int8=True on the float model {model.name!r} is post-training quantization, which "
            "needs `representative_data` (a few hundred training inputs) to calibrate the "
            "activation ranges. Pass it, or train a quantization-aware model with "
            "`quantize_for_distillation` (no calibration needed), or use int8=False."
        )
    converter = _converter(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative_data is not None:
            converter.representative_dataset = _representative(representative_data, model, count)
        if not qat:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_dtype != "float32":
            converter.inference_input_type = _IO_DTYPES[io_dtype]
            converter.inference_output_type = _IO_DTYPES[io_dtype]
    try:
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": QAT models carry
            # their own input ranges.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            with contextlib.redirect_stdout(io.StringIO()):  # "Saved artifact at ..." (Keras 3 export)
                flatbuffer = converter.convert()
    except Exception as e:  # ConverterError and friends: say why
        kind = "int8 " if int8 else ""
        raise TFLiteConversionError(
            f"TFLite {kind}conversion of `model` ({model.name!r}) failed: {_conversion_reason(str(e))}."
        ) from e
    if path is not None:
        with open(os.fspath(path), "wb") as f:
            f.write(flatbuffer)
    return flatbuffer


def _interpreter(tflite, num_threads):
    from ai_edge_litert.interpreter import Interpreter

    def load(**source):
        try:
            return Interpreter(**source, num_threads=num_threads)
        except ValueError as error:
            raise ValueError(
                f"`tflite` is not a TFLite model ({error}). Pass the bytes `keras_kd.optimize."
                "to_tflite` returns, or the path of the `.tflite` file it wrote."
            ) from None

    if isinstance(tflite, (bytes, bytearray)):
        return load(model_content=bytes(tflite))
    if isinstance(tflite, (str, os.PathLike)):
        if not os.path.exists(os.fspath(tflite)):
            raise FileNotFoundError(f"No TFLite file at {os.fspath(tflite)!r}.")
        return load(model_path=os.fspath(tflite))
    raise TypeError(
        "Expected `tflite` to be the bytes of a TFLite model or a path to a .tflite file. "
        f"Received: {type(tflite).__name__}."
    )


def _converter(model):
    """A ``TFLiteConverter`` whose signature names the outputs in Keras order.

    Keras 3 models export their outputs as ``output_0``, ``output_1``, ...;
    tf_keras ones under their layer names, listed alphabetically, which loses
    the order. A multi-output single-input tf_keras model is therefore
    converted from a function returning ``{"output_<i>": the i-th Keras
    output}``, the Keras 3 naming; `evaluate_tflite` reads ``output_0``.
    """
    inputs = _input_tensors(model)
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) < 2 or len(inputs) != 1 or _compat.flavour_of(model) == _compat.KERAS3:
        return tf.lite.TFLiteConverter.from_keras_model(model)
    spec = tf.TensorSpec(tuple(inputs[0].shape), inputs[0].dtype, name=_compat.input_name(inputs[0]))

    @tf.function(input_signature=[spec])
    def serve(x):
        results = tf.nest.flatten(model(x, training=False))
        return {f"output_{i}": t for i, t in enumerate(results)}

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)


def _output_index(interpreter, output) -> int:
    """The tensor index of the output `evaluate_tflite` scores (see there)."""
    details = interpreter.get_output_details()
    signatures = interpreter.get_signature_list()
    named = {}
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        named = {name: d["index"] for name, d in runner.get_output_details().items()}
    if output is None:
        if len(details) == 1:
            return details[0]["index"]
        if "output_0" in named:
            return named["output_0"]
        raise ValueError(
            f"The TFLite model has {len(details)} outputs ({sorted(named) or [d['name'] for d in details]}) "
            "and its signature does not give their Keras order (`keras_kd.optimize.to_tflite` names "
            "them output_0, output_1, ...). Pass `output=` the name of the logits output."
        )
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(f"Expected `output` to be an int, a str or None. Received: output={output!r}")
    name = f"output_{output}" if isinstance(output, int) else output
    if name not in named:
        if isinstance(output, int) and output == 0 and len(details) == 1:
            return details[0]["index"]
        raise ValueError(f"Unknown `output`={output!r}. The TFLite model's outputs are {sorted(named)}.")
    return named[name]


def _labels(y):
    if targets_lib.is_targets(y):
        return y.labels
    return y


def _has_labels(element_spec) -> bool:
    if not isinstance(element_spec, tuple) or len(element_spec) < 2:
        return False
    y = element_spec[1]
    if isinstance(y, targets_lib.TeacherTargets.Spec):
        return bool(y.has_labels)
    return True


def _predictions_and_labels(logits, y):
    """Predicted and true class ids, as `keras_kd.teacher_agreement` reads them:
    argmax (``logit > 0`` for one logit, a binary model); labels as class ids,
    one-hot/soft labels (argmax), or 0/1 labels (``> 0.5``) for one logit."""
    classes = logits.shape[-1]
    pred = (logits[..., 0] > 0).astype(np.int64) if classes == 1 else logits.argmax(-1)
    if y.ndim == logits.ndim and y.shape[-1] == classes and classes > 1:
        y = y.argmax(-1)
    if y.size != pred.size:
        raise ValueError(
            f"The labels of shape {y.shape} do not match the model's outputs of shape {logits.shape}: "
            f"expected class ids of shape {pred.shape} (or {pred.shape + (1,)}), or one-hot labels of "
            f"shape {logits.shape}. Check that the labels belong to this model ({max(classes, 2)} classes)."
        )
    y = y.reshape(pred.shape)
    if classes == 1:
        if y.size and (np.min(y) < 0 or np.max(y) > 1):
            raise ValueError(
                "A one-logit (binary) model needs labels in [0, 1] (0/1 class labels or "
                f"probabilities). Received labels in [{np.min(y)}, {np.max(y)}]."
            )
        return pred, (y > 0.5).astype(np.int64)
    if y.size and (np.any(y != np.round(y)) or np.min(y) < 0 or np.max(y) >= classes):
        raise ValueError(
            f"Expected class ids in [0, {classes - 1}] for a model with {classes} outputs. "
            f"Received labels in [{np.min(y)}, {np.max(y)}]"
            + (" that are not whole numbers" if np.any(y != np.round(y)) else "")
            + ". Pass class ids, or one-hot labels of the output's width."
        )
    return pred, y


def evaluate_tflite(
    tflite,
    dataset,
    *,
    batch_size: int = 256,
    return_logits: bool = False,
    num_threads: Optional[int] = None,
    output: Optional[Union[int, str]] = None,
):
    """Accuracy of a TFLite model on a dataset, run with the LiteRT interpreter.

    Runs ``ai_edge_litert.interpreter.Interpreter`` (TensorFlow's own
    ``tf.lite.Interpreter`` is deprecated) batch by batch. Integer inputs
    and outputs (``to_tflite(..., io_dtype="int8")``) are handled with the
    model's quantization parameters: inputs are quantized as
    ``round(x / scale) + zero_point``, outputs dequantized as
    ``(q - zero_point) * scale``, so the logits compare with the Keras
    model's.

    Accuracy is the fraction of positions where the argmax of the output
    (``logit > 0`` for a one-unit output: a binary model's Bernoulli logit)
    equals the label (class ids, one-hot labels, or 0/1 labels for a binary
    model); labels may be
    `keras_kd.TeacherTargets` (their ``labels`` are used). Sample weights are
    ignored.

    Args:
        tflite: the model's bytes (from `to_tflite`) or a ``.tflite`` path.
        dataset: a ``tf.data.Dataset`` of ``(x, y[, sample_weight])``,
            batched or not, or an ``(x, y)`` tuple of arrays. With
            ``return_logits=True``, elements may be ``x`` alone.
        batch_size: batch size for unbatched data. Defaults to 256.
        return_logits: also return the model's (dequantized) outputs.
            Defaults to False.
        num_threads: interpreter threads; None lets LiteRT choose.
            Defaults to None.
        output: which output holds the logits, for a multi-output model:
            ``i`` for the model's ``i``-th Keras output, or the name of a
            signature output. None scores the only output, or the first Keras
            output (``output_0``, as `to_tflite` and Keras 3 name it), never
            the first tensor LiteRT happens to list. Defaults to None.

    Returns:
        The accuracy, a float; with ``return_logits``, ``(accuracy, logits)``
        where ``logits`` is a float32 array (``accuracy`` is None for data
        without labels).

    Raises:
        ValueError: for a multi-input model, a dataset without labels
            (including unlabelled keras_kd data, whose targets carry
            ``has_labels=False``) and ``return_logits=False``, inputs of the
            wrong shape, labels that do not fit the output (another shape, a
            class id out of range), or a multi-output model whose outputs are not named
            in Keras order and no ``output``.

    Example:

    ```python
    acc = keras_kd.optimize.evaluate_tflite("student_int8.tflite", test_ds)
    ```
    """
    interpreter = _interpreter(tflite, num_threads)
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise ValueError(
            f"evaluate_tflite supports single-input models. Received a model with {len(inputs)} "
            f"inputs: {[d['name'] for d in inputs]}."
        )
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset, tf.data.Dataset):
        dataset = tf.data.Dataset.from_tensor_slices(dataset)
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "Expected `dataset` to be a tf.data.Dataset or an (x, y) tuple. "
            f"Received: {type(dataset).__name__}."
        )
    rank = len(inputs[0]["shape_signature"])
    x_spec = _numpy_x(dataset.element_spec)
    if not isinstance(x_spec, tf.TensorSpec):
        raise ValueError(
            f"Expected elements whose x is one tensor. Received element_spec={dataset.element_spec}."
        )
    if x_spec.shape.rank == rank - 1:
        dataset = dataset.batch(batch_size)
        x_spec = _numpy_x(dataset.element_spec)
    signature = [int(d) for d in inputs[0]["shape_signature"]]
    dims = x_spec.shape.as_list()[1:] if x_spec.shape.rank == rank else []
    mismatch = any(s not in (-1, d) and d is not None for s, d in zip(signature[1:], dims))
    if x_spec.shape.rank != rank or mismatch:
        raise ValueError(
            f"The TFLite model takes inputs of shape {signature} (-1: any size); the dataset's "
            f"x has shape {x_spec.shape}."
        )
    has_labels = _has_labels(dataset.element_spec)
    if not has_labels and not return_logits:
        raise ValueError(
            "`dataset` has no labels to measure accuracy on (its elements are `x` alone, or its "
            "keras_kd targets say `has_labels=False`); pass return_logits=True for the outputs."
        )
    in_detail = inputs[0]
    out_index = _output_index(interpreter, output)

    def out_details():
        return next(d for d in interpreter.get_output_details() if d["index"] == out_index)

    out_detail = out_details()
    in_scale, in_zero = in_detail["quantization"]
    current_shape = None
    correct = count = 0
    all_logits = []
    for element in dataset:
        x = np.asarray(_numpy_x(element))
        if tuple(x.shape) != current_shape:
            interpreter.resize_tensor_input(in_detail["index"], list(x.shape))
            interpreter.allocate_tensors()
            current_shape = tuple(x.shape)
            out_detail = out_details()
        dtype = in_detail["dtype"]
        if np.issubdtype(dtype, np.integer) and in_scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x.astype(np.float32) / in_scale) + in_zero, info.min, info.max).astype(dtype)
        else:
            x = x.astype(dtype)
        interpreter.set_tensor(in_detail["index"], x)
        interpreter.invoke()
        out = interpreter.get_tensor(out_detail["index"])
        scale, zero = out_detail["quantization"]
        if np.issubdtype(out.dtype, np.integer) and scale:
            logits = (out.astype(np.float32) - zero) * scale
        else:
            logits = np.asarray(out, np.float32)
        if return_logits:
            all_logits.append(logits)
        if has_labels:
            pred, y = _predictions_and_labels(logits, np.asarray(_labels(element[1])))
            correct += int(np.sum(pred == y))
            count += pred.size
    accuracy = correct / count if has_labels and count else None
    if return_logits:
        return accuracy, (np.concatenate(all_logits) if all_logits else np.zeros((0,), np.float32))
    return accuracy


def file_size(obj, *, compressed: bool = False) -> int:
    """Size in bytes of a TFLite model, a file, or a Keras model as saved.

    Pruning alone does not shrink a file (zeros take as much room as other
    numbers); it shows under compression, so ``compressed=True`` reports the
    gzip size (level 9), as the tfmot guides do.

    Args:
        obj: TFLite ``bytes``, a path to a file, or a Keras 3 / tf_keras model
            (saved to a temporary ``.keras`` / ``.h5`` file to measure).
        compressed: report the gzip-compressed size. Defaults to False.

    Returns:
        The size in bytes.

    Example:

    ```python
    print(keras_kd.optimize.file_size(int8_bytes), keras_kd.optimize.file_size(float_bytes))
    ```
    """
    if isinstance(obj, (bytes, bytearray)):
        data = bytes(obj)
    elif isinstance(obj, (str, os.PathLike)):
        with open(os.fspath(obj), "rb") as f:
            data = f.read()
    elif _compat.is_model(obj):
        with tempfile.TemporaryDirectory() as tmp:
            if _compat.flavour_of(obj) == _compat.KERAS3:
                target = os.path.join(tmp, "model.keras")
                obj.save(target)
            else:
                target = os.path.join(tmp, "model.keras")
                with _tfmot().quantization.keras.quantize_scope():
                    obj.save(target)
            with open(target, "rb") as f:
                data = f.read()
    else:
        raise TypeError(
            f"Expected `obj` to be TFLite bytes, a path or a Keras model. Received: {type(obj).__name__}."
        )
    return len(gzip.compress(data, compresslevel=9)) if compressed else len(data)
