"""The Keras 3 <-> tf_keras model bridge behind `keras_kd.optimize.to_tf_keras`
and `keras_kd.optimize.to_keras3`.

A model is rebuilt layer by layer from its graph: each built-in layer from its
config, translated by `keras_kd._compat.translate_layer_config` (renamed
arguments, activations by meaning, BatchNormalization statistics), then every
weight is copied and state derived from weights (e.g. an adapted
``Normalization``'s mean and variance) is finalised.
"""

from __future__ import annotations

import warnings
from typing import Optional

import tensorflow as tf

from keras_kd import _compat

_TFMOT_PRUNE_WRAPPERS = ("PruneLowMagnitude",)
_TFMOT_QUANT_WRAPPERS = ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer", "QuantizeAnnotate")


# ---------------------------------------------------------------------------
# Keras 3 <-> tf_keras bridge
# ---------------------------------------------------------------------------


def _is_tfmot_layer(layer, names) -> bool:
    klass = type(layer)
    return klass.__name__ in names and klass.__module__.startswith("tensorflow_model_optimization")


def _walk_layers(model, prefix=""):
    """``(path, layer)`` for every layer of a model, nested models expanded."""
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        yield path, layer
        if _compat.is_model(layer):
            yield from _walk_layers(layer, path + "/")


def _qualname(obj) -> str:
    klass = type(obj)
    return f"{klass.__module__}.{klass.__qualname__}"


class _Converter:
    """Rebuilds a Functional/Sequential model layer by layer in another flavour."""

    def __init__(self, target: str, custom_objects: dict):
        self.target = target
        self.keras = _compat.module(target)
        self.custom_objects = dict(custom_objects or {})
        self.new_layers: dict = {}  # id(old layer) -> new layer
        self.pairs: list = []  # (path, old, new) whose weights must be copied
        self.problems: list = []

    # -- layers ---------------------------------------------------------------

    def layer(self, layer, path):
        key = id(layer)
        if key not in self.new_layers:
            if _compat.is_model(layer):
                self.new_layers[key] = self.model(layer, path + "/")
            else:
                new = self._new_layer(layer, path)
                if new is not None:
                    self.pairs.append((path, layer, new))
                self.new_layers[key] = new
        return self.new_layers[key]

    def _problem(self, path, obj, reason):
        self.problems.append(f"{path} ({type(obj).__name__}): {reason}")

    def _new_layer(self, layer, path):
        name = type(layer).__name__
        target_name = self.keras.__name__
        custom = self.custom_objects.get(name, self.custom_objects.get(type(layer)))
        try:
            if custom is not None:
                return self._custom(layer, path, custom)
            if _is_tfmot_layer(layer, _TFMOT_PRUNE_WRAPPERS):
                self._problem(
                    path,
                    layer,
                    "a tfmot pruning wrapper; remove the wrappers first with "
                    "`keras_kd.optimize.strip(model)` (the pruned weights stay)",
                )
                return None
            if _is_tfmot_layer(layer, _TFMOT_QUANT_WRAPPERS):
                self._problem(
                    path,
                    layer,
                    "a tfmot quantization-aware layer: fake-quantization wrappers exist only in "
                    "tf_keras. Deploy a QAT model with `keras_kd.optimize.to_tflite(model)`; bring "
                    "back the float student (before `quantize_for_distillation`) instead",
                )
                return None
            if not _compat.is_builtin(layer):
                self._problem(
                    path,
                    layer,
                    f"custom layer class `{_qualname(layer)}` is not a built-in Keras layer; pass "
                    f"`custom_objects={{{name!r}: <{target_name} layer class, or fn(layer) -> layer>}}`",
                )
                return None
            if name == "TFOpLambda" or name == "SlicingOpLambda":
                self._problem(
                    path,
                    layer,
                    "a TensorFlow op called on symbolic tensors in a tf_keras model; Keras 3 "
                    "has no such node. Use a layer (e.g. `layers.Add`, `layers.Lambda`) instead",
                )
                return None
            if name == "Lambda":
                return self._lambda(layer)
            _, config = _compat.translate_layer_config(name, layer.get_config(), self.target)
            return _compat.layer_from_config(_compat.builtin_layer_class(self.target, name), config)
        except _compat.UnconvertibleError as e:
            self._problem(path, layer, str(e))
        except Exception as e:  # noqa: BLE001 - reported with the layer's name
            reason = f"{target_name}.layers.{name}.from_config failed: {type(e).__name__}: {e}"
            self._problem(path, layer, reason)
        return None

    def _custom(self, layer, path, custom):
        """The replacement ``custom_objects`` gives: a target layer class or ``fn(layer)``."""
        name = type(layer).__name__
        target_name = self.keras.__name__
        expected = f"a {target_name} layer class or a function `fn(layer) -> {target_name} layer`"
        if isinstance(custom, type):
            if not issubclass(custom, self.keras.layers.Layer):
                given = f"{custom.__module__}.{custom.__qualname__}"
                self._problem(path, layer, f"`custom_objects[{name!r}]` is {given}, not {expected}")
                return None
            config = layer.get_config()
            _, config = _compat.translate_layer_config(name, config, self.target, klass=custom)
            return _compat.layer_from_config(custom, config)
        if not callable(custom):
            self._problem(path, layer, f"`custom_objects[{name!r}]` is {custom!r}, not {expected}")
            return None
        new = custom(layer)
        if not isinstance(new, self.keras.layers.Layer):
            self._problem(
                path, layer,
                f"`custom_objects[{name!r}]` returned {new!r} of type {type(new).__name__}, "
                f"not a {target_name} layer",
            )
            return None
        return new

    def _lambda(self, layer):
        # The same Python function: it runs on TensorFlow tensors in both flavours.
        return self.keras.layers.Lambda(
            layer.function,
            output_shape=getattr(layer, "_output_shape", None),
            mask=getattr(layer, "mask", None),
            arguments=dict(getattr(layer, "arguments", None) or {}),
            name=layer.name,
        )

    # -- models -----------------------------------------------------------------

    def model(self, model, prefix=""):
        graph = _compat.graph_of(model)
        if graph is None:
            self.problems.append(
                f"{prefix.rstrip('/') or model.name} ({type(model).__name__}): a subclassed model or a "
                "Sequential model that was never built has no layer graph to rebuild; build it "
                "(call it on an `Input`) or write it as a Functional model"
            )
            return None
        if _compat.is_sequential(model):
            return self._sequential(model, prefix)
        return self._functional(model, prefix)

    def _sequential(self, model, prefix):
        layers = [layer for layer in model.layers if not _compat.is_input_layer(layer)]
        news = [self.layer(layer, prefix + layer.name) for layer in layers]
        if self.problems:
            return None
        first = model.inputs[0]
        inp = _compat.make_input(self.target, first, name=_compat.input_name(first))
        return self.keras.Sequential([inp, *news], name=model.name)

    def _functional(self, model, prefix):
        calls = list(_compat.graph_calls(model))
        skipped, auto_masks = _implicit_mask_ops(calls)
        for op, _, kwargs, outs in calls:
            if id(op) in skipped:
                continue
            if not (_compat.is_model(op) or isinstance(op, _layer_types())):
                op_name = getattr(op, "name", type(op).__name__)
                feeds_mask = any(id(t) in _explicit_masks(calls, auto_masks) for t in outs)
                if feeds_mask:
                    reason = (
                        "a Keras 3 operation (`keras.ops`) that computes an explicit `mask=` for a "
                        "layer; tf_keras cannot rebuild it, and dropping it would change the outputs. "
                        "Pass the mask as a model input (`keras.Input(..., dtype='bool')`), or let a "
                        "layer compute it (`Embedding(mask_zero=True)`, `Masking`)"
                    )
                else:
                    reason = (
                        "a Keras 3 operation (`keras.ops`) called on symbolic tensors, not a layer; "
                        "tf_keras has no such node. Use a layer instead (e.g. `keras.layers.Add` "
                        "for `keras.ops.add`)"
                    )
                self.problems.append(f"{prefix}{op_name} ({type(op).__name__}): {reason}")
                continue
            self.layer(op, prefix + op.name)
        if self.problems:
            return None
        inputs, outputs = _compat.model_io(model)
        tensors = {}
        for t in tf.nest.flatten(inputs):
            tensors[id(t)] = _compat.make_input(self.target, t, name=_compat.input_name(t))

        def swap(value):
            return tensors.get(id(value), value)

        for op, args, kwargs, outs in calls:
            if id(op) in skipped:
                continue
            kwargs = dict(kwargs)
            if "mask" in kwargs and all(
                t is None or id(t) in auto_masks for t in tf.nest.flatten(kwargs["mask"])
            ):
                del kwargs["mask"]  # the mask the layers compute: the target propagates it
            new = self.new_layers[id(op)]
            try:
                result = new(*tf.nest.map_structure(swap, list(args)), **tf.nest.map_structure(swap, kwargs))
            except Exception as e:  # noqa: BLE001 - reported with the layer's name
                self._problem(
                    prefix + op.name, op, f"calling the rebuilt {self.keras.__name__} layer failed: "
                    f"{type(e).__name__}: {e}"
                )
                return None
            for old, made in zip(outs, tf.nest.flatten(result)):
                tensors[id(old)] = made
        new_inputs = tf.nest.map_structure(lambda t: tensors[id(t)], inputs)
        new_outputs = tf.nest.map_structure(lambda t: tensors[id(t)], outputs)
        return self.keras.Model(new_inputs, new_outputs, name=model.name)

    def copy_weights(self):
        for path, old, new in self.pairs:
            values = old.get_weights()
            shapes = [tuple(w.shape) for w in new.weights]
            if [tuple(v.shape) for v in values] != shapes:
                self._problem(
                    path,
                    old,
                    f"weights do not line up: {[tuple(v.shape) for v in values]} in the source, "
                    f"{shapes} in the rebuilt layer",
                )
                continue
            new.set_weights(values)
            # State derived from weights (an adapted Normalization's mean and
            # variance, lookup tables, ...) is computed when a layer is built;
            # recompute it from the copied weights, as loading weights does.
            for layer in _self_and_sublayers(new):
                finalize = getattr(layer, "finalize_state", None)
                if callable(finalize):
                    finalize()
            if self.target == _compat.KERAS3 and type(old).__name__ == "BatchNormalization":
                if getattr(old, "fused", False):
                    warnings.warn(
                        f"{path} (BatchNormalization): the tf_keras layer uses the fused kernel, "
                        "whose moving variance is updated with the Bessel-corrected batch variance "
                        "(n / (n - 1)); Keras 3 uses the biased one. Outputs are equal after "
                        "conversion, but training the converted model updates the moving variance "
                        "differently. For identical training, build the tf_keras layer with "
                        "`fused=False`.",
                        stacklevel=4,
                    )


def _self_and_sublayers(layer):
    flatten = getattr(layer, "_flatten_layers", None)  # both flavours have it
    return list(flatten(include_self=True, recursive=True)) if callable(flatten) else [layer]


def _implicit_mask_ops(calls):
    """The op nodes that only compute the masks layers propagate themselves.

    Keras 3 records the mask a layer computes (``Embedding(mask_zero=True)``:
    ``not_equal``; ``Masking``: ``not_equal`` then ``any``) as op nodes whose
    result reaches the next layer as its ``mask`` argument. A mask is implicit
    when it is the ``_keras_mask`` of the layer's own inputs: the target
    computes and propagates it itself, so those ops are left out. Explicit
    masks (any other tensor passed as ``mask=``) are kept.

    Returns:
        ``(ids of the op objects to skip, ids of the implicit mask tensors)``.
    """
    layer_types = _layer_types()
    auto_masks = set()
    for _, args, kwargs, _ in calls:
        if "mask" not in kwargs:
            continue
        carried = {id(_compat.get_keras_mask(t)) for t in tf.nest.flatten(args)}
        carried.discard(id(None))
        masks = [t for t in tf.nest.flatten(kwargs["mask"]) if t is not None]
        if masks and all(id(t) in carried for t in masks):
            auto_masks.update(id(t) for t in masks)
    producer = {}
    for call in calls:
        for t in call[3]:
            producer[id(t)] = call
    skipped = set()
    todo = list(auto_masks)
    while todo:
        call = producer.get(todo.pop())
        if call is None or id(call[0]) in skipped:
            continue
        if _compat.is_model(call[0]) or isinstance(call[0], layer_types):
            continue
        skipped.add(id(call[0]))
        todo.extend(id(t) for t in tf.nest.flatten((call[1], call[2])) if hasattr(t, "shape"))
    # An op whose result is also used as data (not only as an implicit mask)
    # stays, and so do the ops that feed it: repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        for op, args, kwargs, _ in calls:
            if id(op) in skipped:
                continue
            data = {k: v for k, v in kwargs.items() if k != "mask"}
            if any(t is not None and id(t) not in auto_masks for t in tf.nest.flatten(kwargs.get("mask"))):
                data["mask"] = kwargs["mask"]
            for t in tf.nest.flatten((args, data)):
                call = producer.get(id(t))
                if call is not None and id(call[0]) in skipped:
                    skipped.discard(id(call[0]))
                    changed = True
    return skipped, auto_masks


def _explicit_masks(calls, auto_masks):
    return {
        id(t)
        for _, _, kwargs, _ in calls
        for t in tf.nest.flatten(kwargs.get("mask"))
        if t is not None and id(t) not in auto_masks
    }


def _layer_types():
    types = [_compat.module(_compat.KERAS3).layers.Layer]
    types.append(_compat.tf_keras().layers.Layer)
    return tuple(types)


def _convert(model, target, custom_objects, argument):
    converter = _Converter(target, custom_objects)
    new = converter.model(model)
    if not converter.problems:
        converter.copy_weights()
    if converter.problems:
        direction = "tf_keras" if target == _compat.TF_KERAS else "Keras 3"
        listing = "\n".join(f"  - {p}" for p in converter.problems)
        used = {type(layer).__name__ for _, layer in _walk_layers(model)} | {
            type(layer) for _, layer in _walk_layers(model)
        }
        unused = [k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}"
                  for k in converter.custom_objects if k not in used]
        note = f"\n`custom_objects` keys that match no layer class of the model: {unused}" if unused else ""
        raise ValueError(
            f"Cannot convert `{argument}` ({model.name!r}) to {direction}: "
            f"{len(converter.problems)} layer(s) or op(s) cannot be converted:\n{listing}{note}"
        )
    return new


def to_tf_keras(model, *, custom_objects: Optional[dict] = None):
    """Rebuilds a Keras 3 model as a tf_keras model with the same weights.

    tensorflow-model-optimization wraps only tf_keras models; this is how a
    Keras 3 student gets to `prune_for_distillation` and
    `quantize_for_distillation`. The model is rebuilt layer by layer from its
    graph (each built-in layer from its config, translated where the two
    Kerases name an argument differently) and every weight is copied, so the
    outputs are equal up to float32 rounding (tested to 1e-5). Layer names,
    input names and the nesting of sub-models are kept. The input model is not
    changed; the new one is not compiled.

    Training the converted model gives what training the source would (weights,
    moving statistics and outputs equal to 1e-5 after the same SGD steps,
    tested per layer family), because the translation is by meaning:
    ``hard_sigmoid`` (``relu6(x + 3) / 6`` in Keras 3, ``0.2 x + 0.5`` clipped
    in tf_keras) becomes a function with the source's meaning,
    ``BatchNormalization`` is built with ``fused=False`` (tf_keras's fused
    kernel updates the moving variance with the Bessel-corrected batch
    variance, Keras 3 with the biased one), and state computed from weights
    (an adapted ``Normalization``) is recomputed after the copy. Masks that
    layers compute (``Embedding(mask_zero=True)``, ``Masking``) are computed
    by the target again; an explicit ``mask=`` from a model input is kept, and
    one computed with ``keras.ops`` is refused rather than dropped.
    ``Dropout`` draws its own random masks in each flavour.

    Convertible: Functional and built Sequential models (nested ones too) made
    of built-in layers that exist in both Kerases (``Dense``, ``Conv*``,
    ``DepthwiseConv2D``, ``SeparableConv*``, ``BatchNormalization``,
    ``LayerNormalization``, ``Dropout``, pooling, ``Flatten``, ``Reshape``,
    activations, ``Embedding``, ``LSTM``/``GRU``, ``Bidirectional``,
    ``TimeDistributed``, merge layers, ...), and
    ``Lambda`` layers (the same Python function is reused). Not convertible,
    and listed all at once in the error: subclassed models, custom layer
    classes (unless given in ``custom_objects``), layers Keras 3 has and
    tf_keras lacks (e.g. ``RMSNormalization``), layer arguments tf_keras
    lacks with a non-default value, and ``keras.ops`` calls in the graph.

    Args:
        model: a Keras 3 Functional or built Sequential model.
        custom_objects: ``{class name or Keras 3 class: replacement}`` for
            custom layers, where a replacement is a tf_keras layer class
            (built with ``from_config`` from the layer's translated config)
            or a function ``fn(keras3_layer) -> tf_keras layer``. Weights are
            copied in ``get_weights`` order. Defaults to None.

    Returns:
        A new, uncompiled tf_keras ``Model`` or ``Sequential``.

    Raises:
        TypeError: if ``model`` is not a Keras 3 model.
        ValueError: listing every layer that cannot be converted and why.

    Example:

    ```python
    student_tfk = keras_kd.optimize.to_tf_keras(keras3_student)
    np.testing.assert_allclose(student_tfk.predict(x), keras3_student.predict(x), atol=1e-5)
    qat = keras_kd.optimize.quantize_for_distillation(student_tfk)
    ```
    """
    _compat.check_model(model, "model")
    if _compat.flavour_of(model) != _compat.KERAS3:
        raise TypeError(
            f"Expected `model` to be a Keras 3 model. Received a {_compat.flavour_of(model)} "
            f"model ({model.name!r}), which tfmot takes as it is."
        )
    return _convert(model, _compat.TF_KERAS, custom_objects, "model")


def to_keras3(model, *, custom_objects: Optional[dict] = None):
    """Rebuilds a float tf_keras model as a Keras 3 model with the same weights.

    The way back after tfmot: a distilled, pruned and `strip`-ped tf_keras
    student (or any float tf_keras student) becomes a Keras 3 model, e.g. to
    save it as ``.keras`` or to serve it with a Keras 3 stack. Same rules as
    `to_tf_keras`, mirrored.

    What cannot come back: a model that still has tfmot pruning wrappers
    (`strip` it first; the sparse weights stay) and a quantization-aware (QAT)
    model: its fake-quantization wrappers exist only in tf_keras, and a QAT
    model deploys through `to_tflite`. Nor ``TFOpLambda`` nodes (TensorFlow
    ops called on symbolic tensors) or custom layers without
    ``custom_objects``.

    A tf_keras ``BatchNormalization`` that uses the fused kernel (4-D inputs
    with ``fused=None`` or ``True``) converts with equal outputs but a
    warning: Keras 3 updates its moving variance with the biased batch
    variance, tf_keras's fused kernel with the Bessel-corrected one, so the
    two drift apart in training. Build it with ``fused=False`` for identical
    training.

    Args:
        model: a tf_keras Functional or Sequential model.
        custom_objects: ``{class name or tf_keras class: replacement}``, a
            Keras 3 layer class or ``fn(tf_keras_layer) -> keras layer``.
            Defaults to None.

    Returns:
        A new, uncompiled Keras 3 ``Model`` or ``Sequential``.

    Raises:
        TypeError: if ``model`` is not a tf_keras model.
        ValueError: listing every layer that cannot be converted and why.

    Example:

    ```python
    deployable = keras_kd.optimize.to_keras3(keras_kd.optimize.strip(pruned))
    deployable.save("student_sparse.keras")
    ```
    """
    _compat.check_model(model, "model")
    if _compat.flavour_of(model) != _compat.TF_KERAS:
        raise TypeError(
            f"Expected `model` to be a tf_keras model. Received a Keras 3 model ({model.name!r}), "
            "which needs no conversion: use it as it is (`to_tf_keras` goes the other way)."
        )
    return _convert(model, _compat.KERAS3, custom_objects, "model")


