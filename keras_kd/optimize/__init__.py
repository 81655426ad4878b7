"""Distill, then prune and quantize: tfmot chains down to a TFLite int8 model.

Distillation is a loss and a dataset (`keras_kd.DistillationLoss`,
`keras_kd.with_teacher`, `keras_kd.cache_teacher_logits`), so it composes
with tensorflow-model-optimization (tfmot) the way any loss does: tfmot wraps
the student, the user compiles the wrapped model with `DistillationLoss` and
fits it on the teacher's targets. This module holds the thin glue around that:

* **Bridge.** tfmot 0.8 wraps only tf_keras (Keras 2) models. `to_tf_keras`
  rebuilds a Keras 3 Functional or Sequential student of built-in layers as a
  tf_keras model with the same weights (outputs equal to float32 rounding),
  and says which layers cannot come over; `to_keras3` brings a trained float
  tf_keras student back.
* **Pruning.** `prune_for_distillation` wraps a copy of the student with
  ``prune_low_magnitude`` and a ``PolynomialDecay`` schedule and returns it
  with the callbacks ``fit`` needs (``UpdatePruningStep``); `strip` removes
  the wrappers for deployment and `sparsity` reports what was achieved.
* **Quantization-aware training.** `quantize_for_distillation` gives the QAT
  model: whole-model ``quantize_model``, partial quantization of chosen
  layers (``quantize_annotate_layer`` + ``quantize_apply``), or
  prune-preserving QAT (PQAT, ``Default8BitPrunePreserveQuantizeScheme``).
* **Deployment.** `to_tflite` converts (int8 weights and activations for QAT
  models; post-training full-integer quantization with calibration data for
  float models), `evaluate_tflite` measures accuracy with the LiteRT
  interpreter, `file_size` measures the artefacts.

Where things live: ``bridge.py`` (the Keras 3 <-> tf_keras converter and its
per-layer-class translator table), ``pruning.py``, ``qat.py``, ``tflite.py``
(conversion, file sizes), ``evaluate.py`` (LiteRT accuracy), ``_common.py``
(tfmot's wrappers and registries, layer walks, class counts). tfmot is
imported on first use, not by ``import keras_kd.optimize``.

What composes with distillation (each row is exercised in
``tests/test_optimize.py`` or ``integration/test_digits_optimize.py``):

* prune + `DistillationLoss` (online `with_teacher` or cached teacher) with
  `HardSampleReweighting`: works; ``UpdatePruningStep`` sits beside keras_kd's
  callbacks in one ``callbacks`` list.
* QAT (whole model, or chosen layers) + `DistillationLoss`: works; the
  teacher's logits stay float32, only the student is fake-quantized.
* prune -> `strip` -> PQAT + `DistillationLoss` -> TFLite int8: works; the
  zeros survive QAT and conversion.
* Keras 3 student -> `to_tf_keras` -> any of the above: works for built-in
  layers; a float result comes back with `to_keras3`.
* pruned or QAT model -> `to_keras3`: no. tfmot's wrappers exist only in
  tf_keras: `strip` a pruned model first; deploy a QAT model with
  `to_tflite`.
* Alignment (`keras_kd.alignment.align`), either order:

  - align, train, ``aligned.export()``, then prune or quantize the clean
    student and train it with `DistillationLoss` (logit distillation);
  - or wrap first and align the wrapped model (tap the wrapped layer names,
    ``prune_low_magnitude_<name>`` or ``quant_<name>``): ``aligned.model``
    shares the wrappers, so feature targets train the pruned or
    quantization-aware student (pass the pruning callbacks to its ``fit``).
    Deploy the wrapped model itself (`strip` / `to_tflite`):
    ``aligned.export()`` rebuilds the student from its config and cannot
    rebuild tfmot wrappers.

Example:

```python
from keras_kd import optimize

student = optimize.to_tf_keras(keras3_student)       # tfmot needs tf_keras
pruned, callbacks = optimize.prune_for_distillation(
    student, target_sparsity=0.75, end_step=steps_per_epoch * 20, teacher=cache)
pruned.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
pruned.fit(train, epochs=25, callbacks=callbacks)
sparse = optimize.strip(pruned)
qat = optimize.quantize_for_distillation(sparse, preserve_sparsity=True)
qat.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
qat.fit(train, epochs=5)
tflite = optimize.to_tflite(qat, path="student_int8.tflite")
print(optimize.evaluate_tflite(tflite, test_ds), optimize.file_size(tflite))
```
"""

from keras_kd.optimize._common import check_num_classes
from keras_kd.optimize.bridge import to_keras3
from keras_kd.optimize.bridge import to_tf_keras
from keras_kd.optimize.evaluate import evaluate_tflite
from keras_kd.optimize.pruning import Pruning
from keras_kd.optimize.pruning import prune_for_distillation
from keras_kd.optimize.pruning import sparsity
from keras_kd.optimize.pruning import strip
from keras_kd.optimize.qat import quantize_for_distillation
from keras_kd.optimize.tflite import TFLiteConversionError
from keras_kd.optimize.tflite import file_size
from keras_kd.optimize.tflite import to_tflite

__all__ = [
    "Pruning",
    "TFLiteConversionError",
    "check_num_classes",
    "evaluate_tflite",
    "file_size",
    "prune_for_distillation",
    "quantize_for_distillation",
    "sparsity",
    "strip",
    "to_keras3",
    "to_tf_keras",
    "to_tflite",
]
