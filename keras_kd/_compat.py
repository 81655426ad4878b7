"""The one place that knows about Keras 3 versus tf_keras.

keras_kd supports both flavours in one process, with no environment variable:
Keras 3 (what ``import keras`` gives) for keras-tuner and new projects, and
tf_keras (Keras 2) for tensorflow-model-optimization. Every other module asks
this one which flavour a model or object belongs to.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import keras
import tensorflow as tf

KERAS3 = "keras"
TF_KERAS = "tf_keras"


def tf_keras():
    """Returns the ``tf_keras`` module (Keras 2), imported lazily.

    Raises:
        ImportError: if ``tf_keras`` is not installed.
    """
    try:
        return importlib.import_module("tf_keras")
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError(
            "keras_kd needs the `tf-keras` package for tf_keras models "
            "(tensorflow-model-optimization works only with them). "
            "Install it with `pip install tf-keras`."
        ) from e


def module(flavour: str):
    """Returns the Keras module of a flavour (``"keras"`` or ``"tf_keras"``)."""
    if flavour == KERAS3:
        return keras
    if flavour == TF_KERAS:
        return tf_keras()
    raise ValueError(
        f"Expected `flavour` to be 'keras' or 'tf_keras'. Received: flavour={flavour!r}"
    )


def flavour_of(obj: Any) -> str | None:
    """Which Keras an object (model, layer, loss, ...) belongs to, by its class.

    Returns:
        ``"keras"``, ``"tf_keras"``, or ``None`` for objects of neither.
    """
    for klass in type(obj).__mro__:
        root = klass.__module__.split(".", 1)[0]
        if root == "keras":
            return KERAS3
        if root == "tf_keras":
            return TF_KERAS
    return None


def is_model(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 or a tf_keras ``Model``."""
    if isinstance(obj, keras.Model):
        return True
    flavour = flavour_of(obj)
    return flavour == TF_KERAS and isinstance(obj, tf_keras().Model)


def check_model(obj: Any, argument: str):
    """Raises a `TypeError` naming ``argument`` unless ``obj`` is a model."""
    if not is_model(obj):
        raise TypeError(
            f"Expected `{argument}` to be a Keras 3 or tf_keras `Model`. "
            f"Received: {argument}={obj!r} of type {type(obj).__name__}."
        )


def callback_base():
    """The callback base class that runs in both flavours' ``fit``.

    A ``keras.callbacks.Callback`` crashes tf_keras ``fit`` (it lacks
    ``_implements_train_batch_hooks``); a tf_keras callback runs in both.
    """
    return tf_keras().callbacks.Callback


def loss_base():
    """A base class for losses that both flavours' ``compile`` take as their own.

    tf_keras wraps any loss that is not a tf_keras ``Loss`` in a function
    wrapper that calls it without ``sample_weight`` and then weights the
    already-reduced value, so a plain Keras 3 ``Loss`` silently loses per-example
    weights (and is scaled twice under a distribution strategy). A subclass of
    this base is a Keras 3 ``Loss`` and a tf_keras ``Loss`` at once; its own
    ``__call__`` does the weighting and reduction for both.
    """
    global _LOSS_BASE
    if _LOSS_BASE is None:
        tfk_loss = tf_keras().losses.Loss

        class DualFlavourLoss(keras.losses.Loss, tfk_loss):
            def __init__(self, name=None, reduction="sum_over_batch_size", dtype=None):
                keras.losses.Loss.__init__(self, name=name, reduction=reduction, dtype=dtype)
                # What tf_keras's Loss.__init__ would set. tf_keras's compile
                # sets `_allow_sum_over_batch_size = True` on the losses it
                # manages (see `caller_scales_for_replicas`).
                self._allow_sum_over_batch_size = False
                self._name_scope = self.name

            def caller_scales_for_replicas(self) -> bool:
                """Whether the training loop divides this loss by the replica count.

                tf_keras's loss container divides "sum_over_batch_size" losses by
                the number of replicas itself; Keras 3 leaves it to the loss.
                """
                return self._allow_sum_over_batch_size and self.reduction == "sum_over_batch_size"

        _LOSS_BASE = DualFlavourLoss
    return _LOSS_BASE


_LOSS_BASE = None


def register_serializable(package: str = "keras_kd"):
    """Registers a class (or function) with both flavours' serialization."""

    def decorator(obj):
        obj = keras.saving.register_keras_serializable(package=package)(obj)
        tf_keras().saving.register_keras_serializable(package=package)(obj)
        return obj

    return decorator


def serialize(obj: Any):
    """Serializes a loss, function or string so that `deserialize` restores it.

    Strings and ``None`` pass through; Keras objects are serialized by their own
    flavour and tagged with it.
    """
    if obj is None or isinstance(obj, str):
        return obj
    flavour = flavour_of(obj) or KERAS3
    return {
        "keras_kd_flavour": flavour,
        "config": module(flavour).saving.serialize_keras_object(obj),
    }


def deserialize(config: Any):
    """Inverse of `serialize`."""
    if config is None or isinstance(config, str):
        return config
    if isinstance(config, dict) and "keras_kd_flavour" in config:
        flavour = config["keras_kd_flavour"]
        return module(flavour).saving.deserialize_keras_object(config["config"])
    return config if callable(config) else keras.saving.deserialize_keras_object(config)


def get_keras_mask(tensor):
    """The Keras mask carried by a tensor (both flavours use ``_keras_mask``)."""
    return getattr(tensor, "_keras_mask", None)


def num_replicas_in_sync() -> int:
    """Replicas of the current `tf.distribute` strategy."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def graph_of(model: Any):
    """The object that holds a model's layer graph, or ``None``.

    Functional models hold their own graph; a built Keras 3 ``Sequential``
    keeps it in an inner functional model; a tf_keras ``Sequential`` with a
    known input shape is itself a graph network. Subclassed models and
    Sequential models that were never built have no readable graph.
    """
    flavour = flavour_of(model)
    if flavour == KERAS3:
        if isinstance(model, keras.Sequential):
            return getattr(model, "_functional", None)
        return model if hasattr(model, "_nodes_by_depth") else None
    if flavour == TF_KERAS and getattr(model, "_is_graph_network", False):
        return model
    return None


def graph_calls(model: Any):
    """The layer calls of a Functional or built Sequential model, inputs first.

    Yields ``(layer, args, kwargs, outputs)`` for each call event in the
    model's own graph (input layers excluded), in an order where every call
    comes after the calls that produce its inputs. ``args`` and ``kwargs``
    hold the model's symbolic tensors as the layer received them; ``outputs``
    is the flat list of the symbolic tensors it returned.

    Raises:
        ValueError: if ``model`` has no readable layer graph (see `graph_of`).
    """
    graph = graph_of(model)
    if graph is None:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no layer graph to read "
            "(a subclassed model, or a Sequential model that was never built)."
        )
    keras3 = flavour_of(model) == KERAS3
    nodes_by_depth = graph._nodes_by_depth
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.is_input:
                continue
            if keras3:
                if node.operation is None:
                    continue
                yield node.operation, node.arguments.args, node.arguments.kwargs, list(node.outputs)
            else:
                yield node.layer, node.call_args, node.call_kwargs, tf.nest.flatten(node.outputs)


def layer_mean_metric(layer: Any, name: str):
    """A mean metric owned by ``layer`` that ``fit``/``evaluate`` log as ``name``.

    Call this in the layer's ``__init__``; it returns ``update(value)`` to call
    inside ``layer.call``. Keras 3 logs metrics tracked by sublayers; tf_keras
    logs values given to ``Layer.add_metric``.
    """
    if flavour_of(layer) == KERAS3:
        metric = keras.metrics.Mean(name=name)
        layer._kd_mean_metric = metric  # tracked by the layer, hence logged

        def update(value):
            metric.update_state(value)

        return update

    def update(value):  # tf_keras
        layer.add_metric(value, name=name, aggregation="mean")

    return update


# ---------------------------------------------------------------------------
# Model-conversion primitives (used by `keras_kd.optimize.to_tf_keras` and
# `to_keras3`): what a layer of one flavour is called in the other, and how
# its config translates. Nothing here builds a whole model.
# ---------------------------------------------------------------------------

# Layer arguments that cannot change what a built layer computes in inference
# (seeds, kernel implementation choices, shapes the rebuilt graph supplies);
# dropped when the other flavour has no such argument.
_OUTPUT_NEUTRAL_ARGUMENTS = frozenset(
    {
        "seed",
        "implementation",
        "use_cudnn",
        "input_shape",
        "batch_input_shape",
        "batch_size",
        "input_length",
        "autocast",
        "synchronized",
        "fused",
        "query_shape",
        "key_shape",
        "value_shape",
    }
)
# Arguments renamed between the flavours: {class name: {Keras 3 name: tf_keras name}}.
_RENAMED_ARGUMENTS = {"LeakyReLU": {"negative_slope": "alpha"}}
_BASE_LAYER_ARGUMENTS = frozenset({"name", "trainable", "dtype", "activity_regularizer"})


class UnconvertibleError(ValueError):
    """A layer or config value that has no equivalent in the other flavour."""


# Activation names both flavours know but define differently. Keras 3:
# ``hard_sigmoid(x) = relu6(x + 3) / 6``; tf_keras: ``clip(0.2 x + 0.5, 0, 1)``.
# Every other name the two share computes the same function (checked for
# every shared name in tests/test_bridge.py). A converted layer gets a
# function with the source's meaning, registered for serialization in both
# flavours, so it also saves and loads (with keras_kd imported).


@register_serializable()
def keras3_hard_sigmoid(x):
    """Keras 3's ``hard_sigmoid``, ``relu6(x + 3) / 6``, for tf_keras layers."""
    x = tf.convert_to_tensor(x)
    return tf.nn.relu6(x + tf.constant(3.0, x.dtype)) / tf.constant(6.0, x.dtype)


@register_serializable()
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
_ACTIVATION_FUNCTIONS = {
    "keras3_hard_sigmoid": keras3_hard_sigmoid,
    "tf_keras_hard_sigmoid": tf_keras_hard_sigmoid,
}


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
    if isinstance(mapped, str) and not callable(getattr(module(target).activations, mapped, None)):
        raise UnconvertibleError(
            f"activation {name!r} has no equivalent in {module(target).__name__}.activations; "
            "use an activation both Kerases have (e.g. 'relu', 'gelu', 'swish') or a layer "
            "given in `custom_objects`"
        )
    return mapped


def builtin_layer_class(flavour: str, class_name: str):
    """The built-in layer class ``class_name`` of a flavour, or ``None``."""
    klass = getattr(module(flavour).layers, class_name, None)
    if isinstance(klass, type) and flavour_of_class(klass) == flavour:
        return klass
    return None


def flavour_of_class(klass: type) -> str | None:
    """Which Keras a class belongs to (``"keras"``, ``"tf_keras"`` or ``None``)."""
    for base in klass.__mro__:
        root = base.__module__.split(".", 1)[0]
        if root in (KERAS3, TF_KERAS):
            return root
    return None


def is_builtin(obj: Any) -> bool:
    """Whether ``obj``'s class is defined by Keras 3 or tf_keras itself (not user code)."""
    return type(obj).__module__.split(".", 1)[0] in (KERAS3, TF_KERAS)


def _init_arguments(klass: type) -> set:
    names = set(_BASE_LAYER_ARGUMENTS)
    flavour = flavour_of_class(klass)
    for base in klass.__mro__:
        if flavour_of_class(base) != flavour or "__init__" not in vars(base):
            continue
        try:
            params = inspect.signature(base.__init__).parameters
        except (TypeError, ValueError):  # pragma: no cover - C-level __init__
            continue
        names.update(p for p in params if p != "self")
    return names


def _init_defaults(klass: type) -> dict:
    """Default values of the ``__init__`` arguments of a layer class (MRO included)."""
    defaults = {}
    flavour = flavour_of_class(klass)
    for base in reversed(klass.__mro__):
        if flavour_of_class(base) != flavour or "__init__" not in vars(base):
            continue
        try:
            params = inspect.signature(base.__init__).parameters
        except (TypeError, ValueError):  # pragma: no cover
            continue
        defaults.update({n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty})
    return defaults


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays
        return False


def _dtype_name(value):
    """A dtype or dtype-policy config reduced to the policy name both flavours take."""
    if isinstance(value, dict) and "config" in value and isinstance(value["config"], dict):
        name = value["config"].get("name")
        if value.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy", "Policy") or name is None:
            raise UnconvertibleError(f"dtype policy {value.get('class_name')!r} has no equivalent")
        return name
    return value


def translate_config(value: Any, target: str):
    """Translates a serialized value (part of a layer config) for ``target``.

    Serialized Keras objects (``{"module": "keras....", "class_name", "config"}``,
    the form both flavours write) become the legacy ``{"class_name", "config"}``
    form that both flavours read; nested layer configs are translated with
    `translate_layer_config`. Objects from other modules (custom
    initializers, activations, ...) raise `UnconvertibleError`.
    """
    if isinstance(value, dict) and "class_name" in value and "config" in value:
        mod = value.get("module")
        if mod is not None and not (mod == "keras" or mod.startswith("keras.")):
            name = value.get("registered_name") or value["class_name"]
            raise UnconvertibleError(f"custom object {name!r} (module {mod!r}) has no built-in equivalent")
        nested_layer = mod is not None and mod.startswith("keras.layers")
        # A layer inside a tf_keras wrapper (Bidirectional, TimeDistributed) may
        # come without a module.
        nested_layer = nested_layer or (
            mod is None
            and target == KERAS3
            and builtin_layer_class(TF_KERAS, value["class_name"]) is not None
        )
        if nested_layer and isinstance(value["config"], dict):
            class_name, config = translate_layer_config(value["class_name"], value["config"], target)
            if target == KERAS3:  # Keras 3 finds built-in classes by their module
                return {
                    "module": "keras.layers",
                    "class_name": class_name,
                    "config": config,
                    "registered_name": None,
                }
            return {"class_name": class_name, "config": config}
        if value["class_name"] in ("DTypePolicy", "FloatDTypePolicy", "Policy"):
            return _dtype_name(value)
        config = value["config"]
        submodule = mod.split(".", 1)[1] if mod and "." in mod else None
        klass = None
        if submodule:
            klass = getattr(getattr(module(target), submodule, None), value["class_name"], None)
        if isinstance(config, dict) and isinstance(klass, type):
            accepted = _init_arguments(klass)
            dropped = {k: v for k, v in config.items() if k not in accepted}
            for k, v in dropped.items():
                if v is not None and v is not False:
                    raise UnconvertibleError(
                        f"{value['class_name']} argument `{k}={v!r}` has no equivalent in "
                        f"{module(target).__name__}.{submodule}"
                    )
            config = {k: v for k, v in config.items() if k in accepted}
        return {"class_name": value["class_name"], "config": translate_config(config, target)}
    if isinstance(value, dict):
        return {k: translate_config(v, target) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(translate_config(v, target) for v in value)
    if isinstance(value, list) or type(value).__name__ == "ListWrapper":
        return [translate_config(v, target) for v in value]
    return value


def translate_layer_config(class_name: str, config: dict, target: str, klass: type | None = None):
    """Translates a layer's config to the built-in layer of the same name in ``target``.

    Returns ``(class_name, config)`` for ``target``'s ``from_config``. Arguments
    the target class does not take are dropped when they cannot change the
    layer's outputs (``None``/``False`` values, seeds, implementation
    choices); any other raises `UnconvertibleError` naming the argument.

    Args:
        class_name: the layer's class name.
        config: the layer's ``get_config()``.
        target: ``"keras"`` or ``"tf_keras"``.
        klass: the target class (defaults to the built-in class of that name).
    """
    klass = klass or builtin_layer_class(target, class_name)
    if klass is None:
        raise UnconvertibleError(f"{module(target).__name__}.layers has no {class_name!r} layer")
    renames = _RENAMED_ARGUMENTS.get(class_name, {})
    if target == KERAS3:
        renames = {v: k for k, v in renames.items()}
    accepted = _init_arguments(klass)
    if any(base.__name__ == "RNN" for base in klass.__mro__):
        accepted.add("zero_output_for_mask")  # tf_keras's RNN takes it through **kwargs
    source = builtin_layer_class(TF_KERAS if target == KERAS3 else KERAS3, class_name)
    source_defaults = _init_defaults(source) if source is not None else {}
    if class_name == "SpectralNormalization":
        raise UnconvertibleError(
            "the bridge does not rebuild SpectralNormalization wrappers (the wrapped layer and "
            "its power-iteration state `vector_u`). Convert the model without the wrapper and "
            "wrap the layer again in the converted model"
        )
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
            # Initializers only set initial values; converted layers get the weights.
            neutral = key in _OUTPUT_NEUTRAL_ARGUMENTS or key.endswith("initializer")
            neutral = neutral or value is None or value is False
            neutral = neutral or (key == "data_format" and value == "channels_last")  # tf_keras's only layout
            if neutral or (key in source_defaults and _same(source_defaults[key], value)):
                continue
            raise UnconvertibleError(
                f"argument `{key}={value!r}` has no equivalent in "
                f"{module(target).__name__}.layers.{class_name}"
            )
        if target == KERAS3 and class_name == "BatchNormalization" and key == "axis":
            # tf_keras stores the (built) axis as a one-element list; Keras 3 takes an int.
            if isinstance(value, (list, tuple)) or type(value).__name__ == "ListWrapper":
                value = list(value)[0]
        try:
            out[key] = translate_config(value, target)
        except UnconvertibleError:
            if key.endswith("initializer"):
                # Only the initial values depend on it, and converted layers
                # get the source's weights: the target's default will do.
                continue
            raise
    if target == TF_KERAS and class_name in ("BatchNormalization", "SyncBatchNormalization"):
        # tf_keras picks its fused kernel on 4-D inputs, which updates the moving
        # variance with the Bessel-corrected batch variance (n / (n - 1)); Keras 3
        # uses the biased one. fused=False trains the same statistics.
        if "fused" in accepted:
            out["fused"] = False
    return class_name, out


def layer_from_config(klass: type, config: dict):
    """``klass.from_config(config)``, for configs made by `translate_layer_config`."""
    if klass.__name__ == "MultiHeadAttention" and flavour_of_class(klass) == TF_KERAS:
        # tf_keras's from_config wants the build shapes of a saved layer and
        # warns without them; the rebuilt layer is built by its first call.
        return klass(**config)
    return klass.from_config(config)


def make_input(flavour: str, like, name: str | None = None):
    """A new ``Input`` of a flavour with the shape (batch axis included),
    dtype and sparseness of the symbolic tensor ``like`` (of either flavour)."""
    shape = tuple(like.shape)
    dtype = like.dtype if isinstance(like.dtype, str) else getattr(like.dtype, "name", str(like.dtype))
    keras_module = module(flavour)
    sparse = bool(getattr(like, "sparse", False))
    return keras_module.Input(shape=shape[1:], batch_size=shape[0], dtype=dtype, name=name, sparse=sparse)


def input_name(tensor) -> str | None:
    """The name of the ``InputLayer`` that produced a symbolic input tensor."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    layer = history[0] if isinstance(history, tuple) else getattr(history, "operation", None)
    return getattr(layer, "name", None)


def is_sequential(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 or tf_keras ``Sequential``."""
    if isinstance(model, keras.Sequential):
        return True
    return flavour_of(model) == TF_KERAS and isinstance(model, tf_keras().Sequential)


def is_input_layer(layer: Any) -> bool:
    """Whether ``layer`` is an ``InputLayer`` (either flavour)."""
    return type(layer).__name__ == "InputLayer" and is_builtin(layer)


def model_io(model: Any):
    """``(inputs, outputs)`` of a Functional model, in their nested structure."""
    if flavour_of(model) == KERAS3:
        return model._inputs_struct, model._outputs_struct
    return model._nested_inputs, model._nested_outputs


def import_tfmot():
    """Imports ``tensorflow_model_optimization``, which works on tf_keras models.

    Importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` in ``os.environ`` (its
    ``keras/compat.py``) and then reads ``tf.keras``; were ``tf.keras`` not
    resolved yet, it would resolve to tf_keras for the rest of the process.
    Here ``tf.keras`` is resolved first, under the environment the user set,
    and the variable is put back afterwards: the process keeps the Keras it
    had, subprocesses inherit the user's environment, and tfmot still uses
    tf_keras (it picks tf_keras whenever ``tf.keras`` is Keras 3).
    """
    if "tensorflow_model_optimization" in sys.modules:
        return sys.modules["tensorflow_model_optimization"]
    getattr(tf.keras, "version", None)  # resolve the lazy `tf.keras` now
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tensorflow_model_optimization as tfmot
    finally:
        if before is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = before
    return tfmot
