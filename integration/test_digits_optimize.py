"""End to end on scikit-learn's digits: distill, prune, quantize, deploy as TFLite int8.

Three seeds (0, 1, 2); each seed trains its own teacher (tf_keras MLP
64-256-256-10 on all training labels, ~97.5% test accuracy) and caches its
logits with `keras_kd.cache_teacher_logits`; every student below reads the
cache. Test set: the fixed stratified 30% split of `load_digits_split` (540
examples, so one example is 0.19 percentage points).

(a) Pruning to 75% sparsity, with and without distillation. Low-data regime
    (Hinton et al. 2015, section 5): the students see 10% of the training
    labels; the distilled student also gets the teacher's soft targets on
    those examples. Both arms share the seed, the student (64-64-10), the
    schedule (PolynomialDecay to 75% over the first 60% of training) and the
    optimizer; only the loss differs.
(b) QAT with distillation, converted to TFLite int8. A float student
    (64-256-256-10, big enough that its 86k weights dominate the file) is
    distilled on all training examples, then fine-tuned quantization-aware
    with the same loss for a few epochs and converted.
(c) A Keras 3 student distilled in Keras 3, converted with `to_tf_keras`,
    QAT-distilled and converted to TFLite int8.

Run: ``.venv/bin/python -m pytest integration/test_digits_optimize.py -s -q``
(``-s`` prints the table the README quotes).
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import optimize
from keras_kd.cache import cache_teacher_logits
from integration.digits import load_digits_split

pytestmark = pytest.mark.integration

SEEDS = (0, 1, 2)
X_TRAIN, X_TEST, Y_TRAIN, Y_TEST = load_digits_split()
TEST = tf.data.Dataset.from_tensor_slices((X_TEST, Y_TEST)).batch(540)


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


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Per seed: the teacher, its logit cache on all training examples, and on the 10% subset."""
    out = {}
    for seed in SEEDS:
        tf_keras.utils.set_random_seed(seed)
        teacher = mlp(tf_keras, [256, 256], "teacher")
        teacher.compile(
            tf_keras.optimizers.Adam(1e-3), tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        teacher.fit(X_TRAIN, Y_TRAIN, epochs=30, batch_size=64, verbose=0)
        teacher.trainable = False
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


def test_pruning_with_distillation_at_least_as_accurate(teachers):
    epochs, batch = 150, 32
    results = {"distilled": [], "cross-entropy": []}
    sparsities = []
    pqat_acc, pqat_sparsity, sizes = [], [], []
    for seed in SEEDS:
        t = teachers[seed]
        n = int(t["few_raw"].cardinality())
        steps_per_epoch = -(-n // batch)
        for arm in results:
            tf_keras.utils.set_random_seed(seed)
            pruned, callbacks = optimize.prune_for_distillation(
                mlp(tf_keras, [64], "student"),
                target_sparsity=0.75,
                end_step=steps_per_epoch * int(epochs * 0.6),
                teacher=t["few_cache"],
            )
            if arm == "distilled":
                loss, data = kd_loss(), t["few"]
            else:
                loss, data = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), t["few_raw"]
            pruned.compile(tf_keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
            pruned.fit(data.shuffle(n, seed=seed).batch(batch), epochs=epochs, callbacks=callbacks, verbose=0)
            stripped = optimize.strip(pruned)
            results[arm].append(accuracy(stripped))
            report = optimize.sparsity(stripped)
            sparsities.append(min(report.values()))
            # Sparsity of the stripped model, counted straight from its kernels.
            for layer in stripped.layers[1:]:
                assert np.mean(layer.kernel.numpy() == 0) >= 0.74, (arm, seed, layer.name)
            if arm == "distilled":
                # Prune-preserving QAT with the same distillation loss, then int8.
                pqat = _qat_distill(stripped, t["few"], t["few_cache"], preserve_sparsity=True, epochs=10)
                int8_bytes = optimize.to_tflite(pqat)
                pqat_acc.append(optimize.evaluate_tflite(int8_bytes, TEST))
                pqat_sparsity.append(min(tflite_weight_sparsity(int8_bytes)))
                sizes.append(
                    (
                        optimize.file_size(optimize.to_tflite(stripped, int8=False), compressed=True),
                        optimize.file_size(int8_bytes, compressed=True),
                    )
                )
    distilled, plain = np.mean(results["distilled"]), np.mean(results["cross-entropy"])
    print(
        "\n(a) pruned to 75%% on 10%% of the labels, 3-seed mean test accuracy: "
        "with distillation %.4f, without %.4f (per seed %s vs %s); min layer sparsity %.4f"
        % (
            distilled,
            plain,
            np.round(results["distilled"], 4),
            np.round(results["cross-entropy"], 4),
            min(sparsities),
        )
    )
    print(
        "    + PQAT with distillation -> TFLite int8: %.4f (per seed %s); int8 kernel sparsity >= %.4f; "
        "gzip size float %d -> int8 %d bytes"
        % (np.mean(pqat_acc), np.round(pqat_acc, 4), min(pqat_sparsity), *np.mean(sizes, axis=0))
    )
    # PQAT keeps the zeros through QAT and int8 conversion; accuracy within
    # 1 point of the pruned float student on the 3-seed mean, as in (b).
    assert min(pqat_sparsity) >= 0.74
    assert np.mean(pqat_acc) >= distilled - 0.01
    # Measured here: ~0.950 vs ~0.914 (distillation ahead on every seed). The
    # issue's claim is "at least as accurate", asserted on the 3-seed mean.
    assert distilled >= plain
    assert min(sparsities) >= 0.74


def _qat_distill(float_student, data, cache, epochs=5, preserve_sparsity=False):
    qat = optimize.quantize_for_distillation(
        float_student, teacher=cache, preserve_sparsity=preserve_sparsity
    )
    qat.compile(tf_keras.optimizers.Adam(1e-4), loss=kd_loss(), metrics=["accuracy"])
    qat.fit(data.shuffle(2000, seed=0).batch(64), epochs=epochs, verbose=0)
    return qat


def test_qat_distilled_tflite_int8_close_to_float_and_smaller(teachers):
    float_acc, int8_acc, keras_acc, ratios = [], [], [], []
    for seed in SEEDS:
        t = teachers[seed]
        tf_keras.utils.set_random_seed(seed)
        student = mlp(tf_keras, [256, 256], "student")
        student.compile(tf_keras.optimizers.Adam(1e-3), loss=kd_loss(), metrics=["accuracy"])
        student.fit(t["all"].shuffle(2000, seed=seed).batch(64), epochs=30, verbose=0)
        float_bytes = optimize.to_tflite(student, int8=False)
        float_acc.append(optimize.evaluate_tflite(float_bytes, TEST))
        keras_acc.append(accuracy(student))

        qat = _qat_distill(student, t["all"], t["all_cache"])
        int8_bytes = optimize.to_tflite(qat)
        int8_acc.append(optimize.evaluate_tflite(int8_bytes, TEST))
        ratios.append(optimize.file_size(float_bytes) / optimize.file_size(int8_bytes))
    print(
        "\n(b) distilled student 64-256-256-10, 3-seed mean test accuracy: float Keras %.4f, float TFLite "
        "%.4f, QAT+KD int8 TFLite %.4f (per seed %s vs %s); file %d -> %d bytes (%.2fx smaller)"
        % (
            np.mean(keras_acc),
            np.mean(float_acc),
            np.mean(int8_acc),
            np.round(float_acc, 4),
            np.round(int8_acc, 4),
            optimize.file_size(float_bytes),
            optimize.file_size(int8_bytes),
            np.mean(ratios),
        )
    )
    # Within 1 percentage point of the float distilled student on the 3-seed
    # mean (5.4 test examples); per seed 2 points, since one seed's 540
    # examples move in steps of 0.19 points and QAT may land either side.
    assert np.mean(int8_acc) >= np.mean(float_acc) - 0.01
    assert min(np.subtract(int8_acc, float_acc)) >= -0.02
    # int8 weights take a quarter of float32's bytes; the flatbuffer's own
    # overhead (graph, quantization parameters) keeps the ratio under 4.
    assert min(ratios) >= 3.0


def test_keras3_student_to_tf_keras_qat_to_tflite(teachers):
    import keras

    float_acc, int8_acc = [], []
    for seed in SEEDS:
        t = teachers[seed]
        keras.utils.set_random_seed(seed)
        student = mlp(keras, [256, 256], "student")
        student.compile(keras.optimizers.Adam(1e-3), loss=kd_loss(), metrics=["accuracy"])
        student.fit(t["all"].shuffle(2000, seed=seed).batch(64), epochs=30, verbose=0)
        float_acc.append(accuracy(student))

        converted = optimize.to_tf_keras(student)
        np.testing.assert_allclose(
            converted.predict(X_TEST, verbose=0), student.predict(X_TEST, verbose=0), atol=1e-5
        )
        qat = _qat_distill(converted, t["all"], t["all_cache"])
        int8_acc.append(optimize.evaluate_tflite(optimize.to_tflite(qat), TEST))
    print(
        "\n(c) Keras 3 student -> to_tf_keras -> QAT+KD -> TFLite int8, 3-seed mean test accuracy: "
        "Keras 3 float %.4f, int8 TFLite %.4f (per seed %s vs %s)"
        % (np.mean(float_acc), np.mean(int8_acc), np.round(float_acc, 4), np.round(int8_acc, 4))
    )
    # Same tolerance as (b): the chain after `to_tf_keras` is the same.
    assert np.mean(int8_acc) >= np.mean(float_acc) - 0.01
