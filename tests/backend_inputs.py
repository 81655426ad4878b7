"""Loss inputs and gradients on the process's Keras 3 backend, for tests that run in both jobs.

The loss picks its math by the tensors' type (`keras_kd._ops`): TF tensors and a TF `TeacherTargets` get
TensorFlow, JAX arrays and a `JaxTeacherTargets` get ``jax.numpy``. With these helpers a test written
once feeds the TF math in the TensorFlow job and the JAX math in the JAX job (the step's view of the
targets: what Keras's JAX data adapter hands the jitted step), against the same references.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_kd

JAX = keras.backend.backend() == "jax"


def targets(**fields):
    """``TeacherTargets(**fields)`` (validated as the tf.data contract), as this backend's step sees it."""
    tf_targets = keras_kd.TeacherTargets(**fields)
    if not JAX:
        return tf_targets
    import jax.numpy as jnp  # noqa: PLC0415 - JAX job only

    # Keras's JAX adapter maps the registered targets' fields to arrays and rebuilds a JaxTeacherTargets.
    return keras.tree.map_structure(lambda v: None if v is None else jnp.asarray(np.asarray(v)), tf_targets)


def array(x, dtype=None):
    """``x`` as a tensor of this backend (tf.constant or a JAX array)."""
    x = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype)
    if JAX:
        import jax.numpy as jnp  # noqa: PLC0415

        return jnp.asarray(x)
    return tf.constant(x)


def with_mask(logits, mask):
    """``logits`` carrying a Keras mask (call inside the traced function on JAX: masks are keyed by array)."""
    if JAX:
        from keras.src.backend.common import masking  # noqa: PLC0415 - how Keras 3 keeps JAX masks

        masking.set_keras_mask(logits, array(mask))
        return logits
    logits = tf.identity(logits)
    logits._keras_mask = tf.constant(mask)
    return logits


def value_and_grad(fn, x, jit=False):
    """``fn(x)`` and the gradient of its sum wrt ``x``, as NumPy.

    TF: a GradientTape inside a tf.function (XLA-compiled when ``jit``; eager when ``jit is None``).
    JAX: ``jax.value_and_grad``, under ``jax.jit`` when ``jit``.
    """
    if JAX:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        def run(x):
            value = fn(x)
            return jnp.sum(value), value

        step = jax.value_and_grad(run, has_aux=True)
        (_, value), grad = (jax.jit(step) if jit else step)(array(x))
        return np.asarray(value), np.asarray(grad)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, x)

    value, grad = (run if jit is None else tf.function(run, jit_compile=jit))(array(x))
    return value.numpy(), grad.numpy()
