"""Teacher ensembles and different teacher/student inputs in the teacher-logit cache.

References are NumPy: each teacher's forward pass is written out from its
weights (Dense -> ReLU -> Dense) and the ensemble's targets are computed by
hand from the formulas (mean of logits; log of the mean softmax).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_kd.cache import CacheMismatchError
from keras_kd.cache import cache_teacher_logits

N, FEATURES, CLASSES = 96, 12, 5


def mlp(K, seed, classes=CLASSES, features=FEATURES, hidden=8):
    K.utils.set_random_seed(seed)
    return K.Sequential(
        [K.Input((features,)), K.layers.Dense(hidden, activation="relu"), K.layers.Dense(classes)]
    )


def forward(model, x):
    """NumPy forward pass of `mlp`: relu(x W1 + b1) W2 + b2."""
    w1, b1, w2, b2 = [np.asarray(w, np.float64) for w in model.get_weights()]
    return np.maximum(np.asarray(x, np.float64) @ w1 + b1, 0.0) @ w2 + b2


def mean_logits(logits):
    return np.mean(logits, axis=0)


def mean_probs(logits):
    """log(mean_i softmax(t_i)), written out."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return np.log(p.mean(axis=0))


def data(seed=0, n=N, features=FEATURES):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype("float32"), rng.integers(0, CLASSES, n).astype("int32")


def collect(ds):
    """ids, x, labels and dense targets of an unbatched output, in order of the batches."""
    ids, xs, ys, logits = [], [], [], []
    for x, t in ds.batch(32):
        ids.append(t.example_id.numpy())
        xs.append(x.numpy())
        ys.append(t.labels.numpy())
        logits.append(t.logits.numpy())
    return np.concatenate(ids), np.concatenate(xs), np.concatenate(ys), np.concatenate(logits)


@pytest.mark.parametrize("ensemble,reference", [("mean_logits", mean_logits), ("mean_probs", mean_probs)])
def test_ensemble_targets_equal_numpy(K, tmp_path, ensemble, reference):
    x, y = data()
    teachers = [mlp(K, seed) for seed in (1, 2, 3)]
    expected = reference(np.stack([forward(t, x) for t in teachers]))
    cache = cache_teacher_logits(teachers, tmp_path, ensemble=ensemble, dtype="float32", batch_size=32, verbose=0)
    out = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    ids, xs, ys, logits = collect(out.shuffle(N, seed=1))
    assert not np.array_equal(ids, np.arange(N))  # shuffled, still paired
    np.testing.assert_array_equal(xs, x[ids])
    np.testing.assert_array_equal(ys, y[ids])
    np.testing.assert_allclose(logits, expected[ids], rtol=1e-5, atol=1e-5)
    assert cache.num_classes == CLASSES
    # One set of targets is stored, not one per teacher.
    assert cache.manifest["layout"]["fields"][0]["shape"] == [1, CLASSES]


@pytest.mark.parametrize("views", [1, 3])
def test_each_teacher_runs_once_per_example_and_view(K, tmp_path, views):
    x, y = data()
    on_jax = K is keras and keras.backend.backend() == "jax"
    # Rows each teacher computed. A JAX teacher runs jitted (its Python `call` runs once per
    # trace), so it counts with a host callback, which runs at every execution.
    counters = [[] if on_jax else tf.Variable(0, dtype=tf.int64) for _ in range(2)]

    def counting(seed, counter):
        class Count(K.layers.Layer):
            def call(self, inputs):
                if on_jax:
                    import jax

                    jax.debug.callback(lambda batch: counter.append(len(batch)), inputs)
                else:
                    counter.assign_add(tf.cast(tf.shape(inputs)[0], tf.int64))
                return inputs

        K.utils.set_random_seed(seed)
        return K.Sequential([K.Input((FEATURES,)), Count(), K.layers.Dense(CLASSES)])

    teachers = [counting(seed, c) for seed, c in zip((1, 2), counters)]
    augment = (lambda x, seed: x + tf.random.stateless_normal(tf.shape(x), seed)) if views > 1 else None
    cache = cache_teacher_logits(teachers, tmp_path, batch_size=30, augment=augment, views=views, verbose=0)
    manifest = cache.build(tf.data.Dataset.from_tensor_slices((x, y)))
    assert [sum(c) if on_jax else int(c.numpy()) for c in counters] == [N * views, N * views]
    assert manifest["num_examples"] == N and manifest["views"] == views


def test_ensemble_with_top_k_equals_numpy(K, tmp_path):
    x, y = data()
    teachers = [mlp(K, seed) for seed in (4, 5)]
    dense = mean_probs(np.stack([forward(t, x) for t in teachers]))
    cache = cache_teacher_logits(teachers, tmp_path, ensemble="mean_probs", top_k=2, dtype="float32", verbose=0)
    out = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    values, indices, lse = [], [], []
    for _, t in out.batch(N):
        values, indices, lse = t.topk_values.numpy(), t.topk_indices.numpy(), t.topk_logsumexp.numpy()
    order = np.argsort(-dense, axis=-1)[:, :2]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(values, np.take_along_axis(dense, order, -1), rtol=1e-5, atol=1e-5)
    # log(mean softmax) sums to one in probability: its log-sum-exp is 0.
    np.testing.assert_allclose(lse, np.log(np.exp(dense).sum(-1)), atol=1e-5)
    np.testing.assert_allclose(lse, 0.0, atol=1e-5)


def test_ensemble_with_augmented_views_equals_numpy_on_the_replayed_view(K, tmp_path):
    x, y = data(n=40)
    teachers = [mlp(K, seed) for seed in (6, 7)]

    def augment(x, seed):
        return x * (1.0 + 0.5 * tf.random.stateless_uniform(tf.shape(x), seed))

    cache = cache_teacher_logits(
        teachers, tmp_path, augment=augment, views=3, ensemble="mean_probs", dtype="float32", verbose=0
    )
    out = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    for _ in range(2):  # two passes, two choices of views
        ids, xs, _, logits = collect(out)
        np.testing.assert_array_equal(ids, np.arange(40))
        assert not np.allclose(xs, x)  # augmented views
        expected = mean_probs(np.stack([forward(t, xs) for t in teachers]))
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_a_changed_teacher_is_named_by_its_index(K, tmp_path):
    x, y = data()
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    teachers = [mlp(K, seed) for seed in (1, 2, 3)]
    raw.apply(cache_teacher_logits(teachers, tmp_path, verbose=0))
    changed = [teachers[0], mlp(K, 9), teachers[2]]
    with pytest.raises(CacheMismatchError, match=r"teacher\[1\]'s weights changed") as info:
        raw.apply(cache_teacher_logits(changed, tmp_path, verbose=0))
    assert "teacher[0]" not in str(info.value) and "teacher[2]" not in str(info.value)
    with pytest.raises(CacheMismatchError, match="number of teachers changed: 3 -> 2"):
        raw.apply(cache_teacher_logits(teachers[:2], tmp_path, verbose=0))
    with pytest.raises(CacheMismatchError, match="`ensemble` changed"):
        raw.apply(cache_teacher_logits(teachers, tmp_path, ensemble="mean_probs", verbose=0))
    rebuilt = raw.apply(cache_teacher_logits(changed, tmp_path, on_mismatch="rebuild", dtype="float32", verbose=0))
    _, _, _, logits = collect(rebuilt)
    np.testing.assert_allclose(logits, mean_logits(np.stack([forward(t, x) for t in changed])), atol=2e-3)


def test_bad_ensembles_are_refused_with_the_fix(K, tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        cache_teacher_logits([], tmp_path)
    with pytest.raises(ValueError, match=r"same number of classes.*5.*3"):
        cache_teacher_logits([mlp(K, 1), mlp(K, 2, classes=3)], tmp_path)
    with pytest.raises(ValueError, match=r"inputs of the same shapes.*teacher_inputs"):
        cache_teacher_logits([mlp(K, 1), mlp(K, 2, features=6)], tmp_path)
    with pytest.raises(ValueError, match=r"`ensemble`.*mean_logits.*Received: ensemble='median'"):
        cache_teacher_logits([mlp(K, 1), mlp(K, 2)], tmp_path, ensemble="median")
    with pytest.raises(TypeError, match=r"teacher\[1\]"):
        cache_teacher_logits([mlp(K, 1), "model.keras"], tmp_path)


# ---------------------------------------------------------------------------
# teacher_inputs / student_inputs
# ---------------------------------------------------------------------------


def every_second(x):
    return x[::2]


def test_teacher_and_student_see_their_own_inputs(K, tmp_path):
    x, y = data()
    teacher = mlp(K, 1)  # reads all 12 features
    cache = cache_teacher_logits(teacher, tmp_path, student_inputs=every_second, dtype="float32", verbose=0)
    out = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    assert out.element_spec[0].shape == (FEATURES // 2,)
    ids, xs, ys, logits = collect(out.shuffle(N, seed=2))
    np.testing.assert_array_equal(xs, x[ids][:, ::2])
    np.testing.assert_array_equal(ys, y[ids])
    np.testing.assert_allclose(logits, forward(teacher, x)[ids], rtol=1e-5, atol=1e-5)


def test_privileged_teacher_inputs(K, tmp_path):
    x, y = data(features=FEATURES)
    teacher = mlp(K, 1, features=FEATURES + 1)  # sees one privileged feature more

    def with_privileged(x):
        return tf.concat([x, tf.reduce_sum(x, keepdims=True)], 0)

    cache = cache_teacher_logits(teacher, tmp_path, teacher_inputs=with_privileged, dtype="float32", verbose=0)
    ids, xs, _, logits = collect(tf.data.Dataset.from_tensor_slices((x, y)).apply(cache))
    np.testing.assert_array_equal(xs, x)  # the student keeps its own inputs
    privileged = np.concatenate([x, x.sum(-1, keepdims=True)], -1)
    np.testing.assert_allclose(logits, forward(teacher, privileged), rtol=1e-4, atol=1e-4)


def test_input_functions_with_augmentation_see_the_same_view(K, tmp_path):
    x, y = data(n=32)
    teacher = mlp(K, 1, features=FEATURES // 2)

    def augment(x, seed):
        return x + tf.random.stateless_normal(tf.shape(x), seed)

    cache = cache_teacher_logits(
        teacher, tmp_path, augment=augment, views=2, teacher_inputs=every_second,
        student_inputs=lambda v: v[1::2], dtype="float32", verbose=0,
    )  # fmt: skip
    ids, xs, _, logits = collect(tf.data.Dataset.from_tensor_slices((x, y)).apply(cache))
    # Recreate each chosen view from the documented seed and check both sides saw it.
    for i, row, student_x in zip(ids, logits, xs):
        views = [augment(x[i], tf.constant([0, i * 2 + v], tf.int64)).numpy() for v in range(2)]
        match = [v for v in views if np.allclose(v[1::2], student_x)]
        assert len(match) == 1
        np.testing.assert_allclose(row, forward(teacher, match[0][::2][None])[0], rtol=1e-4, atol=1e-4)


def test_a_changed_input_function_is_refused(K, tmp_path):
    x, y = data()
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    teacher = mlp(K, 1, features=FEATURES // 2)
    raw.apply(cache_teacher_logits(teacher, tmp_path, teacher_inputs=every_second, verbose=0))
    with pytest.raises(CacheMismatchError, match="`teacher_inputs_digest` changed"):
        raw.apply(cache_teacher_logits(teacher, tmp_path, teacher_inputs=lambda v: v[1::2], verbose=0))
    # The student's function is covered too, although the stored logits do not depend on it.
    with pytest.raises(CacheMismatchError, match="`student_inputs` changed"):
        raw.apply(cache_teacher_logits(teacher, tmp_path, teacher_inputs=every_second, student_inputs=every_second,
                                       verbose=0))
    with pytest.raises(ValueError, match=r"`teacher_inputs` to be None or a callable"):
        cache_teacher_logits(teacher, tmp_path, teacher_inputs="half")
