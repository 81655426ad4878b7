"""The teacher side of the logit cache: what it sees and what it stores.

`Teachers` holds one teacher or an ensemble, the input transforms
(``augment``, ``teacher_inputs``, ``student_inputs``) and the storage
settings. It makes the per-example inputs of the build pass, runs the
teachers in one traced step per block (their logits combined by
`keras_kd.targets.ensemble_logits`), checks what they output and digests
the transforms for the fingerprint.

Views: view ``v`` of example ``i`` is ``augment(x, seed=[seed, i * views + v])``;
the teachers see ``teacher_inputs(view)`` and the student ``student_inputs(view)``.
"""

import hashlib
import weakref

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import targets as targets_lib
from keras_kd.cache import fingerprint
from keras_kd.data import teachers as teachers_lib
from keras_kd.cache.errors import warn
from keras_kd.cache.format import FLOAT16_MAX
_TRANSFORM_SAMPLE = 4  # elements whose transformed inputs are hashed

# Traced teacher steps, per first teacher model (see `Teachers.step`).
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def seed_of(seed, example_id, view, views):
    """The documented per-view augmentation seed ``[seed, id * views + view]``."""
    example_id = tf.cast(example_id, tf.int64)
    view = tf.cast(view, tf.int64)
    return tf.stack(
        [tf.broadcast_to(tf.constant(seed, tf.int64), tf.shape(example_id)), example_id * views + view],
        axis=-1,
    )


def _identity(x):
    return x


def output_shape(model, output_index=0):
    """The static output shape of a model's selected output, or None."""
    outputs = getattr(model, "outputs", None)
    if outputs:
        out = (
            outputs[output_index]
            if isinstance(output_index, int) and output_index < len(outputs)
            else outputs[0]
        )
        return tuple(out.shape)
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape) if shape is not None else None


class Teachers:
    """One teacher or an ensemble, with the inputs each side sees.

    Args:
        models: the list of teacher models (see `keras_kd._checks.teacher_list`).
        ensemble: ``"mean_logits"`` or ``"mean_probs"``.
        output_index: which output holds the logits.
        top_k: keep the ``top_k`` largest logits, or None.
        dtype: ``"float16"`` or ``"float32"``.
        augment: ``fn(x, seed) -> x`` or None.
        views: augmented views per example.
        seed: seed of the views.
        teacher_inputs: ``fn(x)`` the teachers see, or None (identity).
        student_inputs: ``fn(x)`` the student sees, or None (identity).
    """

    def __init__(
        self,
        models,
        ensemble,
        output_index,
        top_k,
        dtype,
        augment,
        views,
        seed,
        teacher_inputs,
        student_inputs,
    ):
        self.models, self.ensemble, self.output_index = list(models), ensemble, output_index
        self.top_k, self.dtype = top_k, dtype
        self.augment, self.views, self.seed = augment, views, seed
        self.teacher_inputs, self.student_inputs = teacher_inputs, student_inputs

    # -- inputs ---------------------------------------------------------------

    def student_view(self, x, view_seed=None):
        """What the student sees of one example (``view_seed`` when augmenting)."""
        if self.augment is not None:
            x = self.augment(x, view_seed)
        return x if self.student_inputs is None else self.student_inputs(x)

    def build_inputs(self, dataset, start_row, rows, block_rows):
        """Batches of the teachers' inputs for rows ``start_row ..< start_row + rows``.

        With ``augment``, each element holds its ``views`` views, stacked.
        """
        ds = dataset
        if start_row:
            ds = ds.skip(start_row)
        if rows is not None:
            ds = ds.take(rows)
        augment, seed, views = self.augment, self.seed, self.views
        to_teacher = self.teacher_inputs or _identity
        if augment is None:
            ds = ds.map(lambda x, *rest: to_teacher(x))
        else:
            ids = tf.data.Dataset.range(start_row, tf.int64.max)

            def all_views(i, element):
                out = [to_teacher(augment(element[0], seed_of(seed, i, v, views))) for v in range(views)]
                return tf.nest.map_structure(lambda *t: tf.stack(t), *out)

            ds = tf.data.Dataset.zip((ids, ds)).map(
                all_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        # Elements of varying shape: the teacher sees each one alone, unpadded.
        batch = block_rows if _checks.fixed_shapes(ds.element_spec) else 1
        return ds.batch(batch).prefetch(tf.data.AUTOTUNE)

    def first_input(self, dataset):
        """The teachers' inputs for view 0 of the first example, batched (a batch of one)."""
        x0 = next(iter(dataset.take(1)))[0]
        if self.augment is not None:
            x0 = self.augment(x0, seed_of(self.seed, tf.constant(0, tf.int64), 0, self.views))
        if self.teacher_inputs is not None:
            x0 = self.teacher_inputs(x0)
        return tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), x0)

    def output_shape(self, dataset):
        """The per-example shape of the stored logits (each teacher's must be the same)."""
        shapes = [output_shape(m, self.output_index) for m in self.models]
        if all(s is not None and len(s) >= 2 and all(d is not None for d in s[1:]) for s in shapes):
            # Known from the models: the teachers run only in the build pass.
            found = [tuple(int(d) for d in s[1:]) for s in shapes]
        else:
            x0 = self.first_input(dataset)
            found = []
            for model in self.models:
                out = teachers_lib.member_logits(model, x0, self.output_index)
                shape = tuple(out.shape[1:])
                if not shape or any(d is None for d in shape):
                    raise ValueError(
                        "Expected the teacher to output logits of shape (batch, ..., classes). "
                        f"Received: {out.shape}"
                    )
                found.append(tuple(int(d) for d in shape))
        if len(set(found)) > 1:
            listed = ", ".join(f"teacher[{i}]: {s}" for i, s in enumerate(found))
            raise ValueError(
                "Expected every teacher of an ensemble to output logits of the same shape per example. "
                f"Received: {listed}. Ensemble only teachers of the same classes (and output_index)."
            )
        shape = found[0]
        if self.top_k is not None and self.top_k > shape[-1]:
            raise ValueError(
                f"Expected `top_k` <= the teacher's {shape[-1]} classes. Received: top_k={self.top_k}"
            )
        return shape

    # -- the traced step --------------------------------------------------------

    def step(self):
        """``step(x) -> (arrays, stats)`` on a batch of teacher inputs, traced once per teachers/settings.

        Keras 3 teachers on the JAX backend run through
        `keras_kd.data.teachers.tf_callable` inside the step, held weakly.
        """
        # Reused by later builds (as `Model.predict` reuses its `predict_function`).
        key = (repr(self.output_index), self.top_k, self.views, self.augment is not None, self.ensemble)
        try:
            steps = _STEPS.setdefault(self.models[0], {})
        except TypeError:  # pragma: no cover - unhashable model
            steps = {}
        found = steps.get(key)
        if found is None or any(r() is not m for r, m in zip(found[0], self.models)):
            # `_STEPS` is keyed by the teacher: the step holds no strong reference to it.
            refs = [weakref.ref(m) for m in self.models]
            steps[key] = found = (refs, self._make_step(refs))
        return found[1]

    def _make_step(self, refs):
        output_index, top_k, views, ensemble = self.output_index, self.top_k, self.views, self.ensemble
        augmented = self.augment is not None

        @tf.function(reduce_retracing=True, autograph=False)
        def step(x):
            if augmented:
                n = tf.shape(tf.nest.flatten(x)[0])[0]
                x = tf.nest.map_structure(lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), x)
            members = [teachers_lib.member_logits(r(), x, output_index, weak=True) for r in refs]
            out = targets_lib.ensemble_logits(members, ensemble)
            if augmented:
                out = tf.reshape(out, tf.concat([[n, views], tf.shape(out)[1:]], 0))
            else:
                out = out[:, None]
            # Inputs too: TensorFlow's fused kernels (MatMul + ReLU) can turn a
            # NaN input into finite logits, which would be cached silently.
            floats = [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(x) if t.dtype.is_floating]
            probabilities = [
                tf.logical_and(
                    tf.logical_and(tf.reduce_min(m) >= 0.0, tf.reduce_max(m) <= 1.0),
                    tf.reduce_all(tf.abs(tf.reduce_sum(m, -1) - 1.0) < 1e-3),
                )
                for m in members
            ]
            stats = {
                "finite": tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(out)), *floats])),
                "max_abs": tf.reduce_max(tf.abs(out)),
                "probabilities": tf.reduce_any(tf.stack(probabilities)),
            }
            if top_k is None:
                return {"values": out}, stats
            values, indices = tf.math.top_k(out, k=top_k)
            return {"values": values, "indices": indices, "logsumexp": tf.reduce_logsumexp(out, -1)}, stats

        return step

    def check(self, stats, first):
        """Refuses non-finite or out-of-range outputs; warns once about probabilities."""
        if not bool(stats["finite"]):
            raise ValueError(
                "The teacher's inputs or outputs contain NaN or Inf; refusing to cache them (the "
                "teacher runs here, outside the training step, so this is where it is checked). "
                "Check the dataset and the teacher."
            )
        if self.dtype == "float16" and float(stats["max_abs"]) > FLOAT16_MAX:
            raise ValueError(
                f"The teacher's logits reach {float(stats['max_abs']):.4g}, beyond float16's range "
                f"({FLOAT16_MAX:g}). Use dtype='float32'."
            )
        if first and bool(stats["probabilities"]):
            warn(
                "The teacher's outputs look like probabilities (in [0, 1], rows summing to 1), "
                "but the cache stores logits and DistillationLoss applies a softmax to them. "
                "Remove the teacher's final softmax (or cache its pre-softmax output via "
                "`output_index`)."
            )

    # -- fingerprint of the transforms --------------------------------------------

    def transform_settings(self, dataset) -> dict:
        """Fingerprint settings of ``augment``, ``teacher_inputs`` and ``student_inputs``.

        Each given function is named, and its outputs on the first elements
        (every view) are digested; ``augment`` must be deterministic given its seed.
        """
        settings = {}
        if self.augment is not None:
            settings.update(views=self.views, seed=self.seed, augment=_name(self.augment))
        for key, fn in (("teacher_inputs", self.teacher_inputs), ("student_inputs", self.student_inputs)):
            if fn is not None:
                settings[key] = _name(fn)
        if settings:
            settings.update(self._digests(dataset))
        return settings

    def _digests(self, dataset) -> dict:
        hashes = {}
        for name in ("augment", "teacher_inputs", "student_inputs"):
            if getattr(self, name) is not None:
                hashes[name] = hashlib.blake2b(digest_size=16)
        for i, element in enumerate(dataset.take(_TRANSFORM_SAMPLE)):
            x = element[0]
            views = []
            for v in range(self.views if self.augment is not None else 1):
                if self.augment is not None:
                    s = seed_of(self.seed, tf.constant(i, tf.int64), v, self.views)
                    a, b = self.augment(x, s), self.augment(x, s)
                    if not _equal(a, b):
                        raise ValueError(
                            "`augment` is not deterministic given its seed: two calls with the same seed "
                            "returned different inputs, so the student could not see the pixels the "
                            "teacher saw. Use stateless ops (tf.image.stateless_*, tf.random.stateless_*) "
                            "seeded with the `seed` argument."
                        )
                    fingerprint.hash_element(hashes["augment"], a)
                    views.append(a)
                else:
                    a = x
                for name in ("teacher_inputs", "student_inputs"):
                    if name in hashes:
                        fingerprint.hash_element(hashes[name], getattr(self, name)(a))
            if self.views > 1 and i == 0 and all(_equal(views[0], w) for w in views[1:]):
                warn(
                    f"`augment` returned the same inputs for all {self.views} views of the first "
                    "example: it seems to ignore its `seed` argument."
                )
        return {f"{name}_digest": h.hexdigest() for name, h in hashes.items()}


def _name(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _equal(a, b) -> bool:
    fa, fb = tf.nest.flatten(a), tf.nest.flatten(b)
    return len(fa) == len(fb) and all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(fa, fb))
