"""Deployment: `to_tflite` (int8 by default) and `file_size`.

A quantization-aware model converts with the ranges it learned; a float model
(either flavour) gets post-training full-integer quantization calibrated on
``representative_data``. `keras_kd.optimize.evaluate_tflite` scores the result.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import tempfile
import warnings
from typing import Optional, Union

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd.optimize import _common
from keras_kd.optimize import bridge


class TFLiteConversionError(ValueError):
    """The TFLite converter refused the model; the message says why."""


_IO_DTYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


def _is_qat(model) -> bool:
    return bool(_common.has_wrappers(model, _common.QAT_LAYERS))


def _input_tensors(model):
    inputs = getattr(model, "inputs", None)
    return list(inputs) if inputs else []

def _representative(data, model, limit):
    """A TFLite ``representative_dataset`` callable from a dataset, array or callable."""
    if callable(data) and not isinstance(data, tf.data.Dataset):
        return data
    inputs = _input_tensors(model)
    if len(inputs) != 1:
        raise ValueError(
            "`representative_data` as a dataset or array needs a single-input model; for "
            f"{len(inputs)} inputs pass a callable yielding lists of input arrays, as "
            "`tf.lite.TFLiteConverter.representative_dataset` takes."
        )
    rank = len(inputs[0].shape)
    dtype = tf.as_dtype(inputs[0].dtype).as_numpy_dtype
    if isinstance(data, tf.data.Dataset):
        spec = _common.element_x(data.element_spec)
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                "Expected `representative_data` elements whose x is one tensor. "
                f"Received element_spec={data.element_spec}."
            )
        expected = [None if d is None else int(d) for d in inputs[0].shape[1:]]
        batched = _checks.is_batched(spec, model)
        dims = spec.shape.as_list()[1:] if batched else spec.shape.as_list()
        if batched is None or any(e is not None and d is not None and e != d for e, d in zip(expected, dims)):
            raise ValueError(
                f"The model takes inputs of shape {[None] + expected}; `representative_data`'s x has "
                f"shape {spec.shape} (batched or not). Pass the model's training inputs."
            )
        ds = data.map(lambda *e: _common.element_x(e) if len(e) > 1 else e[0])
        if batched:
            ds = ds.unbatch()

        def generate():
            for x in ds.take(limit).as_numpy_iterator():
                yield [np.asarray(x, dtype)[None]]

        return generate
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = data[0]  # (x, y[, sample_weight]) arrays, as evaluate_tflite takes them
    try:
        array = np.asarray(data, dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Expected `representative_data` to be a tf.data.Dataset, an array of inputs, an "
            f"(x, y) tuple of arrays or a callable. Received: {type(data).__name__} ({error})."
        ) from None
    if array.ndim == rank - 1:
        array = array[None]
    expected = [None if d is None else int(d) for d in inputs[0].shape[1:]]
    if array.ndim != rank or any(e not in (None, d) for e, d in zip(expected, array.shape[1:])):
        raise ValueError(
            f"The model takes inputs of shape {[None] + expected}; `representative_data` has shape "
            f"{list(array.shape)}. Pass the inputs (a batch of examples) or an (x, y) tuple."
        )

    def generate_array():
        for x in array[:limit]:
            yield [np.asarray(x, dtype)[None]]

    return generate_array


def _conversion_reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines()]
    select = [line.split(":", 1)[1].strip() for line in lines if line.startswith("TF Select ops:")]
    if select:
        return (
            f"the model uses TensorFlow ops that have no TFLite builtin kernel: {select[0]}. Replace "
            "the layers that use them with layers TFLite supports, or convert with "
            "`tf.lite.TFLiteConverter` and `SELECT_TF_OPS` (a larger runtime, not int8)"
        )
    errors = [
        re.sub(r"^.*?error: ", "", line) for line in lines if "error:" in line and not line.startswith("loc(")
    ]
    errors = [e for e in errors if e and not e.startswith("failed while converting")]
    if errors:
        return errors[0]
    return next((line for line in lines if line), "unknown converter error")


def to_tflite(
    model,
    representative_data=None,
    *,
    int8: bool = True,
    io_dtype: str = "float32",
    path: Optional[Union[str, os.PathLike]] = None,
    num_calibration_examples: int = 256,
) -> bytes:
    """Converts a student to a TFLite flatbuffer, int8 by default.

    * A quantization-aware model (`quantize_for_distillation`) with
      ``int8=True``: ``TFLiteConverter`` with ``Optimize.DEFAULT`` turns its
      fake-quant ops into int8 weights and activations with the ranges
      learned in QAT. ``representative_data`` is optional (used only to
      calibrate what QAT did not cover).
    * A float model (Keras 3 or tf_keras, e.g. a stripped pruned model) with
      ``int8=True``: post-training full-integer quantization; needs
      ``representative_data`` to calibrate activation ranges, and every op
      must have an int8 kernel (``TFLITE_BUILTINS_INT8``).
    * ``int8=False``: a float32 model (the baseline to compare sizes and
      accuracy with).

    A Keras 3 model in a process whose Keras backend is JAX is converted
    through `to_tf_keras` (same weights, pure TensorFlow): Keras's own JAX
    export (jax2tf) leaves state TFLite cannot hold, e.g. the uint32 seed of a
    ``Dropout`` layer. Models the bridge cannot rebuild fall back to that export.

    Args:
        model: a Keras 3 or tf_keras model (no pruning wrappers: `strip`).
        representative_data: calibration inputs: a ``tf.data.Dataset`` of
            ``x`` or ``(x, y[, sample_weight])``, batched or not, an array of
            inputs, an ``(x, y)`` tuple of arrays, or a callable as ``TFLiteConverter.representative_dataset``
            takes. The first ``num_calibration_examples`` examples are used.
            Defaults to None.
        int8: quantize to int8. Defaults to True.
        io_dtype: type of the model's input and output tensors: ``"float32"``
            (quantize/dequantize inside the model, a drop-in replacement) or
            ``"int8"``/``"uint8"`` (fully integer, for accelerators and
            microcontrollers; `evaluate_tflite` applies the scales).
            Defaults to "float32".
        path: if set, the flatbuffer is also written there. Defaults to None.
        num_calibration_examples: examples read from ``representative_data``.
            Defaults to 256.

    Returns:
        The TFLite flatbuffer as ``bytes``.

    Raises:
        ValueError: for a model with pruning wrappers, int8 conversion of a
            float model without ``representative_data``, a bad ``io_dtype``.
        TFLiteConversionError: when the converter fails, saying why (e.g.
            which ops TFLite has no kernel for).

    Example:

    ```python
    int8_bytes = keras_kd.optimize.to_tflite(qat, path="student_int8.tflite")
    float_bytes = keras_kd.optimize.to_tflite(float_student, int8=False)
    ```
    """
    _compat.check_model(model, "model")
    _checks.one_of(io_dtype, "io_dtype", tuple(_IO_DTYPES))
    if not int8 and io_dtype != "float32":
        raise ValueError(
            f"`io_dtype={io_dtype!r}` needs int8=True: a float model has float inputs and outputs."
        )
    count = _checks.positive_int(num_calibration_examples, "num_calibration_examples")
    _common.require_float32(
        model, "model", "to_tflite",
        "TFLite's builtin kernels compute in float32 or int8, so float16 ops would fail to convert "
        "(for float16 weights in the file, convert a float32 model with "
        "`tf.lite.TFLiteConverter` and `target_spec.supported_types = [tf.float16]`)",
    )
    flavour = _compat.flavour_of(model)
    qat = False
    if flavour == _compat.TF_KERAS:
        if _common.has_wrappers(model, _common.PRUNE_WRAPPERS):
            raise ValueError(
                f"`model` ({model.name!r}) still has tfmot pruning wrappers (masks and step counters "
                "would be exported): convert `keras_kd.optimize.strip(model)` instead."
            )
        qat = _is_qat(model)
    if int8 and not qat and representative_data is None:
        raise ValueError(
            f"int8=True on the float model {model.name!r} is post-training quantization, which "
            "needs `representative_data` (a few hundred training inputs) to calibrate the "
            "activation ranges. Pass it, or train a quantization-aware model with "
            "`quantize_for_distillation` (no calibration needed), or use int8=False."
        )
    converter = _converter(_tensorflow_model(model))
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative_data is not None:
            converter.representative_dataset = _representative(representative_data, model, count)
        if not qat:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_dtype != "float32":
            converter.inference_input_type = _IO_DTYPES[io_dtype]
            converter.inference_output_type = _IO_DTYPES[io_dtype]
    try:
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": QAT models carry
            # their own input ranges.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            with contextlib.redirect_stdout(io.StringIO()):  # "Saved artifact at ..." (Keras 3 export)
                flatbuffer = converter.convert()
    except Exception as e:  # ConverterError and friends: say why
        kind = "int8 " if int8 else ""
        raise TFLiteConversionError(
            f"TFLite {kind}conversion of `model` ({model.name!r}) failed: {_conversion_reason(str(e))}."
        ) from e
    if path is not None:
        with open(os.fspath(path), "wb") as f:
            f.write(flatbuffer)
    return flatbuffer


def _tensorflow_model(model):
    """``model``, or its tf_keras rebuild for a Keras 3 model on the JAX backend (see `to_tflite`)."""
    if _compat.flavour_of(model) != _compat.KERAS3 or not _compat.is_jax_backend():
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fused BatchNorm notes: same outputs in inference
            return bridge.to_tf_keras(model)
    except bridge.UnconvertibleError:
        return model  # Keras's JAX export (jax2tf) may still convert it


def _converter(model):
    """A ``TFLiteConverter`` whose signature names the outputs in Keras order.

    Keras 3 models export their outputs as ``output_0``, ``output_1``, ...;
    tf_keras ones under their layer names, listed alphabetically, which loses
    the order. A multi-output single-input tf_keras model is therefore
    converted from a function returning ``{"output_<i>": the i-th Keras
    output}``, the Keras 3 naming; `evaluate_tflite` reads ``output_0``.
    """
    inputs = _input_tensors(model)
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) < 2 or len(inputs) != 1 or _compat.flavour_of(model) == _compat.KERAS3:
        return tf.lite.TFLiteConverter.from_keras_model(model)
    spec = tf.TensorSpec(tuple(inputs[0].shape), inputs[0].dtype, name=_compat.input_name(inputs[0]))

    @tf.function(input_signature=[spec])
    def serve(x):
        results = tf.nest.flatten(model(x, training=False))
        return {f"output_{i}": t for i, t in enumerate(results)}

    return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)


def file_size(obj, *, compressed: bool = False) -> int:
    """Size in bytes of a TFLite model, a file, or a Keras model as saved.

    Pruning alone does not shrink a file (zeros take as much room as other
    numbers); it shows under compression, so ``compressed=True`` reports the
    gzip size (level 9), as the tfmot guides do.

    Args:
        obj: TFLite ``bytes``, a path to a file, or a Keras 3 / tf_keras model
            (saved to a temporary ``.keras`` / ``.h5`` file to measure).
        compressed: report the gzip-compressed size. Defaults to False.

    Returns:
        The size in bytes.

    Example:

    ```python
    print(keras_kd.optimize.file_size(int8_bytes), keras_kd.optimize.file_size(float_bytes))
    ```
    """
    if isinstance(obj, (bytes, bytearray)):
        data = bytes(obj)
    elif isinstance(obj, (str, os.PathLike)):
        with open(os.fspath(obj), "rb") as f:
            data = f.read()
    elif _compat.is_model(obj):
        with tempfile.TemporaryDirectory() as tmp:
            if _compat.flavour_of(obj) == _compat.KERAS3:
                target = os.path.join(tmp, "model.keras")
                obj.save(target)
            else:
                target = os.path.join(tmp, "model.keras")
                with _common.tfmot().quantization.keras.quantize_scope():
                    obj.save(target)
            with open(target, "rb") as f:
                data = f.read()
    else:
        raise TypeError(
            f"Expected `obj` to be TFLite bytes, a path or a Keras model. Received: {type(obj).__name__}."
        )
    return len(gzip.compress(data, compresslevel=9)) if compressed else len(data)
