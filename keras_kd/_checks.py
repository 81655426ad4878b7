"""Shared argument and dataset checks: one place for each rule.

Every public entry point validates its arguments at construction with these
helpers, so that the same mistake gets the same message everywhere:
"Expected `views` to be a positive integer. Received: views=True".

Integers: Python and NumPy integers are accepted and returned as ``int``;
``bool`` (an ``int`` subclass in Python) is refused, as are floats, even
integral ones. Numbers: any real number but ``bool``; NaN is always refused
and infinities unless ``finite=False``.

Dataset helpers read only the ``element_spec`` (never iterate the data).
Batched-ness is decided in one way: an element is batched when each input
tensor has the rank of the model's matching symbolic input (which includes
the batch axis), unbatched when it has one axis less; anything else (no
model inputs, unknown rank, inputs that disagree) is "cannot tell" (None).
"""

import difflib
import math
import numbers
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    "positive_int",
    "non_negative_int",
    "integer",
    "number",
    "one_of",
    "require_dataset",
    "split_element",
    "fixed_shapes",
    "model_input_ranks",
    "is_batched",
    "batch_dim",
    "num_classes_of",
    "check_num_classes",
    "teacher_list",
]


# ---------------------------------------------------------------------------
# Scalars.
# ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(value, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int``: any Python or NumPy integer, not a bool.

    Raises:
        ValueError: for a bool, a float or any other non-integer.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value):
        none = "None or " if allow_none else ""
        raise ValueError(f"Expected `{name}` to be {none}an integer. Received: {name}={value!r}")
    return int(value)


def _int_at_least(value, name, low, what, allow_none):
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < low:
        none = "None or " if allow_none else ""
        raise ValueError(f"Expected `{name}` to be {none}{what}. Received: {name}={value!r}")
    return int(value)


def positive_int(value, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int`` >= 1 (``None`` passes when ``allow_none``).

    Raises:
        ValueError: for a bool, a non-integer or a value < 1.

    Example:

    ```python
    views = positive_int(views, "views")
    ```
    """
    return _int_at_least(value, name, 1, "a positive integer", allow_none)


def non_negative_int(value, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int`` >= 0 (``None`` passes when ``allow_none``).

    Raises:
        ValueError: for a bool, a non-integer or a negative value.
    """
    return _int_at_least(value, name, 0, "a non-negative integer", allow_none)


def _bounds_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def number(
    value,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    allow_none: bool = False,
) -> Optional[float]:
    """``value`` as a ``float`` inside an interval with open or closed ends.

    Args:
        value: the argument.
        name: its name, for the message.
        low, high: bounds; None for no bound.
        low_open, high_open: whether the bound itself is excluded.
        finite: refuse infinities. NaN is always refused.
        allow_none: let ``None`` through (returned as is).

    Returns:
        The value as a Python float (or None).

    Raises:
        ValueError: for a bool, a non-number, NaN, an infinity (when
            ``finite``) or a value outside the interval.

    Example:

    ```python
    momentum = number(momentum, "momentum", low=0, high=1, high_open=True)
    # Expected `momentum` in [0, 1). Received: momentum=1
    ```
    """
    if value is None and allow_none:
        return None
    bounds = _bounds_text(low, high, low_open, high_open)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        what = ("None or a number" if allow_none else "a number") + (f" {bounds}" if bounds else "")
        raise ValueError(f"Expected `{name}` to be {what}. Received: {name}={value!r}")
    checked = float(value)
    bad = math.isnan(checked) or (finite and math.isinf(checked))
    if low is not None:
        bad = bad or (checked <= low if low_open else checked < low)
    if high is not None:
        bad = bad or (checked >= high if high_open else checked > high)
    if bad:
        parts = [p for p in (bounds, "and finite" if finite else "") if p]
        text = " ".join(parts) if bounds else ("to be finite" if finite else "to be a number")
        raise ValueError(f"Expected `{name}` {text}. Received: {name}={value!r}")
    return checked


def one_of(value, name: str, choices: Sequence[Any]):
    """``value`` if it equals one of ``choices`` (a bool never matches 0 or 1).

    Raises:
        ValueError: listing the choices and, for strings, the closest one.

    Example:

    ```python
    placement = one_of(placement, "placement", ("auto", "dataset", "step"))
    ```
    """
    for choice in choices:
        if isinstance(value, (bool, np.bool_)) != isinstance(choice, (bool, np.bool_)):
            continue
        if value is None or choice is None:
            if value is choice:
                return choice
            continue
        try:
            equal = bool(value == choice)
        except (TypeError, ValueError):  # e.g. an array compared with a string
            equal = False
        if equal:
            return choice
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise ValueError(f"Expected `{name}` to be one of {tuple(choices)!r}. Received: {name}={value!r}.{hint}")


# ---------------------------------------------------------------------------
# Datasets (element specs only).
# ---------------------------------------------------------------------------


def require_dataset(value, name: str = "dataset", hint: str = "") -> tf.data.Dataset:
    """``value`` if it is a ``tf.data.Dataset``, else a TypeError naming its type."""
    if not isinstance(value, tf.data.Dataset):
        raise TypeError(
            f"Expected `{name}` to be a tf.data.Dataset. Received: {type(value).__name__}."
            + (f" {hint}" if hint else "")
        )
    return value


def split_element(element_spec, what: str = "dataset") -> Tuple[Any, Any, Any]:
    """``(x_spec, y_spec, sample_weight_spec or None)`` of an ``(x, y[, w])`` element.

    Raises:
        ValueError: when the element is not a 2- or 3-tuple, as `model.fit` takes.
    """
    if not isinstance(element_spec, tuple) or len(element_spec) not in (2, 3):
        raise ValueError(
            f"Expected the {what} to yield `(x, y)` or `(x, y, sample_weight)` elements, as "
            f"`model.fit` takes. Received element_spec={element_spec}."
        )
    return element_spec[0], element_spec[1], element_spec[2] if len(element_spec) == 3 else None


def fixed_shapes(spec) -> bool:
    """Whether every component is a plain tensor of fully known shape (batchable as is)."""
    return all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in tf.nest.flatten(spec))


def _symbolic(model, attribute: str) -> list:
    """A model's flat symbolic ``inputs``/``outputs``; empty for callables and unbuilt models."""
    try:
        tensors = getattr(model, attribute, None)
    except (AttributeError, ValueError):  # an unbuilt Keras 3 Sequential raises
        return []
    return tf.nest.flatten(tensors) if tensors else []


def model_input_ranks(model) -> Optional[Tuple[int, ...]]:
    """Ranks (batch axis included) of a model's symbolic inputs; None for callables/unbuilt models."""
    inputs = _symbolic(model, "inputs")
    if not inputs:
        return None
    ranks = []
    for tensor in inputs:
        try:
            ranks.append(len(tensor.shape))
        except (TypeError, AttributeError, ValueError):  # unknown rank
            return None
    return tuple(ranks)


def is_batched(x_spec, model, y_spec=None) -> Optional[bool]:
    """Whether elements with inputs ``x_spec`` (and labels ``y_spec``) are batches for ``model``.

    True when every input tensor has the rank of the model's matching input,
    False when every one has one axis less. When the model cannot tell (no
    symbolic inputs, e.g. an unbuilt Sequential or a callable; unknown ranks;
    a different number of inputs; inputs that disagree), the labels decide
    if given: scalar labels are one example's (False); labels and inputs that
    all start with an axis of unknown size are what ``.batch()`` gives (True).
    Otherwise None (cannot tell).
    """
    from_model = _batched_for_model(x_spec, model)
    if from_model is not None or y_spec is None:
        return from_model
    return _batched_from_labels(x_spec, y_spec)


def _batched_from_labels(x_spec, y_spec) -> Optional[bool]:
    labels = [s for s in tf.nest.flatten(y_spec) if isinstance(s, tf.TensorSpec)]
    if len(labels) != 1 or labels[0].shape.rank is None:
        return None
    if labels[0].shape.rank == 0:
        return False
    leading = [getattr(s, "shape", None) for s in [*tf.nest.flatten(x_spec), labels[0]]]
    if all(shape is not None and shape.rank and shape[0] is None for shape in leading):
        return True
    return None


def _batched_for_model(x_spec, model) -> Optional[bool]:
    ranks = model_input_ranks(model)
    specs = tf.nest.flatten(x_spec)
    if ranks is None or len(specs) != len(ranks):
        return None
    deltas = set()
    for spec, rank in zip(specs, ranks):
        shape = getattr(spec, "shape", None)
        if shape is None or shape.rank is None:
            return None
        deltas.add(rank - shape.rank)
    if deltas == {0}:
        return True
    if deltas == {1}:
        return False
    return None


def batch_dim(x_spec) -> Optional[int]:
    """The static leading axis of batched inputs (None when unknown, e.g. a last partial batch)."""
    specs = tf.nest.flatten(x_spec)
    if not specs or getattr(specs[0], "shape", None) is None or not specs[0].shape.rank:
        return None
    dims = {s.shape[0] for s in specs if getattr(s, "shape", None) is not None and s.shape.rank}
    return dims.pop() if len(dims) == 1 else None


# ---------------------------------------------------------------------------
# Class counts and teachers.
# ---------------------------------------------------------------------------


def num_classes_of(model, output_index: int = 0) -> Optional[int]:
    """The last axis of a model's selected output (None when unknown or for callables)."""
    outputs = _symbolic(model, "outputs")
    if not outputs:
        return None
    if len(outputs) == 1:
        tensor = outputs[0]
    elif _is_int(output_index) and -len(outputs) <= output_index < len(outputs):
        tensor = outputs[output_index]
    else:
        return None
    try:
        last = tuple(tensor.shape)[-1]
    except (TypeError, ValueError, IndexError):  # unknown rank or a scalar output
        return None
    return None if last is None else int(last)


def check_num_classes(counts: Mapping[str, Optional[int]], fix: str = "") -> Optional[int]:
    """The common class count of named producers; unknown (None) counts are skipped.

    Args:
        counts: e.g. ``{"the student 'mlp'": 10, "the teacher 'cnn'": 5}``.
        fix: what to do about a mismatch, appended to the message.

    Returns:
        The class count all known entries share, or None if none is known.

    Raises:
        ValueError: naming every entry and its count when they differ.
    """
    known = {name: int(c) for name, c in counts.items() if c is not None}
    listed = _disagreement(known, str)
    if listed:
        raise ValueError(
            "Expected the same number of classes from every model: distillation compares logits "
            f"class by class. Received: {listed}." + (f" {fix}" if fix else "")
        )
    return next(iter(known.values()), None)


def _disagreement(values: Mapping[str, Any], describe) -> Optional[str]:
    """``"name: value, ..."`` of the known (not None) values when they are not all equal, else None."""
    known = {name: v for name, v in values.items() if v is not None}
    if len(set(known.values())) <= 1:
        return None
    return ", ".join(f"{name}: {describe(v)}" for name, v in known.items())


def _input_shapes(model) -> Optional[Tuple[Tuple[Optional[int], ...], ...]]:
    inputs = _symbolic(model, "inputs")
    if not inputs:
        return None
    try:
        return tuple(tuple(t.shape)[1:] for t in inputs)
    except (TypeError, ValueError):
        return None


def _model_name(model, i) -> str:
    name = getattr(model, "name", None)
    return f"teacher {i} ({name!r})" if name else f"teacher {i}"


def teacher_list(teacher, output_index: int = 0, name: str = "teacher") -> list:
    """One model, or a non-empty list/tuple of models (an ensemble), as a list.

    An ensemble's members must output the same number of classes and take
    inputs of the same shapes (where the models declare them): their logits
    are averaged class by class over the same inputs.

    Raises:
        TypeError: for an element that is not callable.
        ValueError: for an empty list, or members that disagree on the class
            count or the input shapes (every member is listed).
    """
    members = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not members:
        raise ValueError(
            f"Expected `{name}` to be a Keras model or a non-empty list of models. "
            f"Received: {name}={teacher!r}."
        )
    for i, model in enumerate(members):
        if not callable(model):
            where = f"{name}[{i}]" if isinstance(teacher, (list, tuple)) else name
            raise TypeError(
                f"Expected `{where}` to be a Keras model or callable. Received: {where}={model!r}"
            )
    if len(members) == 1:
        return members
    check_num_classes(
        {_model_name(m, i): num_classes_of(m, output_index) for i, m in enumerate(members)},
        fix="Ensemble only teachers of the same classes.",
    )
    shapes = {_model_name(m, i): _input_shapes(m) for i, m in enumerate(members)}
    listed = _disagreement(shapes, lambda v: ", ".join(str(s) for s in v))
    if listed:
        raise ValueError(
            "Expected every teacher of an ensemble to take inputs of the same shapes (each one runs on "
            f"the same x). Received: {listed}. Give each teacher the same inputs, e.g. with "
            "`teacher_inputs=`, or distil from the teachers separately."
        )
    return members
