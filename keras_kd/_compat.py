"""The one place that knows about Keras 3 versus tf_keras.

keras_kd supports both flavours in one process, with no environment variable:
Keras 3 (what ``import keras`` gives) for keras-tuner and new projects, and
tf_keras (Keras 2) for tensorflow-model-optimization. Every other module asks
this one which flavour a model or object belongs to.
"""

from __future__ import annotations

import importlib
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
