"""Prints the README table of bad inputs: each one tried, and what the user sees.

Run: .venv/bin/python benchmarks/bad_inputs.py (not a benchmark: a reproducible record of the error messages).
"""
import os, warnings, tempfile
os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"
import numpy as np, tensorflow as tf, keras, keras_tuner
import keras_kd
from keras_kd import optimize, tuning, TeacherTargets
rows = []
def case(name, fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            result = fn(); msg = result if isinstance(result, str) else "(no error)"
            ours = [x for x in w if any(k in str(x.message) for k in ("keras_kd", "DistillationLoss", "teacher"))]
            if not ours and not isinstance(result, str): ours = w
            if ours: msg = f"warning: {ours[-1].category.__name__}: {str(ours[-1].message)}"
        except Exception as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            ours = [l[l.index("keras_kd"):] for l in lines if "keras_kd:" in l or "keras_kd.with_teacher:" in l]
            ours = [o.rstrip("]").rstrip() for o in ours]
            text = ours[0] if ours else " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
            # Errors raised inside a tf.data function: the message, not the traceback.
            raised = [l.split(": ", 1)[1] for l in lines if l.split(": ", 1)[0].endswith("Error") and ": " in l]
            if "assertion failed: [" in str(e):
                text = str(e).split("assertion failed: [", 1)[1].split("]", 1)[0]
            elif "in user code" in str(e) and raised:
                text = raised[-1]
            msg = f"{type(e).__name__}: {text}"
    msg = msg.replace("|", "\\|")
    rows.append((name, msg[:230]))
x = np.random.rand(64, 8).astype("float32"); y = np.random.randint(0, 4, 64)
def mlp(c=4): return keras.Sequential([keras.Input((8,)), keras.layers.Dense(c)])
t4, t5 = mlp(4), mlp(5)
ds = tf.data.Dataset.from_tensor_slices((x, y))
case("`DistillationLoss(temperature=0)`", lambda: keras_kd.DistillationLoss(temperature=0))
case("`DistillationLoss(alpha=1.5)`", lambda: keras_kd.DistillationLoss(alpha=1.5))
case("`DistillationLoss(divergence='kld')`", lambda: keras_kd.DistillationLoss(divergence="kld"))
def fit(teacher, data, student=None):
    s = student or mlp(4); s.compile("sgd", keras_kd.DistillationLoss()); s.fit(data, verbose=0)
case("teacher with 5 classes, student with 4", lambda: fit(t5, keras_kd.with_teacher(ds.batch(16), t5)))
case("NaN in teacher logits", lambda: fit(None, ds.batch(16).map(lambda a, b: (a, TeacherTargets(labels=b, logits=tf.fill([tf.shape(a)[0], 4], np.nan))))))
case("labels out of range (label 7, 4 classes)", lambda: fit(t4, keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y + 7)).batch(16), t4)))
def xla_fit(data, student=None, **kw):
    s = student or mlp(4); s.compile("sgd", keras_kd.DistillationLoss(**kw), jit_compile=True)
    return f"(XLA drops assertions) training loss {s.fit(data, verbose=0).history['loss'][0]}: training visibly fails"
def nan_teacher(c=4):
    m = mlp(c); m.layers[-1].kernel.assign(np.full((8, c), np.nan, "float32")); return m
case("NaN teacher, `jit_compile=True`, `placement='step'`", lambda: xla_fit(keras_kd.with_teacher(ds.batch(16), nan_teacher(), placement="step")))
case("NaN teacher, `jit_compile=True`, `placement='pipeline'`", lambda: xla_fit(keras_kd.with_teacher(ds.batch(16), nan_teacher(), placement="pipeline")))
case("-inf in one teacher logit, `jit_compile=True`", lambda: xla_fit(ds.batch(16).map(lambda a, b: (a, TeacherTargets(labels=b, logits=tf.tensor_scatter_nd_update(tf.zeros([tf.shape(a)[0], 4]), [[0, 1]], [-np.inf]))))))
case("labels out of range, `jit_compile=True`", lambda: xla_fit(keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y + 7)).batch(16), t4, placement="step")))
case("negative labels (-1)", lambda: fit(t4, keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y - 5)).batch(16), t4)))
def mlp1(): return keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
yb = (x[:, 0] > 0.5).astype("int64")
case("binary: one-logit student, 2-class teacher", lambda: fit(None, keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, yb)).batch(16), mlp(2)), student=mlp1()))
case("binary: label 2 for a one-logit student", lambda: fit(None, keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, yb + 2)).batch(16), mlp1()), student=mlp1()))
def binary_supported():
    s, t = mlp1(), mlp1(); s.compile("sgd", keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
    got = s.evaluate(keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, yb)).batch(64), t), verbose=0)
    sl, tl = s.predict(x, verbose=0)[:, 0].astype("float64") / 2, t.predict(x, verbose=0)[:, 0].astype("float64") / 2
    p, q = 1 / (1 + np.exp(-tl)), 1 / (1 + np.exp(-sl))
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    bce = -(yb * np.log(1 / (1 + np.exp(-2 * sl))) + (1 - yb) * np.log(1 - 1 / (1 + np.exp(-2 * sl))))
    want = (0.3 * bce + 0.7 * 4 * kl).mean()
    return f"(no error) Bernoulli distillation: loss {got:.6f}, NumPy formula {want:.6f}"
case("binary: one-logit student and teacher (supported)", binary_supported)
def uint8_labels():
    s = mlp(4); s.compile("sgd", keras_kd.DistillationLoss(), metrics=["accuracy"])
    h = s.fit(keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y.astype("uint8"))).batch(16), t4), verbose=0)
    return f"(no error) uint8 labels train like int64 (loss {h.history['loss'][0]:.4f})"
case("`uint8` labels (as `keras.datasets` returns)", uint8_labels)
case("labels of shape (batch, 5) for 4 classes", lambda: fit(t4, keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, np.eye(5, dtype="float32")[y])).batch(16), t4, placement="pipeline")))
soft_student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
case("student ending in softmax", lambda: fit(t4, keras_kd.with_teacher(ds.batch(16), t4), student=soft_student))
soft_teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
case("teacher ending in softmax, `with_teacher`", lambda: keras_kd.with_teacher(ds.batch(16), soft_teacher))
case("`DistillationLoss` trained on plain `(x, y)` (no teacher)", lambda: fit(None, ds.batch(16)))
def plain_loss_fit():
    s = mlp(4); s.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    s.fit(keras_kd.with_teacher(ds.batch(16), t4), verbose=0)
case("a plain Keras loss (`SparseCategoricalCrossentropy`) trained on `with_teacher` data", plain_loss_fit)
case("`DistillationLoss(temperature=tf.Variable(-3.0))`", lambda: keras_kd.DistillationLoss(temperature=tf.Variable(-3.0)))
def set_alpha(): keras_kd.DistillationLoss().alpha = "x"
case("`loss.alpha = 'x'`", set_alpha)
case("`with_teacher` on an unbatched dataset", lambda: keras_kd.with_teacher(ds, t4))
case("`with_teacher` applied twice", lambda: keras_kd.with_teacher(keras_kd.with_teacher(ds.batch(8), t4), t4))
case("top-k targets without log-sum-exp (`topk_fill='uniform'`)", lambda: keras_kd.DistillationLoss()(TeacherTargets(labels=[0], topk_indices=[[0]], topk_values=[[1.0]]), np.zeros((1, 4), "float32")))
case("top-k targets whose `topk_logsumexp` is below their own top-k's", lambda: float(keras_kd.DistillationLoss()(TeacherTargets(labels=[0], topk_indices=[[0, 1]], topk_values=[[3.0, 2.0]], topk_logsumexp=[1.0]), np.zeros((1, 4), "float32"))))
case("`hard_loss=keras.losses.SparseCategoricalCrossentropy()` (from_logits=False)", lambda: keras_kd.DistillationLoss(hard_loss=keras.losses.SparseCategoricalCrossentropy()))
case("`divergence=keras_kd.reverse_kl` with `topk_fill='renormalize'`", lambda: keras_kd.DistillationLoss(divergence=keras_kd.reverse_kl, topk_fill="renormalize"))
case("teacher logits per sequence `(batch, classes)`, student per time step `(batch, time, classes)`", lambda: keras_kd.DistillationLoss()(TeacherTargets(labels=np.zeros((4, 4), "int64"), logits=np.zeros((4, 5), "float32")), np.zeros((4, 4, 5), "float32")))
d = tempfile.mkdtemp(prefix='kd-')
c = keras_kd.cache_teacher_logits(t4, d + "/c", verbose=0); list(ds.apply(c))
case("cache reused with another teacher", lambda: ds.apply(keras_kd.cache_teacher_logits(mlp(4), d + "/c", verbose=0)))
case("cache reused with another dataset", lambda: ds.take(63).apply(keras_kd.cache_teacher_logits(t4, d + "/c", verbose=0)))
x2 = np.random.rand(256, 8).astype("float32"); y2 = np.random.randint(0, 4, 256)
list(tf.data.Dataset.from_tensor_slices((x2, y2)).apply(keras_kd.cache_teacher_logits(t4, d + "/c256", verbose=0)))
x3 = x2.copy(); x3[100:] = x3[100:][::-1]
case("cache reused after reordering `x[100:]` of 256 examples", lambda: list(tf.data.Dataset.from_tensor_slices((x3, y2)).apply(keras_kd.cache_teacher_logits(t4, d + "/c256", verbose=0))))
f = [p for p in os.listdir(d + "/c") if p.endswith(".bin")][0]
with open(f"{d}/c/{f}", "r+b") as fh: fh.seek(10); b = fh.read(1); fh.seek(10); fh.write(bytes([b[0] ^ 0xFF]))
case("cache file with a flipped byte", lambda: ds.apply(keras_kd.cache_teacher_logits(t4, d + "/c", verbose=0)))
with open(f"{d}/c/{f}", "r+b") as fh: fh.truncate(7)
case("truncated cache file", lambda: ds.apply(keras_kd.cache_teacher_logits(t4, d + "/c", verbose=0)))
case("infinite dataset given to the cache", lambda: ds.repeat().apply(keras_kd.cache_teacher_logits(t4, d + "/inf", verbose=0)))
open(d + "/file", "w").close()
case("unwritable cache directory", lambda: ds.apply(keras_kd.cache_teacher_logits(t4, d + "/file/c", verbose=0)))
probs = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="softmax")])
case("teacher that outputs probabilities", lambda: ds.apply(keras_kd.cache_teacher_logits(probs, d + "/p", verbose=0)))
case("student class count differs from the cache's", lambda: optimize.check_num_classes(mlp(5), d + "/p"))
case("`HardSampleReweighting.attach` without example ids", lambda: keras_kd.HardSampleReweighting().attach(ds))
case("reweighting table size differs from the dataset", lambda: keras_kd.HardSampleReweighting(num_examples=10).attach(keras_kd.add_example_ids(ds)))
def stray_ids_fit(jit):
    s = mlp(4); s.compile("sgd", keras_kd.DistillationLoss(), jit_compile=jit)
    s.fit(keras_kd.with_teacher(keras_kd.add_example_ids(ds).batch(16), t4), epochs=2, verbose=0,
          callbacks=[keras_kd.HardSampleReweighting(num_examples=10)])
case("reweighting `num_examples=10` for 64 examples (weights in the step)", lambda: stray_ids_fit(False))
case("the same, `jit_compile=True`", lambda: stray_ids_fit(True))
case("label-based signal on unlabelled data", lambda: keras_kd.HardSampleReweighting(signal="wsld").attach(keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices(x))))
case("`with_teacher(ds, [])` (an empty ensemble)", lambda: keras_kd.with_teacher(ds.batch(8), []))
case("`mixup` before `.batch(...)`", lambda: ds.map(keras_kd.mixup(0.2, num_classes=4)))
case("`mixup` of unlabelled examples (`NO_LABEL`)", lambda: next(iter(keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x)).batch(8).map(keras_kd.mixup(0.2, num_classes=4)))))
case("`mixup(alpha=0)`", lambda: keras_kd.mixup(0))
case("`align` with an unknown layer name", lambda: keras_kd.align(mlp(4), t4, pairs=[("dense_9", "dense_1")]))
class Sub(keras.Model):
    def call(self, a): return a
case("`align` with a subclassed student", lambda: keras_kd.align(Sub(), t4, pairs=[("a", "b")]))
case("Keras 3 model given to `prune_for_distillation`", lambda: optimize.prune_for_distillation(mlp(4), 0.5, end_step=10))
class Custom(keras.layers.Layer):
    def call(self, a): return a * 2
cm = keras.Sequential([keras.Input((8,)), Custom(), keras.layers.Dense(4)])
case("`to_tf_keras` of a model with a custom layer", lambda: optimize.to_tf_keras(cm))
case("`to_tflite` of a float model without representative data", lambda: optimize.to_tflite(optimize.to_tf_keras(mlp(4))))
case("`distillation_hyperparameters(temperature=(0, 4))`", lambda: tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), temperature=(0.0, 4.0)))
case("`distillation_hyperparameters(alpha=(0, 1.5))`", lambda: tuning.distillation_hyperparameters(keras_tuner.HyperParameters(), alpha=(0.0, 1.5)))
case("build function that returns no model", lambda: tuning.RandomSearch(tuning.DistillationHyperModel(lambda hp: "nope"), objective="val_accuracy", max_trials=1, directory=tempfile.mkdtemp()))
# Issue 17: ensembles, DKD, transfer sets, mixup, different inputs.
case("ensemble of a 4-class and a 5-class teacher", lambda: keras_kd.with_teacher(ds.batch(16), [t4, t5]))
t9 = keras.Sequential([keras.Input((9,)), keras.layers.Dense(4)])
case("ensemble of teachers with inputs (8,) and (9,)", lambda: keras_kd.with_teacher(ds.batch(16), [t4, t9]))
case("`with_teacher(..., ensemble='mean')`", lambda: keras_kd.with_teacher(ds.batch(16), [t4, mlp(4)], ensemble="mean"))
case("`cache_teacher_logits([], directory)`", lambda: keras_kd.cache_teacher_logits([], d + "/empty"))
e1, e2 = mlp(4), mlp(4)
list(ds.apply(keras_kd.cache_teacher_logits([e1, e2], d + "/ens", verbose=0)))
e2.layers[-1].kernel.assign(e2.layers[-1].kernel + 1.0)
case("ensemble cache reused after one teacher changed", lambda: list(ds.apply(keras_kd.cache_teacher_logits([e1, e2], d + "/ens", verbose=0))))
def dkd_fit(data, jit=False):
    s = mlp(4); s.compile("sgd", keras_kd.DistillationLoss(divergence="dkd"), jit_compile=jit)
    loss = s.fit(data, verbose=0).history["loss"][0]
    return f"(XLA drops assertions) training loss {loss}: training visibly fails" if jit else f"(no error) loss {loss}"
transfer = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x)).batch(16)
case("DKD on a transfer set (`keras_kd.unlabelled`, NO_LABEL)", lambda: dkd_fit(keras_kd.with_teacher(transfer, t4)))
case("DKD on a transfer set, `jit_compile=True`", lambda: dkd_fit(keras_kd.with_teacher(transfer, t4), jit=True))
case("DKD on the cache of unlabelled `x`", lambda: dkd_fit(tf.data.Dataset.from_tensor_slices(x).apply(keras_kd.cache_teacher_logits(t4, d + "/unl", verbose=0)).batch(16)))
case("`DistillationLoss(divergence='dkd', topk_fill='renormalize')`", lambda: keras_kd.DistillationLoss(divergence="dkd", topk_fill="renormalize"))
case("`mixup` of class ids without `num_classes`", lambda: ds.batch(16).map(keras_kd.mixup(0.2)))
case("`mixup(num_classes=4)` of a label 7", lambda: list(tf.data.Dataset.from_tensor_slices((x, y + 7 * (y == 0))).batch(16).map(keras_kd.mixup(0.2, num_classes=4))))
case("`mixup(num_classes=5)` for a 4-class student", lambda: fit(t4, keras_kd.with_teacher(ds.batch(16).map(keras_kd.mixup(0.2, num_classes=5)), t4)))
case("`mixup` after `with_teacher`", lambda: keras_kd.with_teacher(ds.batch(16), t4).map(keras_kd.mixup(0.2, num_classes=4)))
case("`with_teacher(..., teacher_inputs='x[:, ::2]')`", lambda: keras_kd.with_teacher(ds.batch(16), t4, teacher_inputs="x[:, ::2]"))
case("`keras_kd.unlabelled` applied after `.batch()`", lambda: fit(t4, keras_kd.with_teacher(keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(x).batch(16)), t4)))
print("| bad input | what you see |\n|---|---|")
for n, m in rows: print(f"| {n} | {m} |")
