"""keras_kd.tuning on Keras 3 + JAX: keras-tuner searches the distillation loss.

The targets carry precomputed teacher logits (as the teacher-logit cache
provides them), and the learning rate is 1e-12, so each trial's student keeps
its initial logits and every epoch's loss is the NumPy formula of
`tests/reference.py` for that trial's (and that epoch's) temperature, alpha and
divergence: a trial that saw another trial's state, or a schedule the step did
not see, would not match.
"""

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import tuning
from tests import reference as ref

pytestmark = pytest.mark.backend("jax")

N, BATCH, FEATURES, CLASSES = 24, 8, 5, 3
LR = 1e-12  # > 0 as the search requires; the weights do not move


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, N).astype("int64")
    t = (2.0 * rng.normal(size=(N, CLASSES))).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, keras_kd.TeacherTargets(labels=y, logits=t)))
    return x, y, t, ds.batch(BATCH)


def _student(hp=None):
    keras.utils.set_random_seed(5)  # every trial starts from the same weights
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES)])


def _initial_logits(x):
    return _student().predict(x, verbose=0)


def _reference(y, s, t, T, alpha, divergence):
    hard = ref.sparse_ce(y, s)
    if alpha == 1.0:
        return hard.mean()
    if divergence == "dkd":
        soft = ref.decoupled_kd(y, s, t, T)
    else:
        soft = T * T * ref.divergence(divergence, t / T, s / T)
    return (alpha * hard + (1 - alpha) * soft).mean()


@pytest.mark.parametrize(
    "values",
    [
        {"kd_alpha": 0.3, "kd_temperature": 2.0, "kd_divergence": "kl"},
        {"kd_alpha": 0.3, "kd_temperature": 4.0, "kd_divergence": "dkd"},
        {"kd_alpha": 1.0},  # plain training: the hard-label loss alone
    ],
)
def test_the_built_student_computes_the_chosen_loss(values):
    x, y, t, ds = _data()
    hypermodel = tuning.DistillationHyperModel(
        _student, temperature=[2.0, 4.0], alpha=[0.3, 1.0], divergence=["kl", "dkd"], learning_rate=LR,
        metrics=[],
    )
    hp = keras_tuner.HyperParameters()
    hp.values.update(values)
    model = hypermodel.build(hp)
    got = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    want = _reference(y, _initial_logits(x), t, values.get("kd_temperature"), values["kd_alpha"],
                      values.get("kd_divergence"))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_grid_search_runs_every_trial_on_its_own_loss_and_schedule(tmp_path):
    x, y, t, ds = _data()
    s = _initial_logits(x)
    epochs = 3

    class Record(keras_kd.Callback):
        trials = []  # one list of (logs) per fit; keras-tuner deep-copies the callback per trial

        def on_train_begin(self, logs=None):
            type(self).trials.append((self.model.loss, []))

        def on_epoch_end(self, epoch, logs=None):
            type(self).trials[-1][1].append(dict(logs))

    hypermodel = tuning.DistillationHyperModel(
        _student, temperature=4.0, alpha=[0.5, 1.0], divergence=["kl", "dkd"], learning_rate=LR, metrics=[],
        schedule=["constant", "linear"], schedule_epochs=epochs, final_temperature=1.0, final_alpha=0.0,
    )
    tuner = keras_tuner.GridSearch(hypermodel, objective="loss", directory=str(tmp_path), project_name="g")
    # Ranking by the loss warns; fine here, where every trial's values are checked one by one.
    with pytest.warns(UserWarning, match="ranks trials by 'loss'"):
        tuner.search(ds, epochs=epochs, verbose=0, callbacks=[Record()])

    trials = list(tuner.oracle.trials.values())
    combos = {tuple(sorted(tr.hyperparameters.values.items())) for tr in trials}
    assert len(trials) == len(combos) == 5  # plain training once + 2 divergences x 2 schedules
    assert len(Record.trials) == 5
    for (loss, epoch_logs), trial in zip(Record.trials, trials):
        hp = trial.hyperparameters.values
        alpha = hp["kd_alpha"]
        linear = hp.get("kd_schedule") == "linear" and alpha != 1.0
        for epoch, logs in enumerate(epoch_logs):
            T = 4.0 - 1.5 * epoch if linear else 4.0  # linear from 4 to 1 over 3 epochs
            a = (alpha - 0.25 * epoch) if linear else alpha  # linear from 0.5 to 0
            want = _reference(y, s, t, T, a, hp.get("kd_divergence"))
            np.testing.assert_allclose(logs["loss"], want, rtol=1e-5, err_msg=f"{hp} epoch {epoch}")
        best = trial.metrics.get_best_value("loss")
        assert best == pytest.approx(min(logs["loss"] for logs in epoch_logs), rel=1e-6)
