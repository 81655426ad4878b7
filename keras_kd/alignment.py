"""Intermediate-feature distillation between models of different shapes.

`align` taps named layers of a student and a teacher, maps each student
feature into the teacher's feature space with a small trainable *projector*
(FitNets' "regressor"), and adds a feature loss between the two. It follows
tfmot's wrap/strip shape: `align` wraps for training, `Aligned.export` strips
for deployment, and neither changes the structure of the user's models.

How the pieces travel (the targets contract of `keras_kd.targets` is kept):

* **Teacher features ride in ``x``.** `Aligned.attach` turns each batch
  ``(x, y[, sample_weight])`` into
  ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t)[, sample_weight])``
  where ``t`` and the ``f_i`` come from one inference-mode forward pass of the
  teacher (`Aligned.feature_extractor`). ``y`` is the same `TeacherTargets`
  that `keras_kd.with_teacher` produces, so `keras_kd.DistillationLoss` and the
  user's metrics (``"accuracy"``) work unchanged.
* **The training model has one output.** `Aligned.model` is a new model of
  the student's flavour whose inputs are the student's inputs followed by one
  input per teacher feature, and whose only output is the student's logits.
  It is built from the student's own graph and *shares the student's layers*
  (as tfmot's pruning wrappers share the layers they wrap): training it trains
  ``student``. Inside, the projectors and a loss layer sit on a side branch;
  the loss layer adds ``sum_i weight_i * mean_batch(feature_loss_i)`` with
  ``add_loss`` (so ``compile`` takes the logit loss only) and logs it as the
  metric ``feature_loss``, then passes the logits through unchanged.
* **Clean student.** `Aligned.export` rebuilds the student from its own
  config and copies the trained weights: no projectors, no extra inputs or
  outputs, ready for tfmot and TFLite.
* **Cached features.** `Aligned.cache_features` returns a ``ds -> ds``
  transform that runs the teacher once over the raw (unbatched, ordered)
  dataset, stores its logits and the tapped features (float16 by default,
  optionally pooled with ``teacher_pool_size``), and pairs them with the
  examples by position, so shuffling, batching and repeating after the
  transform are safe. It is independent of the teacher-logit cache.

The feature losses are pure TF functions of ``(teacher_features,
student_features)`` returning one value per example, like the divergences in
`keras_kd.losses`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from keras_kd import _compat
from keras_kd import _feature_cache
from keras_kd import _storage
from keras_kd import losses as losses_lib
from keras_kd import targets as targets_lib

__all__ = [
    "FEATURE_LOSSES",
    "Aligned",
    "AlignmentPair",
    "align",
    "attention_map",
    "attention_transfer",
    "feature_cosine",
    "feature_l1",
    "feature_mse",
    "get_feature_loss",
]

FeatureLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# ---------------------------------------------------------------------------
# Feature losses: per-example values, teacher first (as the divergences).
# ---------------------------------------------------------------------------


def _flat(features):
    features = tf.cast(features, tf.float32)
    return tf.reshape(features, [tf.shape(features)[0], -1])


def feature_mse(teacher_features, student_features):
    """Mean squared difference of the features, per example.

    Formula: ``mean_j (s_j - t_j)^2`` over all non-batch positions ``j``.
    The FitNets hint loss (Romero et al. 2015) up to a constant factor.

    Args:
        teacher_features: teacher features, shape ``(batch, ...)``.
        student_features: projected student features, same shape.

    Returns:
        A float32 tensor of shape ``(batch,)``.

    Example:

    >>> t = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    >>> s = tf.constant([[1.0, 4.0], [1.0, -1.0]])
    >>> feature_mse(t, s).numpy()
    array([2., 1.], dtype=float32)

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """
    return tf.reduce_mean(tf.square(_flat(student_features) - _flat(teacher_features)), axis=-1)


def feature_l1(teacher_features, student_features):
    """Mean absolute difference of the features, per example.

    Formula: ``mean_j |s_j - t_j|`` over all non-batch positions ``j``.

    Example:

    >>> feature_l1(tf.constant([[1.0, 2.0]]), tf.constant([[0.0, 4.0]])).numpy()
    array([1.5], dtype=float32)
    """
    return tf.reduce_mean(tf.abs(_flat(student_features) - _flat(teacher_features)), axis=-1)


def feature_cosine(teacher_features, student_features):
    """Cosine distance between the flattened features, per example.

    Formula: ``1 - <s, t> / (||s|| ||t||)`` with ``s`` and ``t`` flattened
    per example; in ``[0, 2]``, 0 when the features point the same way
    whatever their scale. An all-zero feature counts as orthogonal (distance 1).

    Example:

    >>> feature_cosine(tf.constant([[1.0, 0.0]]), tf.constant([[0.0, 3.0]])).numpy()
    array([1.], dtype=float32)
    """
    s = tf.math.l2_normalize(_flat(student_features), axis=-1)
    t = tf.math.l2_normalize(_flat(teacher_features), axis=-1)
    return 1.0 - tf.reduce_sum(s * t, axis=-1)


def attention_map(features, p: float = 2.0):
    """Spatial attention map of Zagoruyko & Komodakis (2017), per example.

    Formula: ``a = vec(sum_c |f[..., c]|^p)`` over the channel (last) axis,
    then ``a / ||a||_2``. Works on ``(batch, H, W, C)`` maps (``H * W``
    positions) and ``(batch, N, D)`` token sequences (``N`` positions).

    Returns:
        A float32 tensor of shape ``(batch, positions)`` with unit L2 rows.
    """
    features = tf.cast(features, tf.float32)
    if features.shape.rank is not None and features.shape.rank < 3:
        raise ValueError(
            "Attention transfer needs features with positions and channels, "
            f"(batch, H, W, C) or (batch, N, D). Received shape {features.shape}."
        )
    energy = tf.reduce_sum(tf.pow(tf.abs(features), p), axis=-1)
    return tf.math.l2_normalize(tf.reshape(energy, [tf.shape(energy)[0], -1]), axis=-1)


def attention_transfer(teacher_features, student_features, p: float = 2.0):
    """Attention-transfer loss (Zagoruyko & Komodakis 2017), per example.

    Formula: ``mean_j (a_s[j] - a_t[j])^2`` with ``a = attention_map(f, p)``,
    as in the authors' code (``(at(x) - at(y)).pow(2).mean()``). Only the
    positions must match; the channel counts of student and teacher may
    differ. The values are small (the maps have unit norm): the authors
    multiply the loss by ``beta / 2 = 500``, so use a large ``weight``.

    References:
        Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving
        the Performance of Convolutional Neural Networks via Attention
        Transfer", ICLR 2017.
    """
    return tf.reduce_mean(
        tf.square(attention_map(student_features, p) - attention_map(teacher_features, p)), axis=-1
    )


FEATURE_LOSSES = {
    "mse": feature_mse,
    "l1": feature_l1,
    "cosine": feature_cosine,
    "attention": attention_transfer,
}


def _is_attention(identifier) -> bool:
    """Whether a feature loss is attention transfer, by name, function or partial.

    Attention transfer compares spatial maps only, so its pairs need no
    channel projector, however it was named.
    """
    fn = get_feature_loss(identifier)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is attention_transfer


def get_feature_loss(identifier: Union[str, FeatureLoss]) -> FeatureLoss:
    """Resolves a feature-loss name (see `FEATURE_LOSSES`) or passes a callable through."""
    if callable(identifier):
        return identifier
    if isinstance(identifier, str) and identifier in FEATURE_LOSSES:
        return FEATURE_LOSSES[identifier]
    raise ValueError(
        f"Unknown feature loss {identifier!r}. Expected one of {sorted(FEATURE_LOSSES)} "
        "or a callable `fn(teacher_features, student_features) -> per-example values`."
    )


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------

_PROJECTORS = ("auto", "identity", "dense", "conv1x1", "conv3x3")
_INITS = ("auto", "identity", "zeros", "glorot")
_RESAMPLES = ("auto", "pool", "resize")


def _per_pair(value, argument, count):
    """A scalar for every pair, or a list/tuple with one value per pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"Expected `{argument}` to be one value or a list of {count} values "
                f"(one per pair). Received: {argument}={value!r}"
            )
        return list(value)
    return [value] * count


def _is_layer(obj) -> bool:
    return _compat.flavour_of(obj) is not None and hasattr(obj, "call") and hasattr(obj, "trainable_weights")


def _check_graph_model(model, argument):
    _compat.check_model(model, argument)
    if _compat.graph_of(model) is not None:
        return
    if isinstance(model, _compat.module(_compat.flavour_of(model)).Sequential):
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


def _shape(tensor) -> tuple:
    return tuple(None if d is None else int(d) for d in tuple(tensor.shape)[1:])


def _fmt(shape) -> str:
    return "(batch, " + ", ".join("None" if d is None else str(d) for d in shape) + ")"


# ---------------------------------------------------------------------------
# Finding layers, by name, path ("outer/inner") or object, in nested models
# ---------------------------------------------------------------------------


def _layer_entries(model, prefix=(), layers=(), readable=True):
    """(path names, path layers, readable) for every non-input layer, recursively."""
    entries = []
    input_layer = _compat.module(_compat.flavour_of(model)).layers.InputLayer
    for layer in model.layers:
        if isinstance(layer, input_layer):
            continue
        names, path = prefix + (layer.name,), layers + (layer,)
        entries.append((names, path, readable))
        if _compat.is_model(layer):
            inner_readable = readable and _compat.graph_of(layer) is not None
            entries.extend(_layer_entries(layer, names, path, inner_readable))
    return entries


def _resolve(model, ref, argument, pair_index):
    """The path of layers (outermost first) that ``ref`` names in ``model``."""
    entries = _layer_entries(model)
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
    elif _is_layer(ref):
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


# ---------------------------------------------------------------------------
# Reading tap tensors from a model's graph. Taps on top-level layers are the
# model's own symbolic tensors (nothing is re-run); a tap inside a nested
# sub-model re-runs that sub-model's layers inline, and the layers after it,
# so the training graph still makes a single forward pass.
# ---------------------------------------------------------------------------


def _rewire(model, new_inputs, wanted, argument, training=None):
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
            new_outputs, sub_found = _rewire(
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


# ---------------------------------------------------------------------------
# Projector planning (pure Python, shapes only) and building
# ---------------------------------------------------------------------------


class _Unalignable(ValueError):
    pass


def _integer_ratio(big, small):
    if big is None or small is None or small == 0 or big < small or big % small:
        return None
    return big // small


def _plan(s, t, projector, resample, channels_needed):
    """Steps that map student features of shape ``s`` onto shape ``t``.

    Shapes exclude the batch axis. Returns a list of step tuples; raises
    `_Unalignable` with the reason when no chain of the requested kind fits.
    """
    steps = []
    cur = tuple(s)
    # 1. Bring the layouts together: (H, W, C) maps <-> (N, D) token sequences.
    if len(cur) == 3 and len(t) == 2:
        h, w, c = cur
        if h is None or w is None:
            raise _Unalignable("a feature map with unknown height or width cannot become tokens")
        steps.append(("to_tokens", h * w, c))
        cur = (h * w, c)
    elif len(cur) == 2 and len(t) == 3:
        n, d = cur
        if n is None:
            raise _Unalignable("a token sequence of unknown length cannot become a feature map")
        side = math.isqrt(n)
        drop_first = False
        if side * side != n:
            side = math.isqrt(n - 1)
            if n > 1 and side * side == n - 1:
                drop_first = True  # a leading class token, as in ViT
            else:
                raise _Unalignable(
                    f"{n} tokens form no square grid (nor a square grid plus one class token)"
                )
        steps.append(("to_map", side, drop_first, d))
        cur = (side, side, d)
    elif len(cur) != len(t):
        raise _Unalignable(
            "the feature ranks differ and only (H, W, C) maps <-> (N, D) tokens can be reshaped"
        )
    # 2. Resample the positions: spatial size of maps, length of sequences.
    if len(cur) in (2, 3):
        positions, target = cur[:-1], t[:-1]
        if positions != target:
            if any(d is None for d in target):
                raise _Unalignable("the teacher's spatial size or length is unknown: there is no target size")
            ratios = [_integer_ratio(p, q) for p, q in zip(positions, target)]
            can_pool = all(r is not None for r in ratios)
            if resample == "pool" and not can_pool:
                raise _Unalignable(
                    f"resample='pool' needs student positions {positions} to be whole multiples "
                    f"of the teacher's {target}"
                )
            mode = "pool" if (resample == "pool" or (resample == "auto" and can_pool)) else "resize"
            if len(cur) == 3:
                steps.append(("pool2d", tuple(ratios)) if mode == "pool" else ("resize2d", target))
            else:
                steps.append(("pool1d", ratios[0]) if mode == "pool" else ("resize1d", target[0], cur[-1]))
            cur = tuple(target) + (cur[-1],)
    elif cur[:-1] != t[:-1]:
        raise _Unalignable(f"only the last axis can be mapped for features of rank {len(cur) + 1}")
    # 3. Map the channels (last axis).
    width, target_width = cur[-1], t[-1]
    if projector == "auto":
        if width == target_width or not channels_needed:
            kind = "none"
        else:
            kind = "conv1x1" if len(cur) == 3 else "dense"
    else:
        kind = "none" if projector == "identity" else projector
    if kind == "none":
        if channels_needed and width != target_width:
            raise _Unalignable(
                f"projector='identity' keeps the width {width}, but the teacher has {target_width}"
            )
    else:
        if width is None or target_width is None:
            raise _Unalignable("the feature width (last axis) must be known to map it")
        if kind in ("conv1x1", "conv3x3") and len(cur) != 3:
            raise _Unalignable(f"projector={projector!r} needs (H, W, C) feature maps")
        if kind == "dense":
            steps.append(("dense", width, target_width))
        else:
            steps.append(("conv", int(kind[4]), width, target_width))
    return steps


def _describe(steps):
    if not steps:
        return "identity (shapes already match)"
    words = []
    for step in steps:
        kind = step[0]
        if kind == "to_tokens":
            words.append(f"reshape map to {step[1]} tokens")
        elif kind == "to_map":
            words.append(
                ("drop the class token, " if step[2] else "") + f"reshape tokens to a {step[1]}x{step[1]} map"
            )
        elif kind == "pool2d":
            words.append(f"average-pool {step[1][0]}x{step[1][1]}")
        elif kind == "resize2d":
            words.append(f"bilinear resize to {step[1][0]}x{step[1][1]}")
        elif kind == "pool1d":
            words.append(f"average-pool the sequence by {step[1]}")
        elif kind == "resize1d":
            words.append(f"linear interpolation to length {step[1]}")
        elif kind == "dense":
            words.append(f"Dense {step[1]} -> {step[2]}")
        elif kind == "conv":
            words.append(f"{step[1]}x{step[1]} conv {step[2]} -> {step[3]} channels")
    return ", then ".join(words)


def _build_steps(keras_module, steps, tensor, prefix, init):
    """Applies the planned projector layers; returns (output, channel-map layer or None)."""
    layers = keras_module.layers
    initializer = "zeros" if init == "zeros" else "glorot_uniform"
    mapper = None
    for step in steps:
        kind = step[0]
        if kind == "to_tokens":
            tensor = layers.Reshape((step[1], step[2]), name=f"{prefix}_tokens")(tensor)
        elif kind == "to_map":
            if step[2]:
                tensor = layers.Cropping1D((1, 0), name=f"{prefix}_drop_class_token")(tensor)
            tensor = layers.Reshape((step[1], step[1], step[3]), name=f"{prefix}_map")(tensor)
        elif kind == "pool2d":
            tensor = layers.AveragePooling2D(step[1], strides=step[1], name=f"{prefix}_pool")(tensor)
        elif kind == "resize2d":
            height, width = step[1]
            tensor = layers.Resizing(height, width, interpolation="bilinear", name=f"{prefix}_resize")(tensor)
        elif kind == "pool1d":
            tensor = layers.AveragePooling1D(step[1], strides=step[1], name=f"{prefix}_pool")(tensor)
        elif kind == "resize1d":
            length, width = step[1], step[2]
            tensor = layers.Reshape((-1, 1, width), name=f"{prefix}_as_image")(tensor)
            tensor = layers.Resizing(length, 1, interpolation="bilinear", name=f"{prefix}_resize")(tensor)
            tensor = layers.Reshape((length, width), name=f"{prefix}_as_sequence")(tensor)
        elif kind == "dense":
            mapper = layers.Dense(step[2], kernel_initializer=initializer, name=f"{prefix}_dense")
            tensor = mapper(tensor)
        elif kind == "conv":
            k = step[1]
            mapper = layers.Conv2D(
                step[3], k, padding="same", kernel_initializer=initializer, name=f"{prefix}_conv{k}x{k}"
            )
            tensor = mapper(tensor)
    return tensor, mapper


def _set_identity(layer):
    kernel, *rest = layer.get_weights()
    eye = np.eye(kernel.shape[-2], kernel.shape[-1], dtype=kernel.dtype)
    new = np.zeros_like(kernel)
    if kernel.ndim == 2:
        new = eye
    else:  # (k, k, in, out): identity at the centre tap
        new[kernel.shape[0] // 2, kernel.shape[1] // 2] = eye
    layer.set_weights([new, *[np.zeros_like(w) for w in rest]])


# ---------------------------------------------------------------------------
# The loss layer (one class per Keras flavour)
# ---------------------------------------------------------------------------

_LOSS_LAYER_CLASSES: dict = {}


def _loss_layer_class(flavour):
    if flavour in _LOSS_LAYER_CLASSES:
        return _LOSS_LAYER_CLASSES[flavour]
    keras_module = _compat.module(flavour)

    class FeatureAlignmentLoss(keras_module.layers.Layer):
        """Adds ``sum_i w_i * mean_batch(loss_i(t_i, s_i))`` and passes its first input through.

        Called on ``[passthrough, s_1, t_1, ..., s_P, t_P]``. The weights are a
        non-trainable variable (``pair_weights``) that callbacks may change.
        """

        def __init__(self, feature_losses, weights, metric_name="feature_loss", **kwargs):
            kwargs["dtype"] = "float32"
            super().__init__(**kwargs)
            # Names, callables, or serialized callables (from a config).
            feature_losses = [_compat.deserialize(f) if isinstance(f, dict) else f for f in feature_losses]
            self._loss_fns = [get_feature_loss(f) for f in feature_losses]
            self.feature_losses = list(feature_losses)
            self.initial_weights = [float(w) for w in weights]
            self.metric_name = metric_name
            self._update_metric = _compat.layer_mean_metric(self, metric_name)

        def build(self, input_shape):
            self.pair_weights = self.add_weight(
                name="pair_weights",
                shape=(len(self.initial_weights),),
                initializer=keras_module.initializers.Constant(self.initial_weights),
                trainable=False,
            )
            self.built = True

        def call(self, inputs):
            passthrough, rest = inputs[0], inputs[1:]
            total = tf.constant(0.0, tf.float32)
            for i, fn in enumerate(self._loss_fns):
                student, teacher = rest[2 * i], rest[2 * i + 1]
                values = fn(tf.stop_gradient(tf.cast(teacher, tf.float32)), tf.cast(student, tf.float32))
                total += tf.cast(self.pair_weights[i], tf.float32) * tf.reduce_mean(values)
            self.add_loss(total)
            self._update_metric(total)
            return passthrough

        def compute_output_shape(self, input_shape):
            return input_shape[0]

        def get_config(self):
            config = super().get_config()
            config.update(
                feature_losses=[
                    f if isinstance(f, str) else _compat.serialize(f) for f in self.feature_losses
                ],
                weights=list(self.initial_weights),
                metric_name=self.metric_name,
            )
            return config

    keras_module.saving.register_keras_serializable(package="keras_kd")(FeatureAlignmentLoss)
    _LOSS_LAYER_CLASSES[flavour] = FeatureAlignmentLoss
    return FeatureAlignmentLoss


def _is_loss_layer(layer) -> bool:
    return any(isinstance(layer, cls) for cls in _LOSS_LAYER_CLASSES.values())


# Registered when keras_kd is imported (both flavours are imported by then), so
# that a saved `Aligned.model` loads in a fresh process after `import keras_kd`.
for _flavour in (_compat.KERAS3, _compat.TF_KERAS):
    _loss_layer_class(_flavour)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlignmentPair:
    """How one student layer is aligned with one teacher layer.

    Attributes:
        student_layer: path of the student layer ("outer/inner" when nested).
        teacher_layer: path of the teacher layer.
        student_shape: the student feature shape (without the batch axis).
        teacher_shape: the teacher feature shape the student is compared with,
            after ``teacher_pool_size`` pooling.
        projector: the projector requested (``"auto"``, a kind or "custom").
        steps: the layers ``projector="auto"`` (or the requested kind) chose,
            in words.
        feature_loss: name of the feature loss (or the callable's name).
        weight: the weight of this pair's loss at construction.
        init: the projector initialisation used ("identity", "zeros",
            "glorot" or "none" when there is nothing to initialise).
    """

    student_layer: str
    teacher_layer: str
    student_shape: tuple
    teacher_shape: tuple
    projector: str
    steps: str
    feature_loss: str
    weight: float
    init: str


class Aligned:
    """A student wired to learn a teacher's intermediate features.

    Build it with `align`. The pieces, in the order of use:

    * `attach` (online teacher) or `cache_features` (teacher run once): the
      dataset for `model`.
    * `model`: the training model (student inputs + teacher features in,
      student logits out). Compile it with ``loss=aligned.loss(kd)`` and your
      metrics, then ``fit``. It shares the student's layers.
    * `hint_model`: FitNets' first stage, the student up to the tapped
      layers plus the projectors, trained on the feature loss alone.
    * `export`: the clean, trained student.

    Attributes:
        student: the student given to `align` (trained in place by `model`).
        teacher: the teacher (never trained).
        pairs: a tuple of `AlignmentPair`, one per aligned pair.
        model: the training model.
        hint_model: the FitNets hint-stage model: student inputs and teacher
            features in, the student up to the tapped layers plus the
            projectors, loss = the feature loss with the weights given to
            `align` (compile it with only an optimizer). It shares its layers
            with `model`.
        feature_extractor: the teacher's feature model, outputs
            ``[logits, f_1, ..., f_P]``.
    """

    def __init__(
        self,
        student,
        teacher,
        pairs,
        *,
        projector="auto",
        feature_loss="mse",
        weight=0.5,
        init="auto",
        resample="auto",
        teacher_pool_size=None,
    ):
        _check_graph_model(student, "student")
        _check_graph_model(teacher, "teacher")
        s_flavour, t_flavour = _compat.flavour_of(student), _compat.flavour_of(teacher)
        self.student, self.teacher = student, teacher
        for layer in student.layers:
            if _is_loss_layer(layer):
                raise ValueError(
                    f"`student` ({student.name!r}) is already an alignment training model. Pass "
                    "the original student, or `aligned.export()`."
                )
        if len(student.outputs) != 1:
            raise ValueError(
                f"Expected `student` to have one output (its logits). Received a model with "
                f"{len(student.outputs)} outputs."
            )
        if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple)):
            pairs = [pairs]
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ValueError(
                "Expected `pairs` to be a non-empty list of (student_layer, teacher_layer) "
                f"tuples. Received: pairs={pairs!r}"
            )
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(
                    "Expected each item of `pairs` to be a (student_layer, teacher_layer) "
                    f"tuple. Received: pairs[{i}]={pair!r}"
                )
        count = len(pairs)
        projectors = _per_pair(projector, "projector", count)
        feature_losses = _per_pair(feature_loss, "feature_loss", count)
        weights = _per_pair(weight, "weight", count)
        inits = _per_pair(init, "init", count)
        resamples = _per_pair(resample, "resample", count)
        for i in range(count):
            p = projectors[i]
            if not (isinstance(p, str) and p in _PROJECTORS) and not callable(p):
                raise ValueError(
                    f"Expected `projector` in {_PROJECTORS}, a Keras layer or a callable "
                    f"`fn(student_shape, teacher_shape) -> layer`. Received: projector={p!r}"
                )
            get_feature_loss(feature_losses[i])
            w = weights[i]
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(f"Expected `weight` >= 0 and finite. Received: weight={w!r}")
            if inits[i] not in _INITS:
                raise ValueError(f"Expected `init` in {_INITS}. Received: init={inits[i]!r}")
            if resamples[i] not in _RESAMPLES:
                raise ValueError(f"Expected `resample` in {_RESAMPLES}. Received: resample={resamples[i]!r}")
        if teacher_pool_size is not None and (
            isinstance(teacher_pool_size, bool)
            or not isinstance(teacher_pool_size, numbers.Integral)
            or teacher_pool_size < 1
        ):
            raise ValueError(
                "Expected `teacher_pool_size` to be None or an integer >= 1. "
                f"Received: teacher_pool_size={teacher_pool_size!r}"
            )
        self._check_inputs()

        s_paths = [_resolve(student, p[0], "student", i) for i, p in enumerate(pairs)]
        t_paths = [_resolve(teacher, p[1], "teacher", i) for i, p in enumerate(pairs)]
        self._warn_trainable_teacher(t_paths)

        s_outputs, s_taps = _rewire(student, None, list(enumerate(p for _, p in s_paths)), "student")
        t_outputs, t_taps = _rewire(teacher, None, list(enumerate(p for _, p in t_paths)), "teacher")

        # Teacher side: the feature extractor, with optional pooling.
        t_keras = _compat.module(t_flavour)
        t_features, t_layer_shapes = [], []
        for i in range(count):
            feature = t_taps[i]
            t_layer_shapes.append(_shape(feature))
            if teacher_pool_size not in (None, 1):
                rank = len(feature.shape)
                name = f"kd_teacher_pool{i}"
                positions = t_layer_shapes[i][:-1]
                if rank in (3, 4) and any(d is not None and d < teacher_pool_size for d in positions):
                    raise ValueError(
                        f"teacher_pool_size={teacher_pool_size} is larger than the teacher features "
                        f"{_fmt(t_layer_shapes[i])} of pair {i}. Use a smaller pool size or None."
                    )
                if rank == 4:
                    feature = t_keras.layers.AveragePooling2D(teacher_pool_size, name=name)(feature)
                elif rank == 3:
                    feature = t_keras.layers.AveragePooling1D(teacher_pool_size, name=name)(feature)
            t_features.append(feature)
        # The teacher's own input structure (a tensor, a list or a dict), so that
        # the extractor takes the same `x` as the teacher.
        self.feature_extractor = t_keras.Model(
            _compat.graph_of(teacher).input, [t_outputs[0], *t_features], name=f"{teacher.name}_features"
        )

        # Student side: projectors, teacher-feature inputs, the loss layer.
        s_keras = _compat.module(s_flavour)
        feature_inputs, projected, described = [], [], []
        for i in range(count):
            s_shape, t_shape = _shape(s_taps[i]), _shape(t_features[i])
            attention = _is_attention(feature_losses[i])
            loss_name = "attention" if attention else feature_losses[i] if isinstance(feature_losses[i], str) else getattr(
                feature_losses[i], "__name__", "custom"
            )
            if attention and (len(t_shape) < 2 or len(s_shape) < 2):
                raise ValueError(
                    f"feature_loss='attention' in pair {i} needs (H, W, C) maps or (N, D) tokens. "
                    f"Received student features {_fmt(s_shape)} and teacher features {_fmt(t_shape)}."
                )
            feature_inputs.append(
                s_keras.Input(shape=t_shape, name=f"kd_teacher_feature_{i}", dtype="float32")
            )
            out, steps_text, used_init = self._project(
                s_keras, i, s_taps[i], s_shape, t_shape, projectors[i], resamples[i], inits[i],
                channels_needed=not attention, names=(s_paths[i][0], t_paths[i][0]),
            )
            projected.append(out)
            described.append(
                AlignmentPair(
                    student_layer="/".join(s_paths[i][0]),
                    teacher_layer="/".join(t_paths[i][0]),
                    student_shape=s_shape,
                    teacher_shape=t_shape,
                    projector=projectors[i] if isinstance(projectors[i], str) else "custom",
                    steps=steps_text
                    + (f" (teacher average-pooled by {teacher_pool_size} from {_fmt(t_layer_shapes[i])})"
                       if t_layer_shapes[i] != t_shape else ""),
                    feature_loss=loss_name,
                    weight=float(weights[i]),
                    init=used_init,
                )
            )
        self.pairs = tuple(described)
        loss_cls = _loss_layer_class(s_flavour)
        interleaved = [x for pair in zip(projected, feature_inputs) for x in pair]
        self._loss_layer = loss_cls(feature_losses, weights, name="kd_feature_loss")
        logits = self._loss_layer([s_outputs[0], *interleaved])
        self.model = s_keras.Model([*student.inputs, *feature_inputs], logits, name=f"{student.name}_aligned")
        self._hint_layer = loss_cls(feature_losses, weights, name="kd_hint_loss")
        hint_out = self._hint_layer([projected[0], *interleaved])
        self.hint_model = s_keras.Model(
            [*student.inputs, *feature_inputs], hint_out, name=f"{student.name}_hints"
        )

    # -- construction helpers ----------------------------------------------

    def _check_inputs(self):
        s_inputs, t_inputs = self.student.inputs, self.teacher.inputs
        if len(s_inputs) != len(t_inputs):
            raise ValueError(
                f"The student takes {len(s_inputs)} inputs and the teacher {len(t_inputs)}; "
                "alignment feeds both the same `x`."
            )
        for s, t in zip(s_inputs, t_inputs):
            s_shape, t_shape = _shape(s), _shape(t)
            if len(s_shape) != len(t_shape) or any(
                a is not None and b is not None and a != b for a, b in zip(s_shape, t_shape)
            ):
                raise ValueError(
                    f"The student's input shape {_fmt(s_shape)} differs from the teacher's "
                    f"{_fmt(t_shape)}; alignment feeds both the same `x`."
                )

    def _warn_trainable_teacher(self, t_paths):
        trainable = [
            "/".join(names)
            for names, path in t_paths
            if all(layer.trainable for layer in (self.teacher, *path))
        ]
        if trainable and self.teacher.trainable_weights:
            warnings.warn(
                f"The teacher's tapped layers {trainable} are trainable. keras_kd runs the teacher "
                "in inference mode and never updates it, but a trainable teacher is usually a "
                "mistake (e.g. a teacher still being fine-tuned). Set `teacher.trainable = False` "
                "to make the freeze explicit.",
                stacklevel=3,
            )

    def _project(
        self, keras_module, i, tensor, s_shape, t_shape, projector, resample, init, channels_needed, names
    ):
        pair_text = f"pair {i} ({'/'.join(names[0])!r} -> {'/'.join(names[1])!r})"
        if not isinstance(projector, str):
            layer = projector if _is_layer(projector) else projector(s_shape, t_shape)
            if not _is_layer(layer) or _compat.flavour_of(layer) != _compat.flavour_of(self.student):
                raise TypeError(
                    f"The custom projector of {pair_text} must be (or return) a layer of the "
                    f"student's Keras ({_compat.flavour_of(self.student)}). Received: {layer!r}"
                )
            out = layer(tensor)
            steps_text, used_init = f"custom layer {layer.name!r}", "custom"
        else:
            try:
                steps = _plan(s_shape, t_shape, projector, resample, channels_needed)
            except _Unalignable as e:
                raise ValueError(
                    f"Cannot align {pair_text}: student features {_fmt(s_shape)} and teacher "
                    f"features {_fmt(t_shape)} with projector={projector!r}, resample={resample!r}: "
                    f"{e}. Choose other layers, another projector, or pass a custom projector layer."
                ) from None
            mappers = [step for step in steps if step[0] in ("dense", "conv")]
            used_init = "none"
            if mappers:
                width_in, width_out = mappers[0][-2], mappers[0][-1]
                used_init = init if init != "auto" else ("identity" if width_in == width_out else "glorot")
                if used_init == "identity" and width_in != width_out:
                    raise ValueError(
                        f"init='identity' in {pair_text} needs the projector to keep the width, but it "
                        f"maps {width_in} -> {width_out} channels. Use init='glorot' or 'zeros'."
                    )
            out, mapper = _build_steps(keras_module, steps, tensor, f"kd_proj{i}", used_init)
            if mapper is not None and used_init == "identity":
                _set_identity(mapper)
            steps_text = _describe(steps)
        out_shape = _shape(out)
        fits = len(out_shape) == len(t_shape) and all(
            a is None or b is None or a == b for a, b in zip(out_shape[:-1], t_shape[:-1])
        )
        if fits and channels_needed:
            fits = out_shape[-1] == t_shape[-1]
        if not fits:
            raise ValueError(
                f"Cannot align {pair_text}: the projector ({steps_text}) turns student features "
                f"{_fmt(s_shape)} into {_fmt(out_shape)}, but the teacher features are {_fmt(t_shape)}."
            )
        return out, steps_text, used_init

    # -- hyperparameters ---------------------------------------------------

    @property
    def feature_weight(self) -> list:
        """Per-pair weights of the feature loss in `model` (a list of floats).

        Assign a number (all pairs) or a list to change them between epochs
        (e.g. from a callback), or ``aligned.feature_weight = 0.0`` for
        FitNets' second stage. `hint_model` keeps the weights given to `align`.
        """
        return [float(w) for w in np.asarray(self._weights_variable())]

    @feature_weight.setter
    def feature_weight(self, value):
        values = _per_pair(value, "feature_weight", len(self.pairs))
        for w in values:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"Expected `feature_weight` >= 0 and finite. Received: feature_weight={value!r}"
                )
        self._weights_variable().assign(np.asarray(values, np.float32))

    def _weights_variable(self):
        return self._loss_layer.pair_weights

    # -- data --------------------------------------------------------------

    def _split(self, dataset, argument="dataset"):
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(
                f"Expected `{argument}` to be a tf.data.Dataset. Received: {type(dataset).__name__}."
            )
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(
                "Expected a dataset of `(x, y)` or `(x, y, sample_weight)` elements, as `fit` "
                f"takes. Received element_spec={spec}."
            )
        y_spec = spec[1]
        if isinstance(y_spec, targets_lib.TeacherTargets.Spec) and (
            y_spec.logits is not None or y_spec.topk_values is not None or y_spec.inputs is not None
        ):
            raise ValueError(
                "The dataset already carries teacher targets. Give `attach`/`cache_features` the "
                "dataset without teacher (plain (x, y), or with example ids only): they add the "
                "teacher's logits and features together."
            )
        return spec

    def _batched(self, x_spec) -> Optional[bool]:
        specs = tf.nest.flatten(x_spec)
        rank = len(self.teacher.inputs[0].shape)
        if not specs or specs[0].shape.rank is None:
            return None
        return specs[0].shape.rank == rank

    def _pack(self, x, y, sample_weight, logits, features, example_id=None):
        flat = tuple(tf.nest.flatten(x))
        feats = tuple(tf.cast(f, tf.float32) for f in features)
        logits = tf.cast(logits, tf.float32)
        if targets_lib.is_targets(y):  # e.g. example ids from `add_example_ids`: keep them
            targets = y.replace(logits=logits)
        else:
            targets = targets_lib.TeacherTargets(labels=y, logits=logits, example_id=example_id)
        return (flat + feats, targets, *sample_weight)

    def attach(
        self, dataset: tf.data.Dataset, *, num_parallel_calls: Optional[int] = None
    ) -> tf.data.Dataset:
        """Adds the online teacher's logits and features to every batch.

        Each ``(x, y[, sample_weight])`` batch becomes
        ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t)[, sample_weight])``,
        where one inference-mode pass of `feature_extractor` on ``x`` gives
        the teacher logits ``t`` and features ``f_i``. Shuffling and
        augmentation before this transform stay consistent: the teacher sees
        exactly the batch the student sees. Use it for validation data too.
        A ``y`` that is already a `TeacherTargets` without teacher (example
        ids from `keras_kd.add_example_ids`) keeps its fields.

        Args:
            dataset: a **batched** dataset of ``(x, y)`` or
                ``(x, y, sample_weight)``.
            num_parallel_calls: parallelism of the teacher map; ``None`` runs
                batches one at a time. Defaults to None.

        Returns:
            A dataset for ``aligned.model.fit``.

        Raises:
            TypeError: if ``dataset`` is not a ``tf.data.Dataset``.
            ValueError: for elements that are not ``(x, y[, sample_weight])``,
                an unbatched dataset, or one that already carries teacher targets.

        Example:

        ```python
        train = aligned.attach(train_ds.shuffle(1000).batch(64))
        aligned.model.fit(train, validation_data=aligned.attach(val_ds.batch(256)))
        ```
        """
        spec = self._split(dataset)
        if self._batched(spec[0]) is False:
            raise ValueError(
                f"`attach` received unbatched elements (x spec {spec[0]}). It runs the teacher on "
                "the batch the student sees: apply it after `.batch(...)`, or use "
                "`cache_features` on the unbatched dataset."
            )
        extractor = self.feature_extractor

        def run(x, y, *sample_weight):
            logits, *features = extractor(x, training=False)
            return self._pack(x, y, sample_weight, logits, features)

        if num_parallel_calls is None:
            return dataset.map(run)
        return dataset.map(run, num_parallel_calls=num_parallel_calls, deterministic=True)

    def cache_features(
        self,
        directory: Optional[str] = None,
        *,
        dtype: str = "float16",
        batch_size: int = 256,
        on_mismatch: str = "error",
        in_memory: Optional[bool] = None,
        overwrite: Optional[bool] = None,
    ) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
        """A transform that runs the teacher once and pairs its features by position.

        Apply it with ``raw_ds.apply(aligned.cache_features(...))`` to the
        raw, **unbatched** dataset of ``(x, y[, sample_weight])`` in a fixed
        order, *before* shuffling, augmentation and batching. On first use it
        runs `feature_extractor` over the dataset (in inference mode, in
        batches of ``batch_size``) and stores the teacher logits (float32)
        and features (``dtype``; pooled if ``align`` got ``teacher_pool_size``).
        The result yields unbatched
        ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t, example_id=n)[, sample_weight])``,
        the n-th cached row paired with the n-th example, so shuffle, batch and
        repeat afterwards (ids already set by `keras_kd.add_example_ids` are
        kept).

        With a ``directory``, the cache is stored there by the same storage
        engine as `keras_kd.cache_teacher_logits`, with the same guarantees
        (see the README's table): fields ``logits`` and ``feature_i`` in
        whole raw blocks with CRC32s, a schema-validated ``manifest.json``
        switched atomically, locks, only keras_kd's own names (a non-empty
        directory that keras_kd did not create is refused, never deleted).
        It is reused by later calls and processes when the fingerprint
        matches: the teacher's weights and architecture, the pairs, shapes,
        dtype, the element count and a digest of **every** element's inputs
        (one pass over the dataset when the transform is applied); the
        teacher also re-runs on the first examples and must reproduce the
        stored rows. A mismatch or damage raises `keras_kd.CacheMismatchError`
        / `keras_kd.CacheCorruptedError` (both ``ValueError``), or rebuilds
        with ``on_mismatch="rebuild"``. Caches up to 32 MiB are held in memory
        (``in_memory`` forces either). Without a directory the cache lives in
        memory.

        Do not put random augmentation or shuffling before this transform:
        the cached features would then belong to other pixels or examples.
        The first examples are read twice to detect that.

        Args:
            directory: where to store the cache, or ``None`` for memory.
            dtype: ``"float16"`` (default, half the bytes) or ``"float32"``
                for the features.
            batch_size: teacher batch size for the single pass (and rows
                per stored block). Defaults to 256.
            on_mismatch: ``"error"`` or ``"rebuild"``, as in
                `keras_kd.cache_teacher_logits`. Defaults to "error".
            in_memory: None (automatic: up to 32 MiB), True or False.
                Defaults to None.
            overwrite: deprecated; ``overwrite=True`` means
                ``on_mismatch="rebuild"``. Defaults to None.

        Returns:
            A function ``dataset -> dataset`` for ``dataset.apply``.

        Raises:
            ValueError: (when applied) for a batched, infinite, empty or
                non-deterministic dataset, or teacher outputs with NaN/Inf.
            keras_kd.CacheMismatchError: a stored cache built for something
                else (``on_mismatch="error"``), or a directory keras_kd did not
                create that is not empty (always).
            keras_kd.CacheCorruptedError: a damaged stored cache
                (``on_mismatch="error"``).
            OSError: an unwritable directory or a full disk.

        Example:

        ```python
        train = raw_ds.apply(aligned.cache_features("cache/digits-features"))
        train = train.shuffle(2000).batch(64)
        aligned.model.fit(train, epochs=20)
        ```
        """
        if dtype not in ("float16", "float32"):
            raise ValueError(f"Expected `dtype` to be 'float16' or 'float32'. Received: dtype={dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(
                f"Expected `batch_size` to be a positive integer. Received: batch_size={batch_size!r}"
            )
        if batch_size > _storage.MAX_BLOCK_ROWS:
            raise ValueError(f"Expected `batch_size` <= {_storage.MAX_BLOCK_ROWS}. Received: batch_size={batch_size!r}")
        if overwrite is not None:
            warnings.warn(
                "`overwrite=` is deprecated; use on_mismatch='rebuild' (overwrite=True) or 'error'.",
                DeprecationWarning,
                stacklevel=2,
            )
            on_mismatch = "rebuild" if overwrite else on_mismatch
        if on_mismatch not in ("error", "rebuild"):
            raise ValueError(f"Expected `on_mismatch` to be 'error' or 'rebuild'. Received: on_mismatch={on_mismatch!r}")
        if in_memory not in (None, True, False):
            raise ValueError(f"Expected `in_memory` to be None, True or False. Received: in_memory={in_memory!r}")
        if directory is not None:
            # Checked (valid UTF-8, resolved) before the teacher runs.
            directory = _storage.resolve_directory(directory, "feature cache")

        def transform(dataset):
            spec = self._split(dataset)
            if self._batched(spec[0]):
                raise ValueError(
                    f"`cache_features` received batched elements (x spec {spec[0]}). Apply it to the "
                    "raw, unbatched dataset, then shuffle and batch the result."
                )
            cardinality = int(dataset.cardinality())
            if cardinality == int(tf.data.INFINITE_CARDINALITY):
                raise ValueError(
                    "`cache_features` received an infinite dataset (e.g. after `.repeat()`). Apply it "
                    "before `.repeat()`."
                )
            table = _FeatureTable.get(self, dataset, directory, dtype, batch_size, on_mismatch, in_memory)
            if cardinality < 0:
                # Unknown size: fail loudly rather than pair a longer or shorter dataset.
                dataset = dataset.apply(tf.data.experimental.assert_cardinality(table.count))

            def pack(position, pair):
                (x, y, *sample_weight), (logits, *features) = pair
                return self._pack(x, y, sample_weight, logits, features, example_id=position)

            out = tf.data.Dataset.zip((dataset, table.dataset())).enumerate().map(pack)
            return out.apply(tf.data.experimental.assert_cardinality(table.count))

        return transform

    # -- loss, summary, export --------------------------------------------

    def loss(self, kd=None):
        """The loss to compile `model` with.

        The feature loss is already inside `model` (added with ``add_loss``),
        so this returns the logit loss: ``kd`` after checking it fits the
        student and teacher, or, with ``kd=None``, hard-label cross-entropy
        from logits (`keras_kd.DistillationLoss` with ``alpha=1``), i.e.
        feature alignment without logit distillation.

        Args:
            kd: a `keras_kd.DistillationLoss` (or any Keras loss on logits),
                or ``None``.

        Returns:
            A loss for ``aligned.model.compile(loss=...)``.

        Raises:
            ValueError: if the student's and the teacher's logits have
                different class counts.
            TypeError: if ``kd`` is not a loss.

        Example:

        ```python
        kd = keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)
        aligned.model.compile("adam", loss=aligned.loss(kd), metrics=["accuracy"])
        ```
        """
        s_classes = self.student.outputs[0].shape[-1]
        t_classes = self.feature_extractor.outputs[0].shape[-1]
        if s_classes is not None and t_classes is not None and s_classes != t_classes:
            raise ValueError(
                f"The student outputs {s_classes} logits and the teacher {t_classes}; logit "
                "distillation needs the same classes."
            )
        if kd is None:
            return losses_lib.DistillationLoss(alpha=1.0, name="hard_loss")
        if not callable(kd) and not isinstance(kd, str):
            raise TypeError(f"Expected `kd` to be a Keras loss or None. Received: kd={kd!r}")
        return kd

    def summary(self, print_fn: Optional[Callable[[str], Any]] = None):
        """Prints each pair: layers, shapes, the projector chosen and why, loss, weight.

        Args:
            print_fn: function that receives each line. Defaults to ``print``.
        """
        print_fn = print_fn or print
        print_fn(
            f"Feature alignment: student {self.student.name!r} ({_compat.flavour_of(self.student)}) <- "
            f"teacher {self.teacher.name!r} ({_compat.flavour_of(self.teacher)}), {len(self.pairs)} pair(s)"
        )
        for i, pair in enumerate(self.pairs):
            print_fn(
                f"  [{i}] {pair.student_layer} {_fmt(pair.student_shape)} -> "
                f"{pair.teacher_layer} {_fmt(pair.teacher_shape)}"
            )
            print_fn(f"      projector={pair.projector!r}: {pair.steps}; init={pair.init}")
            print_fn(f"      feature_loss={pair.feature_loss!r}, weight={pair.weight:g}")
        n_proj = sum(
            int(np.prod(w.shape))
            for layer in self.model.layers
            if layer.name.startswith("kd_proj")
            for w in layer.weights
        )
        print_fn(f"  projector parameters: {n_proj} (trained, never exported)")

    def export(self, custom_objects: Optional[dict] = None):
        """The trained student alone, as a new model of the student's Keras.

        Rebuilt from the student's own config (so ``get_config()`` equals the
        original's) with the trained weights copied: no projectors, no extra
        inputs or outputs, not compiled (compile it again, as after tfmot's
        ``strip_pruning``). Independent of `model`: training further does not
        change an exported model. Ready for tfmot (tf_keras students) and
        TFLite conversion.

        Args:
            custom_objects: custom layers of the student that are not
                registered as serializable, by class name. Defaults to None.

        Returns:
            A Functional or Sequential model with the student's config.

        Example:

        ```python
        deployable = aligned.export()
        deployable.compile("adam", loss=keras_kd.DistillationLoss())  # e.g. for tfmot fine-tuning
        ```
        """
        wrapped = [
            layer.name
            for layer in self.student.layers
            if type(layer).__module__.startswith("tensorflow_model_optimization")
        ]
        if wrapped:
            raise ValueError(
                f"The student has tensorflow-model-optimization wrappers ({wrapped[:3]}): `export()` rebuilds a "
                "plain float student. Deploy a pruned student with `keras_kd.optimize.strip(model)` and a "
                "quantization-aware one with `keras_kd.optimize.to_tflite(model)`; or align first, export, "
                "then prune or quantize the exported student."
            )
        clean = type(self.student).from_config(self.student.get_config(), custom_objects=custom_objects)
        clean.set_weights(self.student.get_weights())
        return clean


def align(
    student,
    teacher,
    pairs: Sequence,
    *,
    projector="auto",
    feature_loss="mse",
    weight=0.5,
    init="auto",
    resample="auto",
    teacher_pool_size: Optional[int] = None,
) -> Aligned:
    """Wires a student to learn a teacher's intermediate features (FitNets, AT).

    For each pair ``(student_layer, teacher_layer)`` the student's feature is
    mapped into the teacher's feature space by a trainable projector and
    compared with a feature loss; shapes are read from the models' graphs
    (no dummy forward pass). Neither model's structure changes: the returned
    `Aligned` holds a separate training model that shares the student's
    layers, and `Aligned.export` gives the clean trained student.

    Projectors (``projector="auto"`` picks the simplest chain that fits and
    `Aligned.summary` says which):

    * equal shapes: nothing (identity);
    * ``(B, F)`` vectors and ``(B, T, D)`` sequences: ``Dense`` on the last axis;
    * ``(B, H, W, C)`` maps: 1x1 conv for a channel change (``"conv3x3"`` on
      request);
    * spatial mismatch: average pooling when the student's size is a whole
      multiple of the teacher's, else bilinear resize (``resample`` forces one);
    * sequence-length mismatch: average pooling or linear interpolation;
    * ``(B, H, W, C)`` maps <-> ``(B, N, D)`` tokens: reshape (a leading class
      token is dropped when ``N - 1`` is a square);
    * with ``feature_loss="attention"`` only positions must match, so
      ``"auto"`` maps no channels.

    Args:
        student: Keras 3 or tf_keras Functional or Sequential model that
            outputs logits. Nested Functional/Sequential sub-models are fine.
        teacher: Functional or Sequential model (any flavour) whose first
            output is its logits. It only runs in inference mode.
        pairs: list of ``(student_layer, teacher_layer)``; each layer is a
            name, a path ``"submodel/layer"`` for nested models, or the layer
            object.
        projector: ``"auto"``, ``"identity"``, ``"dense"``, ``"conv1x1"``,
            ``"conv3x3"``, a Keras layer, or ``fn(student_shape,
            teacher_shape) -> layer``; one value or one per pair. Defaults to
            "auto".
        feature_loss: ``"mse"`` (FitNets), ``"l1"``, ``"cosine"``,
            ``"attention"`` (attention transfer) or a callable
            ``fn(teacher_features, student_features) -> per-example values``;
            one or one per pair. Defaults to "mse".
        weight: weight of each pair's feature loss, added to the compiled
            loss; one or one per pair. Defaults to 0.5.
        init: projector initialisation: ``"identity"`` (needs equal widths),
            ``"zeros"``, ``"glorot"``, or ``"auto"`` (identity where the
            widths match, else Glorot). Defaults to "auto".
        resample: ``"auto"``, ``"pool"`` or ``"resize"`` for spatial or
            length mismatch. Defaults to "auto".
        teacher_pool_size: average-pool teacher maps and sequences by this
            factor before comparing (bounds the size of cached features).
            Defaults to None.

    Returns:
        An `Aligned`.

    Raises:
        TypeError: for a subclassed model or a non-model.
        ValueError: for an unknown layer name (with the closest names), an
            ambiguous name, a pair whose shapes cannot be aligned (with both
            shapes and the projector tried), a shared layer, or a bad argument.

    Warns:
        UserWarning: when the teacher's tapped layers are trainable.

    Example:

    ```python
    aligned = keras_kd.alignment.align(
        student, teacher, pairs=[("s_conv2", "t_conv3")], weight=0.5)
    aligned.summary()
    train = aligned.attach(train_ds.batch(64))
    kd = keras_kd.DistillationLoss(temperature=4.0)
    aligned.model.compile("adam", loss=aligned.loss(kd), metrics=["accuracy"])
    aligned.model.fit(train, epochs=10)
    deployable = aligned.export()
    ```

    FitNets' two stages: fit ``aligned.hint_model`` (compiled with only an
    optimizer) on the same data, then set ``aligned.feature_weight = 0.0``
    and fit ``aligned.model`` with the distillation loss.

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
        Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    """
    return Aligned(
        student,
        teacher,
        pairs,
        projector=projector,
        feature_loss=feature_loss,
        weight=weight,
        init=init,
        resample=resample,
        teacher_pool_size=teacher_pool_size,
    )


# ---------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------

# Stored by keras_kd's one storage engine (keras_kd._storage), like the
# teacher-logit cache: see keras_kd._feature_cache.
_FeatureTable = _feature_cache.FeatureTable
