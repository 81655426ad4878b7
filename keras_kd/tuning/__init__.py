"""keras-tuner searches over distillation, for Keras 3 and tf_keras students.

* `distillation_hyperparameters(hp, ...)` (``hyperparameters.py``) declares
  temperature, alpha, divergence, alignment weight and learning rate on a
  ``HyperParameters`` object and returns ready-to-use keras_kd objects; your
  own build function calls it. It refuses a reweighting, which a build
  function cannot apply.
* `DistillationHyperModel(build_student, ...)` (``hypermodel.py``): a
  ``keras_tuner.HyperModel`` that compiles your student with those choices and
  also searches the reweighting signal and strength: in ``fit`` it attaches
  the reweighting callback.
* `RandomSearch`, `BayesianOptimization`, `Hyperband` (``tuners.py``):
  keras-tuner's own tuners, made to accept tf_keras models too (keras-tuner
  1.4 refuses them, so quantization-aware students could not be tuned).
  Optional post-training objectives: the int8 TFLite accuracy and a
  size/accuracy trade-off. The keras-tuner internals they need are read in
  ``_keras_tuner_private.py`` only.

Teacher targets should come from the cache (`cache_teacher_logits`) so a
search of N trials runs the teacher over the data once.
"""

from keras_kd.tuning.hypermodel import DistillationHyperModel
from keras_kd.tuning.hyperparameters import SCHEDULES
from keras_kd.tuning.hyperparameters import DistillationChoices
from keras_kd.tuning.hyperparameters import Range
from keras_kd.tuning.hyperparameters import distillation_hyperparameters
from keras_kd.tuning.tuners import OBJECTIVE_DIRECTIONS
from keras_kd.tuning.tuners import SIZE_ACCURACY
from keras_kd.tuning.tuners import TFLITE_INT8_ACCURACY
from keras_kd.tuning.tuners import TFLITE_SIZE_KIB
from keras_kd.tuning.tuners import BayesianOptimization
from keras_kd.tuning.tuners import Hyperband
from keras_kd.tuning.tuners import RandomSearch

__all__ = [
    "BayesianOptimization",
    "DistillationChoices",
    "DistillationHyperModel",
    "Hyperband",
    "OBJECTIVE_DIRECTIONS",
    "RandomSearch",
    "Range",
    "SCHEDULES",
    "SIZE_ACCURACY",
    "TFLITE_INT8_ACCURACY",
    "TFLITE_SIZE_KIB",
    "distillation_hyperparameters",
]
