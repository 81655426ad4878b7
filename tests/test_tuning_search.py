"""Searching alpha = 1 (plain training), DKD and schedules with keras-tuner's own tuners.

References: Keras's own SparseCategoricalCrossentropy training from the same
initial weights (alpha = 1 is training from scratch), the NumPy DKD formula of
tests/reference.py, and schedule values computed by hand.
"""

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import tuning
from tests import reference as ref

N, FEATURES, CLASSES = 96, 8, 3


def _arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0).astype("int64")  # 3 classes, learnable
    return x, y


def _active(hp) -> dict:
    """The values of the hyperparameters whose conditions hold."""
    return {h.name: hp.values[h.name] for h in hp.space if hp.is_active(h) and h.name in hp.values}


def _teacher():
    keras.utils.set_random_seed(7)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES)])


def _distilled(x, y, teacher, batch=16):
    raw = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return keras_kd.with_teacher(raw, teacher, placement="pipeline").cache()


def _student(K, seed=3):
    K.utils.set_random_seed(seed)
    return K.Sequential([K.Input((FEATURES,)), K.layers.Dense(16, activation="relu"), K.layers.Dense(CLASSES)])


def test_alpha_one_trains_exactly_like_scratch(K):
    """alpha = 1 chosen by the search is plain training: the same weights as
    Keras's own cross-entropy from the same initial weights and batches."""
    x, y = _arrays()
    hp = keras_tuner.HyperParameters()
    kd = tuning.distillation_hyperparameters(hp, alpha=[0.5, 1.0], temperature=[2.0, 4.0], learning_rate=1e-2)
    hp.values["kd_alpha"] = 1.0
    kd = tuning.distillation_hyperparameters(hp, alpha=[0.5, 1.0], temperature=[2.0, 4.0], learning_rate=1e-2)
    assert kd.plain_training and kd.loss.alpha == 1.0
    assert "kd_temperature" not in _active(hp)  # conditioned on alpha < 1
    ours = _student(K)
    ours.compile(kd.optimizer(K.__name__), loss=kd.loss)
    ours.fit(_distilled(x, y, _teacher()), epochs=3, verbose=0)
    scratch = _student(K)
    scratch.compile(K.optimizers.Adam(1e-2), loss=K.losses.SparseCategoricalCrossentropy(from_logits=True))
    scratch.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=3, verbose=0)
    for a, b in zip(ours.get_weights(), scratch.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _grid_build(trial_values):
    def build(hp):
        kd = keras_kd.distillation_hyperparameters(
            hp, alpha=[0.5, 1.0], temperature=[2.0, 4.0], divergence=["kl", "dkd"], learning_rate=1e-2)
        student = _student(keras)
        student.compile(kd.optimizer(), loss=kd.loss, metrics=["accuracy"])
        trial_values.append((_active(hp), kd.plain_training))
        return student

    return build


def test_grid_search_tries_plain_training_once_and_its_best_is_no_worse(tmp_path):
    """keras-tuner's own GridSearch: 2 temperatures x 2 divergences at alpha=0.5,
    plus plain training once (not once per temperature); the best trial's
    validation accuracy is >= the scratch trial's, which equals Keras's own
    scratch training from the same initial weights."""
    x, y = _arrays()
    train, val = _distilled(x[:64], y[:64], _teacher()), _distilled(x[64:], y[64:], _teacher())
    seen = []
    tuner = keras_tuner.GridSearch(_grid_build(seen), objective="val_accuracy", max_trials=20,
                                   directory=str(tmp_path), project_name="grid")
    # 2 epochs: the scratch trial's score is still the best of several epochs (the figure
    # SaveBestEpoch keeps), compared with Keras's own history below.
    tuner.search(train, validation_data=val, epochs=2, verbose=0)
    trials = list(tuner.oracle.trials.values())
    values = [_active(t.hyperparameters) for t in trials]
    assert len(trials) == 5
    plain = [t for t, v in zip(trials, values) if v["kd_alpha"] == 1.0]
    assert len(plain) == 1 and set(values[trials.index(plain[0])]) == {"kd_alpha", "learning_rate"}
    assert {(v["kd_temperature"], v["kd_divergence"]) for v in values if v["kd_alpha"] == 0.5} == {
        (2.0, "kl"), (4.0, "kl"), (2.0, "dkd"), (4.0, "dkd")}
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.score >= plain[0].score
    # The scratch trial is Keras's own scratch training (same init, batches, optimizer).
    scratch = _student(keras)
    scratch.compile(keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    history = scratch.fit(tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(16), epochs=2, verbose=0,
                          validation_data=tf.data.Dataset.from_tensor_slices((x[64:], y[64:])).batch(16))
    assert plain[0].score == pytest.approx(max(history.history["val_accuracy"]))


def test_dkd_and_its_weight_are_searched():
    """divergence="dkd" with a searched non-target weight: the loss is
    alpha * CE + (1 - alpha) * DKD (NumPy formula from Zhao et al. 2022)."""
    hp = keras_tuner.HyperParameters()
    hp.values.update({"kd_divergence": "dkd", "kd_dkd_non_target_weight": 2.0})
    kd = tuning.distillation_hyperparameters(hp, temperature=3.0, alpha=0.25, divergence=["kl", "dkd"],
                                             dkd_non_target_weight=[2.0, 8.0])
    assert hp.values["kd_dkd_non_target_weight"] == 2.0
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(5, 4)).astype("float32"), rng.normal(size=(5, 4)).astype("float32")
    y = np.array([0, 1, 2, 3, 1])
    targets = keras_kd.TeacherTargets(labels=tf.constant(y), logits=tf.constant(t))
    want = np.mean(0.25 * ref.sparse_ce(y, s) + 0.75 * ref.decoupled_kd(y, s, t, 3.0, 1.0, 2.0))
    np.testing.assert_allclose(float(kd.loss(targets, tf.constant(s))), want, rtol=1e-5)
    # With "kl" chosen the DKD weight is inactive.
    hp = keras_tuner.HyperParameters()
    tuning.distillation_hyperparameters(hp, divergence=["kl", "dkd"], dkd_non_target_weight=[2.0, 8.0])
    assert "kd_dkd_non_target_weight" not in _active(hp)


@pytest.mark.parametrize("kind, temperatures, alphas", [
    # linear from (T=4, alpha=0.5) to (T=1, alpha=0.0) over 3 epochs, then held
    ("linear", [4.0, 2.5, 1.0, 1.0], [0.5, 0.25, 0.0, 0.0]),
    # half-cosine: end + (start - end) * (1 + cos(pi * e / 2)) / 2 at e = 0, 1, 2
    ("cosine", [4.0, 2.5, 1.0, 1.0], [0.5, 0.25, 0.0, 0.0]),
])
def test_hypermodel_searches_a_schedule(K, kind, temperatures, alphas, tmp_path):
    """The tf_keras-capable tuner searches the schedule end to end: with seed 0
    its two trials are "constant" (no scheduler: no schedule values logged) and
    `kind`, whose four epochs log the schedule's values, computed by hand above.
    (One search: each trial is DistillationHyperModel.build then .fit, what a
    direct call would run, in its own session.)"""
    x, y = _arrays()

    class Logged(keras_kd.Callback):
        fits = []  # one list of (temperature, alpha) per fit; keras-tuner deep-copies the callback

        def on_train_begin(self, logs=None):
            type(self).fits.append([])

        def on_epoch_end(self, epoch, logs=None):
            type(self).fits[-1].append((logs.get("kd_temperature"), logs.get("kd_alpha")))

    hypermodel = tuning.DistillationHyperModel(
        lambda hp: _student(K), temperature=4.0, alpha=0.5, learning_rate=1e-2,
        schedule=["constant", kind], schedule_epochs=3, final_temperature=1.0, final_alpha=0.0,
    )
    tuner = tuning.RandomSearch(hypermodel, objective="loss", max_trials=2, seed=0,
                                directory=str(tmp_path), project_name="s")
    tuner.search(_distilled(x, y, _teacher()), epochs=4, verbose=0, callbacks=[Logged()])
    schedules = [t.hyperparameters.values["kd_schedule"] for t in tuner.oracle.trials.values()]
    assert sorted(schedules) == sorted(["constant", kind])
    assert len(Logged.fits) == len(schedules)  # one fit per trial, in trial order
    for schedule, got in zip(schedules, Logged.fits):
        if schedule == "constant":
            assert got == [(None, None)] * 4
        else:
            assert [t for t, _ in got] == pytest.approx(temperatures)
            assert [a for _, a in got] == pytest.approx(alphas)


def test_schedule_arguments():
    hp = keras_tuner.HyperParameters()
    pattern = r"cannot apply a schedule \(received schedule='linear'.*DistillationHyperModel"
    with pytest.raises(keras_tuner.errors.FatalValueError, match=pattern):
        tuning.distillation_hyperparameters(hp, schedule="linear", schedule_epochs=5)
    with pytest.raises(ValueError, match="Unknown schedule 'step'"):
        tuning.distillation_hyperparameters(hp, schedule=["constant", "step"])
    with pytest.raises(ValueError, match="schedule_epochs"):
        tuning.DistillationHyperModel(lambda hp: None, schedule="cosine")
    with pytest.raises(ValueError, match="Expected `schedule_epochs` to be None or a positive integer"):
        tuning.DistillationHyperModel(lambda hp: None, schedule="cosine", schedule_epochs=True)
    with pytest.raises(ValueError, match="final_alpha"):
        tuning.DistillationHyperModel(lambda hp: None, schedule="cosine", schedule_epochs=3, final_alpha=1.5)
    # Constant (the default) is accepted where a build function calls it.
    assert tuning.distillation_hyperparameters(hp, schedule="constant").scheduler is None


@pytest.mark.parametrize("objective", ["val_loss", "loss"])
def test_ranking_by_the_searched_loss_warns_once(objective, tmp_path):
    """keras-tuner's own GridSearch over alpha (incl. plain training) and divergence:
    the trials train on different losses, so ranking by a loss warns, once."""
    x, y = _arrays()
    hypermodel = tuning.DistillationHyperModel(
        lambda hp: _student(keras), temperature=2.0, alpha=[0.5, 1.0], divergence=["kl", "dkd"],
        learning_rate=1e-2,
    )
    tuner = keras_tuner.GridSearch(hypermodel, objective=keras_tuner.Objective(objective, "min"), max_trials=3,
                                   directory=str(tmp_path), project_name="w")
    data = _distilled(x, y, _teacher())
    with pytest.warns(UserWarning, match="not comparable.*val_accuracy") as record:
        tuner.search(data, validation_data=data, epochs=1, verbose=0)
    assert len(tuner.oracle.trials) == 3
    assert sum("not comparable" in str(w.message) for w in record) == 1


def test_ranking_by_accuracy_or_a_fixed_loss_does_not_warn(tmp_path):
    x, y = _arrays()
    data = _distilled(x, y, _teacher())
    searched = tuning.DistillationHyperModel(lambda hp: _student(keras), temperature=2.0, alpha=[0.5, 1.0],
                                             learning_rate=1e-2)
    fixed = tuning.DistillationHyperModel(lambda hp: _student(keras), temperature=2.0, alpha=0.5,
                                          learning_rate=[1e-2, 1e-3])  # same loss in every trial
    import warnings

    # One trial each: whether to warn depends on the hypermodel's ranges and the objective only,
    # the same at every trial's fit (test_ranking_by_the_searched_loss_warns_once: at the first).
    for hypermodel, objective in ((searched, "val_accuracy"), (fixed, "val_loss")):
        tuner = keras_tuner.GridSearch(hypermodel, objective=objective, max_trials=1,
                                       directory=str(tmp_path), project_name=objective)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            tuner.search(data, validation_data=data, epochs=1, verbose=0)
        assert not [w for w in record if "not comparable" in str(w.message)]
