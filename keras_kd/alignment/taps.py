"""Graph taps: finding layers by name or path and reading their tensors.

Taps on top-level layers are the model's own symbolic tensors (nothing is
re-run); a tap inside a nested sub-model re-runs that sub-model's layers
inline, and the layers after it, so the training graph still makes a single
forward pass. The layer graph itself is read through `keras_kd._compat`
(`graph_of`, `graph_calls`), which owns the flavour knowledge.
"""

from __future__ import annotations

import difflib

import tensorflow as tf

from keras_kd import _compat


def is_layer(obj) -> bool:
    """Whether ``obj`` is a Keras layer (either flavour)."""
    return _compat.flavour_of(obj) is not None and hasattr(obj, "call") and hasattr(obj, "trainable_weights")


def check_graph_model(model, argument):
    """Refuses models whose layer graph cannot be read, saying how to build one that can."""
    _compat.check_model(model, argument)
    if _compat.graph_of(model) is not None:
        return
    if _compat.is_sequential(model):
        raise ValueError(
            f"`{argument}` ({model.name!r}) is a Sequential model that was never built, so "
            "the shapes of its layers are unknown. Start it with `keras.Input(shape)` or call "
            f"`{argument}.build(input_shape)` before `align`."
        )
    raise TypeError(
        f"`{argument}` ({model.name!r}, class {type(model).__name__}) is a subclassed model: "
        "its layer graph cannot be read, so its intermediate layers cannot be tapped and a "
        "clean copy cannot be rebuilt. Build it with the Functional API "
        "(`keras.Model(inputs, outputs)`) or as a `Sequential` model. Subclassed layers "
        "inside a Functional model are fine; only the layers you tap must be reachable."
    )


def feature_shape(tensor) -> tuple:
    """A symbolic tensor's shape without the batch axis, ``None`` for unknown sizes."""
    return tuple(None if d is None else int(d) for d in tuple(tensor.shape)[1:])


def fmt_shape(shape, batch=True) -> str:
    """``(batch, 4, 4, 8)`` (or ``(4, 4, 8)`` with ``batch=False``) for messages and summaries."""
    dims = (["batch"] if batch else []) + ["None" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def compatible_shapes(a, b) -> bool:
    """Same rank, and equal sizes wherever both are known."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


# -- finding layers, by name, path ("outer/inner") or object, in nested models


def layer_entries(model, prefix=(), layers=(), readable=True):
    """(path names, path layers, readable) for every non-input layer, recursively."""
    entries = []
    for layer in model.layers:
        if _compat.is_input_layer(layer):
            continue
        names, path = prefix + (layer.name,), layers + (layer,)
        entries.append((names, path, readable))
        if _compat.is_model(layer):
            inner_readable = readable and _compat.graph_of(layer) is not None
            entries.extend(layer_entries(layer, names, path, inner_readable))
    return entries


def resolve(model, ref, argument, pair_index):
    """The path of layers (outermost first) that ``ref`` names in ``model``."""
    entries = layer_entries(model)
    if isinstance(ref, str):
        matches = [e for e in entries if "/".join(e[0]) == ref]
        if not matches:
            matches = [e for e in entries if e[0][-1] == ref]
        if len(matches) > 1:
            raise ValueError(
                f"Layer name {ref!r} in pair {pair_index} is ambiguous in {argument} "
                f"{model.name!r}: it names {['/'.join(e[0]) for e in matches]}. "
                "Use the full path 'outer/inner' or pass the layer object."
            )
        if not matches:
            candidates = sorted({"/".join(e[0]) for e in entries} | {e[0][-1] for e in entries})
            close = difflib.get_close_matches(ref, candidates, n=5, cutoff=0.4)
            hint = f" Closest names: {close}." if close else ""
            raise ValueError(
                f"Unknown layer {ref!r} in pair {pair_index}: {argument} {model.name!r} has no "
                f"layer of that name.{hint} All layer names: {candidates[:40]}"
                + (" ..." if len(candidates) > 40 else "")
            )
    elif is_layer(ref):
        matches = [e for e in entries if e[1][-1] is ref]
        if not matches:
            raise ValueError(
                f"The layer object {ref.name!r} in pair {pair_index} is not part of "
                f"{argument} {model.name!r}."
            )
    else:
        raise TypeError(
            f"Expected each pair to name layers by string or by layer object. Received "
            f"{ref!r} of type {type(ref).__name__} in pair {pair_index}."
        )
    names, path, readable = matches[0]
    if not readable:
        raise TypeError(
            f"Layer {'/'.join(names)!r} in pair {pair_index} sits inside a subclassed model of "
            f"{argument} {model.name!r}, whose layer graph cannot be read. Rebuild that "
            "sub-model with the Functional API, or tap a layer outside it."
        )
    return names, path


# -- reading the tapped tensors (see the module docstring)


def rewire(model, new_inputs, wanted, argument, training=None):
    """Outputs of ``model`` and the tensors of the tapped layers.

    Args:
        model: a Functional or built Sequential model.
        new_inputs: tensors to feed in place of ``model.inputs`` (a flat list), or
            ``None`` to keep the model's own inputs.
        wanted: ``[(key, path)]`` where ``path`` is a tuple of layers starting at
            this model's level.
        training: the ``training`` argument the enclosing model was called
            with (e.g. ``backbone(x, training=False)``), passed on to every
            re-run layer so that re-running keeps the model's behaviour.

    Returns:
        ``(outputs, found)``: the flat list of output tensors and
        ``{key: tensor}``.
    """
    mapping = {}
    if new_inputs is not None:
        for ref, new in zip(model.inputs, new_inputs):
            mapping[id(ref)] = new
    direct, nested = {}, {}
    for key, path in wanted:
        target = direct if len(path) == 1 else nested
        target.setdefault(id(path[0]), []).append((key, path[1:]))
    calls = {}
    found = {}
    for layer, args, kwargs, outputs in _compat.graph_calls(model):
        lid = id(layer)
        if lid in direct or lid in nested:
            calls[lid] = calls.get(lid, 0) + 1
            if calls[lid] > 1:
                raise ValueError(
                    f"Layer {layer.name!r} is called more than once in {argument} "
                    f"{model.name!r} (a shared layer), so its features are ambiguous. "
                    "Tap a layer that is called once."
                )
        changed = False

        def substitute(value):
            nonlocal changed
            new = mapping.get(id(value))
            if new is None:
                return value
            changed = True
            return new

        new_args, new_kwargs = tf.nest.map_structure(substitute, (tuple(args), dict(kwargs)))
        if training is not None and new_kwargs.get("training") is None:
            new_kwargs["training"] = training
        if lid in nested:
            sub_inputs = tf.nest.flatten(new_args[0] if new_args else new_kwargs.get("inputs"))
            new_outputs, sub_found = rewire(
                layer, sub_inputs, nested[lid], argument, training=new_kwargs.get("training")
            )
            found.update(sub_found)
            changed = True
        elif changed:
            new_outputs = tf.nest.flatten(layer(*new_args, **new_kwargs))
        else:
            new_outputs = outputs
        if changed:
            for ref, new in zip(outputs, new_outputs):
                mapping[id(ref)] = new
        for key, _ in direct.get(lid, ()):
            if len(new_outputs) != 1:
                raise ValueError(
                    f"Layer {layer.name!r} returns {len(new_outputs)} tensors; a tapped layer "
                    "must return one feature tensor."
                )
            found[key] = new_outputs[0]
    missing = [key for key, _ in wanted if key not in found]
    if missing:  # pragma: no cover - every resolved layer is in the graph
        raise ValueError(f"Could not find the tapped layers {missing} in {argument} {model.name!r}.")
    return [mapping.get(id(o), o) for o in model.outputs], found