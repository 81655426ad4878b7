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
