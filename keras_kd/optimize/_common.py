"""What the optimize modules share: tfmot's wrappers, layer walks, selectors, copies.

tfmot itself is imported on first use (`tfmot()`), never when
`keras_kd.optimize` is imported. Every private attribute of tfmot that
keras_kd reads is read here, through `keras_kd._compat.private_attribute`.
"""

from __future__ import annotations

import importlib
import numbers
import os
from typing import Iterable, Optional

from keras_kd import _checks
from keras_kd import _compat

PRUNE_WRAPPERS = ("PruneLowMagnitude",)
QUANT_WRAPPERS = ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer", "QuantizeAnnotate")
QAT_LAYERS = ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")
TFMOT = _TFMOT = "tensorflow_model_optimization"


def tfmot():
    """The ``tensorflow_model_optimization`` module (imported on first use)."""
    return _compat.import_tfmot()


def _tfmot_private_module(path: str):
    """A tfmot module outside its public API (``tfmot.python.core...``)."""
    tfmot()
    try:
        return importlib.import_module(f"{_TFMOT}.python.core.{path}")
    except ImportError:
        raise _compat.PrivateAPIError(
            f"keras_kd reads the private module `{_TFMOT}.python.core.{path}`, and the installed "
            f"tensorflow-model-optimization {_compat.dependency_version(_TFMOT)} does not have it. "
            "Install the versions keras_kd declares (setup.cfg `install_requires`)."
        ) from None


def prune_registry():
    """tfmot's ``PruneRegistry`` class (what it can prune, and which weights)."""
    return _tfmot_private_module("sparsity.keras.prune_registry").PruneRegistry


def prune_registry_maps():
    """``(rnn layer classes, {cell class: weight names}, {layer class: weight paths})``,
    tfmot's private ``PruneRegistry`` tables, read once per call."""
    registry = prune_registry()
    return tuple(
        _compat.private_attribute(registry, name, _TFMOT)
        for name in ("_RNN_LAYERS", "_RNN_CELLS_WEIGHTS_MAP", "_LAYERS_WEIGHTS_MAP")
    )


def quantizable_activations() -> list:
    """Names of the activations tfmot's QAT quantizes inside a layer (sorted)."""
    aware = _tfmot_private_module("quantization.keras.quantize_aware_activation").QuantizeAwareActivation
    pre = _compat.private_attribute(aware, "_PRE_QUANT_ACTIVATIONS", _TFMOT)
    post = _compat.private_attribute(aware, "_POST_QUANT_ACTIVATIONS", _TFMOT)
    return sorted(set(pre) | set(post))


# tfmot's private reads, for the canary test (see `keras_kd._compat.PRIVATE_READS`).
PRIVATE_READS = (
    (_TFMOT, "python.core.sparsity.keras.prune_registry.PruneRegistry", "_RNN_LAYERS"),
    (_TFMOT, "python.core.sparsity.keras.prune_registry.PruneRegistry", "_RNN_CELLS_WEIGHTS_MAP"),
    (_TFMOT, "python.core.sparsity.keras.prune_registry.PruneRegistry", "_LAYERS_WEIGHTS_MAP"),
    (_TFMOT, "python.core.quantization.keras.quantize_aware_activation.QuantizeAwareActivation",
     "_PRE_QUANT_ACTIVATIONS"),
    (_TFMOT, "python.core.quantization.keras.quantize_aware_activation.QuantizeAwareActivation",
     "_POST_QUANT_ACTIVATIONS"),
    (_TFMOT, "python.core.sparsity.keras.pruning_wrapper.PruneLowMagnitude", "pruning_vars"),
)


def is_tfmot_layer(layer, names) -> bool:
    """Whether ``layer`` is one of tfmot's wrapper classes ``names``."""
    klass = type(layer)
    return klass.__name__ in names and klass.__module__.startswith(_TFMOT)


def walk_layers(model, prefix=""):
    """``(path, layer)`` for every layer of a model, nested models expanded."""
    for layer in getattr(model, "layers", []):
        path = f"{prefix}{layer.name}"
        yield path, layer
        if _compat.is_model(layer):
            yield from walk_layers(layer, path + "/")


def has_wrappers(model, names) -> list:
    """Paths of the layers of ``model`` that are tfmot wrappers ``names``."""
    return [path for path, layer in walk_layers(model) if is_tfmot_layer(layer, names)]


def unwrapped(layer):
    """The layer inside tfmot's pruning and quantization wrappers."""
    while hasattr(layer, "layer") and is_tfmot_layer(layer, PRUNE_WRAPPERS + QUANT_WRAPPERS):
        layer = layer.layer
    return layer


def qualname(obj) -> str:
    klass = type(obj)
    return f"{klass.__module__}.{klass.__qualname__}"


def require_tf_keras_graph(model, argument: str, what: str):
    """Raises `TypeError` unless ``model`` is a tf_keras Functional or Sequential model."""
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


_FLOAT32_FIX = (
    "Rebuild the student in float32 and copy the weights:\n"
    "  float_student = tf_keras.models.clone_model(student, clone_function=lambda layer: "
    "layer.__class__.from_config({**layer.get_config(), 'dtype': 'float32'}))\n"
    "  float_student.set_weights(student.get_weights())\n"
    "(`keras.models.clone_model` for a Keras 3 student)."
)


_OTHER_FLOATS = ("float16", "bfloat16", "float64")


def require_float32(model, argument: str, what: str, why: str, *, mixed_only: bool = False):
    """Raises `ValueError` listing the layers of ``model`` that do not compute in float32.

    Args:
        model: the model to check.
        argument: its argument name, for the message.
        what: the function that needs float32 layers.
        why: why it does, for the message.
        mixed_only: refuse only mixed-precision layers (compute dtype other
            than the variables' dtype), e.g. for pruning, which takes float16.
    """
    found = [
        f"{path} ({getattr(layer.dtype_policy, 'name', layer.dtype_policy)})"
        for path, layer in walk_layers(model)
        if not _compat.is_model(layer) and not _compat.is_input_layer(layer)
        and (layer.compute_dtype != layer.variable_dtype if mixed_only else layer.compute_dtype in _OTHER_FLOATS)
    ]
    if found:
        raise ValueError(
            f"`{what}` needs the layers of `{argument}` ({model.name!r}) to compute in "
            f"{'one dtype' if mixed_only else 'float32'}: {why}. These do not: "
            f"{found[:5]}{' ...' if len(found) > 5 else ''}. {_FLOAT32_FIX}"
        )


def custom_objects(model, extra=None) -> dict:
    """The model's own custom layer classes by name (tfmot rebuilds models from
    their config, which needs them), plus the user's ``custom_objects``."""
    found = {
        type(layer).__name__: type(layer)
        for _, layer in walk_layers(model)
        if not _compat.is_builtin(layer) and not type(layer).__module__.startswith(_TFMOT)
    }
    found.update(extra or {})
    return found


def clone(model):
    """A copy of a tf_keras model with the same weights, sharing nothing."""
    module = tfmot()
    scope = module.quantization.keras.quantize_scope(custom_objects(model))
    with module.sparsity.keras.prune_scope(), scope:
        copy = _compat.tf_keras().models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def selector(layers, model, argument) -> Optional[callable]:
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


def element_x(element):
    """``x`` of an element ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


# ---------------------------------------------------------------------------
# Class counts
# ---------------------------------------------------------------------------


def check_num_classes(student, teacher):
    """Checks that the student outputs as many classes as the teacher.

    Distillation compares the student's logits with the teacher's class by
    class, so the counts must match. `DistillationLoss` finds a mismatch only
    when the first batch is traced; this finds it before any training, with
    both counts in the message.

    Args:
        student: a Keras 3 or tf_keras model (its first output is the logits).
        teacher: the teacher model, a list of teacher models (an ensemble,
            whose members must agree), a teacher-logit cache (the object
            returned by `keras_kd.cache_teacher_logits`, or its directory; the
            cache's manifest records the class count), or an int class count.

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
    student_classes = _checks.num_classes_of(student)
    if isinstance(teacher, bool):
        raise TypeError(
            f"Expected `teacher` to be a model, a cache or a class count. Received: teacher={teacher!r}"
        )
    if isinstance(teacher, numbers.Integral):
        teacher_classes, where = _checks.positive_int(teacher, "teacher"), "the teacher"
    elif _compat.is_model(teacher):
        teacher_classes, where = _checks.num_classes_of(teacher), f"the teacher {teacher.name!r}"
    elif isinstance(teacher, (list, tuple)) and teacher and all(_compat.is_model(t) for t in teacher):
        members = _checks.teacher_list(teacher)  # the members agree with each other
        teacher_classes = next((c for c in map(_checks.num_classes_of, members) if c is not None), None)
        where = f"the teachers {[t.name for t in members]}"
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
            "Expected `teacher` to be a Keras model, a list of models, a teacher-logit cache (or its "
            f"directory) or an int class count. Received: teacher={teacher!r} of type {type(teacher).__name__}."
        )
    return _checks.check_num_classes(
        {f"the student {student.name!r}": student_classes, where: teacher_classes},
        fix=f"Give the student a {teacher_classes}-unit logit layer (or distill from a teacher with "
        f"{student_classes} classes).",
    )
