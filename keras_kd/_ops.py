"""The array namespace of the loss math, chosen by the tensor's type.

The loss, its divergences, the label decoding and the metrics are written once
against ``ops = _ops.namespace(tensor)``:

* a ``tf.Tensor``, ``tf.Variable`` or TF composite tensor (a TF
  `keras_kd.TeacherTargets`, ragged, ...) gets `TF`, raw TensorFlow functions
  (no ``keras.ops`` layer: the TF step builds exactly the graph it always did);
* a ``jax.Array`` (concrete or a tracer) gets `JAX`, ``jax.numpy``/``jax.nn``;
* anything else (NumPy, Python numbers, a Keras variable) follows the Keras
  backend of the process (``keras.backend.backend()``).

Names follow ``keras.ops`` where it has one, with the same argument order:
``abs argmax broadcast_to cast clip concatenate convert_to_tensor exp expand_dims
expm1 floor isfinite log log1p log_sigmoid log_softmax logsumexp max maximum mean
min minimum one_hot reshape shape sigmoid size softmax sqrt square squeeze stack
stop_gradient sum take_along_axis top_k where zeros zeros_like ones_like full``.

The few extras the loss needs (same meaning on both bindings):

* ``ndim(x)`` (static rank or None), ``static_shape(x)`` (tuple, None for
  unknown), ``dynamic_shape(x)``, ``is_floating(x)``, ``is_integer(x)``,
  ``int_dtype`` (``"int64"`` on TF, ``"int32"`` on JAX unless x64 is enabled);
* ``multiply_no_nan(x, y)``: ``x * y`` and 0 where ``y == 0`` (even if ``x`` is
  NaN/Inf), with a finite gradient there;
* ``divide_no_nan(x, y)``: ``x / y`` and 0 where ``y == 0``;
* ``one_hot_bool(ids, depth)``: a boolean one-hot;
* ``softmax_cross_entropy(labels, logits)``,
  ``sparse_softmax_cross_entropy(ids, logits)`` (NaN for ids outside
  ``[0, classes)`` on JAX, as TF's kernel gives under XLA),
  ``sigmoid_cross_entropy(labels, logits)``;
* runtime checks: ``check_numerics(x, message)``, ``assert_all(cond, message)``
  (returns the assert op, or None) and ``control_dependencies(ops_or_none)``.
  On TF they are ``tf.debugging`` ops (dropped by XLA); on JAX they are
  no-ops, since nothing can raise from inside ``jax.jit``. The loss never relies
  on them alone: a bad value also turns the affected examples' loss into NaN
  (`keras_kd.losses.guards`), which is what TF gives under XLA too.
* ``name``: ``"tensorflow"`` or ``"jax"``; ``is_tf``.
"""

from __future__ import annotations

import contextlib
import sys

import keras
import tensorflow as tf


def _tf_static_shape(x):
    shape = tf.convert_to_tensor(x).shape if not hasattr(x, "shape") else x.shape
    shape = tf.TensorShape(shape)
    return None if shape.rank is None else tuple(shape.as_list())


class TF:
    """Raw TensorFlow functions under keras.ops-style names (see the module docstring)."""

    name = "tensorflow"
    is_tf = True
    int_dtype = "int64"

    abs = staticmethod(tf.abs)
    broadcast_to = staticmethod(tf.broadcast_to)
    cast = staticmethod(tf.cast)
    concatenate = staticmethod(lambda xs, axis=0: tf.concat(xs, axis=axis))
    convert_to_tensor = staticmethod(tf.convert_to_tensor)
    exp = staticmethod(tf.exp)
    expand_dims = staticmethod(tf.expand_dims)
    expm1 = staticmethod(tf.math.expm1)
    floor = staticmethod(tf.math.floor)
    isfinite = staticmethod(tf.math.is_finite)
    log = staticmethod(tf.math.log)
    log1p = staticmethod(tf.math.log1p)
    log_sigmoid = staticmethod(tf.math.log_sigmoid)
    log_softmax = staticmethod(lambda x, axis=-1: tf.nn.log_softmax(x, axis=axis))
    logsumexp = staticmethod(lambda x, axis=None, keepdims=False: tf.reduce_logsumexp(x, axis=axis, keepdims=keepdims))
    max = staticmethod(lambda x, axis=None, keepdims=False: tf.reduce_max(x, axis=axis, keepdims=keepdims))
    maximum = staticmethod(tf.maximum)
    mean = staticmethod(lambda x, axis=None, keepdims=False: tf.reduce_mean(x, axis=axis, keepdims=keepdims))
    min = staticmethod(lambda x, axis=None, keepdims=False: tf.reduce_min(x, axis=axis, keepdims=keepdims))
    minimum = staticmethod(tf.minimum)
    ones_like = staticmethod(tf.ones_like)
    reshape = staticmethod(tf.reshape)
    sigmoid = staticmethod(tf.sigmoid)
    size = staticmethod(tf.size)
    softmax = staticmethod(lambda x, axis=-1: tf.nn.softmax(x, axis=axis))
    sqrt = staticmethod(tf.sqrt)
    square = staticmethod(tf.square)
    squeeze = staticmethod(tf.squeeze)
    stack = staticmethod(lambda xs, axis=0: tf.stack(xs, axis=axis))
    stop_gradient = staticmethod(tf.stop_gradient)
    sum = staticmethod(lambda x, axis=None, keepdims=False: tf.reduce_sum(x, axis=axis, keepdims=keepdims))
    where = staticmethod(tf.where)
    zeros_like = staticmethod(tf.zeros_like)
    multiply_no_nan = staticmethod(tf.math.multiply_no_nan)
    divide_no_nan = staticmethod(tf.math.divide_no_nan)
    check_numerics = staticmethod(tf.debugging.check_numerics)
    control_dependencies = staticmethod(lambda ops: tf.control_dependencies(ops or []))
    softmax_cross_entropy = staticmethod(
        lambda labels, logits: tf.nn.softmax_cross_entropy_with_logits(labels, logits)
    )
    sparse_softmax_cross_entropy = staticmethod(
        lambda ids, logits: tf.nn.sparse_softmax_cross_entropy_with_logits(ids, logits)
    )
    sigmoid_cross_entropy = staticmethod(
        lambda labels, logits: tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    )

    @staticmethod
    def clip(x, low, high):
        return tf.clip_by_value(x, low, high)

    @staticmethod
    def argmax(x, axis=-1, dtype="int64"):
        return tf.argmax(x, axis=axis, output_type=dtype)

    @staticmethod
    def one_hot(ids, depth, dtype="float32"):
        return tf.one_hot(ids, depth, dtype=dtype)

    @staticmethod
    def one_hot_bool(ids, depth):
        return tf.one_hot(ids, depth, on_value=True, off_value=False)

    @staticmethod
    def take_along_axis(x, indices, axis=-1):
        if axis not in (-1, x.shape.rank - 1):
            raise NotImplementedError("take_along_axis: only the last axis")
        return tf.gather(x, indices, batch_dims=indices.shape.rank - 1, axis=-1)

    @staticmethod
    def top_k(x, k):
        return tf.math.top_k(x, k)

    @staticmethod
    def zeros(shape, dtype="float32"):
        return tf.zeros(shape, dtype)

    @staticmethod
    def full(shape, value, dtype="float32"):
        return tf.fill(shape, tf.constant(value, dtype))

    @staticmethod
    def constant(value, dtype="float32"):
        return tf.constant(value, dtype)

    @staticmethod
    def ndim(x):
        return tf.TensorShape(x.shape).rank

    @staticmethod
    def static_shape(x):
        return _tf_static_shape(x)

    @staticmethod
    def dynamic_shape(x, dtype="int32"):
        return tf.shape(x, out_type=dtype)

    @staticmethod
    def is_floating(x):
        return tf.as_dtype(x.dtype).is_floating

    @staticmethod
    def is_integer(x):
        return tf.as_dtype(x.dtype).is_integer

    @staticmethod
    def dtype_name(x):
        return tf.as_dtype(x.dtype).name

    @staticmethod
    def assert_all(condition, message):
        return tf.debugging.Assert(tf.reduce_all(condition), [message])


class _JAXNamespace:
    """``jax.numpy``/``jax.nn`` under the same names as `TF` (built on first use: JAX is optional)."""

    name = "jax"
    is_tf = False

    def __init__(self):
        import jax  # noqa: PLC0415 - optional dependency
        import jax.numpy as jnp  # noqa: PLC0415

        self._jax, self._jnp = jax, jnp
        self.int_dtype = "int64" if jax.config.jax_enable_x64 else "int32"
        self.abs = jnp.abs
        self.broadcast_to = jnp.broadcast_to
        self.exp = jnp.exp
        self.expand_dims = jnp.expand_dims
        self.expm1 = jnp.expm1
        self.floor = jnp.floor
        self.isfinite = jnp.isfinite
        self.log = jnp.log
        self.log1p = jnp.log1p
        self.log_sigmoid = jax.nn.log_sigmoid
        self.maximum = jnp.maximum
        self.minimum = jnp.minimum
        self.ones_like = jnp.ones_like
        self.reshape = jnp.reshape
        self.sigmoid = jax.nn.sigmoid
        self.size = jnp.size
        self.sqrt = jnp.sqrt
        self.square = jnp.square
        self.stop_gradient = jax.lax.stop_gradient
        self.where = jnp.where
        self.zeros_like = jnp.zeros_like
        self.clip = jnp.clip

    # dtypes: int64 becomes int32 unless x64 is on (what JAX would do, without its warning)
    def _as_dtype(self, dtype):
        if dtype is None:
            return None
        return self._jax.dtypes.canonicalize_dtype(self._jnp.dtype(getattr(dtype, "as_numpy_dtype", dtype)))

    def cast(self, x, dtype):
        return self._jnp.asarray(x).astype(self._as_dtype(dtype))

    def convert_to_tensor(self, x, dtype=None):
        if hasattr(x, "__jax_array__") and not isinstance(x, self._jax.Array):
            x = x.__jax_array__()
        return self._jnp.asarray(x, dtype=self._as_dtype(dtype))

    def constant(self, value, dtype="float32"):
        return self._jnp.asarray(value, dtype=self._as_dtype(dtype))

    def concatenate(self, xs, axis=0):
        return self._jnp.concatenate(xs, axis=axis)

    def stack(self, xs, axis=0):
        return self._jnp.stack(xs, axis=axis)

    def squeeze(self, x, axis=None):
        return self._jnp.squeeze(x, axis=axis)

    def log_softmax(self, x, axis=-1):
        return self._jax.nn.log_softmax(x, axis=axis)

    def softmax(self, x, axis=-1):
        return self._jax.nn.softmax(x, axis=axis)

    def logsumexp(self, x, axis=None, keepdims=False):
        return self._jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)

    def sum(self, x, axis=None, keepdims=False):
        return self._jnp.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return self._jnp.mean(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return self._jnp.max(x, axis=axis, keepdims=keepdims)

    def min(self, x, axis=None, keepdims=False):
        return self._jnp.min(x, axis=axis, keepdims=keepdims)

    def argmax(self, x, axis=-1, dtype="int64"):
        return self._jnp.argmax(x, axis=axis).astype(self._as_dtype(dtype))

    def one_hot(self, ids, depth, dtype="float32"):
        return self._jax.nn.one_hot(ids, depth, dtype=self._as_dtype(dtype))

    def one_hot_bool(self, ids, depth):
        return self._jnp.asarray(ids)[..., None] == self._jnp.arange(depth)

    def take_along_axis(self, x, indices, axis=-1):
        return self._jnp.take_along_axis(x, indices, axis=axis)

    def top_k(self, x, k):
        return self._jax.lax.top_k(x, k)

    def zeros(self, shape, dtype="float32"):
        return self._jnp.zeros(shape, self._as_dtype(dtype))

    def full(self, shape, value, dtype="float32"):
        return self._jnp.full(shape, value, self._as_dtype(dtype))

    @staticmethod
    def ndim(x):
        return len(x.shape)

    @staticmethod
    def static_shape(x):
        return tuple(x.shape)

    def dynamic_shape(self, x, dtype="int32"):
        return self._jnp.asarray(x.shape, dtype=self._as_dtype(dtype))

    def is_floating(self, x):
        return self._jnp.issubdtype(x.dtype, self._jnp.floating)

    def is_integer(self, x):
        return self._jnp.issubdtype(x.dtype, self._jnp.integer)

    def dtype_name(self, x):
        return self._jnp.dtype(x.dtype).name

    def multiply_no_nan(self, x, y):
        # replace x first, so that neither the value nor the gradient sees NaN where y == 0
        zero = y == 0
        return self._jnp.where(zero, self._jnp.zeros_like(x), x) * y

    def divide_no_nan(self, x, y):
        zero = y == 0
        return self._jnp.where(zero, 0.0, x / self._jnp.where(zero, 1.0, y))

    def softmax_cross_entropy(self, labels, logits):
        return -self._jnp.sum(labels * self._jax.nn.log_softmax(logits, axis=-1), axis=-1)

    def sparse_softmax_cross_entropy(self, ids, logits):
        classes = logits.shape[-1]
        valid = (ids >= 0) & (ids < classes)
        safe = self._jnp.where(valid, ids, 0)
        picked = self._jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        value = self._jax.nn.logsumexp(logits, axis=-1) - picked
        return self._jnp.where(valid, value, self._jnp.nan)

    def sigmoid_cross_entropy(self, labels, logits):
        jnp = self._jnp
        return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))

    # Runtime checks cannot raise inside jax.jit: the NaN guards carry them (see the module docstring).
    @staticmethod
    def check_numerics(x, message):  # noqa: ARG004 - same signature as TF's
        return x

    @staticmethod
    def assert_all(condition, message):  # noqa: ARG004
        return None

    @staticmethod
    def control_dependencies(ops):  # noqa: ARG004
        return contextlib.nullcontext()


_JAX = None


def jax_namespace():
    """The `JAX` binding (imports JAX on first use)."""
    global _JAX
    if _JAX is None:
        _JAX = _JAXNamespace()
    return _JAX


def is_jax_array(x) -> bool:
    """Whether ``x`` is a ``jax.Array`` (concrete or a tracer); False when JAX was never imported."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


_TF_TYPES = (tf.Tensor, tf.Variable, tf.RaggedTensor, tf.SparseTensor, tf.experimental.ExtensionType)


def is_tf_value(x) -> bool:
    """Whether ``x`` is a TensorFlow value (tensor, variable or composite tensor such as TeacherTargets)."""
    return isinstance(x, _TF_TYPES)


def _is_jax_targets(value) -> bool:
    module = sys.modules.get("keras_kd._jax_targets")
    return module is not None and isinstance(value, module.JaxTeacherTargets)


def namespace(*tensors):
    """The array namespace for ``tensors``, decided by the first one whose type tells.

    TF tensors/variables/composites (a TF `TeacherTargets`) give `TF`; JAX
    arrays, tracers and `JaxTeacherTargets` give the JAX binding. Values of
    neither kind (NumPy, numbers, None) do not decide: the next tensor does,
    and if none does, the Keras backend of the process. So
    ``namespace(y_pred, y_true)`` is TF for NumPy logits with TF targets.
    """
    for tensor in tensors:
        if tensor is None:
            continue
        if isinstance(tensor, _TF_TYPES):
            return TF
        if is_jax_array(tensor) or _is_jax_targets(tensor):
            return jax_namespace()
        value = getattr(tensor, "value", None)  # a Keras variable
        if isinstance(tensor, keras.Variable) and value is not None:
            return namespace(value)
    return jax_namespace() if keras.backend.backend() == "jax" else TF
