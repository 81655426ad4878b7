"""Building `align`'s models: the teacher's feature extractor, the training
model and the hint model, from checked arguments.

The training model is built from the student's own graph and shares its
layers (as tfmot's wrappers share the layers they wrap); the projectors and
the loss layer sit on a side branch. Nothing here changes the user's models.
"""

from __future__ import annotations

import dataclasses
import warnings

from keras_kd import _checks
from keras_kd import _compat
from keras_kd.alignment import projectors as projectors_lib
from keras_kd.alignment import taps
from keras_kd.alignment.feature_losses import get_feature_loss
from keras_kd.alignment.feature_losses import is_attention
from keras_kd.alignment.loss_layer import is_loss_layer
from keras_kd.alignment.loss_layer import loss_layer_class
from keras_kd.alignment.taps import compatible_shapes
from keras_kd.alignment.taps import feature_shape
from keras_kd.alignment.taps import fmt_shape


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


@dataclasses.dataclass(frozen=True)
class Options:
    """`align`'s per-pair arguments, checked: one list entry per pair."""

    projectors: list
    feature_losses: list
    weights: list
    inits: list
    resamples: list
    teacher_pool_size: object


@dataclasses.dataclass(frozen=True)
class Wiring:
    """What `build` returns: the models of an `Aligned` and their pieces."""

    feature_extractor: object
    pairs: tuple
    model: object
    hint_model: object
    loss_layer: object


# -- argument checks


def per_pair(value, argument, count):
    """A scalar for every pair, or a list/tuple with one value per pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"Expected `{argument}` to be one value or a list of {count} values "
                f"(one per pair). Received: {argument}={value!r}"
            )
        return list(value)
    return [value] * count


def check_weights(value, argument, count):
    """Per-pair feature-loss weights: finite numbers >= 0 (booleans refused)."""
    return [_checks.number(w, argument, low=0) for w in per_pair(value, argument, count)]


def check_pairs(pairs) -> list:
    """``pairs`` as a non-empty list of 2-tuples (one bare tuple is one pair)."""
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
    return list(pairs)


def check_options(count, projector, feature_loss, weight, init, resample, teacher_pool_size) -> Options:
    """Checks `align`'s arguments and spreads them to one value per pair."""
    projectors = per_pair(projector, "projector", count)
    feature_losses = per_pair(feature_loss, "feature_loss", count)
    inits = per_pair(init, "init", count)
    resamples = per_pair(resample, "resample", count)
    for p in projectors:
        if not (isinstance(p, str) and p in projectors_lib.PROJECTORS) and not callable(p):
            raise ValueError(
                f"Expected `projector` in {projectors_lib.PROJECTORS}, a Keras layer or a callable "
                f"`fn(student_shape, teacher_shape) -> layer`. Received: projector={p!r}"
            )
    for f in feature_losses:
        get_feature_loss(f)
    inits = [_checks.one_of(v, "init", projectors_lib.INITS) for v in inits]
    resamples = [_checks.one_of(v, "resample", projectors_lib.RESAMPLES) for v in resamples]
    teacher_pool_size = _checks.positive_int(teacher_pool_size, "teacher_pool_size", allow_none=True)
    weights = check_weights(weight, "weight", count)
    return Options(projectors, feature_losses, weights, inits, resamples, teacher_pool_size)


def check_one_teacher(teacher):
    """`align` taps one teacher's layers: a list of teachers gets the alternatives."""
    if isinstance(teacher, (list, tuple)):
        raise TypeError(
            f"Expected `teacher` to be one Keras model: `align` taps the layers of one teacher. Received a "
            f"{type(teacher).__name__} of {len(teacher)}. To distil the logits of an ensemble, use "
            "`keras_kd.with_teacher(dataset, teachers, ensemble='mean_logits')` or "
            "`keras_kd.cache_teacher_logits(teachers, directory, ensemble=...)`; to align features, pick "
            "one teacher (e.g. the best) and pass it alone."
        )


def check_input_function(fn, argument):
    """``None`` (the identity) or a callable ``x -> model inputs``."""
    if fn is not None and not callable(fn):
        raise TypeError(
            f"Expected `{argument}` to be None or a function of the dataset's `x`. "
            f"Received: {argument}={fn!r}"
        )
    return fn


def check_student(student):
    """One output (the logits), and not already an alignment training model."""
    for layer in student.layers:
        if is_loss_layer(layer):
            raise ValueError(
                f"`student` ({student.name!r}) is already an alignment training model. Pass "
                "the original student, or `aligned.export()`."
            )
    if len(student.outputs) != 1:
        raise ValueError(
            f"Expected `student` to have one output (its logits). Received a model with "
            f"{len(student.outputs)} outputs."
        )


def check_same_inputs(student, teacher):
    """Without input functions, both models receive the same ``x``: their inputs must agree."""
    s_inputs, t_inputs = student.inputs, teacher.inputs
    hint = (
        " If the teacher and the student read different inputs, pass `teacher_inputs=fn` and/or "
        "`student_inputs=fn` to `align`, functions of the dataset's `x`."
    )
    if len(s_inputs) != len(t_inputs):
        raise ValueError(
            f"The student takes {len(s_inputs)} inputs and the teacher {len(t_inputs)}; "
            "alignment feeds both the same `x`." + hint
        )
    for s, t in zip(s_inputs, t_inputs):
        s_shape, t_shape = feature_shape(s), feature_shape(t)
        if not compatible_shapes(s_shape, t_shape):
            raise ValueError(
                f"The student's input shape {fmt_shape(s_shape)} differs from the teacher's "
                f"{fmt_shape(t_shape)}; alignment feeds both the same `x`." + hint
            )


def warn_trainable_teacher(teacher, t_paths):
    trainable = [
        "/".join(names) for names, path in t_paths if all(layer.trainable for layer in (teacher, *path))
    ]
    if trainable and teacher.trainable_weights:
        warnings.warn(
            f"The teacher's tapped layers {trainable} are trainable. keras_kd runs the teacher "
            "in inference mode and never updates it, but a trainable teacher is usually a "
            "mistake (e.g. a teacher still being fine-tuned). Set `teacher.trainable = False` "
            "to make the freeze explicit.",
            stacklevel=5,
        )


# -- building


def _feature_extractor(teacher, t_outputs, t_taps, pool_size):
    """The teacher's ``[logits, f_1, ..., f_P]`` model (features pooled by ``pool_size``)."""
    t_keras = _compat.module(_compat.flavour_of(teacher))
    features, layer_shapes = [], []
    for i, feature in enumerate(t_taps):
        layer_shapes.append(feature_shape(feature))
        if pool_size not in (None, 1):
            rank = len(feature.shape)
            name = f"kd_teacher_pool{i}"
            if rank in (3, 4) and any(d is not None and d < pool_size for d in layer_shapes[i][:-1]):
                raise ValueError(
                    f"teacher_pool_size={pool_size} is larger than the teacher features "
                    f"{fmt_shape(layer_shapes[i])} of pair {i}. Use a smaller pool size or None."
                )
            if rank == 4:
                feature = t_keras.layers.AveragePooling2D(pool_size, name=name)(feature)
            elif rank == 3:
                feature = t_keras.layers.AveragePooling1D(pool_size, name=name)(feature)
        features.append(feature)
    # The teacher's own input structure (a tensor, a list or a dict), so that
    # the extractor takes the same `x` as the teacher.
    extractor = t_keras.Model(
        _compat.graph_of(teacher).input, [t_outputs[0], *features], name=f"{teacher.name}_features"
    )
    return extractor, features, layer_shapes


def _loss_name(feature_loss, attention):
    if attention:
        return "attention"
    return feature_loss if isinstance(feature_loss, str) else getattr(feature_loss, "__name__", "custom")


def build(student, teacher, pairs, options: Options) -> Wiring:
    """Taps both models, builds the projectors and the loss layer, and returns the models."""
    count = len(pairs)
    s_paths = [taps.resolve(student, p[0], "student", i) for i, p in enumerate(pairs)]
    t_paths = [taps.resolve(teacher, p[1], "teacher", i) for i, p in enumerate(pairs)]
    warn_trainable_teacher(teacher, t_paths)
    s_outputs, s_taps = taps.rewire(student, None, list(enumerate(p for _, p in s_paths)), "student")
    t_outputs, t_taps = taps.rewire(teacher, None, list(enumerate(p for _, p in t_paths)), "teacher")
    extractor, t_features, t_layer_shapes = _feature_extractor(
        teacher, t_outputs, [t_taps[i] for i in range(count)], options.teacher_pool_size
    )

    s_flavour = _compat.flavour_of(student)
    s_keras = _compat.module(s_flavour)
    feature_inputs, projected, described = [], [], []
    for i in range(count):
        s_shape, t_shape = feature_shape(s_taps[i]), feature_shape(t_features[i])
        attention = is_attention(options.feature_losses[i])
        if attention and (len(t_shape) < 2 or len(s_shape) < 2):
            raise ValueError(
                f"feature_loss='attention' in pair {i} needs (H, W, C) maps or (N, D) tokens. "
                f"Received student features {fmt_shape(s_shape)} and teacher features {fmt_shape(t_shape)}."
            )
        feature_inputs.append(s_keras.Input(shape=t_shape, name=f"kd_teacher_feature_{i}", dtype="float32"))
        out, steps_text, used_init = projectors_lib.project(
            s_flavour, i, s_taps[i], t_shape, options.projectors[i], options.resamples[i], options.inits[i],
            channels_needed=not attention, names=(s_paths[i][0], t_paths[i][0]),
        )  # fmt: skip
        projected.append(out)
        if t_layer_shapes[i] != t_shape:
            pooled_from = fmt_shape(t_layer_shapes[i])
            steps_text += f" (teacher average-pooled by {options.teacher_pool_size} from {pooled_from})"
        described.append(
            AlignmentPair(
                student_layer="/".join(s_paths[i][0]),
                teacher_layer="/".join(t_paths[i][0]),
                student_shape=s_shape,
                teacher_shape=t_shape,
                projector=options.projectors[i] if isinstance(options.projectors[i], str) else "custom",
                steps=steps_text,
                feature_loss=_loss_name(options.feature_losses[i], attention),
                weight=options.weights[i],
                init=used_init,
            )
        )
    loss_cls = loss_layer_class(s_flavour)
    interleaved = [x for pair in zip(projected, feature_inputs) for x in pair]
    loss_layer = loss_cls(options.feature_losses, options.weights, name="kd_feature_loss")
    logits = loss_layer([s_outputs[0], *interleaved])
    model = s_keras.Model([*student.inputs, *feature_inputs], logits, name=f"{student.name}_aligned")
    hint_layer = loss_cls(options.feature_losses, options.weights, name="kd_hint_loss")
    hint_out = hint_layer([projected[0], *interleaved])
    hint_model = s_keras.Model([*student.inputs, *feature_inputs], hint_out, name=f"{student.name}_hints")
    return Wiring(extractor, tuple(described), model, hint_model, loss_layer)
