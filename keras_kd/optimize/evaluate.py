"""`evaluate_tflite`: the accuracy of a TFLite model, run with the LiteRT interpreter.

Labels and logits are read as `keras_kd.teacher_agreement` reads them
(`keras_kd._labels`): class ids, one-hot or soft labels, 0/1 labels for a
one-logit binary model; `keras_kd.NO_LABEL` examples are left out.
"""

from __future__ import annotations

import os
import types
from typing import Optional, Union

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _labels
from keras_kd import targets as targets_lib
from keras_kd.optimize import _common


def _interpreter(tflite, num_threads):
    from ai_edge_litert.interpreter import Interpreter

    def load(**source):
        try:
            return Interpreter(**source, num_threads=num_threads)
        except ValueError as error:
            raise ValueError(
                f"`tflite` is not a TFLite model ({error}). Pass the bytes `keras_kd.optimize."
                "to_tflite` returns, or the path of the `.tflite` file it wrote."
            ) from None

    if isinstance(tflite, (bytes, bytearray)):
        return load(model_content=bytes(tflite))
    if isinstance(tflite, (str, os.PathLike)):
        if not os.path.exists(os.fspath(tflite)):
            raise FileNotFoundError(f"No TFLite file at {os.fspath(tflite)!r}.")
        return load(model_path=os.fspath(tflite))
    raise TypeError(
        "Expected `tflite` to be the bytes of a TFLite model or a path to a .tflite file. "
        f"Received: {type(tflite).__name__}."
    )




def _output_index(interpreter, output) -> int:
    """The tensor index of the output `evaluate_tflite` scores (see there)."""
    details = interpreter.get_output_details()
    signatures = interpreter.get_signature_list()
    named = {}
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        named = {name: d["index"] for name, d in runner.get_output_details().items()}
    if output is None:
        if len(details) == 1:
            return details[0]["index"]
        if "output_0" in named:
            return named["output_0"]
        raise ValueError(
            f"The TFLite model has {len(details)} outputs ({sorted(named) or [d['name'] for d in details]}) "
            "and its signature does not give their Keras order (`keras_kd.optimize.to_tflite` names "
            "them output_0, output_1, ...). Pass `output=` the name of the logits output."
        )
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(f"Expected `output` to be an int, a str or None. Received: output={output!r}")
    name = f"output_{output}" if isinstance(output, int) else output
    if name not in named:
        if isinstance(output, int) and output == 0 and len(details) == 1:
            return details[0]["index"]
        raise ValueError(f"Unknown `output`={output!r}. The TFLite model's outputs are {sorted(named)}.")
    return named[name]


def _labels_of(y):
    if isinstance(y, targets_lib.TeacherTargets):
        return y.labels
    return y


def _has_labels(element_spec) -> bool:
    if not isinstance(element_spec, tuple) or len(element_spec) < 2:
        return False
    y = element_spec[1]
    if isinstance(y, targets_lib.TeacherTargets.Spec):
        return bool(y.has_labels)
    return True


def _predictions_and_labels(logits, y):
    """Predicted and true class ids of the labelled examples, as `keras_kd.teacher_agreement`
    reads them (`keras_kd._labels`): argmax (``logit > 0`` for one logit, a binary model);
    labels as class ids, one-hot/soft labels (argmax), or 0/1 labels (``> 0.5``) for one
    logit. `keras_kd.NO_LABEL` examples are left out."""
    classes = logits.shape[-1]
    pred = np.asarray(_labels.predicted_class(logits))  # a tf or JAX array: the process backend decides
    ids = np.asarray(_labels.class_ids(y, classes, logits_rank=logits.ndim))
    if ids.size != pred.size:
        raise ValueError(
            f"The labels of shape {y.shape} do not match the model's outputs of shape {logits.shape}: "
            f"expected class ids of shape {pred.shape} (or {pred.shape + (1,)}), or one-hot labels of "
            f"shape {logits.shape}. Check that the labels belong to this model ({max(classes, 2)} classes)."
        )
    ids = ids.reshape(pred.shape)
    if classes == 1:
        values = np.asarray(y, np.float64)[np.asarray(y) != _labels.NO_LABEL]
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                "A one-logit (binary) model needs labels in [0, 1] (0/1 class labels or "
                f"probabilities). Received labels in [{values.min()}, {values.max()}]."
            )
    elif not np.all(np.asarray(_labels.valid_class_ids(ids, classes))):
        values = np.asarray(y)
        raise ValueError(
            f"Expected class ids in [0, {classes - 1}] for a model with {classes} outputs. "
            f"Received labels in [{np.min(values)}, {np.max(values)}]"
            + (" that are not whole numbers" if np.any(ids == _labels.INVALID_ID) else "")
            + ". Pass class ids, or one-hot labels of the output's width."
        )
    kept = ids != _labels.NO_LABEL
    return pred[kept], ids[kept]


def evaluate_tflite(
    tflite,
    dataset,
    *,
    batch_size: int = 256,
    return_logits: bool = False,
    num_threads: Optional[int] = None,
    output: Optional[Union[int, str]] = None,
):
    """Accuracy of a TFLite model on a dataset, run with the LiteRT interpreter.

    Runs ``ai_edge_litert.interpreter.Interpreter`` (TensorFlow's own
    ``tf.lite.Interpreter`` is deprecated) batch by batch. Integer inputs
    and outputs (``to_tflite(..., io_dtype="int8")``) are handled with the
    model's quantization parameters: inputs are quantized as
    ``round(x / scale) + zero_point``, outputs dequantized as
    ``(q - zero_point) * scale``, so the logits compare with the Keras
    model's.

    Accuracy is the fraction of positions where the argmax of the output
    (``logit > 0`` for a one-unit output: a binary model's Bernoulli logit)
    equals the label (class ids, one-hot or soft labels, or 0/1 labels for a
    binary model); labels may be `keras_kd.TeacherTargets` (their ``labels``
    are used). Examples labelled `keras_kd.NO_LABEL` are left out. Sample
    weights are ignored.

    Args:
        tflite: the model's bytes (from `to_tflite`) or a ``.tflite`` path.
        dataset: a ``tf.data.Dataset`` of ``(x, y[, sample_weight])``,
            batched or not, or an ``(x, y)`` tuple of arrays. With
            ``return_logits=True``, elements may be ``x`` alone.
        batch_size: batch size for unbatched data. Defaults to 256.
        return_logits: also return the model's (dequantized) outputs.
            Defaults to False.
        num_threads: interpreter threads; None lets LiteRT choose.
            Defaults to None.
        output: which output holds the logits, for a multi-output model:
            ``i`` for the model's ``i``-th Keras output, or the name of a
            signature output. None scores the only output, or the first Keras
            output (``output_0``, as `to_tflite` and Keras 3 name it), never
            the first tensor LiteRT happens to list. Defaults to None.

    Returns:
        The accuracy, a float; with ``return_logits``, ``(accuracy, logits)``
        where ``logits`` is a float32 array (``accuracy`` is None for data
        without labels, or whose labels are all `keras_kd.NO_LABEL`).

    Raises:
        ValueError: for a multi-input model, a dataset without labels
            (including unlabelled keras_kd data, whose targets carry
            ``has_labels=False``) and ``return_logits=False``, inputs of the
            wrong shape, labels that do not fit the output (another shape, a
            class id out of range), labels that are all `keras_kd.NO_LABEL` and
            ``return_logits=False``, or a multi-output model whose outputs
            are not named in Keras order and no ``output``.

    Example:

    ```python
    acc = keras_kd.optimize.evaluate_tflite("student_int8.tflite", test_ds)
    ```
    """
    batch_size = _checks.positive_int(batch_size, "batch_size")
    num_threads = _checks.positive_int(num_threads, "num_threads", allow_none=True)
    interpreter = _interpreter(tflite, num_threads)
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise ValueError(
            f"evaluate_tflite supports single-input models. Received a model with {len(inputs)} "
            f"inputs: {[d['name'] for d in inputs]}."
        )
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset, tf.data.Dataset):
        dataset = tf.data.Dataset.from_tensor_slices(dataset)
    _checks.require_dataset(dataset, "dataset", hint="Or pass an (x, y) tuple of arrays.")
    rank = len(inputs[0]["shape_signature"])
    x_spec = _common.element_x(dataset.element_spec)
    if not isinstance(x_spec, tf.TensorSpec):
        raise ValueError(
            f"Expected elements whose x is one tensor. Received element_spec={dataset.element_spec}."
        )
    signature = [int(d) for d in inputs[0]["shape_signature"]]
    # The one batched-ness rule, against the TFLite input's rank (batch axis included).
    if _checks.is_batched(x_spec, types.SimpleNamespace(inputs=[tf.TensorSpec([None] * rank)])) is False:
        dataset = dataset.batch(batch_size)
        x_spec = _common.element_x(dataset.element_spec)
    dims = x_spec.shape.as_list()[1:] if x_spec.shape.rank == rank else []
    mismatch = any(s not in (-1, d) and d is not None for s, d in zip(signature[1:], dims))
    if x_spec.shape.rank != rank or mismatch:
        raise ValueError(
            f"The TFLite model takes inputs of shape {signature} (-1: any size); the dataset's "
            f"x has shape {x_spec.shape}."
        )
    has_labels = _has_labels(dataset.element_spec)
    if not has_labels and not return_logits:
        raise ValueError(
            "`dataset` has no labels to measure accuracy on (its elements are `x` alone, or its "
            "keras_kd targets say `has_labels=False`); pass return_logits=True for the outputs."
        )
    in_detail = inputs[0]
    out_index = _output_index(interpreter, output)

    def out_details():
        return next(d for d in interpreter.get_output_details() if d["index"] == out_index)

    out_detail = out_details()
    in_scale, in_zero = in_detail["quantization"]
    current_shape = None
    correct = count = unlabelled = 0
    all_logits = []
    for element in dataset:
        x = np.asarray(_common.element_x(element))
        if tuple(x.shape) != current_shape:
            interpreter.resize_tensor_input(in_detail["index"], list(x.shape))
            interpreter.allocate_tensors()
            current_shape = tuple(x.shape)
            out_detail = out_details()
        dtype = in_detail["dtype"]
        if np.issubdtype(dtype, np.integer) and in_scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x.astype(np.float32) / in_scale) + in_zero, info.min, info.max).astype(dtype)
        else:
            x = x.astype(dtype)
        interpreter.set_tensor(in_detail["index"], x)
        interpreter.invoke()
        out = interpreter.get_tensor(out_detail["index"])
        scale, zero = out_detail["quantization"]
        if np.issubdtype(out.dtype, np.integer) and scale:
            logits = (out.astype(np.float32) - zero) * scale
        else:
            logits = np.asarray(out, np.float32)
        if return_logits:
            all_logits.append(logits)
        if has_labels:
            pred, y = _predictions_and_labels(logits, np.asarray(_labels_of(element[1])))
            correct += int(np.sum(pred == y))
            count += pred.size
            unlabelled += logits.size // max(logits.shape[-1], 1) - pred.size
    if has_labels and not count and unlabelled and not return_logits:
        raise ValueError(
            f"Every label of `dataset` ({unlabelled} examples) is keras_kd.NO_LABEL (-1, an "
            "unlabelled example): there is no accuracy to measure. Pass labelled data, or "
            "return_logits=True for the outputs."
        )
    accuracy = correct / count if has_labels and count else None
    if return_logits:
        return accuracy, (np.concatenate(all_logits) if all_logits else np.zeros((0,), np.float32))
    return accuracy
