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
(b), (c): QAT chains, in `test_digits_optimize_qat.py` (a file of their own, so
    that the two test workers run them side by side).

Run: ``.venv/bin/python -m pytest integration/test_digits_optimize.py -s -q``
(``-s`` prints the table the README quotes).
"""

import numpy as np
import pytest
import tf_keras

from keras_kd import optimize
from integration.digits_optimize import SEEDS, TEST, accuracy, kd_loss, mlp, qat_distill
from integration.digits_optimize import tflite_weight_sparsity
from integration.digits_optimize import train_teachers

pytestmark = pytest.mark.integration

# The students' 150 epochs of 4 batches run as 15 fit-epochs over the shuffled batches repeated 10
# times: the same 600 steps (the pruning schedule counts steps), each repetition reshuffled as a new
# epoch would be, one call per 40-step epoch. UpdatePruningStep re-masks at every 10th epoch's end
# instead of every one; the last, before `strip`, is the same.
REPEAT = 10


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return train_teachers(tmp_path_factory)


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
            pruned.compile(
                tf_keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"], steps_per_execution=4 * REPEAT
            )
            pruned.fit(data.shuffle(n, seed=seed).batch(batch).repeat(REPEAT), epochs=epochs // REPEAT,
                       callbacks=callbacks, verbose=0)
            stripped = optimize.strip(pruned)
            results[arm].append(accuracy(stripped))
            report = optimize.sparsity(stripped)
            sparsities.append(min(report.values()))
            # Sparsity of the stripped model, counted straight from its kernels.
            for layer in stripped.layers[1:]:
                assert np.mean(layer.kernel.numpy() == 0) >= 0.74, (arm, seed, layer.name)
            if arm == "distilled":
                # Prune-preserving QAT with the same distillation loss, then int8.
                pqat = qat_distill(stripped, t["few"], t["few_cache"], preserve_sparsity=True, epochs=10)
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
    # Measured here: ~0.947 vs ~0.918 (distillation ahead on every seed). The
    # issue's claim is "at least as accurate", asserted on the 3-seed mean.
    assert distilled >= plain
    assert min(sparsities) >= 0.74
