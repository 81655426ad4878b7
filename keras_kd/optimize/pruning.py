"""Magnitude pruning during distillation: `prune_for_distillation`, `strip`, `sparsity`.

A thin layer over tfmot's ``prune_low_magnitude``: the student is copied and
wrapped, trained with `keras_kd.DistillationLoss` and the returned callbacks,
then `strip`-ped for deployment. What tfmot prunes in each layer is read from
tfmot's own registry, so `sparsity` counts exactly those weights.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd.optimize import _common
from keras_kd.optimize._common import check_num_classes


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
    if _common.is_tfmot_layer(layer, _common.PRUNE_WRAPPERS) or _compat.is_input_layer(layer):
        return None
    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer) or hasattr(layer, "get_prunable_weights"):
        return None
    if _compat.is_model(layer):
        return None  # tfmot recurses into nested models; their layers are checked
    if _common.prune_registry().supports(layer):
        return None
    if not _compat.is_builtin(layer):
        return (
            f"custom layer class `{_common.qualname(layer)}`: tfmot prunes the built-in layers of its "
            "registry and layers that implement `tfmot.sparsity.keras.PrunableLayer` "
            "(`get_prunable_weights`)"
        )
    return (
        f"tfmot's pruning registry has no entry for the built-in layer `{type(layer).__name__}` "
        "(for recurrent layers: an unsupported cell)"
    )


def _unsupported(model, select, why) -> list:
    problems = []
    for path, layer in _common.walk_layers(model):
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
    frequency = _checks.positive_int(frequency, "frequency")
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
    _common.require_tf_keras_graph(student, "student", "prune_for_distillation")
    _common.require_float32(
        student, "student", "prune_for_distillation",
        "tfmot's pruning wrappers call the wrapped layer without its mixed-precision autocast",
        mixed_only=True,
    )
    for value, argument in ((target_sparsity, "target_sparsity"), (initial_sparsity, "initial_sparsity")):
        _checks.number(value, argument, low=0, high=1, high_open=True, finite=False)
    if initial_sparsity > target_sparsity:
        raise ValueError(
            "Expected `initial_sparsity` <= `target_sparsity`. Received: "
            f"initial_sparsity={initial_sparsity}, target_sparsity={target_sparsity}"
        )
    for value, argument in ((begin_step, "begin_step"), (end_step, "end_step")):
        _checks.integer(value, argument)
        if value < 0:
            raise ValueError(
                f"Expected `{argument}` to be a non-negative integer. Received: {argument}={value!r}. "
                "A negative step count usually comes from `dataset.cardinality()`, which is -1 "
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
    _checks.number(power, "power", low=0, low_open=True)
    _checks.one_of(block_pooling_type, "block_pooling_type", ("AVG", "MAX"))
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise ValueError(f"Expected `block_size` to be a (height, width) pair. Received: block_size={block_size!r}")
    block_size = tuple(_checks.positive_int(v, "block_size") for v in block_size)
    schedule_begin, frequency = _schedule_steps(begin_step, end_step, frequency)
    if teacher is not None:
        check_num_classes(student, teacher)
    select = _common.selector(layers, student, "layers")
    tfmot = _common.tfmot()
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
        for path, layer in _common.walk_layers(student)
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
    copy = _common.clone(student)
    if select is None:
        pruned = sparsity_lib.prune_low_magnitude(copy, **params)
    else:
        tfk = _compat.tf_keras()

        def wrap(layer):
            if select(layer) and not _common.is_tfmot_layer(layer, _common.PRUNE_WRAPPERS):
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
    _common.require_tf_keras_graph(model, "model", "strip")
    tfmot = _common.tfmot()
    with tfmot.quantization.keras.quantize_scope():
        stripped = tfmot.sparsity.keras.strip_pruning(model)
    return _common.clone(stripped)


_KERNEL = re.compile(r"(^|_)kernel$|^embeddings$")


def _prunable_weights(layer) -> Optional[list]:
    """The weights tfmot prunes in ``layer`` (either flavour), by tfmot's own
    registry; ``None`` for layers tfmot cannot prune."""
    if _common.is_tfmot_layer(layer, _common.PRUNE_WRAPPERS):
        # Undocumented: a renamed attribute must not silently drop the layer from the report.
        return [weight for weight, _, _ in _compat.private_attribute(layer, "pruning_vars", _common.TFMOT)]
    inner = _common.unwrapped(layer)
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
    if hasattr(layer, "get_prunable_weights") and not _compat.is_model(layer):
        return [(w, w.name.split(":")[0].split("/")[-1]) for w in layer.get_prunable_weights()]
    rnn_layers, rnn_cells, layer_weights = _common.prune_registry_maps()
    klass = None
    if _compat.is_builtin(layer):
        klass = _compat.builtin_layer_class(_compat.TF_KERAS, type(layer).__name__)
    if klass is None:
        return None
    if klass in rnn_layers:
        cells = getattr(layer.cell, "cells", [layer.cell])
        names = {c.__name__: n for c, n in rnn_cells.items()}
        if any(type(cell).__name__ not in names for cell in cells):
            return None
        return [(getattr(cell, n), n) for cell in cells for n in names[type(cell).__name__]]
    if klass not in layer_weights:
        return None
    found = []
    for path in layer_weights[klass]:
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
        for w in _common.unwrapped(layer).weights
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
    keras_kd.optimize.sparsity(keras_kd.optimize.strip(pruned))
    # {"dense": 0.75, "dense_1": 0.75}
    ```
    """
    _compat.check_model(model, "model")
    _common.tfmot()
    report = {}
    for path, layer in _common.walk_layers(model):
        if _compat.is_model(layer):
            continue
        zeros = total = 0
        for weight in _prunable_weights(layer) or []:
            values = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
            zeros += int(np.sum(values == 0))
            total += values.size
        if total:
            name = _common.unwrapped(layer).name
            key = path.rsplit("/", 1)[0] + "/" + name if "/" in path else name
            report[key] = zeros / total
    return report
