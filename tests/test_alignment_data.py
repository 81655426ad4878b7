"""Tests for keras_kd.alignment's data paths: the online teacher (`attach`), the
feature cache (`cache_features`), example ids, and teacher and student on
different inputs (`teacher_inputs` / `student_inputs`).

Every behaviour runs under Keras 3 and tf_keras (the ``K`` fixture). References
are NumPy (slicing, pooling, the MSE written out) or the models' own
``predict``, never the code under test compared with itself.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import data as data_lib
from keras_kd import losses as losses_lib
from keras_kd import targets as targets_lib
from keras_kd.alignment import align
from tests.test_alignment import X
from tests.test_alignment import Y
from tests.test_alignment import feature_of
from tests.test_alignment import net


def test_attach_carries_teacher_logits_and_features(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (2, 2, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], teacher_pool_size=2)
    weights = np.arange(6, dtype="float32")
    ds = tf.data.Dataset.from_tensor_slices((X, Y, weights)).batch(4)
    (x, f), targets, sw = next(iter(a.attach(ds)))
    np.testing.assert_array_equal(x, X[:4])
    np.testing.assert_array_equal(targets.labels, Y[:4])
    np.testing.assert_array_equal(sw, weights[:4])
    np.testing.assert_allclose(targets.logits, t.predict(X[:4], verbose=0), rtol=1e-5, atol=1e-6)
    # teacher_pool_size=2: a 2x2 map averaged to 1x1 (NumPy mean over the grid).
    expected = feature_of(K, t).predict(X[:4], verbose=0).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6)
    assert a.pairs[0].teacher_shape == (1, 1, 16)
    with pytest.raises(ValueError, match="unbatched elements"):
        a.attach(tf.data.Dataset.from_tensor_slices((X, Y)))
    with pytest.raises(ValueError, match="already carries teacher targets"):
        a.attach(a.attach(ds.map(lambda x, y, w: (x, y))))
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        a.attach((X, Y))


# ---------------------------------------------------------------------------
# Cached features
# ---------------------------------------------------------------------------


def test_cache_pairs_by_position_under_shuffle(K, tmp_path):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], teacher_pool_size=2)
    raw = tf.data.Dataset.from_tensor_slices((X, Y))
    for directory in (None, str(tmp_path / "cache")):
        cached = raw.apply(a.cache_features(directory))
        assert cached.element_spec[0][1].shape == (2, 2, 16)
        pooled = feature_of(K, t).predict(X, verbose=0).reshape(6, 2, 2, 2, 2, 16).mean(axis=(2, 4))
        logits = t.predict(X, verbose=0)
        seen = 0
        for (x, f), targets in cached.shuffle(6, seed=1).batch(4):
            for i in range(len(x)):
                n = int(np.argmin(np.abs(X - x[i].numpy()).sum(axis=(1, 2, 3))))
                # float16 storage: relative error below 2^-10.
                np.testing.assert_allclose(f[i], pooled[n], rtol=2e-3, atol=2e-3)
                np.testing.assert_allclose(targets.logits[i], logits[n], rtol=1e-5, atol=1e-6)
                assert int(targets.labels[i]) == Y[n]
                seen += 1
        assert seen == 6
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["dtype"] == "float16"
    stored = {f["name"]: f for f in manifest["layout"]["fields"]}["feature_0"]  # per-row dtype and shape
    assert np.dtype(stored["dtype"]) == np.float16 and stored["shape"] == [2, 2, 16]


def test_cache_reuse_mismatch_and_bad_input(K, tmp_path):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    raw = tf.data.Dataset.from_tensor_slices((X, Y))
    directory = str(tmp_path / "c")
    raw.apply(a.cache_features(directory))
    stamp = os.path.getmtime(os.path.join(directory, "manifest.json"))
    raw.apply(a.cache_features(directory))  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(directory, "manifest.json")) == stamp
    # Another teacher (different weights) does not match the stored cache.
    t2 = net(K, (4, 4, 16), "t", frozen=True)
    a2 = align(s, t2, [("feat", "feat")])
    with pytest.raises(ValueError, match="teacher_weights changed"):
        raw.apply(a2.cache_features(directory))
    rebuilt = raw.apply(a2.cache_features(directory, overwrite=True))
    (_, f), _ = next(iter(rebuilt.batch(6)))
    np.testing.assert_allclose(f, feature_of(K, t2).predict(X, verbose=0), rtol=2e-3, atol=2e-3)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".kd-features-")]  # no temporary left
    with pytest.raises(ValueError, match="batched elements"):
        raw.batch(2).apply(a.cache_features())
    with pytest.raises(ValueError, match="infinite dataset"):
        raw.repeat().apply(a.cache_features())
    with pytest.raises(ValueError, match="different examples each time"):
        raw.shuffle(6).apply(a.cache_features())
    with pytest.raises(ValueError, match=r"`dtype`.*Received: dtype='int8'"):
        a.cache_features(dtype="int8")


def test_example_ids_are_kept_or_added(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    raw = tf.data.Dataset.from_tensor_slices((X, Y))
    # The cache numbers examples by position, like the teacher-logit cache.
    for (x, _), targets in raw.apply(a.cache_features()).shuffle(6, seed=2).batch(6):
        for i in range(6):
            n = int(targets.example_id[i])
            np.testing.assert_array_equal(x[i], X[n])
            assert int(targets.labels[i]) == Y[n]
    # Ids from add_example_ids travel through attach (online teacher).
    numbered = data_lib.add_example_ids(raw.map(lambda x, y: (x, y))).shuffle(6, seed=3).batch(6)
    (x, _), targets = next(iter(a.attach(numbered)))
    for i in range(6):
        np.testing.assert_array_equal(x[i], X[int(targets.example_id[i])])
    np.testing.assert_allclose(targets.logits, t.predict(x.numpy(), verbose=0), rtol=1e-5, atol=1e-6)
    a.model.compile(optimizer="sgd", loss=a.loss(losses_lib.DistillationLoss()))
    assert np.isfinite(a.model.evaluate(a.attach(numbered), verbose=0, return_dict=True)["loss"])


# ---------------------------------------------------------------------------
# Teacher and student on different inputs (teacher_inputs / student_inputs)
# ---------------------------------------------------------------------------

SIGNAL = np.random.default_rng(5).normal(size=(8, 40, 1)).astype("float32")
SIGNAL_Y = np.arange(8) % 3


def every_second(x):
    # `...` indexing: the same function works on a batch (attach) and on one example (cache).
    return x[..., ::2, :]


def signal_net(K, length, name, frozen=False):
    """(length, 1) signal -> Conv1D(4) "feat" -> Flatten -> Dense(3) logits."""
    inp = K.Input((length, 1))
    feat = K.layers.Conv1D(4, 3, padding="same", name="feat")(inp)
    model = K.Model(inp, K.layers.Dense(3, name="logits")(K.layers.Flatten()(feat)), name=name)
    model.trainable = not frozen
    return model


def signal_pair(K):
    """A teacher on the full 40-sample signal, a student on every second sample."""
    student, teacher = signal_net(K, 20, "s"), signal_net(K, 40, "t", frozen=True)
    aligned = align(student, teacher, [("feat", "feat")], teacher_pool_size=2, weight=0.4,
                    student_inputs=every_second)
    return student, teacher, aligned


def pooled_teacher_features(K, teacher, x):
    # teacher_pool_size=2 on a (40, 4) sequence: the mean of consecutive pairs of positions.
    return feature_of(K, teacher).predict(x, verbose=0).reshape(len(x), 20, 2, 4).mean(axis=2)


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_different_inputs_online_match_numpy(K, jit_compile):
    s, t, a = signal_pair(K)
    assert a.pairs[0].student_shape == (20, 4) and a.pairs[0].teacher_shape == (20, 4)
    lines = []
    a.summary(print_fn=lines.append)
    assert "inputs: the teacher sees x, the student every_second(x)" in "\n".join(lines)
    ds = tf.data.Dataset.from_tensor_slices((SIGNAL, SIGNAL_Y)).batch(8)
    (x, f), targets = next(iter(a.attach(ds)))
    np.testing.assert_array_equal(x, SIGNAL[:, ::2])  # the student's view, by NumPy slicing
    np.testing.assert_allclose(f, pooled_teacher_features(K, t, SIGNAL), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets.logits, t.predict(SIGNAL, verbose=0), rtol=1e-5, atol=1e-6)
    kd = losses_lib.DistillationLoss(temperature=2.0, alpha=0.5)
    a.model.compile(optimizer="sgd", loss=a.loss(kd), jit_compile=jit_compile)
    result = a.model.evaluate(a.attach(ds), verbose=0, return_dict=True)
    # Identity projector (shapes match): 0.4 * mean((f_s - pooled f_t)^2) over batch and positions.
    f_s = feature_of(K, s).predict(SIGNAL[:, ::2], verbose=0)
    feature = 0.4 * np.mean((f_s - pooled_teacher_features(K, t, SIGNAL)) ** 2)
    kd_value = float(kd(targets_lib.TeacherTargets(labels=tf.constant(SIGNAL_Y), logits=t.predict(SIGNAL, verbose=0)),
                        s.predict(SIGNAL[:, ::2], verbose=0)))
    np.testing.assert_allclose(result["feature_loss"], feature, rtol=1e-4)
    np.testing.assert_allclose(result["loss"], kd_value + feature, rtol=1e-4)


def test_different_inputs_through_the_feature_cache(K, tmp_path):
    s, t, a = signal_pair(K)
    raw = tf.data.Dataset.from_tensor_slices((SIGNAL, SIGNAL_Y))
    directory = str(tmp_path / "views")
    pooled, logits = pooled_teacher_features(K, t, SIGNAL), t.predict(SIGNAL, verbose=0)
    for _ in range(2):  # built, then reused
        seen = 0
        for (x, f), targets in raw.apply(a.cache_features(directory)).shuffle(8, seed=4).batch(3):
            for i in range(len(x)):
                n = int(targets.example_id[i])
                np.testing.assert_array_equal(x[i], SIGNAL[n, ::2])
                np.testing.assert_allclose(f[i], pooled[n], rtol=2e-3, atol=2e-3)  # float16 storage
                np.testing.assert_allclose(targets.logits[i], logits[n], rtol=1e-5, atol=1e-6)
                seen += 1
        assert seen == 8
    # The stored features belong to the teacher's view: another view is refused, not reused.
    reversed_view = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=every_second,
                          teacher_inputs=lambda x: x[..., ::-1, :])
    with pytest.raises(ValueError, match="contents changed"):
        raw.apply(reversed_view.cache_features(directory))
    # The student's view is in the fingerprint too: the odd samples instead of the even ones are refused.
    odd = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=lambda x: x[..., 1::2, :])
    with pytest.raises(ValueError, match=r"student_inputs_digest changed \(the student's inputs"):
        raw.apply(odd.cache_features(directory))
    # A random teacher view would store features of inputs the student never pairs with.
    # (A generator's state advances across passes; a seeded op would repeat the same noise each pass.)
    noise = tf.random.Generator.from_seed(1)
    noisy = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=every_second,
                  teacher_inputs=lambda x: x + noise.normal(tf.shape(x)))
    with pytest.raises(ValueError, match="different examples each time"):
        raw.apply(noisy.cache_features())
    # A random student view could never match its own fingerprint: refused with the fix.
    jitter = align(s, t, [("feat", "feat")], teacher_pool_size=2,
                   student_inputs=lambda x: every_second(x) + noise.normal(tf.shape(every_second(x))))
    with pytest.raises(ValueError, match=r"`student_inputs` gives different inputs each time.*after the transform"):
        raw.apply(jitter.cache_features())


def test_privileged_teacher_inputs(K):
    # The teacher reads x and a privileged channel; the student reads x only.
    rng = np.random.default_rng(6)
    x = {"signal": SIGNAL, "extra": rng.normal(size=(8, 40, 1)).astype("float32")}
    teacher = signal_net(K, 40, "t", frozen=True)
    student = signal_net(K, 40, "s")
    a = align(student, teacher, [("feat", "feat")],
              teacher_inputs=lambda x: x["signal"] + x["extra"], student_inputs=lambda x: x["signal"])
    (xs, f), targets = next(iter(a.attach(tf.data.Dataset.from_tensor_slices((x, SIGNAL_Y)).batch(8))))
    np.testing.assert_array_equal(xs, SIGNAL)
    privileged = SIGNAL + x["extra"]
    np.testing.assert_allclose(f, feature_of(K, teacher).predict(privileged, verbose=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets.logits, teacher.predict(privileged, verbose=0), rtol=1e-5, atol=1e-6)


def test_different_inputs_bad_input(K):
    s, t = signal_net(K, 20, "s"), signal_net(K, 40, "t", frozen=True)
    ds = tf.data.Dataset.from_tensor_slices((SIGNAL, SIGNAL_Y))
    with pytest.raises(ValueError, match=r"input shape \(batch, 20, 1\) differs.*pass `teacher_inputs=fn`"):
        align(s, t, [("feat", "feat")], teacher_pool_size=2)
    with pytest.raises(TypeError, match=r"`student_inputs` to be None or a function.*Received: student_inputs=3"):
        align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=3)
    with pytest.raises(TypeError, match=r"one Keras model.*list of 2.*with_teacher\(dataset, teachers, ensemble="):
        align(s, [t, t], [("feat", "feat")])
    # The student's view does not fit the student: x itself for a student on 20 samples.
    wrong = align(s, t, [("feat", "feat")], teacher_pool_size=2, teacher_inputs=lambda x: x)
    message = (r"`x` itself \(no `student_inputs` given\) gives inputs of shape \(40, 1\) per example, "
               r"but the student 's' takes \(20, 1\). Pass `student_inputs=fn`")
    with pytest.raises(ValueError, match=message):
        wrong.attach(ds.batch(4))
    with pytest.raises(ValueError, match=message):
        ds.apply(wrong.cache_features())
    wrong = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=lambda x: x[..., :10, :])
    with pytest.raises(ValueError, match=r"`student_inputs\(x\)` gives inputs of shape \(10, 1\) per example"):
        wrong.attach(ds.batch(4))
    # The teacher's view does not fit the teacher.
    halved = align(s, t, [("feat", "feat")], teacher_pool_size=2, teacher_inputs=every_second,
                   student_inputs=every_second)
    with pytest.raises(ValueError, match=r"`teacher_inputs\(x\)` gives inputs of shape \(20, 1\) per example"):
        halved.attach(ds.batch(4))
    # A function that fails on x says which one, and what it receives.
    broken = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=lambda x: x["signal"])
    with pytest.raises(ValueError, match=r"(?s)`student_inputs` failed on the dataset's `x`.*a batch \(in `attach`\)"):
        broken.attach(ds.batch(4))
    a = align(s, t, [("feat", "feat")], teacher_pool_size=2, student_inputs=every_second)
    with pytest.raises(ValueError, match="unbatched elements"):
        a.attach(ds)
    with pytest.raises(ValueError, match="batched elements"):
        ds.batch(4).apply(a.cache_features())
