"""One teacher or an ensemble, as one function ``inputs -> float32 logits``.

Shared by both placements of `with_teacher`: the selection of the logits
output (`targets.teacher_output`) and the combination of an ensemble's logits
(`targets.ensemble_logits`) live in `keras_kd.targets`, so the cache and the
online teacher agree.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd import targets as targets_lib


def teacher_members(teacher, output_index, ensemble):
    """The teachers as a list (an ensemble's members checked) and the ensemble rule.

    Raises:
        ValueError: for an empty list, members with different class counts or
            input shapes, or an unknown ``ensemble``.
        TypeError: for a member that is not callable.
    """
    ensemble = _checks.one_of(ensemble, "ensemble", targets_lib.ENSEMBLES)
    return _checks.teacher_list(teacher, output_index), ensemble


def _name(teacher, i):
    name = getattr(teacher, "name", None)
    return f"teacher {i} ({name!r})" if name else f"teacher {i}"


def member_logits(teacher, inputs, output_index, weak=False):
    """One teacher's float32 logits (a tf.Tensor): its selected output, in inference mode.

    ``weak``: a JAX teacher is held by a weak reference only (see `tf_callable`).
    """
    if runs_on_jax(teacher):
        return tf_callable(teacher, output_index, weak=weak)(inputs)
    try:
        outputs = teacher(inputs, training=False)
    except (NotImplementedError, TypeError) as e:  # JAX code on a tf.Tensor (a JAX function as teacher)
        markers = ("symbolic tf.Tensor", "SymbolicTensor", "EagerTensor")  # eager, traced (tf.data)
        if not _compat.is_jax_backend() or not any(m in str(e) for m in markers):
            raise
        raise TypeError(
            f"keras_kd runs the teacher {getattr(teacher, '__name__', type(teacher).__name__)!r} in tf.data as "
            "a TensorFlow function, and it ran JAX code on a tf.Tensor (the Keras backend is 'jax'). "
            "Give a Keras 3 model (or layer) instead, which keras_kd runs through "
            "`keras_kd.data.teachers.tf_callable`, or a TensorFlow function."
        ) from e
    return tf.cast(targets_lib.teacher_output(outputs, output_index), tf.float32)


def runs_on_jax(teacher) -> bool:
    """Whether ``teacher`` is a Keras 3 model (or layer) in a JAX process (it cannot run on tf.Tensors).

    tf_keras models and plain callables run on TensorFlow in any process.
    """
    return _compat.is_jax_backend() and isinstance(teacher, keras.layers.Layer)


def jax_function(teachers, output_index=0, ensemble="mean_logits"):
    """``run(inputs)``: the (ensemble's) float32 logits of Keras 3 JAX teachers, in JAX.

    Pure and traceable: each member runs ``stateless_call`` in inference mode
    with its variables' current values, so it can run inside a jitted step
    (``placement="step"``). There the values are constants of the compiled
    step; ``run.refresh()`` (called on the host before every batch, see
    `keras_kd.targets.register_teacher`) clears JAX's caches when a teacher's
    weights changed since, so the next step is traced with the new weights
    (one retrace per change, never stale logits). Use `tf_callable` to run it
    from tf.data.
    """
    teachers = list(teachers)
    variables = [v for t in teachers for v in (*t.trainable_variables, *t.non_trainable_variables)]
    run = _stateless_function(lambda: teachers, output_index, ensemble)
    baked = []  # the variable values the last trace read (constants of a compiled step)

    def call(inputs):
        values = _variable_values(teachers)
        baked[:] = [v.value for v in variables]
        return run(values, inputs)

    def refresh():
        if baked and any(v.value is not b for v, b in zip(variables, baked)):
            import jax

            baked.clear()
            jax.clear_caches()  # the steps that baked the old weights are traced again

    call.refresh = refresh
    return call


def build_unbuilt(teachers, inputs):
    """Builds each unbuilt Keras 3 JAX teacher (e.g. a Sequential without ``Input``).

    On TensorFlow a first call builds such a teacher; ``stateless_call`` needs
    its variables, so each one is called once, eagerly, on zeros shaped like
    ``inputs`` (tensors or ``tf.TensorSpec``s, unknown axes as 1).
    """
    import numpy as np

    for teacher in teachers:
        if runs_on_jax(teacher) and not teacher.built:
            zeros = [np.zeros([1 if d is None else d for d in t.shape.as_list()], t.dtype.as_numpy_dtype)
                     for t in tf.nest.flatten(inputs)]
            teacher(tf.nest.pack_sequence_as(inputs, zeros), training=False)


def _variable_values(teachers):
    return [([v.value for v in t.trainable_variables], [v.value for v in t.non_trainable_variables])
            for t in teachers]


def _stateless_function(members, output_index, ensemble):
    import jax.numpy as jnp

    def run(values, inputs):
        teachers = members()
        logits = []
        for t, (trainable, non_trainable) in zip(teachers, values):
            outputs, _ = t.stateless_call(trainable, non_trainable, inputs, training=False)
            logits.append(jnp.asarray(targets_lib.teacher_output(outputs, output_index), jnp.float32))
        _check_same_shapes(teachers, [tuple(z.shape[1:]) for z in logits])
        return targets_lib.ensemble_logits(logits, ensemble)

    return run


def tf_callable(teacher, output_index=0, ensemble="mean_logits", *, weak=False):
    """A Keras 3 JAX teacher (or ensemble) as a TensorFlow function, for tf.data.

    ``run(inputs)`` takes the teacher's inputs as TensorFlow tensors (any
    nesting the teacher accepts) and returns its float32 logits as a
    ``tf.Tensor`` with a static shape: a ``tf.numpy_function`` around a jitted
    ``stateless_call`` that receives the teachers' current variable values on
    every call (weights loaded later are seen, nothing recompiles). The
    teacher runs on JAX's default device (the accelerator when there is one),
    not on tf.data's CPU. One compilation per distinct input shape (a final
    partial batch adds one). Used by `with_teacher(placement="pipeline")`, the
    teacher-logit cache builder and `align`'s online teacher features.

    Args:
        teacher: a Keras 3 model, or a list of them (an ensemble), in a process
            whose Keras backend is JAX.
        output_index: which output holds the logits. Defaults to 0.
        ensemble: ``"mean_logits"`` or ``"mean_probs"`` (see
            `keras_kd.targets.ensemble_logits`). Defaults to "mean_logits".
        weak: hold the teachers by weak references only, for callers that
            keep the function longer than the teachers should live (a traced
            step cached per teacher). Defaults to False.

    Returns:
        ``run(inputs) -> tf.Tensor`` (float32 logits).

    Raises:
        ValueError: when the Keras backend is not JAX, or for a member that is
            not a Keras 3 model (tf_keras models and TensorFlow callables run
            in tf.data directly).
    """
    import jax
    import numpy as np

    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    ensemble = _checks.one_of(ensemble, "ensemble", targets_lib.ENSEMBLES)
    if not all(runs_on_jax(t) for t in teachers):
        raise ValueError(
            "keras_kd.tf_callable wraps Keras 3 models on the JAX backend (backend: "
            f"{keras.backend.backend()!r}; received: {', '.join(type(t).__name__ for t in teachers)}). "
            "tf_keras models and TensorFlow functions run in tf.data as they are."
        )
    if weak:
        refs = [weakref.ref(t) for t in teachers]
        del teachers

        def members():
            return [r() for r in refs]
    else:

        def members():
            return teachers

    jitted = jax.jit(_stateless_function(members, output_index, ensemble))

    @tf.autograph.experimental.do_not_convert  # JAX code: nothing for AutoGraph to convert
    def run(inputs):
        structure = inputs
        flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(inputs)]
        build_unbuilt(members(), tf.nest.pack_sequence_as(structure, flat))
        shape = _output_shape(jitted, members(), structure, flat)

        def host(*arrays):
            packed = tf.nest.pack_sequence_as(structure, list(arrays))
            return np.asarray(jitted(_variable_values(members()), packed), np.float32)

        logits = tf.numpy_function(host, flat, tf.float32, stateful=False, name="jax_teacher")
        logits.set_shape(shape)
        return logits

    return run


def tf_outputs(model, *, weak=False):
    """All outputs of one Keras 3 JAX model as TensorFlow tensors, for tf.data.

    Like `tf_callable` (a ``tf.numpy_function`` around the model's jitted
    ``stateless_call`` with its current variable values), for a model with
    several outputs, e.g. `keras_kd.align`'s feature extractor
    ``[logits, f_1, ..., f_P]``.

    Args:
        model: a Keras 3 model (or layer) in a process whose backend is JAX.
        weak: hold the model by a weak reference only (see `tf_callable`).
            Defaults to False.

    Returns:
        ``run(inputs) -> list of tf.Tensor``: every output, float32, in
        ``keras.tree.flatten`` order of the model's outputs, each with its
        static shape (the inputs' batch axis, the rest from ``jax.eval_shape``).

    Raises:
        ValueError: when the backend is not JAX or ``model`` is not a Keras 3 layer or model.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not runs_on_jax(model):
        raise ValueError(
            "keras_kd.tf_outputs wraps a Keras 3 model on the JAX backend (backend: "
            f"{keras.backend.backend()!r}; received: {type(model).__name__}). "
            "tf_keras models and TensorFlow functions run in tf.data as they are."
        )
    ref = weakref.ref(model) if weak else (lambda m=model: m)
    del model

    def outputs(values, inputs):
        out, _ = ref().stateless_call(*values[0], inputs, training=False)
        return [jnp.asarray(o, jnp.float32) for o in keras.tree.flatten(out)]

    jitted = jax.jit(outputs)

    @tf.autograph.experimental.do_not_convert  # JAX code: nothing for AutoGraph to convert
    def run(inputs):
        structure = inputs
        flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(inputs)]
        probe = [jax.ShapeDtypeStruct([1 if d is None else d for d in t.shape.as_list()], t.dtype.as_numpy_dtype)
                 for t in flat]
        specs = jax.eval_shape(jitted, _variable_values([ref()]), tf.nest.pack_sequence_as(structure, probe))
        batch = flat[0].shape[0] if flat[0].shape.rank else None
        ragged = any(d is None for t in flat for d in t.shape.as_list()[1:])

        def host(*arrays):
            packed = tf.nest.pack_sequence_as(structure, list(arrays))
            return [np.asarray(o, np.float32) for o in jitted(_variable_values([ref()]), packed)]

        results = tf.numpy_function(host, flat, [tf.float32] * len(specs), stateful=False, name="jax_outputs")
        for tensor, spec in zip(results, specs):
            middle = [None if ragged else d for d in spec.shape[1:-1]]
            tensor.set_shape([batch, *middle, spec.shape[-1]] if len(spec.shape) > 1 else [batch])
        return list(results)

    return run


def _output_shape(jitted, teachers, structure, flat):
    """The static shape of the logits for inputs ``flat``: the batch axis of the
    inputs, the other axes from ``jax.eval_shape`` (unknown where an input's
    non-batch axis is unknown)."""
    import jax

    def probe(t):
        dims = [1 if d is None else d for d in t.shape.as_list()]
        return jax.ShapeDtypeStruct(dims, t.dtype.as_numpy_dtype)

    spec = jax.eval_shape(jitted, _variable_values(teachers),
                          tf.nest.pack_sequence_as(structure, [probe(t) for t in flat]))
    batch = flat[0].shape[0] if flat[0].shape.rank else None
    ragged = any(d is None for t in flat for d in t.shape.as_list()[1:])
    middle = [None if ragged else d for d in spec.shape[1:-1]]
    return tf.TensorShape([batch, *middle, spec.shape[-1]] if len(spec.shape) > 1 else [batch])


def _check_same_shapes(teachers, shapes):
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{_name(t, i)}: {s}" for i, (t, s) in enumerate(zip(teachers, shapes)))
        raise ValueError(
            "Expected every teacher of an ensemble to output logits of the same shape (the same "
            f"classes). Received: {listed}. Ensemble only teachers of the same classes."
        )


def teacher_function(teachers, output_index, ensemble):
    """``run(inputs)``: the (ensemble's) float32 logits for one batch of inputs, in TensorFlow.

    Each member runs in inference mode (``training=False``). Members whose
    class counts differ are refused while tracing (callables declare none
    before they run); the message lists every member's count. Keras 3 members
    in a JAX process run through `tf_callable` (all JAX members of an
    ensemble in one call).
    """
    jax_members = [t for t in teachers if runs_on_jax(t)]
    if jax_members and len(jax_members) == len(teachers):
        return tf_callable(teachers, output_index, ensemble)
    jax_run = {id(t): tf_callable(t, output_index) for t in jax_members}

    def one(teacher, inputs):
        if id(teacher) in jax_run:
            return jax_run[id(teacher)](inputs)
        return member_logits(teacher, inputs, output_index)

    if len(teachers) == 1:
        teacher = teachers[0]
        return lambda inputs: one(teacher, inputs)

    def run(inputs):
        logits = [one(t, inputs) for t in teachers]
        _check_same_shapes(teachers, [tuple(z.shape.as_list()[1:]) for z in logits])
        return targets_lib.ensemble_logits(logits, ensemble)

    return run
