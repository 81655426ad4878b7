"""Quantization-aware training during distillation: `quantize_for_distillation`.

tfmot's ``quantize_model`` (whole model), ``quantize_annotate_layer`` +
``quantize_apply`` (chosen layers) or the prune-preserving scheme (PQAT), on a
copy of the student; the layers tfmot would refuse are all listed up front.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

from keras_kd import _checks
from keras_kd import _compat
from keras_kd.optimize import _common
from keras_kd.optimize._common import check_num_classes
from keras_kd.optimize.pruning import sparsity


_NESTED_QAT = (
    "a model nested inside the student: tfmot quantizes the layers of one flat "
    "Functional or Sequential model; rebuild it without nesting"
)


# Built-in layers tfmot 0.8's 8-bit registry leaves out (commented out upstream, "not verified").
_ONE_D = ("Conv1D", "MaxPooling1D", "UpSampling1D", "LocallyConnected1D")
_PTQ = (
    "For an int8 model without QAT, train the float student and use post-training "
    "quantization: `keras_kd.optimize.to_tflite(student, representative_data=x_train)`"
)


def _quantize_reason(layer) -> str:
    name = type(layer).__name__
    if not _compat.is_builtin(layer):
        return (
            f"custom layer class `{_common.qualname(layer)}`: tfmot's 8-bit scheme quantizes the built-in "
            "layers it knows; give this layer a `tfmot.quantization.keras.QuantizeConfig` "
            "(`quantize_annotate_layer(layer, quantize_config=...)` inside `quantize_scope`)"
        )
    if name == "BatchNormalization":
        return (
            "tfmot quantizes a BatchNormalization only together with the Conv2D, DepthwiseConv2D "
            "or Dense layer right before it, when that layer has no activation of its own "
            "(`activation=None`; put a ReLU after the BatchNormalization instead), and this one has "
            "no such layer before it (tfmot's `quantize_model` refuses it too). Quantize the other "
            "layers (`layers=[...]`) or move or remove it"
        )
    if name in _ONE_D:
        return (
            f"tfmot's 8-bit quantization registry has no `{name}` (tfmot leaves 1-D convolution and "
            "pooling layers out as not verified; `quantize_model` refuses it too). Write it as the "
            "2-D layer on inputs of shape (steps, 1, channels) (e.g. `Conv2D(f, (k, 1))`), or give "
            "it a `tfmot.quantization.keras.QuantizeConfig`"
        )
    return (
        f"tfmot's 8-bit quantization registry does not support the built-in layer `{name}` in "
        "this position or configuration (tfmot's `quantize_model` refuses it too); quantize the "
        "other layers, or give it a `tfmot.quantization.keras.QuantizeConfig`"
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
    _common.require_tf_keras_graph(student, "student", "quantize_for_distillation")
    _common.require_float32(
        student, "student", "quantize_for_distillation",
        "tfmot's fake-quantization wrappers compute in float32 (they fail on float16 and "
        "mixed-precision layers)",
    )
    pruned = _common.has_wrappers(student, _common.PRUNE_WRAPPERS)
    if pruned:
        raise ValueError(
            f"`student` ({student.name!r}) still has tfmot pruning wrappers ({pruned[:3]}...). "
            "Strip them first: `quantize_for_distillation(keras_kd.optimize.strip(pruned), "
            "preserve_sparsity=True)`."
        )
    quantized = _common.has_wrappers(student, _common.QAT_LAYERS)
    if quantized:
        raise ValueError(
            f"`student` ({student.name!r}) is already quantization-aware ({quantized[:3]}): "
            "quantize the float student once."
        )
    _checks.one_of(preserve_sparsity, "preserve_sparsity", (True, False))
    if teacher is not None:
        check_num_classes(student, teacher)
    tfmot = _common.tfmot()
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
    select = _common.selector(layers, student, "layers")
    nested = [
        f"  - {path} ({type(layer).__name__}): {_NESTED_QAT}"
        for path, layer in _common.walk_layers(student)
        if _compat.is_model(layer)
    ]
    if nested:
        raise ValueError(
            f"tfmot cannot quantize {len(nested)} layer(s) of `student` ({student.name!r}):\n"
            + "\n".join(nested)
        )
    if preserve_sparsity and select is not None:
        kept_float = [
            f"{name}: {value:.2f}" for name, value in sparsity(student).items()
            if value >= 0.3 and not select(student.get_layer(name))
        ]
        if kept_float:
            warnings.warn(
                f"`student` ({student.name!r}) has sparse kernels in layers that stay float "
                f"({', '.join(kept_float[:5])} zeros): the prune-preserving scheme keeps the zeros "
                "only in the quantized layers, so training fills these in again. Quantize them too, "
                "or freeze them (`layer.trainable = False` before compiling).",
                stacklevel=2,
            )
    hint = "" if select is not None else "\nQuantize only the other layers with `layers=[...]`."
    hint += f"\n{_PTQ}."
    scope = qk.quantize_scope(_common.custom_objects(student, custom_objects))
    copy = _common.clone(student)
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
            match = re.search(r"unsupported layer <class '[\w.]*?(\w+)'>", str(e))
            refused = [x for x in copy.layers if match and type(x).__name__ == match.group(1)]
            if refused:  # "`get_quantize_config()` called on an unsupported layer <class ...>"
                listing = "\n".join(f"  - {x.name} ({type(x).__name__}): {_quantize_reason(x)}" for x in refused)
                raise ValueError(
                    f"tfmot cannot quantize {len(refused)} layer(s) of `student` ({student.name!r}):\n"
                    f"{listing}{hint}"
                ) from e
            raise ValueError(f"tfmot could not quantize `student` ({student.name!r}): {e}") from e


def _activation_refusal(model, student) -> str:
    """tfmot's "Only some Keras activations ... are supported", with the layers named."""
    supported = _common.quantizable_activations()
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
    if _common.has_wrappers(model, ("QuantizeAnnotate",)):
        return []
    layer_map = {
        layer.name: {"quantize_config": None}
        for layer in model.layers
        if not _compat.is_input_layer(layer) and (select is None or select(layer))
    }
    for input_layer, consumers in _compat.input_consumers(model).items():
        if any(name in layer_map for name in consumers):
            layer_map[input_layer.name] = {}
    transformed, layer_map = scheme.get_layout_transformer().apply(model, layer_map)
    registries = [scheme.get_quantize_registry()]
    qk = _common.tfmot().quantization.keras
    if isinstance(scheme, qk.collab_opts.Default8BitPrunePreserveQuantizeScheme):
        # Its registry "supports" every layer without trainable weights but takes the
        # quantize configs from the default 8-bit registry, which may refuse them.
        registries.append(qk.default_8bit.Default8BitQuantizeScheme().get_quantize_registry())
    problems = []
    for layer in transformed.layers:
        if _compat.is_input_layer(layer) or layer.name not in layer_map:
            continue
        if _common.is_tfmot_layer(layer, _common.QUANT_WRAPPERS) or layer_map[layer.name].get("quantize_config"):
            continue
        if not all(registry.supports(layer) for registry in registries):
            problems.append(f"  - {layer.name} ({type(layer).__name__}): {_quantize_reason(layer)}")
    return problems
