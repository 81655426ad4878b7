"""The Keras 3 <-> tf_keras model bridge: `to_tf_keras` and `to_keras3`.

A model is rebuilt layer by layer from its graph (`keras_kd._compat.graph_calls`).
Each built-in layer crosses by its config: the class of the same name in the
other flavour is built from the config, translated by meaning. What holds for
every layer is generic (serialized objects, dtype policies, activations,
arguments that cannot change outputs); what differs for one layer class is
one `LayerTranslator` in `TRANSLATORS` (renamed arguments, fix-ups,
refusals, a custom build, a check after the weights are copied). Then every
weight is copied and state derived from weights is recomputed.

To support a layer class whose config differs between the flavours, add an
entry to `TRANSLATORS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow as tf

from keras_kd import _compat
from keras_kd.optimize import _common

KERAS3 = _compat.KERAS3
TF_KERAS = _compat.TF_KERAS


class UnconvertibleError(ValueError):
    """A layer or config value that has no equivalent in the other flavour."""


# --- The per-layer-class translator table ---


@dataclasses.dataclass(frozen=True)
class LayerTranslator:
    """How one built-in layer class (and its subclasses) crosses between the flavours.

    Attributes:
        renames: ``{Keras 3 argument: tf_keras argument}`` for arguments named differently.
        accepts: arguments the target takes through ``**kwargs`` (not in its signature).
        refuse: why the layer cannot cross (raised as `UnconvertibleError`), or None.
        adjust: ``fn(config, target) -> config``, run after the generic translation.
        rebuild: ``fn(layer, keras_module) -> layer``, building the target layer from
            the source layer object instead of from its config.
        build: ``fn(klass, config, target) -> layer`` instead of ``klass.from_config(config)``.
        after_copy: ``fn(path, source_layer, target)``, run after the weights are copied
            (e.g. to warn about training differences).
    """

    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    accepts: frozenset = frozenset()
    refuse: Optional[str] = None
    adjust: Optional[Callable] = None
    rebuild: Optional[Callable] = None
    build: Optional[Callable] = None
    after_copy: Optional[Callable] = None


def _batch_norm_config(config, target):
    axis = config.get("axis")
    if target == KERAS3 and isinstance(axis, (list, tuple)):
        # tf_keras stores the (built) axis as a list; Keras 3 takes one int.
        if len(axis) != 1:
            raise UnconvertibleError(
                f"argument `axis={list(axis)!r}` (normalizing over several axes) has no "
                "equivalent in keras.layers.BatchNormalization, which takes one axis"
            )
        config["axis"] = axis[0]
    if target == TF_KERAS:
        # tf_keras picks its fused kernel on 4-D inputs, which updates the moving
        # variance with the Bessel-corrected batch variance (n / (n - 1)); Keras 3
        # uses the biased one. fused=False trains the same statistics.
        config["fused"] = False
    return config


def _warn_fused_batch_norm(path, layer, target):
    if target == KERAS3 and getattr(layer, "fused", False):
        warnings.warn(
            f"{path} (BatchNormalization): the tf_keras layer uses the fused kernel, whose moving "
            "variance is updated with the Bessel-corrected batch variance (n / (n - 1)); Keras 3 "
            "uses the biased one. Outputs are equal after conversion, but training the converted "
            "model updates the moving variance differently. For identical training, build the "
            "tf_keras layer with `fused=False`.",
            stacklevel=5,
        )


def _lambda(layer, keras_module):
    # The same Python function: it runs on TensorFlow tensors in both flavours.
    return keras_module.layers.Lambda(
        layer.function,
        output_shape=_compat.lambda_output_shape(layer),
        mask=getattr(layer, "mask", None),
        arguments=dict(getattr(layer, "arguments", None) or {}),
        name=layer.name,
    )


def _multi_head_attention(klass, config, target):
    if target == TF_KERAS:
        # tf_keras's from_config wants the build shapes of a saved layer and
        # warns without them; the rebuilt layer is built by its first call.
        return klass(**config)
    return klass.from_config(config)


_BATCH_NORMALIZATION = LayerTranslator(adjust=_batch_norm_config, after_copy=_warn_fused_batch_norm)
_TF_OP = LayerTranslator(
    refuse=(
        "a TensorFlow op called on symbolic tensors in a tf_keras model; Keras 3 "
        "has no such node. Use a layer (e.g. `layers.Add`, `layers.Lambda`) instead"
    )
)

# {class name: translator}; a layer uses the entry of the first class in its
# MRO that has one (LSTM, GRU, ... use "RNN").
TRANSLATORS = {
    "LeakyReLU": LayerTranslator(renames={"negative_slope": "alpha"}),
    "BatchNormalization": _BATCH_NORMALIZATION,
    "SyncBatchNormalization": _BATCH_NORMALIZATION,
    "RNN": LayerTranslator(accepts=frozenset({"zero_output_for_mask"})),  # tf_keras: via **kwargs
    "MultiHeadAttention": LayerTranslator(build=_multi_head_attention),
    "Lambda": LayerTranslator(rebuild=_lambda),
    "TFOpLambda": _TF_OP,
    "SlicingOpLambda": _TF_OP,
    "SpectralNormalization": LayerTranslator(
        refuse=(
            "the bridge does not rebuild SpectralNormalization wrappers (the wrapped layer and "
            "its power-iteration state `vector_u`). Convert the model without the wrapper and "
            "wrap the layer again in the converted model"
        )
    ),
}
_GENERIC = LayerTranslator()


def translator(klass: type) -> LayerTranslator:
    """The `LayerTranslator` of a layer class: the entry of the first class of its MRO."""
    return next((TRANSLATORS[b.__name__] for b in klass.__mro__ if b.__name__ in TRANSLATORS), _GENERIC)


# --- Activations, translated by meaning ---

# Activation names both flavours know but define differently. Keras 3:
# ``hard_sigmoid(x) = relu6(x + 3) / 6``; tf_keras: ``clip(0.2 x + 0.5, 0, 1)``.
# Every other shared name computes the same function (tests/test_bridge.py
# checks each). A converted layer gets a function with the source's meaning,
# registered in both flavours, so it also saves and loads.


@_compat.register_serializable()
def keras3_hard_sigmoid(x):
    """Keras 3's ``hard_sigmoid``, ``relu6(x + 3) / 6``, for tf_keras layers."""
    x = tf.convert_to_tensor(x)
    return tf.nn.relu6(x + tf.constant(3.0, x.dtype)) / tf.constant(6.0, x.dtype)


@_compat.register_serializable()
def tf_keras_hard_sigmoid(x):
    """tf_keras's ``hard_sigmoid``, ``clip(0.2 x + 0.5, 0, 1)``, for Keras 3 layers."""
    x = tf.convert_to_tensor(x)
    x = tf.add(tf.multiply(x, tf.constant(0.2, x.dtype)), tf.constant(0.5, x.dtype))
    return tf.clip_by_value(x, 0.0, 1.0)


# {target flavour: {activation name in the source: what the target must use}}
_ACTIVATIONS_BY_MEANING = {
    TF_KERAS: {"hard_sigmoid": keras3_hard_sigmoid, "silu": "swish"},
    KERAS3: {"hard_sigmoid": tf_keras_hard_sigmoid},
}
_ACTIVATION_FUNCTIONS = {"keras3_hard_sigmoid": keras3_hard_sigmoid, "tf_keras_hard_sigmoid": tf_keras_hard_sigmoid}


def _activation_name(value):
    """The activation name of a config value (a string or a serialized function), or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("class_name") == "function":
        return value["config"] if isinstance(value.get("config"), str) else None
    return None


def translate_activation(value, target: str):
    """An activation config value of the other flavour, translated by meaning.

    Names with the same meaning in both flavours pass through; ``hard_sigmoid``
    (a different function in each) becomes a function with the source's
    meaning, and keras_kd's translation functions become the built-in name
    again in the flavour whose meaning they carry. Names the target lacks
    raise `UnconvertibleError`.
    """
    name = _activation_name(value)
    if name is None:
        return translate_config(value, target)
    function = _ACTIVATION_FUNCTIONS.get(name.split(">")[-1])
    if function is not None:
        native = KERAS3 if function is keras3_hard_sigmoid else TF_KERAS
        return "hard_sigmoid" if native == target else function
    if isinstance(value, dict):
        mod = value.get("module") or ""
        if mod.split(".")[0] not in (KERAS3, TF_KERAS):
            return translate_config(value, target)  # a custom function: refused there
    mapped = _ACTIVATIONS_BY_MEANING[target].get(name, name)
    if isinstance(mapped, str) and not callable(getattr(_compat.module(target).activations, mapped, None)):
        raise UnconvertibleError(
            f"activation {name!r} has no equivalent in {_compat.module(target).__name__}.activations; "
            "use an activation both Kerases have (e.g. 'relu', 'gelu', 'swish') or a layer "
            "given in `custom_objects`"
        )
    return mapped


# --- Generic config translation ---

# Layer arguments that cannot change what a built layer computes in inference
# (seeds, kernel implementation choices, shapes the rebuilt graph supplies);
# dropped when the other flavour has no such argument.
_OUTPUT_NEUTRAL_ARGUMENTS = frozenset({
    "seed", "implementation", "use_cudnn", "input_shape", "batch_input_shape", "batch_size",
    "input_length", "autocast", "synchronized", "fused", "query_shape", "key_shape", "value_shape",
})
_BASE_LAYER_ARGUMENTS = frozenset({"name", "trainable", "dtype", "activity_regularizer"})
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy", "Policy")


def _init_parameters(klass: type) -> dict:
    """``{name: default or inspect.Parameter.empty}`` of a class's ``__init__``, MRO included."""
    parameters = {}
    flavour = _compat.flavour_of_class(klass)
    for base in reversed(klass.__mro__):
        if _compat.flavour_of_class(base) != flavour or "__init__" not in vars(base):
            continue
        try:
            params = inspect.signature(base.__init__).parameters
        except (TypeError, ValueError):  # pragma: no cover - C-level __init__
            continue
        parameters.update({n: p.default for n, p in params.items() if n != "self"})
    return parameters


def _accepted(klass: type) -> set:
    return set(_BASE_LAYER_ARGUMENTS) | set(_init_parameters(klass))


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays
        return False


def _dtype_name(value):
    """A dtype or dtype-policy config reduced to the policy name both flavours take."""
    if isinstance(value, dict) and "config" in value and isinstance(value["config"], dict):
        name = value["config"].get("name")
        if value.get("class_name") not in _POLICY_CLASSES or name is None:
            hint = ""
            if "Quantized" in str(value.get("class_name")):  # Keras 3's `model.quantize(...)`
                hint = (": a layer quantized by Keras 3's `model.quantize`. Convert the float model, "
                        "then quantize with `quantize_for_distillation` or `to_tflite`")
            raise UnconvertibleError(f"dtype policy {value.get('class_name')!r} has no equivalent{hint}")
        return name
    return value


def _is_list(value) -> bool:
    return isinstance(value, list) or type(value).__name__ == "ListWrapper"


def _translate_object(value: dict, target: str):
    """A serialized Keras object (``{"module", "class_name", "config"}``) for ``target``."""
    mod = value.get("module")
    if mod is not None and not (mod == "keras" or mod.startswith("keras.")):
        name = value.get("registered_name") or value["class_name"]
        raise UnconvertibleError(f"custom object {name!r} (module {mod!r}) has no built-in equivalent")
    # A layer inside a tf_keras wrapper (Bidirectional, TimeDistributed) may come without a module.
    nested_layer = (mod is not None and mod.startswith("keras.layers")) or (
        mod is None and target == KERAS3 and _compat.builtin_layer_class(TF_KERAS, value["class_name"]) is not None
    )
    if nested_layer and isinstance(value["config"], dict):
        class_name, config = translate_layer_config(value["class_name"], value["config"], target)
        if target == KERAS3:  # Keras 3 finds built-in classes by their module
            return {"module": "keras.layers", "class_name": class_name, "config": config, "registered_name": None}
        return {"class_name": class_name, "config": config}
    if value["class_name"] in _POLICY_CLASSES:
        return _dtype_name(value)
    config = value["config"]
    submodule = mod.split(".", 1)[1] if mod and "." in mod else None
    klass = getattr(getattr(_compat.module(target), submodule, None), value["class_name"], None) if submodule else None
    if isinstance(config, dict) and isinstance(klass, type):
        accepted = _accepted(klass)
        for k, v in config.items():
            if k not in accepted and v is not None and v is not False:
                raise UnconvertibleError(
                    f"{value['class_name']} argument `{k}={v!r}` has no equivalent in "
                    f"{_compat.module(target).__name__}.{submodule}"
                )
        config = {k: v for k, v in config.items() if k in accepted}
    return {"class_name": value["class_name"], "config": translate_config(config, target)}


def translate_config(value: Any, target: str):
    """Translates a serialized value (part of a layer config) for ``target``.

    Serialized Keras objects (``{"module": "keras....", "class_name", "config"}``,
    the form both flavours write) become the legacy ``{"class_name", "config"}``
    form that both flavours read; nested layer configs are translated with
    `translate_layer_config`. Objects from other modules (custom
    initializers, activations, ...) raise `UnconvertibleError`.
    """
    if isinstance(value, dict) and "class_name" in value and "config" in value:
        return _translate_object(value, target)
    if isinstance(value, dict):
        return {k: translate_config(v, target) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(translate_config(v, target) for v in value)
    if _is_list(value):
        return [translate_config(v, target) for v in value]
    return value


def _neutral(key, value, source_defaults) -> bool:
    """Whether an argument the target lacks can be dropped without changing outputs."""
    if key in _OUTPUT_NEUTRAL_ARGUMENTS or key.endswith("initializer") or value is None or value is False:
        return True  # initializers only set initial values; converted layers get the weights
    if key == "data_format" and value == "channels_last":  # tf_keras's only layout
        return True
    default = source_defaults.get(key, inspect.Parameter.empty)
    return default is not inspect.Parameter.empty and _same(default, value)


def translate_layer_config(class_name: str, config: dict, target: str, klass: Optional[type] = None):
    """Translates a layer's config to the built-in layer of the same name in ``target``.

    Returns ``(class_name, config)`` for ``target``'s ``from_config``. Arguments
    the target class does not take are dropped when they cannot change the
    layer's outputs (``None``/``False`` values, the source's defaults, seeds,
    implementation choices); any other raises `UnconvertibleError` naming the
    argument. The class's `LayerTranslator` renames, refuses or adjusts.

    Args:
        class_name: the layer's class name.
        config: the layer's ``get_config()``.
        target: ``"keras"`` or ``"tf_keras"``.
        klass: the target class (defaults to the built-in class of that name).
    """
    klass = klass or _compat.builtin_layer_class(target, class_name)
    if klass is None:
        raise UnconvertibleError(f"{_compat.module(target).__name__}.layers has no {class_name!r} layer")
    rules = translator(klass)
    if rules.refuse:
        raise UnconvertibleError(rules.refuse)
    renames = dict(rules.renames) if target == TF_KERAS else {v: k for k, v in rules.renames.items()}
    accepted = _accepted(klass) | rules.accepts
    source = _compat.builtin_layer_class(TF_KERAS if target == KERAS3 else KERAS3, class_name)
    source_defaults = _init_parameters(source) if source is not None else {}
    out = {}
    for key, value in config.items():
        if key == "dtype":
            out[key] = _dtype_name(value)
            continue
        if key == "activation" or key.endswith("_activation"):
            out[key] = translate_activation(value, target)
            continue
        if key not in accepted and renames.get(key) in accepted:
            key = renames[key]
        if key not in accepted:
            if _neutral(key, value, source_defaults):
                continue
            raise UnconvertibleError(
                f"argument `{key}={value!r}` has no equivalent in "
                f"{_compat.module(target).__name__}.layers.{class_name}"
            )
        try:
            out[key] = translate_config(list(value) if _is_list(value) else value, target)
        except UnconvertibleError:
            if key.endswith("initializer"):
                continue  # only the initial values depend on it: the target's default will do
            raise
    if rules.adjust is not None:
        out = rules.adjust(out, target)
        out = {k: v for k, v in out.items() if k in accepted}
    return class_name, out


def layer_from_config(klass: type, config: dict, target: str):
    """The target layer built from a config made by `translate_layer_config`."""
    build = translator(klass).build
    return build(klass, config, target) if build is not None else klass.from_config(config)


# --- Rebuilding a model ---


def _layer_types():
    return (_compat.module(KERAS3).layers.Layer, _compat.tf_keras().layers.Layer)


_KERAS_OP_MASK = (
    "a Keras 3 operation (`keras.ops`) that computes an explicit `mask=` for a layer; tf_keras "
    "cannot rebuild it, and dropping it would change the outputs. Pass the mask as a model input "
    "(`keras.Input(..., dtype='bool')`), or let a layer compute it (`Embedding(mask_zero=True)`, "
    "`Masking`)"
)
_KERAS_OP = (
    "a Keras 3 operation (`keras.ops`) called on symbolic tensors, not a layer; tf_keras has no "
    "such node. Use a layer instead (e.g. `keras.layers.Add` for `keras.ops.add`)"
)


def _weight_values(layer) -> list:
    """``layer.get_weights()`` without Keras 3's NumPy 2 ``__array__`` DeprecationWarning on JAX."""
    import keras

    return [np.asarray(w.value) if isinstance(w, keras.Variable) else w.numpy() for w in layer.weights]


class _Converter:
    """Rebuilds a Functional/Sequential model layer by layer in another flavour."""

    def __init__(self, target: str, custom_objects: dict):
        self.target = target
        self.keras = _compat.module(target)
        self.custom_objects = dict(custom_objects or {})
        self.new_layers: dict = {}  # id(old layer) -> new layer
        self.pairs: list = []  # (path, old, new) whose weights must be copied
        self.problems: list = []

    def _problem(self, path, obj, reason):
        self.problems.append(f"{path} ({type(obj).__name__}): {reason}")

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

    def _refusal(self, layer) -> Optional[str]:
        """Why ``layer`` (not in ``custom_objects``) cannot cross, or None."""
        name = type(layer).__name__
        if _common.is_tfmot_layer(layer, _common.PRUNE_WRAPPERS):
            return (
                "a tfmot pruning wrapper; remove the wrappers first with "
                "`keras_kd.optimize.strip(model)` (the pruned weights stay)"
            )
        if _common.is_tfmot_layer(layer, _common.QUANT_WRAPPERS):
            return (
                "a tfmot quantization-aware layer: fake-quantization wrappers exist only in "
                "tf_keras. Deploy a QAT model with `keras_kd.optimize.to_tflite(model)`; bring "
                "back the float student (before `quantize_for_distillation`) instead"
            )
        if not _compat.is_builtin(layer):
            target_name = self.keras.__name__
            return (
                f"custom layer class `{_common.qualname(layer)}` is not a built-in Keras layer; pass "
                f"`custom_objects={{{name!r}: <{target_name} layer class, or fn(layer) -> layer>}}`"
            )
        return translator(type(layer)).refuse

    def _new_layer(self, layer, path):
        name = type(layer).__name__
        custom = self.custom_objects.get(name, self.custom_objects.get(type(layer)))
        try:
            if custom is not None:
                return self._custom(layer, path, custom)
            refusal = self._refusal(layer)
            if refusal:
                self._problem(path, layer, refusal)
                return None
            rules = translator(type(layer))
            if rules.rebuild is not None:
                return rules.rebuild(layer, self.keras)
            _, config = translate_layer_config(name, layer.get_config(), self.target)
            return layer_from_config(_compat.builtin_layer_class(self.target, name), config, self.target)
        except UnconvertibleError as e:
            self._problem(path, layer, str(e))
        except Exception as e:  # noqa: BLE001 - reported with the layer's name
            reason = f"{self.keras.__name__}.layers.{name}.from_config failed: {type(e).__name__}: {e}"
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
            _, config = translate_layer_config(name, layer.get_config(), self.target, klass=custom)
            return layer_from_config(custom, config, self.target)
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

    def model(self, model, prefix=""):
        if _compat.graph_of(model) is None:
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
        explicit = _explicit_masks(calls, auto_masks)  # once: not per op
        for op, _, _, outs in calls:
            if id(op) in skipped:
                continue
            if not (_compat.is_model(op) or isinstance(op, _layer_types())):
                reason = _KERAS_OP_MASK if any(id(t) in explicit for t in outs) else _KERAS_OP
                self._problem(prefix + getattr(op, "name", type(op).__name__), op, reason)
                continue
            self.layer(op, prefix + op.name)
        if self.problems:
            return None
        inputs, outputs = _compat.model_io(model)
        tensors = {id(t): _compat.make_input(self.target, t, name=_compat.input_name(t)) for t in tf.nest.flatten(inputs)}

        def swap(value):
            return tensors.get(id(value), value)

        for op, args, kwargs, outs in calls:
            if id(op) in skipped:
                continue
            kwargs = dict(kwargs)
            if "mask" in kwargs and all(t is None or id(t) in auto_masks for t in tf.nest.flatten(kwargs["mask"])):
                del kwargs["mask"]  # the mask the layers compute: the target propagates it
            new = self.new_layers[id(op)]
            try:
                result = new(*tf.nest.map_structure(swap, list(args)), **tf.nest.map_structure(swap, kwargs))
            except Exception as e:  # noqa: BLE001 - reported with the layer's name
                self._problem(
                    prefix + op.name, op,
                    f"calling the rebuilt {self.keras.__name__} layer failed: {type(e).__name__}: {e}"
                    + _jax_function_hint(op, self.target),
                )
                return None
            for old, made in zip(outs, tf.nest.flatten(result)):
                tensors[id(old)] = made
        new_inputs = tf.nest.map_structure(lambda t: tensors[id(t)], inputs)
        new_outputs = tf.nest.map_structure(lambda t: tensors[id(t)], outputs)
        return self.keras.Model(new_inputs, new_outputs, name=model.name)

    def copy_weights(self):
        rounded = []
        for path, old, new in self.pairs:
            values = _weight_values(old)
            shapes = [tuple(w.shape) for w in new.weights]
            if [tuple(v.shape) for v in values] != shapes:
                self._problem(
                    path, old,
                    f"weights do not line up: {[tuple(v.shape) for v in values]} in the source, "
                    f"{shapes} in the rebuilt layer",
                )
                continue
            new.set_weights(values)
            rounded += [f"{path} ({v.dtype} -> {w.dtype})" for v, w in zip(values, _weight_values(new))
                        if v.dtype.kind == "f" and not np.array_equal(w.astype(v.dtype), v)][:1]
            # State derived from weights (an adapted Normalization's mean and
            # variance, lookup tables, ...) is computed when a layer is built;
            # recompute it from the copied weights, as loading weights does.
            for layer in _compat.sublayers(new):
                finalize = getattr(layer, "finalize_state", None)
                if callable(finalize):
                    finalize()
            after_copy = translator(type(old)).after_copy
            if after_copy is not None:
                after_copy(path, old, self.target)
        if rounded:
            warnings.warn(
                f"Weights rounded to the rebuilt layers' variable dtype: {rounded[:5]}. (tf_keras keeps "
                "e.g. a float16 BatchNormalization's variables in float32, Keras 3 in float16.) Outputs "
                "differ by that rounding; convert a float32 model for equal outputs.",
                stacklevel=4,
            )


def _jax_function_hint(layer, target: str) -> str:
    """Why a Keras 3 layer holding a Python function fails in tf_keras on the JAX backend."""
    if target != TF_KERAS or not _compat.is_jax_backend() or not hasattr(layer, "function"):
        return ""
    return (
        f" (keras_kd.optimize.to_tf_keras, Keras backend 'jax': the function of {type(layer).__name__} "
        f"{layer.name!r} computes with JAX here (`keras.ops` runs on JAX in this process) and cannot run "
        "on the TensorFlow tensors of a tf_keras model. Replace it with a built-in layer (e.g. "
        f"`Activation`, `Rescaling`), or give its TensorFlow version: `custom_objects={{{type(layer).__name__!r}: "
        "lambda layer: tf_keras.layers.Lambda(tf_fn, name=layer.name)}`.)"
    )


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
    producer = {id(t): call for call in calls for t in call[3]}
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


def _explicit_masks(calls, auto_masks) -> set:
    """Ids of the tensors passed as ``mask=`` that no layer computes itself."""
    return {
        id(t)
        for _, _, kwargs, _ in calls
        for t in tf.nest.flatten(kwargs.get("mask"))
        if t is not None and id(t) not in auto_masks
    }


def _convert(model, target, custom_objects, argument):
    converter = _Converter(target, custom_objects)
    new = converter.model(model)
    if not converter.problems:
        converter.copy_weights()
    if converter.problems:
        direction = "tf_keras" if target == TF_KERAS else "Keras 3"
        listing = "\n".join(f"  - {p}" for p in converter.problems)
        layers = [layer for _, layer in _common.walk_layers(model)]
        used = {type(layer).__name__ for layer in layers} | {type(layer) for layer in layers}
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
    graph (each built-in layer from its config, translated by meaning) and
    every weight is copied, so the outputs are equal up to float32 rounding
    (tested to 1e-5). Layer names, input names and the nesting of sub-models
    are kept. The input model is not changed; the new one is not compiled.

    Training the converted model gives what training the source would
    (weights, moving statistics and outputs equal to 1e-5 after the same SGD
    steps, tested per layer family): the translation is by meaning (e.g.
    ``hard_sigmoid``, defined differently in each flavour, becomes a function
    with the source's meaning; ``BatchNormalization`` gets ``fused=False``,
    whose moving variance tf_keras updates as Keras 3 does), and state
    computed from weights (an adapted ``Normalization``) is recomputed.
    Masks that layers compute (``Embedding(mask_zero=True)``, ``Masking``)
    are computed by the target again; an explicit ``mask=`` from a model
    input is kept, and one computed with ``keras.ops`` is refused rather than
    dropped. ``Dropout`` draws its own random masks in each flavour.

    Convertible: Functional and built Sequential models (nested ones too) of
    built-in layers both Kerases have, and ``Lambda`` layers (the same Python
    function). Not convertible, all listed in one error: subclassed models,
    custom layers (unless in ``custom_objects``), layers tf_keras lacks (e.g.
    ``RMSNormalization``), arguments it lacks with non-default values, and
    ``keras.ops`` calls in the graph.

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
    qat = keras_kd.optimize.quantize_for_distillation(student_tfk)
    ```
    """
    _compat.check_model(model, "model")
    if _compat.flavour_of(model) != KERAS3:
        raise TypeError(
            f"Expected `model` to be a Keras 3 model. Received a {_compat.flavour_of(model)} "
            f"model ({model.name!r}), which tfmot takes as it is."
        )
    return _convert(model, TF_KERAS, custom_objects, "model")


def to_keras3(model, *, custom_objects: Optional[dict] = None):
    """Rebuilds a float tf_keras model as a Keras 3 model with the same weights.

    The way back after tfmot: a distilled, pruned and `strip`-ped tf_keras
    student (or any float tf_keras student) becomes a Keras 3 model, e.g. to
    save it as ``.keras``. Same rules as `to_tf_keras`, mirrored. What cannot
    come back: a model that still has tfmot pruning wrappers (`strip` it
    first; the sparse weights stay), a quantization-aware (QAT) model (its
    fake-quantization wrappers exist only in tf_keras; deploy it with
    `to_tflite`), ``TFOpLambda`` nodes (TensorFlow ops called on symbolic
    tensors) and custom layers without ``custom_objects``.

    A tf_keras ``BatchNormalization`` on the fused kernel (4-D inputs,
    ``fused=None`` or ``True``) converts with equal outputs and a warning:
    its moving variance uses the Bessel-corrected batch variance, Keras 3's
    the biased one, so they drift apart in training (build it with
    ``fused=False`` for identical training).

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
    if _compat.flavour_of(model) != TF_KERAS:
        raise TypeError(
            f"Expected `model` to be a tf_keras model. Received a Keras 3 model ({model.name!r}), "
            "which needs no conversion: use it as it is (`to_tf_keras` goes the other way)."
        )
    return _convert(model, KERAS3, custom_objects, "model")
