"""keras_kd.mixup (consistent mixup/cutmix before the teacher) and keras_kd.unlabelled.

The draws (lambda, partner) are read back from the data itself: probe inputs
whose rows are one-hot example indicators (mixup) or ``100 * i + position``
(cutmix) tell which partner and which weight each mixed row got, and every
other quantity is then checked against the paper's formula in NumPy.
"""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import keras_kd
from keras_kd import targets as targets_lib
from tests import reference as ref
from tests.conftest import mlp

PLACEMENTS = ["pipeline", "step"]


def _probe_batch(b=16, features=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.eye(b, dtype="float32"), rng.normal(size=(b, features)).astype("float32")], 1)
    return x, rng.integers(0, classes, size=b), rng.uniform(0.5, 2.0, size=b).astype("float32")


def _read_mixup_draws(mixed, b):
    """(lam, partner) per row from the one-hot probe columns of mixed rows."""
    probe = mixed[:, :b]
    lam, partner = np.empty(b), np.empty(b, int)
    for i in range(b):
        others = [j for j in np.flatnonzero(probe[i] > 1e-7) if j != i]
        assert len(others) <= 1, probe[i]
        partner[i] = others[0] if others else i
        lam[i] = probe[i, i] if others else 1.0
    return lam, partner


@pytest.mark.parametrize("labels", ["sparse", "sparse_column", "one_hot"])
def test_mixup_equals_the_formula_for_the_drawn_lambda_and_partner(labels):
    b, k = 16, 4
    x, y, w = _probe_batch(b, classes=k)
    one_hot = np.eye(k, dtype="float32")[y]
    given = {"sparse": y, "sparse_column": y[:, None], "one_hot": one_hot}[labels]
    ds = tf.data.Dataset.from_tensor_slices((x, given, w)).batch(b)
    xm, ym, wm = (v.numpy() for v in next(iter(ds.map(keras_kd.mixup(0.7, num_classes=k, seed=3)))))
    lam, partner = _read_mixup_draws(xm, b)
    assert sorted(partner) == list(range(b))  # a permutation of the batch
    assert (partner != np.arange(b)).sum() >= b // 2  # most examples got a partner
    mix = lambda v: lam.reshape((-1,) + (1,) * (v.ndim - 1)) * v + (1 - lam.reshape((-1,) + (1,) * (v.ndim - 1))) * v[partner]  # noqa: E731
    np.testing.assert_allclose(xm, mix(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ym, mix(one_hot), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wm, mix(w), rtol=1e-5, atol=1e-6)
    assert ym.shape == (b, k) and ym.dtype == np.float32
    np.testing.assert_allclose(ym.sum(-1), 1.0, rtol=1e-6)


def test_mixup_mixes_every_input_of_a_dict_with_the_same_draw():
    b = 8
    x, y, _ = _probe_batch(b)
    inputs = {"probe": x, "other": x[:, b:] * 3.0}
    ds = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(b)
    xm, ym = next(iter(ds.map(keras_kd.mixup(1.0, num_classes=4, seed=0))))
    lam, partner = _read_mixup_draws(xm["probe"].numpy(), b)
    want = lam[:, None] * inputs["other"] + (1 - lam[:, None]) * inputs["other"][partner]
    np.testing.assert_allclose(xm["other"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_mixup_binary_labels_stay_soft_binary():
    b = 8
    x, _, _ = _probe_batch(b)
    y = (np.arange(b) % 2).astype("float32")
    xm, ym = next(iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(b).map(
        keras_kd.mixup(0.5, num_classes=1, seed=1))))
    lam, partner = _read_mixup_draws(xm.numpy(), b)
    np.testing.assert_allclose(ym.numpy(), lam * y + (1 - lam) * y[partner], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12,), (12, 3), (12, 5, 2)])
def test_cutmix_replaces_one_span_along_the_first_spatial_axis(shape):
    b, k = 10, 3
    length = shape[0]
    # value 100 * example + position: every entry says where it came from.
    x = (100.0 * np.arange(b).reshape((b,) + (1,) * len(shape))
         + np.arange(length).reshape((1, length) + (1,) * (len(shape) - 1))
         + np.zeros((b,) + shape)).astype("float32")
    y = np.arange(b) % k
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(b)
    xm, ym = (v.numpy() for v in next(iter(ds.map(keras_kd.mixup(1.0, num_classes=k, kind="cutmix", seed=5)))))
    one_hot = np.eye(k)[y]
    spans = 0
    for i in range(b):
        source = (xm[i] // 100).astype(int)  # which example each entry came from
        np.testing.assert_array_equal(xm[i] % 100, x[0] % 100)  # positions never move
        per_position = source.reshape(length, -1)
        assert (per_position == per_position[:, :1]).all()  # whole slices along the other axes
        from_partner = np.flatnonzero(per_position[:, 0] != i)
        partners = set(per_position[from_partner, 0])
        assert len(partners) <= 1
        if from_partner.size:
            spans += 1
            assert from_partner.max() - from_partner.min() + 1 == from_partner.size  # contiguous
        j = partners.pop() if partners else i
        kept = 1.0 - from_partner.size / length
        np.testing.assert_allclose(ym[i], kept * one_hot[i] + (1 - kept) * one_hot[j], rtol=1e-5, atol=1e-6)
    assert spans >= b // 2


def test_cutmix_on_2d_inputs_cuts_rows():
    b, k = 6, 3
    x = (100.0 * np.arange(b)[:, None, None, None] + np.arange(8)[None, :, None, None]
         + np.zeros((b, 8, 4, 2))).astype("float32")
    xm, _ = next(iter(tf.data.Dataset.from_tensor_slices((x, np.arange(b) % k)).batch(b).map(
        keras_kd.mixup(1.0, num_classes=k, kind="cutmix", seed=2))))
    source = xm.numpy() // 100
    assert (source == source[:, :, :1, :1]).all()  # a cut spans whole rows (all of W and C)


def test_lambda_follows_beta_alpha_alpha():
    """Kolmogorov-Smirnov against Beta(alpha, alpha), and the theoretical mean/variance."""
    b, alpha = 4096, 0.4
    x = np.concatenate([np.eye(b, dtype="float32")], 1)
    xm, _ = next(iter(tf.data.Dataset.from_tensor_slices((x, np.zeros(b, "int32"))).batch(b).map(
        keras_kd.mixup(alpha, num_classes=2, seed=11))))
    lam, partner = _read_mixup_draws(xm.numpy(), b)
    lam = lam[partner != np.arange(b)]
    assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert lam.mean() == pytest.approx(0.5, abs=0.03)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_draws_are_reproducible_given_the_seed_and_new_every_epoch():
    x, y, _ = _probe_batch(16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def epochs(seed, n=2):
        mapped = ds.map(keras_kd.mixup(0.5, num_classes=4, seed=seed))
        return [next(iter(mapped))[0].numpy() for _ in range(n)]

    a, b = epochs(7), epochs(7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], a[1])  # the next epoch mixes anew
    assert not np.allclose(epochs(8)[0], a[0])


# --- consistent teaching: the teacher sees the mixed view ---------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_teacher_sees_the_mixed_view_and_loss_equals_numpy(K, placement, jit_compile):
    b, k = 16, 4
    x, y, _ = _probe_batch(b, features=7, classes=k)  # 16 + 7 = 23 features
    teacher, student = mlp(K, inputs=23, hidden=32), mlp(K, inputs=23)
    mixed = tf.data.Dataset.from_tensor_slices((x, y)).batch(b).map(keras_kd.mixup(0.6, num_classes=k, seed=4))
    for xb, targets in keras_kd.with_teacher(mixed.repeat(2), teacher, placement=placement):  # fresh draws
        np.testing.assert_allclose(targets_lib.materialize(targets).logits.numpy(),
                                   teacher.predict(xb.numpy(), verbose=0), rtol=1e-5, atol=1e-6)
    xm, ym = (v.numpy() for v in next(iter(mixed)))
    # The same drawn batch for every pass below (each pass over `mixed` draws anew).
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensors((xm, ym)), teacher, placement=placement)
    xb, targets = next(iter(ds))
    np.testing.assert_array_equal(xb.numpy(), xm)
    teacher_logits = targets_lib.materialize(targets).logits.numpy()
    np.testing.assert_allclose(teacher_logits, teacher.predict(xm, verbose=0), rtol=1e-5, atol=1e-6)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.4), jit_compile=jit_compile)
    value = student.evaluate(ds, verbose=0)
    s = student.predict(xm, verbose=0)
    hard = ref.categorical_ce(ym, s)
    soft = ref.divergence("kl", teacher_logits / 2.0, s / 2.0) * 4.0
    assert value == pytest.approx(np.mean(0.4 * hard + 0.6 * soft), rel=1e-5)


# --- bad inputs ---------------------------------------------------------------------


def test_mixup_bad_arguments():
    for alpha in (0, -1.0, True, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="alpha"):
            keras_kd.mixup(alpha)
    with pytest.raises(ValueError, match="Did you mean 'cutmix'"):
        keras_kd.mixup(0.2, kind="cutmx")
    with pytest.raises(ValueError, match="num_classes"):
        keras_kd.mixup(0.2, num_classes=True)
    with pytest.raises(ValueError, match="seed"):
        keras_kd.mixup(0.2, seed=1.5)


def test_mixup_bad_datasets():
    x, y, _ = _probe_batch(8)
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(ValueError, match="needs `num_classes`"):
        batched.map(keras_kd.mixup(0.2))
    with pytest.raises(ValueError, match="with 4 classes but num_classes=3"):
        tf.data.Dataset.from_tensor_slices((x, np.eye(4)[y])).batch(8).map(keras_kd.mixup(0.2, num_classes=3))
    with pytest.raises(ValueError, match="after `.batch"):
        tf.data.Dataset.from_tensor_slices((x, y)).map(keras_kd.mixup(0.2, num_classes=4))
    with pytest.raises(ValueError, match="teacher targets or example ids"):
        keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y))).batch(8).map(
            keras_kd.mixup(0.2, num_classes=4))
    with pytest.raises(ValueError, match="floating-point inputs"):
        tf.data.Dataset.from_tensor_slices((x.astype("int32"), y)).batch(8).map(keras_kd.mixup(0.2, num_classes=4))
    with pytest.raises(ValueError, match="kind='mixup' for other inputs"):
        tf.data.Dataset.from_tensor_slices(({"a": x}, y)).batch(8).map(
            keras_kd.mixup(0.2, num_classes=4, kind="cutmix"))
    for bad in (y + 4, np.where(np.arange(8) == 3, keras_kd.NO_LABEL, y)):
        ds = tf.data.Dataset.from_tensor_slices((x, bad)).batch(8).map(keras_kd.mixup(0.2, num_classes=4))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"class ids must be in \[0, 4\).*NO_LABEL"):
            next(iter(ds))


@pytest.mark.parametrize("labels", [
    [0.7, 1.7, 2.9, 3.5],          # fractional: the loss refuses them, mixup must not truncate them
    [0.0, 1.0, np.nan, 3.0],
    [[0.0], [np.inf], [2.0], [3.0]],
])
def test_mixup_refuses_float_labels_that_are_not_whole_numbers(labels):
    y = np.array(labels, np.float32)
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 3), np.float32), y)).batch(4)
    ds = ds.map(keras_kd.mixup(1e-3, num_classes=4, seed=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="float labels must be whole numbers"):
        next(iter(ds))


def test_mixup_decodes_whole_float_and_uint8_labels_as_the_loss_does():
    x = np.zeros((4, 3), np.float32)  # identical inputs: the mixed labels are lam-weighted one-hots
    for y in (np.array([3.0, 0.0, 2.0, 1.0], np.float32), np.array([[3], [0], [2], [1]], np.uint8)):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).map(keras_kd.mixup(1e-3, num_classes=4, seed=0))
        mixed = next(iter(ds))[1].numpy()
        np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-6)
        # every row's mass sits on its own class and its partner's, both from the original ids
        ids = np.ravel(y).astype(int)
        assert all(set(np.flatnonzero(row > 0)) <= set(ids) for row in mixed)
        assert all(np.count_nonzero(row) <= 2 for row in mixed)


# --- unlabelled transfer sets -----------------------------------------------------------


def test_unlabelled_marks_every_example():
    x = np.arange(12, dtype="float32").reshape(6, 2)
    ds = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x))
    assert ds.element_spec[1] == tf.TensorSpec([], tf.int64)
    pairs = list(ds)
    assert [int(p[1]) for p in pairs] == [keras_kd.NO_LABEL] * 6 == [-1] * 6
    np.testing.assert_array_equal(np.stack([p[0].numpy() for p in pairs]), x)
    multi = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices((x, x[:, :1])))
    (a, b), label = next(iter(multi))  # a tuple element is a multi-input x
    np.testing.assert_array_equal(b.numpy(), x[0, :1])
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        keras_kd.unlabelled(x)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_transfer_set_mixed_with_labelled_data_equals_numpy(K, placement):
    """Unlabelled examples have no hard term; the mean runs over every example."""
    rng = np.random.default_rng(2)
    x, extra = rng.normal(size=(24, 8)).astype("float32"), rng.normal(size=(8, 8)).astype("float32")
    y = rng.integers(0, 4, size=24)
    labelled = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    ds = labelled.concatenate(keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(extra))).batch(32)
    teacher, student = mlp(K, hidden=32), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
    value = student.evaluate(keras_kd.with_teacher(ds, teacher, placement=placement), verbose=0)
    inputs = np.concatenate([x, extra])
    s, t = student.predict(inputs, verbose=0), teacher.predict(inputs, verbose=0)
    soft = ref.divergence("kl", t / 2.0, s / 2.0) * 4.0
    hard = np.concatenate([ref.sparse_ce(y, s[:24]), np.zeros(8)])
    assert value == pytest.approx(np.mean(0.3 * hard + 0.7 * soft), rel=1e-5)
