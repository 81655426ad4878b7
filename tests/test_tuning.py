"""keras-tuner integration: hyperparameters, the hypermodel, tuners for both flavours."""

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import tuning
from keras_kd.tuning.hyperparameters import _distillation_choices


def test_hyperparameters_declare_and_build_objects():
    hp = keras_tuner.HyperParameters()
    # What DistillationHyperModel declares (the public function refuses a reweighting).
    choices = _distillation_choices(
        hp,
        temperature=(1.0, 8.0),
        alpha=[0.1, 0.5],
        divergence=["kl", "js"],
        learning_rate=1e-3,
        reweighting_signal=["none", "kl"],
        alignment_weight=(0.0, 2.0),
    )
    assert set(hp.values) >= {"kd_temperature", "kd_alpha", "kd_divergence", "learning_rate", "kd_reweighting",
                              "kd_alignment_weight"}
    assert hp.values["kd_temperature"] == 1.0  # a Float's default is its minimum
    assert isinstance(choices.loss, keras_kd.DistillationLoss)
    assert choices.loss.temperature == hp.values["kd_temperature"]
    assert choices.loss.alpha == pytest.approx(hp.values["kd_alpha"]) == 0.1
    assert choices.loss.divergence == "kl"
    assert choices.learning_rate == 1e-3
    assert choices.reweighting is None  # "none" is the first choice
    assert choices.alignment_weight == 0.0
    assert float(choices.optimizer("tf_keras").learning_rate.numpy()) == pytest.approx(1e-3)


def test_hyperparameters_follow_hp_values():
    hp = keras_tuner.HyperParameters()
    hp.Fixed("kd_temperature", 3.0)
    hp.Fixed("kd_reweighting", "wsld")
    choices = _distillation_choices(hp, reweighting_signal=["none", "wsld"])
    assert choices.loss.temperature == 3.0
    assert isinstance(choices.reweighting, keras_kd.HardSampleReweighting)
    assert choices.reweighting.signal == "wsld"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": (0.0, 4.0)}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": (4.0, 1.0)}, "low < high"),
        ({"alpha": (0.0, 1.5)}, "alpha"),
        ({"alpha": [-0.1, 0.5]}, "alpha"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"divergence": "kld"}, "divergence"),
        ({"reweighting_signal": "loss"}, "reweighting_signal"),
        ({"alignment_weight": (-1.0, 1.0)}, "alignment_weight"),
        ({"alpha": []}, "non-empty"),
    ],
)
def test_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), **kwargs)
    with pytest.raises(ValueError, match=match):
        tuning.DistillationHyperModel(lambda hp: None, **kwargs)


def _data(K):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=64)
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    train = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), teacher, placement="pipeline")
    return train.cache()


@pytest.mark.parametrize("tuner_class", [tuning.RandomSearch, tuning.BayesianOptimization, tuning.Hyperband])
def test_tuners_accept_both_flavours(K, tuner_class, tmp_path):
    train = _data(K)

    def build_student(hp):
        return K.Sequential([K.Input((8,)), K.layers.Dense(hp.Int("units", 4, 8, step=4), activation="relu"),
                             K.layers.Dense(3)])

    hypermodel = tuning.DistillationHyperModel(build_student, temperature=(1.0, 4.0), alpha=(0.0, 0.5))
    # Hyperband(max_epochs=2, factor=2), the smallest with two rounds: its first bracket trains 2
    # trials for 1 epoch, then resumes the better one's checkpoint for a second epoch. Its second
    # bracket (2 fresh trials of 2 epochs) takes the path the first round took; the oracle stops
    # after the first bracket's 3 trials.
    # BayesianOptimization draws its first max(3 * dimensions, 3) trials at random, so a second
    # trial would take the first one's path again; choosing the best of two trials is
    # RandomSearch's and Hyperband's case (the same Tuner code picks and reloads it).
    size = {"max_epochs": 2, "factor": 2} if tuner_class is tuning.Hyperband else {"max_trials": 2}
    if tuner_class is tuning.BayesianOptimization:
        size = {"max_trials": 1}
    tuner = tuner_class(hypermodel, objective="val_accuracy", directory=str(tmp_path), project_name="p", **size)
    if tuner_class is tuning.Hyperband:
        tuner.oracle.max_trials = 3
    tuner.search(train, validation_data=train, epochs=2, verbose=0)
    best = tuner.get_best_models(1)[0]
    assert keras_kd._compat.flavour_of(best) == keras_kd._compat.flavour_of(build_student(keras_tuner.HyperParameters()))
    trial = tuner.oracle.get_best_trials(1)[0]
    assert 0.0 <= trial.score <= 1.0
    if tuner_class is tuning.Hyperband:
        # Later Hyperband rounds resume from an earlier trial's checkpoint.
        assert len(tuner.oracle.trials) == 3
        assert any("tuner/trial_id" in t.hyperparameters.values for t in tuner.oracle.trials.values())
    # The best model reloaded from its checkpoint reproduces the trial's validation accuracy.
    acc = best.evaluate(train, verbose=0, return_dict=True)["accuracy"]
    assert acc == pytest.approx(trial.score, abs=1e-6)


def test_early_stopping_on_teacher_agreement(K, tmp_path):
    train = _data(K)
    stop = K.callbacks.EarlyStopping(monitor="val_teacher_agreement", mode="max", patience=0, min_delta=10.0)
    hypermodel = tuning.DistillationHyperModel(lambda hp: K.Sequential([K.Input((8,)), K.layers.Dense(3)]))
    tuner = tuning.RandomSearch(hypermodel, objective="val_accuracy", max_trials=1, directory=str(tmp_path))
    epochs = []

    class Count(keras_kd._compat.callback_base()):
        def on_epoch_end(self, epoch, logs=None):
            epochs.append(epoch)

    tuner.search(train, validation_data=train, epochs=10, verbose=0, callbacks=[stop, Count()])
    assert len(epochs) == 2  # stopped after patience, not 10 epochs


def test_build_that_returns_no_model_is_a_clear_error(tmp_path):
    hypermodel = tuning.DistillationHyperModel(lambda hp: "not a model")
    # keras-tuner builds the hypermodel once when the tuner is created.
    with pytest.raises(keras_tuner.errors.FatalTypeError, match="Keras 3 or tf_keras Model. Received: 'not a model'"):
        tuning.RandomSearch(hypermodel, objective="val_accuracy", max_trials=1, directory=str(tmp_path))


def test_keras3_callback_with_tf_keras_student_is_a_clear_error(tmp_path):
    import tf_keras

    train = _data(tf_keras)
    hypermodel = tuning.DistillationHyperModel(lambda hp: tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(3)]))
    tuner = tuning.RandomSearch(hypermodel, objective="val_accuracy", max_trials=1, directory=str(tmp_path))
    with pytest.raises(keras_tuner.errors.FatalValueError, match="Keras 3 callback"):
        tuner.search(train, validation_data=train, epochs=1, verbose=0,
                     callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss")])


def test_tflite_objective_requires_data(tmp_path):
    hypermodel = tuning.DistillationHyperModel(lambda hp: keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="tflite_data"):
        tuning.RandomSearch(hypermodel, objective=keras_tuner.Objective("tflite_int8_accuracy", "max"),
                            max_trials=1, directory=str(tmp_path))


@pytest.mark.parametrize("signal", ["kl", ["none", "teacher_wrong"], ("wsld",)])
def test_reweighting_in_distillation_hyperparameters_is_refused_at_the_call(signal):
    # A build function cannot give the callback to `fit`: refused at the call, whoever runs it.
    pattern = r"cannot apply a reweighting \(received reweighting_signal=.*DistillationHyperModel"
    with pytest.raises(keras_tuner.errors.FatalValueError, match=pattern):
        tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), reweighting_signal=signal)
    for extra in ({"reweighting_strength": (0.5, 2.0)}, {"reweighting_warmup_epochs": 2}):
        pattern = rf"{next(iter(extra))}=.*DistillationHyperModel"
        with pytest.raises(keras_tuner.errors.FatalValueError, match=pattern):
            tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), **extra)  # would be dropped
    with pytest.raises(ValueError, match=r"Unknown reweighting_signal 'loss'"):
        tuning.distillation_hyperparameters(keras_tuner.HyperParameters(),
                                            reweighting_signal=["none", "loss"])
    # No reweighting at all stays accepted.
    for off in (None, "none", ["none"]):
        choices = tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), reweighting_signal=off)
        assert choices.reweighting is None


@pytest.mark.parametrize("tuner_class", [keras_tuner.RandomSearch, tuning.RandomSearch])
def test_reweighting_in_a_plain_build_function_fails_keras_tuners_own_search(tuner_class, tmp_path):
    train = _data(keras)

    def build(hp):
        kd = keras_kd.distillation_hyperparameters(hp, reweighting_signal=["none", "kl"])
        student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        student.compile(kd.optimizer(), loss=kd.loss)
        return student

    fits = []

    class Count(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fits.append(1)

    # keras-tuner builds once when the tuner is created, then once per trial:
    # the Fatal error stops either (it is not counted as a failed trial).
    pattern = r"reweighting_signal=\['none', 'kl'\].*DistillationHyperModel"
    with pytest.raises(keras_tuner.errors.FatalValueError, match=pattern):
        tuner = tuner_class(build, objective="val_loss", max_trials=2, directory=str(tmp_path))
        tuner.search(train, validation_data=train, epochs=1, verbose=0, callbacks=[Count()])
    assert fits == []  # nothing trained without the chosen reweighting


def test_distillation_hypermodel_applies_the_reweighting_under_keras_tuners_own_search(tmp_path):
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    y = np.random.default_rng(2).integers(0, 3, size=64)
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    cache = keras_kd.cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    train = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache).batch(16)
    hypermodel = tuning.DistillationHyperModel(
        lambda hp: keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]),
        reweighting_signal="teacher_wrong",
        reweighting_num_examples=64,
    )
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            observers = getattr(self.model.loss, "_observers", [])
            seen.append([type(getattr(o, "__self__", o)).__name__ for o in observers])

    tuner = keras_tuner.RandomSearch(hypermodel, objective="loss", max_trials=1,
                                     directory=str(tmp_path / "t"))
    tuner.search(train, epochs=1, verbose=0, callbacks=[Spy()])
    assert seen == [["HardSampleReweighting"]]  # the chosen reweighting took part in training


def test_distillation_hypermodel_reweighting_on_batched_data_names_the_argument(tmp_path):
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    cache = keras_kd.cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    train = tf.data.Dataset.from_tensor_slices((x, np.zeros(64, "int64"))).apply(cache).batch(16)
    hypermodel = tuning.DistillationHyperModel(
        lambda hp: keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]), reweighting_signal="kl"
    )
    tuner = keras_tuner.RandomSearch(hypermodel, objective="loss", max_trials=2,
                                     directory=str(tmp_path / "t"))
    with pytest.raises(keras_tuner.errors.FatalValueError, match=r"reweighting_num_examples=N"):
        tuner.search(train, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"reweighting_num_examples=0"):
        tuning.DistillationHyperModel(lambda hp: None, reweighting_signal="kl", reweighting_num_examples=0)


def test_plain_import_does_not_import_keras_tuner_or_tfmot():
    """`import keras_kd` leaves keras-tuner and tfmot alone; `keras_kd.tuning`,
    `keras_kd.optimize` and the top-level tuning names import them on first use."""
    import subprocess
    import sys

    code = "\n".join([
        "import sys",
        "import keras_kd",
        "heavy = ('keras_tuner', 'tensorflow_model_optimization')",
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))",
        "assert 'tuning' in dir(keras_kd) and 'optimize' in dir(keras_kd)",
        "print(keras_kd.DistillationHyperModel.__module__, keras_kd.distillation_hyperparameters.__module__)",
        "print('keras_tuner' in sys.modules, keras_kd.tuning.RandomSearch.__name__)",
        "print(keras_kd.optimize.to_tflite.__name__)",
        "from keras_kd import tuning, optimize",
        "print(tuning is keras_kd.tuning, optimize is keras_kd.optimize)",
        "try:",
        "    keras_kd.no_such_name",
        "except AttributeError as e:",
        "    print('AttributeError', e)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(__import__("os").environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"  # nothing of keras-tuner or tfmot after a plain import
    assert lines[1] == "keras_kd.tuning.hypermodel keras_kd.tuning.hyperparameters"
    assert lines[2] == "True RandomSearch"
    assert lines[3] == "to_tflite"
    assert lines[4] == "True True"
    assert lines[5] == "AttributeError module 'keras_kd' has no attribute 'no_such_name'"
