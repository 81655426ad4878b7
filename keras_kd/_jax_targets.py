"""`TeacherTargets` on the JAX backend: what Keras's JAX data adapter hands the step.

The tf.data contract stays `keras_kd.TeacherTargets` (a TensorFlow extension
type). Keras's ``TFDatasetAdapter.get_jax_iterator`` maps every leaf of a batch
through ``np.array`` with ``keras.tree.map_structure``; an unregistered
extension type would become a 0-d object array (``Invalid dtype: object``).
On the JAX backend only, `register` makes the TensorFlow type a *node* of
Keras's tree utilities whose children are its tensor fields and whose
unflattening builds a `JaxTeacherTargets`: the adapter converts the fields, not
the object, and the step receives a `JaxTeacherTargets` with the same field
names.

`JaxTeacherTargets` is

* a JAX pytree (``jax.tree_util``), so ``jax.jit`` and ``jax.device_put`` see
  its arrays;
* a *leaf* of ``keras.tree`` (it is not registered there), so ``CompileLoss``
  keeps its single-output path and the symbolic build sees one value;
* shaped like its labels (``shape``, ``dtype``, ``ndim``) and converted to its
  labels by ``jnp.asarray``/``keras.ops.convert_to_tensor`` (``__jax_array__``)
  and ``np.asarray`` (``__array__``), so ``metrics=["accuracy"]`` and the other
  built-in metrics measure the hard labels.

Registering on TensorFlow would turn ``y`` into a nested structure there
("y_true and y_pred have different structures"): `register` refuses to.
This module imports JAX only inside `register`, so a TensorFlow process never
imports it.
"""

from __future__ import annotations

import importlib

import numpy as np

# The tensor fields (children), then the static ones (pytree metadata).
ARRAY_FIELDS = ("labels", "logits", "topk_indices", "topk_values", "topk_logsumexp", "inputs", "example_id")
STATIC_FIELDS = ("teacher_key", "has_labels")
FIELDS = ARRAY_FIELDS + STATIC_FIELDS

# Keras's tree registration (`keras.src.tree`, which `keras.tree` re-exports in
# part): the one private Keras name this module reads; canary in
# tests/test_private_canaries.py.
KERAS_TREE_MODULE = "keras.src.tree.tree_api"
KERAS_TREE_FUNCTION = "register_tree_node_class"


class JaxTeacherTargets:
    """Labels plus teacher targets for one batch, as JAX (or NumPy) arrays.

    The JAX-side twin of `keras_kd.TeacherTargets` with the same fields and
    helpers (``replace``, ``with_labels``, ``kind``, ``has_teacher``). Built by
    Keras's data adapter from a `TeacherTargets` batch; not validated (JAX
    rebuilds pytrees with placeholder leaves).
    """

    __slots__ = FIELDS

    def __init__(self, labels, logits=None, topk_indices=None, topk_values=None, topk_logsumexp=None,
                 inputs=None, example_id=None, teacher_key="", has_labels=True):
        self.labels = labels
        self.logits = logits
        self.topk_indices = topk_indices
        self.topk_values = topk_values
        self.topk_logsumexp = topk_logsumexp
        self.inputs = inputs
        self.example_id = example_id
        self.teacher_key = teacher_key
        self.has_labels = has_labels

    # --- shaped like its labels (Keras reads y_true.shape/dtype) -------------
    @property
    def shape(self):
        return tuple(self.labels.shape)

    @property
    def dtype(self):
        return self.labels.dtype

    @property
    def ndim(self):
        return len(self.labels.shape)

    def __len__(self):
        return self.labels.shape[0]

    def __jax_array__(self):
        self._warn_if_a_keras_loss_ignores_the_teacher()
        return self.labels

    def __array__(self, dtype=None, copy=None):
        self._warn_if_a_keras_loss_ignores_the_teacher()
        labels = np.asarray(self.labels)
        return labels if dtype is None else labels.astype(dtype)

    def _warn_if_a_keras_loss_ignores_the_teacher(self):
        if self.has_teacher:
            from keras_kd import targets  # noqa: PLC0415 - targets imports this module

            targets.warn_if_a_keras_loss_ignores_the_teacher()

    # --- the same helpers as TeacherTargets ----------------------------------
    def replace(self, **fields):
        """A copy with some fields replaced, e.g. ``targets.replace(logits=z)``."""
        values = {name: getattr(self, name) for name in FIELDS}
        values.update(fields)
        return JaxTeacherTargets(**values)

    def with_labels(self, labels):
        """A copy whose labels are replaced by ``labels``."""
        return self.replace(labels=labels)

    @property
    def kind(self) -> str:
        """``"dense"``, ``"topk"``, ``"inputs"`` or ``"none"``: which teacher form is set."""
        if self.logits is not None:
            return "dense"
        if self.topk_values is not None:
            return "topk"
        if self.inputs is not None:
            return "inputs"
        return "none"

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher form (dense, top-k or in-step inputs) is set."""
        return self.kind != "none"

    def __repr__(self):
        shown = ", ".join(f"{n}={getattr(getattr(self, n), 'shape', getattr(self, n))}"
                          for n in FIELDS if getattr(self, n) is not None)
        return f"JaxTeacherTargets({shown})"

    # --- JAX pytree protocol ----------------------------------------------------
    def tree_flatten(self):
        return tuple(getattr(self, n) for n in ARRAY_FIELDS), tuple(getattr(self, n) for n in STATIC_FIELDS)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(**dict(zip(ARRAY_FIELDS, children)), **dict(zip(STATIC_FIELDS, static)))


def _flatten_tf_targets(targets):
    """Keras-tree children of a TensorFlow `TeacherTargets`: its tensor fields."""
    return tuple(getattr(targets, n) for n in ARRAY_FIELDS), tuple(getattr(targets, n) for n in STATIC_FIELDS)


def _unflatten_to_jax(cls, static, children):
    # Rebuilt from converted (NumPy) fields, on the host, once per batch.
    refresh = HOST_REFRESH.get(static[0]) if static[0] else None
    if refresh is not None:
        refresh()
    return JaxTeacherTargets.tree_unflatten(static, children)


# teacher_key -> a function run on the host before each batch of in-step targets
# (see `keras_kd.data.teachers.jax_function`); filled by `targets.register_teacher`
# from the registered function's ``refresh`` attribute.
HOST_REFRESH: dict = {}


_REGISTERED = False


def register(tf_targets_class) -> None:
    """Registers the targets with Keras's tree utilities and JAX (idempotent).

    Args:
        tf_targets_class: `keras_kd.TeacherTargets`.

    Raises:
        RuntimeError: when the Keras backend is not JAX (registering on
            TensorFlow would break single-output losses there).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras_kd registers TeacherTargets with keras.tree only on the JAX backend; "
            f"the backend is {keras.backend.backend()!r}."
        )
    import jax

    jax.tree_util.register_pytree_node_class(JaxTeacherTargets)
    # Keras's registration takes a class with `tree_flatten`/`tree_unflatten`
    # (its optree and dm-tree implementations alike).
    tf_targets_class.tree_flatten = _flatten_tf_targets
    tf_targets_class.tree_unflatten = classmethod(_unflatten_to_jax)
    register_node = getattr(importlib.import_module(KERAS_TREE_MODULE), KERAS_TREE_FUNCTION)
    register_node(tf_targets_class)
    _REGISTERED = True


# ---------------------------------------------------------------------------
# The targets math of `keras_kd.targets`, in jax.numpy (same formulas)
# ---------------------------------------------------------------------------


def dense_teacher_logits(targets, num_classes: int, topk_fill: str):
    """JAX twin of `keras_kd.targets.dense_teacher_logits` (see it for the policy)."""
    import jax
    import jax.numpy as jnp

    if targets.logits is not None:
        return jnp.asarray(targets.logits, jnp.float32)
    values = jnp.asarray(targets.topk_values, jnp.float32)
    indices = jnp.asarray(targets.topk_indices, jnp.int32)
    k = values.shape[-1]
    if topk_fill == "uniform":
        lse = jnp.asarray(targets.topk_logsumexp, jnp.float32)
        lse_k = jax.nn.logsumexp(values, axis=-1)
        missing = num_classes - k
        gap = jnp.minimum(lse_k - lse, -1e-7)
        tail = lse + jnp.log(-jnp.expm1(gap))
        fill = tail - np.log(max(missing, 1)).astype(np.float32)
        if missing <= 0:
            fill = jnp.full_like(fill, -jnp.inf)
    else:  # "renormalize"
        fill = jnp.full(values.shape[:-1], -jnp.inf, jnp.float32)
    one_hot = jax.nn.one_hot(indices, num_classes, dtype=jnp.float32)  # (..., k, C)
    placed = jnp.sum(one_hot * values[..., None], axis=-2)
    chosen = jnp.sum(one_hot, axis=-2) > 0
    return jnp.where(chosen, placed, fill[..., None])


def ensemble_logits(logits, ensemble: str):
    """JAX twin of `keras_kd.targets.ensemble_logits`."""
    import jax
    import jax.numpy as jnp

    if len(logits) == 1:
        return logits[0]
    stacked = jnp.stack(list(logits))
    if ensemble == "mean_logits":
        return jnp.mean(stacked, 0)
    log_n = np.log(len(logits)).astype(stacked.dtype)
    if stacked.shape[-1] == 1:
        log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(stacked), 0) - log_n
        log_q = jax.nn.logsumexp(jax.nn.log_sigmoid(-stacked), 0) - log_n
        return log_p - log_q
    return jax.nn.logsumexp(jax.nn.log_softmax(stacked, -1), 0) - log_n


def stop_gradient(x):
    import jax

    return jax.lax.stop_gradient(x)
