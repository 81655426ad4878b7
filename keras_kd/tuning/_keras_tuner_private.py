"""Every read of keras-tuner internals by `keras_kd.tuning`, in one guarded place.

keras-tuner 1.4 offers no public way to run a tf_keras model or to recognise
its own per-trial callbacks, so the tuners in ``tuners.py`` rely on the names
below (tested with keras-tuner 1.4.8; the bounds are in setup.cfg). Each
accessor fails with the name and the installed version when keras-tuner
changes it, instead of misbehaving; ``tests/test_private_canaries.py`` checks
them all.

* ``keras_tuner.src.engine.tuner_utils``: ``SaveBestEpoch`` (its
  ``objective`` and ``filepath``), ``TunerCallback`` (its ``tuner`` and
  ``trial``), ``validate_trial_results``;
* ``keras_tuner.src.utils.save_json``;
* ``Tuner._build_hypermodel``, ``Tuner._get_build_config_fname`` (called) and
  ``Tuner._try_build``, ``Tuner._build_and_fit_model`` (overridden);
* ``MultiObjective.objectives`` (the objectives of a list objective).
"""

from __future__ import annotations

import keras_tuner

VERSION = getattr(keras_tuner, "__version__", "unknown")


class KerasTunerInternalsError(ImportError):
    """The installed keras-tuner lacks an internal name keras_kd.tuning relies on."""


def _missing(what: str, error: Exception = None) -> KerasTunerInternalsError:
    return KerasTunerInternalsError(
        f"keras_kd.tuning relies on keras-tuner's internal `{what}`, which keras-tuner {VERSION} does not "
        "have (keras_kd is tested with keras-tuner 1.4.8). Install `keras-tuner>=1.4.8,<1.5`."
        + (f" ({error})" if error else "")
    )


try:
    from keras_tuner.src import utils as _utils
    from keras_tuner.src.engine import tuner_utils as _tuner_utils
except ImportError as e:  # pragma: no cover - depends on the installed version
    raise _missing("keras_tuner.src.engine.tuner_utils / keras_tuner.src.utils", e) from e

for _name in ("SaveBestEpoch", "TunerCallback", "validate_trial_results"):
    if not hasattr(_tuner_utils, _name):  # pragma: no cover
        raise _missing(f"keras_tuner.src.engine.tuner_utils.{_name}")
for _name in ("_try_build", "_build_hypermodel", "_build_and_fit_model", "_get_build_config_fname"):
    if not hasattr(keras_tuner.Tuner, _name):  # pragma: no cover
        raise _missing(f"keras_tuner.Tuner.{_name}")
if not hasattr(_utils, "save_json"):  # pragma: no cover
    raise _missing("keras_tuner.src.utils.save_json")

SaveBestEpoch = _tuner_utils.SaveBestEpoch
TunerCallback = _tuner_utils.TunerCallback


def _attribute(obj, name: str, owner: str):
    try:
        return getattr(obj, name)
    except AttributeError as e:
        raise _missing(f"{owner}.{name}", e) from e


def save_best_epoch_settings(callback) -> tuple:
    """``(objective, filepath)`` of a keras-tuner ``SaveBestEpoch``."""
    return (_attribute(callback, "objective", "SaveBestEpoch"), _attribute(callback, "filepath", "SaveBestEpoch"))


def tuner_callback_settings(callback) -> tuple:
    """``(tuner, trial)`` of a keras-tuner ``TunerCallback``."""
    return (_attribute(callback, "tuner", "TunerCallback"), _attribute(callback, "trial", "TunerCallback"))


def objective_list(objective) -> list:
    """The single objectives of an objective (a ``MultiObjective`` holds several, as ``objectives``)."""
    objectives = getattr(objective, "objectives", None)
    return list(objectives) if objectives is not None else [objective]


def build_hypermodel(tuner, hp):
    """``Tuner._build_hypermodel``: builds under the tuner's strategy and applies its compile overrides."""
    return tuner._build_hypermodel(hp)


def save_build_config(tuner, trial_id, model):
    """What ``Tuner._build_and_fit_model`` does after ``fit``: saves the model's build config."""
    _utils.save_json(tuner._get_build_config_fname(trial_id), model.get_build_config())


def validate_trial_results(results, objective, func_name: str):
    """keras-tuner's check of what ``HyperModel.fit`` returned."""
    _tuner_utils.validate_trial_results(results, objective, func_name)
