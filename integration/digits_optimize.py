"""What the digits optimize chains share (`test_digits_optimize.py`, `test_digits_optimize_qat.py`):
the data split, the MLPs, the loss, the per-seed teachers and their logit caches, int8 sparsity."""

import contextlib
import fcntl
import os

import numpy as np
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import optimize
from keras_kd.cache import cache_teacher_logits
from integration.digits import load_digits_split

SEEDS = (0, 1, 2)
X_TRAIN, X_TEST, Y_TRAIN, Y_TEST = load_digits_split()
TEST = tf.data.Dataset.from_tensor_slices((X_TEST, Y_TEST)).batch(540)
# steps_per_execution: one call per epoch of digits' 20 batches (no batch-level callback in these
# fits: tfmot's UpdatePruningStep counts steps in the graph and acts at epoch end only).
STEPS = 32


def mlp(K, widths, name):
    inp = K.Input((64,), name="pixels")
    h = inp
    for i, width in enumerate(widths):
        h = K.layers.Dense(width, activation="relu", name=f"{name}_hidden{i}")(h)
    return K.Model(inp, K.layers.Dense(10, name=f"{name}_logits")(h), name=name)


def accuracy(model):
    return float(np.mean(model.predict(X_TEST, batch_size=540, verbose=0).argmax(-1) == Y_TEST))


def kd_loss():
    return keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)


@contextlib.contextmanager
def _locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _session_dir(tmp_path_factory):
    """A folder every process of this test session sees: under pytest-xdist each worker's base
    temporary folder is a child of the session's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _teacher(seed, shared):
    """The seed's teacher (tf_keras MLP 64-256-256-10, 30 epochs on all training labels), trained once
    per test session: both files of the optimize chains use it, often in two worker processes, so
    the first to need it trains it and saves its weights; the others load the same weights."""
    tf_keras.utils.set_random_seed(seed)
    teacher = mlp(tf_keras, [256, 256], "teacher")
    path = os.path.join(str(shared), f"digits_optimize_teacher{seed}.npz")
    with _locked(path + ".lock"):
        if os.path.exists(path):
            with np.load(path) as saved:
                teacher.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])
        else:
            teacher.compile(
                tf_keras.optimizers.Adam(1e-3),
                tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                steps_per_execution=STEPS,
            )
            teacher.fit(X_TRAIN, Y_TRAIN, epochs=30, batch_size=64, verbose=0)
            np.savez(path + ".tmp.npz", **{f"w{i}": w for i, w in enumerate(teacher.get_weights())})
            os.replace(path + ".tmp.npz", path)
    teacher.trainable = False
    return teacher


def train_teachers(tmp_path_factory):
    """Per seed: the teacher, its logit cache on all training examples, and on the 10% subset."""
    out = {}
    shared = _session_dir(tmp_path_factory)
    for seed in SEEDS:
        teacher = _teacher(seed, shared)
        few = np.random.default_rng(seed).permutation(len(X_TRAIN))[: len(X_TRAIN) // 10]
        root = tmp_path_factory.mktemp(f"seed{seed}")
        full = cache_teacher_logits(teacher, str(root / "all"), verbose=0)
        subset = cache_teacher_logits(teacher, str(root / "few"), verbose=0)
        out[seed] = dict(
            teacher=teacher,
            accuracy=accuracy(teacher),
            all=tf.data.Dataset.from_tensor_slices((X_TRAIN, Y_TRAIN)).apply(full),
            all_cache=full,
            few_raw=tf.data.Dataset.from_tensor_slices((X_TRAIN[few], Y_TRAIN[few])),
            few=tf.data.Dataset.from_tensor_slices((X_TRAIN[few], Y_TRAIN[few])).apply(subset),
            few_cache=subset,
        )
    print("\nteacher accuracy (3-seed mean): %.4f" % np.mean([t["accuracy"] for t in out.values()]))
    return out


def tflite_weight_sparsity(flatbuffer):
    """Fraction of zeros in each int8 weight matrix (Dense kernel) of a TFLite model."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    fractions = []
    for detail in interpreter.get_tensor_details():
        # Constants have a fixed shape; activations have a -1 batch dimension.
        constant = len(detail["shape_signature"]) == 2 and -1 not in detail["shape_signature"]
        if constant and detail["dtype"] == np.int8:
            fractions.append(float(np.mean(interpreter.get_tensor(detail["index"]) == 0)))
    assert len(fractions) == 2, fractions  # the two Dense kernels
    return fractions



def qat_distill(float_student, data, cache, epochs=5, preserve_sparsity=False):
    qat = optimize.quantize_for_distillation(
        float_student, teacher=cache, preserve_sparsity=preserve_sparsity
    )
    qat.compile(
        tf_keras.optimizers.Adam(1e-4), loss=kd_loss(), metrics=["accuracy"], steps_per_execution=STEPS
    )
    qat.fit(data.shuffle(2000, seed=0).batch(64), epochs=epochs, verbose=0)
    return qat
