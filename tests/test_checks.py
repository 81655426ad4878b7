"""keras_kd._checks: the shared validators, each expectation written out by hand."""

import math
import re

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import _checks
from tests.conftest import mlp


def raises(message, kind=ValueError):
    """pytest.raises matching ``message`` literally."""
    return pytest.raises(kind, match=re.escape(message))


# -- integers ------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1), np.uint8(200)])
def test_positive_int_accepts_python_and_numpy_ints(value):
    out = _checks.positive_int(value, "views")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize(
    "value", [True, False, np.bool_(True), 0, -2, 1.0, 2.5, "3", None, [1], float("nan")]
)
def test_positive_int_refuses(value):
    expected = f"Expected `views` to be a positive integer. Received: views={value!r}"
    with raises(expected):
        _checks.positive_int(value, "views")


def test_positive_int_allow_none():
    assert _checks.positive_int(None, "top_k", allow_none=True) is None
    with raises("Expected `top_k` to be None or a positive integer. Received: top_k=0"):
        _checks.positive_int(0, "top_k", allow_none=True)


@pytest.mark.parametrize("value", [0, 5, np.int16(0)])
def test_non_negative_int_accepts(value):
    assert _checks.non_negative_int(value, "warmup_epochs") == int(value)


@pytest.mark.parametrize("value", [-1, True, 0.0, "0"])
def test_non_negative_int_refuses(value):
    expected = f"Expected `warmup_epochs` to be a non-negative integer. Received: warmup_epochs={value!r}"
    with raises(expected):
        _checks.non_negative_int(value, "warmup_epochs")


def test_integer_takes_negatives_but_not_bools():
    assert _checks.integer(-3, "seed") == -3
    assert _checks.integer(np.int64(2**40), "seed") == 2**40
    with raises("Expected `seed` to be an integer. Received: seed=False"):
        _checks.integer(False, "seed")
    with raises("Expected `seed` to be an integer. Received: seed=1.0"):
        _checks.integer(1.0, "seed")


# -- numbers in ranges -----------------------------------------------------------


def test_number_closed_open_ends():
    # [0, 1): 0 is in, 1 is out.
    assert _checks.number(0, "momentum", low=0, high=1, high_open=True) == 0.0
    assert _checks.number(np.float32(0.5), "momentum", low=0, high=1, high_open=True) == 0.5
    with raises("Expected `momentum` in [0, 1) and finite. Received: momentum=1"):
        _checks.number(1, "momentum", low=0, high=1, high_open=True)
    # (0, 1]: 1 is in, 0 is out.
    assert _checks.number(1, "alpha", low=0, high=1, low_open=True) == 1.0
    with raises("Expected `alpha` in (0, 1] and finite. Received: alpha=0"):
        _checks.number(0, "alpha", low=0, high=1, low_open=True)


def test_number_one_sided_bounds():
    with raises("Expected `temperature` > 0 and finite. Received: temperature=-1"):
        _checks.number(-1, "temperature", low=0, low_open=True)
    with raises("Expected `temperature` > 0 and finite. Received: temperature=0"):
        _checks.number(0, "temperature", low=0, low_open=True)
    assert _checks.number(0, "weight", low=0) == 0.0
    with raises("Expected `x` <= 2 and finite. Received: x=2.5"):
        _checks.number(2.5, "x", high=2)
    with raises("Expected `x` < 2 and finite. Received: x=2"):
        _checks.number(2, "x", high=2, high_open=True)


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", None, [1.0], 1j])
def test_number_refuses_non_numbers(value):
    expected = f"Expected `temperature` to be a number > 0. Received: temperature={value!r}"
    with raises(expected):
        _checks.number(value, "temperature", low=0, low_open=True)


def test_number_nan_and_infinity():
    with raises("Expected `strength` to be finite. Received: strength=nan"):
        _checks.number(float("nan"), "strength")
    with raises("Expected `strength` to be finite. Received: strength=inf"):
        _checks.number(math.inf, "strength")
    # NaN is refused even when infinities are allowed; inf then passes a lower bound.
    with pytest.raises(ValueError, match="Received: timeout=nan"):
        _checks.number(float("nan"), "timeout", low=0, finite=False)
    assert _checks.number(math.inf, "timeout", low=0, finite=False) == math.inf
    assert _checks.number(None, "timeout", low=0, allow_none=True) is None


# -- choices -------------------------------------------------------------------


def test_one_of_returns_the_choice_and_suggests_the_closest():
    choices = ("auto", "dataset", "step")
    assert _checks.one_of("step", "placement", choices) == "step"
    expected = (
        "Expected `placement` to be one of ('auto', 'dataset', 'step'). "
        "Received: placement='stpe'. Did you mean 'step'?"
    )
    with raises(expected):
        _checks.one_of("stpe", "placement", choices)


def test_one_of_does_not_confuse_bools_with_ints():
    assert _checks.one_of(1, "verbose", (0, 1, 2)) == 1
    with raises("Received: verbose=True"):
        _checks.one_of(True, "verbose", (0, 1, 2))
    assert _checks.one_of(None, "in_memory", (None, True, False)) is None
    assert _checks.one_of(False, "in_memory", (None, True, False)) is False
    with raises("Received: in_memory=0"):
        _checks.one_of(0, "in_memory", (None, True, False))


def test_one_of_survives_unhashable_and_array_values():
    with pytest.raises(ValueError, match="Expected `ensemble` to be one of"):
        _checks.one_of(["mean_logits"], "ensemble", ("mean_logits", "mean_probs"))
    with pytest.raises(ValueError, match="Expected `ensemble` to be one of"):
        _checks.one_of(np.array([1, 2]), "ensemble", ("mean_logits", "mean_probs"))


# -- datasets --------------------------------------------------------------------


def test_require_dataset():
    ds = tf.data.Dataset.range(3)
    assert _checks.require_dataset(ds) is ds
    with raises("Expected `data` to be a tf.data.Dataset. Received: ndarray. Wrap it.", TypeError):
        _checks.require_dataset(np.zeros(3), "data", hint="Wrap it.")


def test_split_element():
    x = np.zeros((4, 3), "float32")
    y = np.zeros((4,), "int32")
    x_spec, y_spec, w_spec = _checks.split_element(tf.data.Dataset.from_tensor_slices((x, y)).element_spec)
    assert x_spec.shape == (3,) and y_spec.shape == () and w_spec is None
    *_, w_spec = _checks.split_element(tf.data.Dataset.from_tensor_slices((x, y, y)).element_spec)
    assert w_spec.shape == ()
    with raises("Expected the dataset to yield `(x, y)` or `(x, y, sample_weight)` elements"):
        _checks.split_element(tf.data.Dataset.from_tensor_slices(x).element_spec)


def test_fixed_shapes():
    assert _checks.fixed_shapes((tf.TensorSpec((3,)), tf.TensorSpec(())))
    assert not _checks.fixed_shapes((tf.TensorSpec((None, 3)), tf.TensorSpec(())))
    assert not _checks.fixed_shapes(tf.RaggedTensorSpec((None,), tf.float32))


def test_is_batched_against_the_model(K):
    model = mlp(K, inputs=8)  # symbolic input (None, 8): rank 2
    assert _checks.model_input_ranks(model) == (2,)
    assert _checks.is_batched(tf.TensorSpec((None, 8)), model) is True
    assert _checks.is_batched(tf.TensorSpec((32, 8)), model) is True
    assert _checks.is_batched(tf.TensorSpec((8,)), model) is False
    assert _checks.is_batched(tf.TensorSpec((2, 4, 8)), model) is None  # neither
    assert _checks.is_batched(tf.TensorSpec(None), model) is None  # unknown rank
    assert _checks.is_batched((tf.TensorSpec((8,)), tf.TensorSpec((8,))), model) is None  # 2 inputs vs 1


def test_is_batched_multi_input_and_callables(K):
    a, b = K.Input((4,)), K.Input((2, 3))
    model = K.Model([a, b], K.layers.Dense(2)(K.layers.Concatenate()([a, K.layers.Flatten()(b)])))
    assert _checks.is_batched((tf.TensorSpec((None, 4)), tf.TensorSpec((None, 2, 3))), model) is True
    assert _checks.is_batched((tf.TensorSpec((4,)), tf.TensorSpec((2, 3))), model) is False
    # One input batched and the other not: cannot tell.
    assert _checks.is_batched((tf.TensorSpec((None, 4)), tf.TensorSpec((2, 3))), model) is None
    assert _checks.is_batched(tf.TensorSpec((None, 4)), lambda x: x) is None
    assert _checks.model_input_ranks(lambda x: x) is None


def test_is_batched_from_the_labels_when_the_model_cannot_tell(K):
    unbuilt = K.Sequential([K.layers.Flatten(), K.layers.Dense(4)])  # no symbolic inputs
    image, batch_of_images = tf.TensorSpec((8, 8, 1)), tf.TensorSpec((None, 8, 8, 1))
    assert _checks.is_batched(image, unbuilt) is None
    # Scalar labels belong to one example; labels and inputs that all start with an axis of
    # unknown size are what `.batch()` gives.
    assert _checks.is_batched(image, unbuilt, tf.TensorSpec((), tf.int64)) is False
    assert _checks.is_batched(batch_of_images, unbuilt, tf.TensorSpec((None,), tf.int64)) is True
    # A fixed batch size (drop_remainder=True) or one-hot labels of one example: cannot tell.
    assert _checks.is_batched(tf.TensorSpec((4, 8, 8, 1)), unbuilt, tf.TensorSpec((4,), tf.int64)) is None
    assert _checks.is_batched(image, unbuilt, tf.TensorSpec((10,))) is None
    # The model's rule comes first.
    assert _checks.is_batched(tf.TensorSpec((8,)), mlp(K), tf.TensorSpec((None,))) is False


def test_batch_dim():
    assert _checks.batch_dim(tf.TensorSpec((32, 8))) == 32
    assert _checks.batch_dim(tf.TensorSpec((None, 8))) is None
    assert _checks.batch_dim((tf.TensorSpec((16, 2)), tf.TensorSpec((16,)))) == 16
    assert _checks.batch_dim((tf.TensorSpec((16, 2)), tf.TensorSpec((8,)))) is None
    assert _checks.batch_dim(tf.TensorSpec(())) is None


# -- class counts and teachers -------------------------------------------------


def test_num_classes_of(K):
    assert _checks.num_classes_of(mlp(K, classes=5)) == 5
    inp = K.Input((3,))
    two = K.Model(inp, [K.layers.Dense(4)(inp), K.layers.Dense(7)(inp)])
    assert _checks.num_classes_of(two, 0) == 4
    assert _checks.num_classes_of(two, 1) == 7
    assert _checks.num_classes_of(two, -1) == 7
    assert _checks.num_classes_of(two, 2) is None
    assert _checks.num_classes_of(lambda x: x) is None


def test_check_num_classes_lists_every_count():
    assert _checks.check_num_classes({"student": 10, "teacher": 10, "cache": None}) == 10
    assert _checks.check_num_classes({"student": None}) is None
    expected = (
        "Expected the same number of classes from every model: distillation compares logits class by "
        "class. Received: the student 's': 10, the teacher 't': 5. Give the student 5 units."
    )
    with raises(expected):
        _checks.check_num_classes(
            {"the student 's'": 10, "the teacher 't'": 5}, fix="Give the student 5 units."
        )


def test_teacher_list_single_and_ensemble(K):
    a, b = mlp(K, classes=4, name="a"), mlp(K, classes=4, name="b")
    assert _checks.teacher_list(a) == [a]
    assert _checks.teacher_list([a, b]) == [a, b]
    assert _checks.teacher_list((a,)) == [a]


def test_teacher_list_refuses_bad_ensembles(K):
    with raises("Expected `teacher` to be a Keras model or a non-empty list of models. Received: teacher=[]"):
        _checks.teacher_list([])
    with raises("Expected `teacher[1]` to be a Keras model or callable. Received: teacher[1]=3", TypeError):
        _checks.teacher_list([mlp(K), 3])
    four, five = mlp(K, classes=4, name="four"), mlp(K, classes=5, name="five")
    with raises("teacher 0 ('four'): 4, teacher 1 ('five'): 5."):
        _checks.teacher_list([four, five])
    wide = mlp(K, inputs=9, classes=4, name="wide")
    with raises("teacher 0 ('four'): (8,), teacher 1 ('wide'): (9,)"):
        _checks.teacher_list([four, wide])
