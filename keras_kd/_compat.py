"""The one place that knows about Keras 3 versus tf_keras.

keras_kd supports both flavours in one process, with no environment variable:
Keras 3 (what ``import keras`` gives) for keras-tuner and new projects, and
tf_keras (Keras 2) for tensorflow-model-optimization. Every other module asks
this one which flavour a model or object belongs to, which base classes and
serialization registry to use, and how to read a model's layer graph.

It is also the one place that reads the dependencies' private attributes
(layer graphs, masks, tfmot's registries): each read goes through
`private_attribute`, which names the attribute and the installed version
when a dependency drops it, and `PRIVATE_READS` lists them all for the
canary test. The Keras 3 <-> tf_keras model bridge (layer-config
translation) lives in `keras_kd.optimize.bridge`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any

import keras
import tensorflow as tf

KERAS3 = "keras"
TF_KERAS = "tf_keras"


# ---------------------------------------------------------------------------
# Private attributes of the dependencies: every read goes through here
# ---------------------------------------------------------------------------

_DISTRIBUTIONS = {
    "keras": "keras",
    "tf_keras": "tf-keras",
    "tensorflow": "tensorflow",
    "tensorflow_model_optimization": "tensorflow-model-optimization",
    "keras_tuner": "keras-tuner",
}

# Every private attribute (or private module) of a dependency that keras_kd
# reads through this module: (package, owner, attribute). The canary test
# checks each one against the installed versions.
PRIVATE_READS = (
    ("keras", "Functional", "_nodes_by_depth"),
    ("keras", "Functional", "_inputs_struct"),
    ("keras", "Functional", "_outputs_struct"),
    ("keras", "Sequential", "_functional"),
    ("keras", "KerasTensor", "_keras_history"),
    ("keras", "KerasTensor", "_keras_mask"),
    ("keras", "Layer", "_flatten_layers"),
    ("keras", "Lambda", "_output_shape"),
    ("tf_keras", "Functional", "_nodes_by_depth"),
    ("tf_keras", "Functional", "_nested_inputs"),
    ("tf_keras", "Functional", "_nested_outputs"),
    ("tf_keras", "Functional", "_input_layers"),
    ("tf_keras", "Model", "_is_graph_network"),
    ("tf_keras", "InputLayer", "_outbound_nodes"),
    ("tf_keras", "KerasTensor", "_keras_history"),
    ("tf_keras", "Tensor", "_keras_mask"),
    ("tf_keras", "Layer", "_flatten_layers"),
    ("tf_keras", "Lambda", "_output_shape"),
    ("tf_keras", "Loss", "_allow_sum_over_batch_size"),
    ("tf_keras", "Loss", "_name_scope"),
)


class PrivateAPIError(RuntimeError):
    """A private attribute keras_kd reads is gone from an installed dependency."""


def dependency_version(package: str) -> str:
    """The installed version of a dependency (``"keras"``, ``"tf_keras"``, ...)."""
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def private_attribute(obj: Any, attribute: str, package: str):
    """``obj.<attribute>``, a private attribute of ``package`` that keras_kd reads.

    Args:
        obj: the object (or class) to read from.
        attribute: the private attribute's name.
        package: the dependency that defines it (``"keras"``, ``"tf_keras"``,
            ``"tensorflow_model_optimization"``, ...).

    Returns:
        The attribute's value.

    Raises:
        PrivateAPIError: naming the attribute and the installed version of
            ``package`` when the attribute is gone.
    """
    try:
        return getattr(obj, attribute)
    except AttributeError:
        owner = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise PrivateAPIError(
            f"keras_kd reads the private attribute `{owner}.{attribute}` of {package}, and the "
            f"installed {package} {dependency_version(package)} does not have it. Install the "
            "versions keras_kd declares (setup.cfg `install_requires`), or report this with the "
            "versions of keras, tf_keras and tensorflow-model-optimization."
        ) from None


# ---------------------------------------------------------------------------
# Backends: Keras 3 on TensorFlow or on JAX (chosen per process by KERAS_BACKEND)
# ---------------------------------------------------------------------------


def is_jax_backend() -> bool:
    """Whether Keras 3 runs on JAX in this process (``KERAS_BACKEND=jax``)."""
    return keras.backend.backend() == "jax"


def is_jax_array(x: Any) -> bool:
    """Whether ``x`` is a JAX array or tracer (never imports JAX)."""
    if "jax" not in sys.modules:
        return False
    return isinstance(x, sys.modules["jax"].Array)


def backend_of(x: Any) -> str:
    """``"jax"`` for a JAX array, tracer or JAX-side targets, else ``"tensorflow"``.

    Dispatch by the tensor, not by the process's backend: tf_keras students
    and tf.data functions keep TensorFlow values in a JAX process.
    """
    if is_jax_array(x) or type(x).__name__ == "JaxTeacherTargets":
        return "jax"
    return "tensorflow"


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
                self._allow_sum_over_batch_size = False  # PRIVATE_READS lists both
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

# Where each flavour's built-in losses and metrics live (a loss function given to `compile` is wrapped
# in a loss; some metrics, e.g. SparseCategoricalCrossentropy, call the loss functions).
_KERAS_LOSS_FILES = (
    os.path.join("keras", "src", "losses", ""),  # Keras 3: keras/src/losses/loss.py, losses.py
    os.path.join("tf_keras", "src", "losses.py"),
)
_KERAS_METRIC_FILES = (os.path.join("keras", "src", "metrics", ""),)  # also tf_keras/src/metrics/


def called_from_a_keras_loss(depth: int = 32) -> bool:
    """Whether Keras 3's or tf_keras's own loss code is among the last ``depth`` callers, and
    no metric's code.

    A built-in Keras loss (or a loss function that ``compile`` wrapped in one)
    converts ``y_true`` to a tensor there; metrics (some through the loss
    functions) and Keras's training loop convert elsewhere.
    """
    frame = sys._getframe(1)  # noqa: SLF001 - the caller's frames, read only
    in_loss = False
    for _ in range(depth):
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if any(part in filename for part in _KERAS_METRIC_FILES):
            return False
        in_loss = in_loss or any(part in filename for part in _KERAS_LOSS_FILES)
        frame = frame.f_back
    return in_loss


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
    """The Keras mask carried by a tensor, or None (both flavours use ``_keras_mask``;
    a tensor without a mask has no such attribute). JAX arrays take no attributes: Keras 3
    keeps their masks in a table, read through its own getter."""
    mask = getattr(tensor, "_keras_mask", None)
    if mask is None and is_jax_array(tensor):
        from keras.src.backend.common import masking  # noqa: PLC0415 - private; canary in tests

        mask = masking.get_keras_mask(tensor)
    return mask


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
            return private_attribute(model, "_functional", KERAS3)  # None until built
        # Functional models (and only they) have a node graph.
        return model if hasattr(model, "_nodes_by_depth") else None
    if flavour == TF_KERAS and is_model(model) and private_attribute(model, "_is_graph_network", TF_KERAS):
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
    nodes_by_depth = private_attribute(graph, "_nodes_by_depth", flavour_of(model))
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


def producing_layer(tensor):
    """The layer (or Keras 3 operation) that produced a symbolic Keras tensor, or None.

    Read from ``_keras_history`` (both flavours); tensors that no layer
    produced (eager tensors, plain ``tf.Tensor``) have none.
    """
    history = getattr(tensor, "_keras_history", None)
    if not history:
        return None
    return history[0] if isinstance(history, tuple) else getattr(history, "operation", None)


def input_name(tensor) -> str | None:
    """The name of the ``InputLayer`` that produced a symbolic input tensor."""
    return getattr(producing_layer(tensor), "name", None)


def make_input(flavour: str, like, name: str | None = None):
    """A new ``Input`` of a flavour with the shape (batch axis included),
    dtype and sparseness of the symbolic tensor ``like`` (of either flavour)."""
    shape = tuple(like.shape)
    dtype = like.dtype if isinstance(like.dtype, str) else getattr(like.dtype, "name", str(like.dtype))
    sparse = bool(getattr(like, "sparse", False))
    return module(flavour).Input(shape=shape[1:], batch_size=shape[0], dtype=dtype, name=name, sparse=sparse)


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
        names = ("_inputs_struct", "_outputs_struct")
    else:
        names = ("_nested_inputs", "_nested_outputs")
    flavour = flavour_of(model)
    return tuple(private_attribute(model, name, flavour) for name in names)


def input_consumers(model: Any) -> dict:
    """``{input layer: names of the layers it feeds}`` of a tf_keras Functional model."""
    return {
        layer: [node.outbound_layer.name for node in private_attribute(layer, "_outbound_nodes", TF_KERAS)]
        for layer in private_attribute(model, "_input_layers", TF_KERAS)
    }


def sublayers(layer: Any) -> list:
    """``layer`` and every layer nested in it, recursively (both flavours)."""
    flatten = private_attribute(layer, "_flatten_layers", flavour_of(layer))
    return list(flatten(include_self=True, recursive=True))


def lambda_output_shape(layer: Any):
    """The ``output_shape`` a ``Lambda`` layer was built with (both flavours)."""
    return private_attribute(layer, "_output_shape", flavour_of(layer))


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
