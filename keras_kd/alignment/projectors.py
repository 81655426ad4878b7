"""Projectors: the layers that map a student feature onto a teacher feature.

`plan` decides, from the shapes alone (pure Python, no TF), the chain of steps
(layout reshape, position resampling, channel mapping) that fits; `project`
builds those layers on a student tensor, or applies a custom projector, and
checks the result against the teacher's shape. To add a projector kind, add
it to `PROJECTORS`, plan it in `plan`, name it in `_WORDS` and build it in
`build_steps`.
"""

from __future__ import annotations

import math

import numpy as np

from keras_kd import _compat
from keras_kd.alignment.taps import compatible_shapes
from keras_kd.alignment.taps import feature_shape
from keras_kd.alignment.taps import fmt_shape
from keras_kd.alignment.taps import is_layer

PROJECTORS = ("auto", "identity", "dense", "conv1x1", "conv3x3")
INITS = ("auto", "identity", "zeros", "glorot")
RESAMPLES = ("auto", "pool", "resize")


class Unalignable(ValueError):
    """No chain of the requested kind maps the student shape onto the teacher's."""


def integer_ratio(big, small):
    if big is None or small is None or small == 0 or big < small or big % small:
        return None
    return big // small


def plan(s, t, projector, resample, channels_needed):
    """Steps that map student features of shape ``s`` onto shape ``t``.

    Shapes exclude the batch axis. Returns a list of step tuples; raises
    `Unalignable` with the reason when no chain of the requested kind fits.
    """
    steps = []
    cur = tuple(s)
    # 1. Bring the layouts together: (H, W, C) maps <-> (N, D) token sequences.
    if len(cur) == 3 and len(t) == 2:
        h, w, c = cur
        if h is None or w is None:
            raise Unalignable("a feature map with unknown height or width cannot become tokens")
        steps.append(("to_tokens", h * w, c))
        cur = (h * w, c)
    elif len(cur) == 2 and len(t) == 3:
        n, d = cur
        if n is None:
            raise Unalignable("a token sequence of unknown length cannot become a feature map")
        side = math.isqrt(n)
        drop_first = False
        if side * side != n:
            side = math.isqrt(n - 1)
            if n > 1 and side * side == n - 1:
                drop_first = True  # a leading class token, as in ViT
            else:
                raise Unalignable(
                    f"{n} tokens form no square grid (nor a square grid plus one class token)"
                )
        steps.append(("to_map", side, drop_first, d))
        cur = (side, side, d)
    elif len(cur) != len(t):
        raise Unalignable(
            "the feature ranks differ and only (H, W, C) maps <-> (N, D) tokens can be reshaped"
        )
    # 2. Resample the positions: spatial size of maps, length of sequences.
    if len(cur) in (2, 3):
        positions, target = cur[:-1], t[:-1]
        if positions != target:
            if any(d is None for d in target):
                raise Unalignable("the teacher's spatial size or length is unknown: there is no target size")
            ratios = [integer_ratio(p, q) for p, q in zip(positions, target)]
            can_pool = all(r is not None for r in ratios)
            if resample == "pool" and not can_pool:
                raise Unalignable(
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
        raise Unalignable(f"only the last axis can be mapped for features of rank {len(cur) + 1}")
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
            raise Unalignable(
                f"projector='identity' keeps the width {width}, but the teacher has {target_width}"
            )
    else:
        if width is None or target_width is None:
            raise Unalignable("the feature width (last axis) must be known to map it")
        if kind in ("conv1x1", "conv3x3") and len(cur) != 3:
            raise Unalignable(f"projector={projector!r} needs (H, W, C) feature maps")
        if kind == "dense":
            steps.append(("dense", width, target_width))
        else:
            steps.append(("conv", int(kind[4]), width, target_width))
    return steps


# Each planned step in words, for `Aligned.summary` and error messages.
_WORDS = {
    "to_tokens": lambda step: f"reshape map to {step[1]} tokens",
    "to_map": lambda step: ("drop the class token, " if step[2] else "")
    + f"reshape tokens to a {step[1]}x{step[1]} map",
    "pool2d": lambda step: f"average-pool {step[1][0]}x{step[1][1]}",
    "resize2d": lambda step: f"bilinear resize to {step[1][0]}x{step[1][1]}",
    "pool1d": lambda step: f"average-pool the sequence by {step[1]}",
    "resize1d": lambda step: f"linear interpolation to length {step[1]}",
    "dense": lambda step: f"Dense {step[1]} -> {step[2]}",
    "conv": lambda step: f"{step[1]}x{step[1]} conv {step[2]} -> {step[3]} channels",
}


def describe(steps):
    """The planned steps in words ("identity" when there are none)."""
    if not steps:
        return "identity (shapes already match)"
    return ", then ".join(_WORDS[step[0]](step) for step in steps)


def build_steps(keras_module, steps, tensor, prefix, init):
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


def set_identity(layer):
    """Sets a Dense or Conv2D kernel to the identity (centre tap for convs), biases to zero."""
    kernel, *rest = layer.get_weights()
    eye = np.eye(kernel.shape[-2], kernel.shape[-1], dtype=kernel.dtype)
    new = np.zeros_like(kernel)
    if kernel.ndim == 2:
        new = eye
    else:  # (k, k, in, out): identity at the centre tap
        new[kernel.shape[0] // 2, kernel.shape[1] // 2] = eye
    layer.set_weights([new, *[np.zeros_like(w) for w in rest]])


def project(flavour, i, tensor, t_shape, projector, resample, init, channels_needed, names):
    """Maps the student tensor of pair ``i`` onto the teacher shape ``t_shape``.

    Args:
        flavour: the student's Keras flavour (the projector layers are of it).
        i: the pair index (names the layers ``kd_proj{i}_*``).
        tensor: the student's symbolic feature tensor.
        t_shape: the teacher feature shape (without the batch axis).
        projector: a kind of `PROJECTORS`, a layer, or ``fn(s_shape, t_shape) -> layer``.
        resample, init: one of `RESAMPLES` and of `INITS`.
        channels_needed: whether the last axes must match (not for attention transfer).
        names: ``(student path, teacher path)`` for messages.

    Returns:
        ``(projected tensor, steps in words, init used)``.

    Raises:
        TypeError: a custom projector that is not a layer of the student's flavour.
        ValueError: shapes no chain can align, or ``init="identity"`` across widths.
    """
    s_shape = feature_shape(tensor)
    pair_text = f"pair {i} ({'/'.join(names[0])!r} -> {'/'.join(names[1])!r})"
    if not isinstance(projector, str):
        layer = projector if is_layer(projector) else projector(s_shape, t_shape)
        if not is_layer(layer) or _compat.flavour_of(layer) != flavour:
            raise TypeError(
                f"The custom projector of {pair_text} must be (or return) a layer of the "
                f"student's Keras ({flavour}). Received: {layer!r}"
            )
        out = layer(tensor)
        steps_text, used_init = f"custom layer {layer.name!r}", "custom"
    else:
        try:
            steps = plan(s_shape, t_shape, projector, resample, channels_needed)
        except Unalignable as e:
            raise ValueError(
                f"Cannot align {pair_text}: student features {fmt_shape(s_shape)} and teacher "
                f"features {fmt_shape(t_shape)} with projector={projector!r}, resample={resample!r}: "
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
        out, mapper = build_steps(_compat.module(flavour), steps, tensor, f"kd_proj{i}", used_init)
        if mapper is not None and used_init == "identity":
            set_identity(mapper)
        steps_text = describe(steps)
    out_shape = feature_shape(out)
    fits = len(out_shape) == len(t_shape) and compatible_shapes(out_shape[:-1], t_shape[:-1])
    if fits and channels_needed:
        fits = out_shape[-1] == t_shape[-1]
    if not fits:
        raise ValueError(
            f"Cannot align {pair_text}: the projector ({steps_text}) turns student features "
            f"{fmt_shape(s_shape)} into {fmt_shape(out_shape)}, but the teacher features are "
            f"{fmt_shape(t_shape)}."
        )
    return out, steps_text, used_init
