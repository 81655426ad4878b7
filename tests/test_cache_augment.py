"""Tests of the cache's inputs, under Keras 3 and tf_keras: augmentation-consistent
views (``augment=``, ``views=``), pipelines that change between passes, dict and
variable-shape inputs, input contexts.

References are independent of the code under test: the user's own stateless
augmentation re-run from the documented seeds, ``teacher.predict`` on the
views, NumPy formulas.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_kd.cache import cache_teacher_logits
from tests.test_cache import FLAVOURS
from tests.test_cache import collect
from tests.test_cache import make_model
from tests.test_cache import raw_dataset
from tests.test_cache import teacher_logits


def add_noise(x, seed):
    """The user's augmentation: stateless, so a seed gives the same pixels."""
    return x + tf.random.stateless_normal(tf.shape(x), seed=seed)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_augmentation_replay_shows_the_student_the_teachers_pixels(flavour, tmp_path):
    n, d, views, seed = 40, 8, 3, 11
    x = np.random.default_rng(0).normal(size=(n, d)).astype("float32")
    y = np.arange(n, dtype="int32") % d
    # An identity teacher: its logits are exactly the input it saw.
    teacher = make_model(flavour, (), d, seed=0, in_dim=d, use_bias=False)
    teacher.layers[-1].set_weights([np.eye(d, dtype="float32")])
    transform = cache_teacher_logits(
        teacher,
        tmp_path,
        augment=add_noise,
        views=views,
        seed=seed,
        dtype="float32",
        batch_size=16,
        verbose=0,
    )
    ds = raw_dataset(x, y).apply(transform)
    # Every view the teacher saw, computed independently from the documented seeds.
    candidates = np.stack(
        [
            [add_noise(x[i], tf.constant([seed, i * views + v], tf.int64)).numpy() for v in range(views)]
            for i in range(n)
        ]
    )
    chosen = []
    for _ in range(3):  # three passes (epochs)
        got = collect(ds.shuffle(n).batch(n))
        order = np.argsort(got["id"])
        student_x, logits = got["x"][order], got["logits"][order]
        np.testing.assert_allclose(teacher_logits(teacher, student_x), logits, rtol=1e-5, atol=1e-5)
        match = np.all(np.isclose(candidates, student_x[:, None]), axis=-1)  # (n, views)
        assert (match.sum(-1) == 1).all()  # exactly one stored view per example
        chosen.append(match.argmax(-1))
        np.testing.assert_array_equal(got["y"][order], y)
    chosen = np.stack(chosen)
    assert len(np.unique(chosen)) == views  # all views get used
    assert (chosen[0] != chosen[1]).any()  # a new choice on each pass


def test_augmentation_with_top_k_and_sample_weights(tmp_path):
    n, d, views, seed = 24, 6, 2, 5
    x = np.random.default_rng(1).normal(size=(n, d)).astype("float32")
    weights = np.linspace(0.1, 1.0, n).astype("float32")
    teacher = make_model("tf_keras", (), d, seed=0, in_dim=d, use_bias=False)
    teacher.layers[-1].set_weights([np.eye(d, dtype="float32")])
    transform = cache_teacher_logits(
        teacher, tmp_path, augment=add_noise, views=views, seed=seed, top_k=d, dtype="float32", verbose=0
    )
    ds = raw_dataset(x, np.zeros(n, "int32"), weights).apply(transform)
    for student_x, t, w in ds.batch(n):
        ids = t.example_id.numpy()
        np.testing.assert_array_equal(w.numpy(), weights[ids])
        # All d classes kept: scattering the top-k back gives the teacher's logits,
        # i.e. (identity teacher) the very inputs the student receives.
        dense = np.zeros((n, d), "float32")
        np.put_along_axis(dense, t.topk_indices.numpy(), t.topk_values.numpy(), -1)
        np.testing.assert_allclose(dense, student_x.numpy(), rtol=1e-6, atol=1e-6)
        assert not np.allclose(student_x.numpy(), x[ids])  # augmented


def test_nondeterministic_augment_is_refused(tmp_path):
    teacher = make_model("keras", (), 4, seed=0, in_dim=4)
    ds = raw_dataset(np.zeros((8, 4), "float32"), np.zeros(8, "int32"))
    with pytest.raises(ValueError, match="not deterministic given its seed"):
        ds.apply(
            cache_teacher_logits(
                teacher, tmp_path, augment=lambda x, s: x + tf.random.normal(tf.shape(x)), views=2, verbose=0
            )
        )


_flip = keras.layers.RandomFlip("horizontal", seed=1)

RANDOM_BEFORE = {
    "tf.random op": (
        lambda ds: ds.map(lambda x, y: (x + tf.random.uniform(tf.shape(x)), y)),
        "RandomUniform",
    ),
    "reshuffle": (lambda ds: ds.shuffle(8), r"shuffle\(reshuffle_each_iteration=True\)"),
    "keras random layer": (
        lambda ds: ds.map(lambda x, y: (tf.reshape(_flip(tf.reshape(x, (2, 2, 1))), (4,)), y)),
        "AssignVariableOp",
    ),
    "sample_from_datasets": (
        lambda ds: tf.data.Dataset.sample_from_datasets([ds, ds], seed=1),
        "Dataset.random",
    ),
    "non-deterministic map": (
        lambda ds: ds.map(lambda x, y: (x, y), num_parallel_calls=2, deterministic=False),
        r"deterministic=False",
    ),
}


@pytest.mark.parametrize("case", sorted(RANDOM_BEFORE))
def test_random_pipeline_before_the_transform_warns(case, tmp_path):
    teacher = make_model("keras", (), 4, seed=0, in_dim=4)
    ds = raw_dataset(np.arange(32, dtype="float32").reshape(8, 4), np.zeros(8, "int32"))
    make, op = RANDOM_BEFORE[case]
    with pytest.warns(UserWarning, match=f"looks random before the transform.*{op}") as record:
        if case == "reshuffle":
            # A new order on every pass is certainly wrong pairing: refused, not only warned about.
            with pytest.raises(ValueError, match=r"reshuffles on every pass.*Shuffle after the transform"):
                make(ds).apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
        else:
            make(ds).apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    assert record[0].filename == __file__  # points at the user's line


def test_deterministic_pipeline_does_not_warn(tmp_path, recwarn):
    teacher = make_model("keras", (), 4, seed=0, in_dim=4)
    ds = raw_dataset(np.arange(32, dtype="float32").reshape(8, 4), np.zeros(8, "int32"))
    ds = ds.shuffle(8, seed=3, reshuffle_each_iteration=False).map(lambda x, y: (x * 2.0, y))
    ds.apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    assert not [w for w in recwarn if "random" in str(w.message)]


def test_dict_inputs_and_variable_shapes(tmp_path):
    # Sequences of varying length under a dict key: the teacher sees each one
    # alone (unpadded) and the output pairs them one by one.
    lengths = [3, 5, 2, 7, 4, 6, 1, 8, 3, 5]
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(n, 2)).astype("float32") for n in lengths]
    inputs = keras.Input((None, 2), name="tokens")
    teacher = keras.Model(
        {"tokens": inputs}, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(inputs))
    )
    raw = tf.data.Dataset.from_generator(
        lambda: (({"tokens": s}, np.int32(i % 3)) for i, s in enumerate(seqs)),
        output_signature=({"tokens": tf.TensorSpec((None, 2), tf.float32)}, tf.TensorSpec((), tf.int32)),
    )
    ds = raw.apply(cache_teacher_logits(teacher, tmp_path, batch_size=4, dtype="float32", verbose=0))
    out = list(ds)
    assert len(out) == len(seqs)
    for i, (x, t) in enumerate(out):
        np.testing.assert_array_equal(x["tokens"].numpy(), seqs[i])
        assert int(t.example_id) == i and int(t.labels) == i % 3
        expected = teacher.predict({"tokens": seqs[i][None]}, verbose=0)[0]
        np.testing.assert_allclose(t.logits.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_input_context_gives_the_shard(tmp_path):
    teacher = make_model("keras", (), 4, seed=0, in_dim=4)
    context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=2)
    transform = cache_teacher_logits(teacher, tmp_path, input_context=context)
    assert (transform.num_shards, transform.shard_index) == (3, 2)
    with pytest.raises(ValueError, match="not both"):
        cache_teacher_logits(teacher, tmp_path, input_context=context, num_shards=3, shard_index=0)

