"""Where the time of a distillation step and epoch goes (issue 15's profile).

On one workload of `bench_workloads` (default ``small``), measures side by side,
interleaved, medians:

1. the training step alone on one fixed batch (``tf.function(model.train_step)``,
   no pipeline): plain student, DistillationLoss with in-memory targets, a
   minimal hand-written KD loss (the floor), with HardSampleReweighting's
   observer and weighting, with_teacher's in-step teacher, and Keras's
   Distiller (which runs the teacher in its step too);
2. the step as ``fit`` calls it (``model.train_function(iterator)`` on a
   repeated one-batch dataset): adds the iterator's ``get_next`` of the
   element structure and the call overhead of the iterator argument;
3. the op census of each traced step (ops by type: asserts, casts, ...);
4. per epoch of the input pipeline: creating the iterator, the first batch, the
   rest, for the raw data, in-memory targets and the cache, plus the cache's
   own stages (unbatched output, unshuffled batches), with the process CPU
   time, the tf.data components per element and two references (the raw
   data with one and two extra scalars) that price one component;
5. a ``tf.profiler`` trace of ``fit`` epochs, summarised per op type
   (host self-time), where the profiler's converter is available.

Run: ``.venv/bin/python benchmarks/profile_step.py [--workload small] [--no-trace]``.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras_kd  # noqa: E402
import bench_workloads as bw  # noqa: E402
from _timing import common_parser  # noqa: E402
from _timing import machine_info  # noqa: E402
from _timing import rotated  # noqa: E402


class MinimalKD(keras.losses.Loss):
    """The floor: alpha * CE + (1 - alpha) * T^2 * KL, nothing else."""

    def __init__(self):
        super().__init__(name="minimal_kd")

    def __call__(self, y_true, y_pred, sample_weight=None):
        t = bw.TEMPERATURE
        labels, teacher = y_true.labels, tf.cast(y_true.logits, tf.float32)
        hard = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), y_pred)
        t_log = tf.nn.log_softmax(teacher / t)
        soft = tf.reduce_sum(tf.exp(t_log) * (t_log - tf.nn.log_softmax(y_pred / t)), -1) * t * t
        return tf.reduce_mean(bw.ALPHA * hard + (1 - bw.ALPHA) * soft)


def no_autotune():
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def timed_calls(fn, calls):
    """CPU seconds of this process per call (all its threads): steadier than
    wall time on a machine that other processes load."""
    t = time.process_time()
    for _ in range(calls):
        out = fn()
    tf.nest.map_structure(lambda v: v.numpy() if hasattr(v, "numpy") else v, out)
    return (time.process_time() - t) / calls


def op_census(concrete):
    counts = collections.Counter(op.type for op in concrete.graph.get_operations())
    for f in concrete.graph._functions.values():  # noqa: SLF001 - nested functions (cond bodies)
        counts.update(n.op for n in f.definition.node_def)
    return counts


def main(argv=None):
    parser = common_parser(__doc__.split("\n")[0], rounds=7)
    parser.add_argument("--workload", default="small", choices=list(bw.WORKLOADS))
    parser.add_argument("--calls", type=int, default=40, help="step calls per timed turn")
    parser.add_argument("--sections", default="step,pipeline,trace",
                        help="comma-separated: step (1-3), pipeline (4), trace (5)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else args.default_rounds)
    calls = 30 if args.quick else args.calls
    w = bw.WORKLOADS[args.workload]
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    print(f"# {w.describe()}; {rounds} rounds, {calls} calls per turn, medians")

    x, y = bw.data(w)
    teacher = bw.mlp(w.teacher, w.features, seed=1)
    workdir = tempfile.mkdtemp(prefix="profile_step_")
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    cached = raw.apply(keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, "cache"), verbose=0))
    logits = teacher.predict(x, batch_size=1024, verbose=0).astype("float16")
    ids = np.arange(w.rows, dtype="int64")
    memory = tf.data.Dataset.from_tensor_slices((x, keras_kd.TeacherTargets(labels=y, logits=logits, example_id=ids)))

    def pipeline(ds, shuffle=True):
        ds = ds.shuffle(w.rows, seed=0) if shuffle else ds
        return ds.batch(w.batch).prefetch(tf.data.AUTOTUNE)

    sections = set(args.sections.split(","))
    if "step" in sections:
        step_section(w, rounds, calls, pipeline, raw, memory, cached, teacher)
    if "pipeline" in sections:
        online = keras_kd.with_teacher(raw.shuffle(w.rows, seed=0).batch(w.batch), teacher).prefetch(tf.data.AUTOTUNE)
        pipeline_section(rounds, pipeline, raw, memory, cached, online, x, y)
    if "trace" in sections:
        trace_section(w, workdir, pipeline, raw, memory, cached)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


def model(w, loss):
    m = bw.mlp(w.student, w.features, seed=2)
    m.compile("adam", loss=loss)
    m.make_train_function()
    return m


def step_section(w, rounds, calls, pipeline, raw, memory, cached, teacher):
    """1-3: the step alone, the step as fit calls it, the op census."""
    plain_batch = next(iter(pipeline(raw)))
    kd_batch = next(iter(pipeline(memory)))
    cache_batch = next(iter(pipeline(cached)))

    steps = {}

    def add(name, loss, batch, setup=None, patch=None, make=None):
        m = make() if make else model(w, loss)
        if setup:
            setup(m)
            m.make_train_function(force=True)
        fn = tf.function(m.train_step)
        if patch:
            with patch():
                concrete = fn.get_concrete_function(batch)
        else:
            concrete = fn.get_concrete_function(batch)
        it = iter(tf.data.Dataset.from_tensors(batch).repeat())
        if patch:
            with patch():
                m.train_function(it)  # traces with the patch in place
        else:
            m.train_function(it)
        steps[name] = dict(direct=lambda: fn(batch), fit_path=lambda: m.train_function(it),
                           census=op_census(concrete))

    def with_reweighting(m):
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=w.rows)
        rew.set_model(m)
        rew.on_train_begin()

    add("plain (CE)", bw.ce_loss(), plain_batch)
    # The composite-tensor plumbing alone: plain CE, but y is the TeacherTargets
    # (Keras converts it to its labels).
    add("plain CE, y=TeacherTargets", bw.ce_loss(), kd_batch)
    add("KD, memory targets", bw.kd_loss(), kd_batch)
    add("KD, cache batch", bw.kd_loss(), cache_batch)
    add("minimal KD loss (floor)", MinimalKD(), kd_batch)
    add("KD + reweighting hooks", bw.kd_loss(), kd_batch, setup=with_reweighting)
    # The online teacher in the step (with_teacher's default placement) against
    # Keras's Distiller, which also runs the teacher in its step.
    online_ds = keras_kd.with_teacher(raw.batch(w.batch), teacher)  # kept alive: it holds the teacher
    add("with_teacher, in-step teacher", bw.kd_loss(), next(iter(online_ds)))

    def distiller():
        m = keras.distillation.Distiller(
            teacher=teacher, student=bw.mlp(w.student, w.features, seed=2),
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=bw.TEMPERATURE, loss=keras.losses.KLDivergence()),
            student_loss_weight=bw.ALPHA)
        m.compile("adam", loss=bw.ce_loss())
        m.make_train_function()
        return m

    add("keras Distiller", None, plain_batch, make=distiller)
    times = {(n, k): [] for n in steps for k in ("direct", "fit_path")}
    for r in range(3 * rounds + 1):  # short turns, many rounds: steadier medians under load
        for name in rotated(list(steps), r):
            for kind in ("direct", "fit_path"):
                t = timed_calls(steps[name][kind], calls)
                if r:
                    times[(name, kind)].append(t)
    base = {k: statistics.median(times[("plain (CE)", k)]) for k in ("direct", "fit_path")}
    print()
    print("## 1-2. one training step, fixed batch (median CPU us of this process per step; delta vs plain)")
    print(f"{'step':<28} {'tf.function(train_step)':>24} {'train_function(iterator)':>26}")
    width = max(28, *(len(n) for n in steps))
    for name in steps:
        cells = []
        for kind in ("direct", "fit_path"):
            v = statistics.median(times[(name, kind)])
            cells.append(f"{v * 1e6:8.0f} ({(v - base[kind]) * 1e6:+6.0f})")
        print(f"{name:<{width}} {cells[0]:>24} {cells[1]:>26}")

    print()
    print("## 3. op census of the traced step (forward + gradient + optimizer)")
    interesting = ["Assert", "CheckNumerics", "Cast", "Identity", "NoOp", "StridedSlice", "Shape",
                   "Reshape", "Select", "SelectV2", "If", "StatelessIf", "Where"]
    print(f"{'step':<{width}} {'ops':>5} " + " ".join(f"{k:>8}" for k in interesting))
    for name, s in steps.items():
        c = s["census"]
        print(f"{name:<{width}} {sum(c.values()):>5} " + " ".join(f"{c.get(k, 0):>8}" for k in interesting))


def components(ds) -> int:
    """tf.data components per element (what shuffle and batch copy one by one)."""
    return len(tf.nest.flatten(ds.element_spec, expand_composites=True))


def pipeline_section(rounds, pipeline, raw, memory, cached, online, x, y):
    """4: one epoch of the input pipeline, in pieces.

    Besides the wall times, the CPU time of the whole process per epoch (all
    tf.data threads; steadier on a loaded machine) and its ratio to the raw
    data's in the same round. The references with one and two extra scalar
    tensors per element (no TeacherTargets) show the cost of a component.
    """
    ids = np.arange(len(y), dtype="int64")
    layout_probe = {
        "raw: shuffle+batch": pipeline(raw),
        "with_teacher (step): shuffle+batch+pack": online,
        "memory targets: shuffle+batch": pipeline(memory),
        "cache: shuffle+batch": pipeline(cached),
        "cache: shuffle+batch, tf.data autotune off": pipeline(cached).with_options(no_autotune()),
        "cache: batch, no shuffle": pipeline(cached, shuffle=False),
        "cache: unbatched, no shuffle": cached,
        "raw: unbatched": raw,
        "memory: unbatched": memory,
        "REF raw + 1 scalar: shuffle+batch": pipeline(tf.data.Dataset.from_tensor_slices((x, y, ids))),
        "REF raw + 2 scalars: shuffle+batch": pipeline(tf.data.Dataset.from_tensor_slices((x, y, ids, ids))),
    }
    epoch_t = {n: collections.defaultdict(list) for n in layout_probe}
    for r in range(rounds * 2 + 1):
        for name in rotated(list(layout_probe), r):
            ds = layout_probe[name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            it = iter(ds)
            t1 = time.perf_counter()
            next(it)
            t2 = time.perf_counter()
            n = 1
            for _ in it:
                n += 1
            t3 = time.perf_counter()
            c1 = time.process_time()
            del it  # freed here, not inside the next pipeline's iter() (a full shuffle buffer takes a while)
            if r:
                epoch_t[name]["iter()"].append(t1 - t0)
                epoch_t[name]["first"].append(t2 - t1)
                epoch_t[name]["rest"].append(t3 - t2)
                epoch_t[name]["total"].append(t3 - t0)
                epoch_t[name]["cpu"].append(c1 - c0)
                epoch_t[name]["n"] = n
    raw_cpu = epoch_t["raw: shuffle+batch"]["cpu"]
    print()
    print("## 4. one epoch of the input pipeline (median ms; `for _ in ds`; cpu = process CPU time,")
    print("##    cpu/raw = median of same-round ratios to 'raw: shuffle+batch'; comp = tf.data components per element)")
    print(f"{'pipeline':<40} {'comp':>4} {'elements':>8} {'iter()':>8} {'first':>8} {'rest':>8} {'total':>8} "
          f"{'us/elem':>8} {'cpu':>8} {'cpu/raw':>7}")
    for name, d in epoch_t.items():
        med = {k: statistics.median(v) * 1e3 for k, v in d.items() if k != "n"}
        per = (med["rest"] * 1e3) / max(d["n"] - 1, 1)
        ratio = statistics.median(a / b for a, b in zip(d["cpu"], raw_cpu))
        print(f"{name:<40} {components(layout_probe[name]):>4} {d['n']:>8} {med['iter()']:>8.2f} {med['first']:>8.2f} "
              f"{med['rest']:>8.2f} {med['total']:>8.2f} {per:>8.1f} {med['cpu']:>8.2f} {ratio:>7.3f}")


def trace_section(w, workdir, pipeline, raw, memory, cached):
    """5: tf.profiler trace of fit epochs, per op type and tf.data stage."""
    print()
    print("## 5. tf.profiler trace of fit (3 epochs each), host self-time per op type, top 25")
    for name, ds, loss in (("memory", pipeline(memory), bw.kd_loss()), ("cache", pipeline(cached), bw.kd_loss()),
                           ("plain", pipeline(raw), bw.ce_loss())):
        m = model(w, loss)
        m.fit(ds, epochs=2, verbose=0)
        logdir = os.path.join(workdir, f"trace_{name}")
        tf.profiler.experimental.start(logdir)
        m.fit(ds, epochs=3, verbose=0)
        tf.profiler.experimental.stop()
        print(f"### {name}")
        print(summarise_trace(logdir))


def summarise_trace(logdir, top=25):
    try:
        from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin
    except ImportError as e:
        return f"(no profiler converter: {e})"
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        return "(no trace written)"
    data, ok = plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not ok:
        return "(converter failed)"
    try:
        table = json.loads(data)
    except (ValueError, TypeError):
        return str(data)[:2000]
    if isinstance(table, list):
        table = table[0]
    cols = [c.get("id") or c.get("label") for c in table["cols"]]
    rows = [[cell.get("v") if cell else None for cell in row["c"]] for row in table["rows"]]
    i_type, i_name = cols.index("type"), cols.index("operation")
    i_self = cols.index("total_self_time")
    i_occ = cols.index("occurrences")
    host = cols.index("host_or_device")
    by_type = collections.defaultdict(lambda: [0.0, 0])
    by_stage = collections.defaultdict(lambda: [0.0, 0])
    for row in rows:
        if row[host] != "Host":
            continue
        by_type[row[i_type]][0] += row[i_self]
        by_type[row[i_type]][1] += row[i_occ]
        if row[i_type] == "Dataset":
            by_stage[row[i_name]][0] += row[i_self]
            by_stage[row[i_name]][1] += row[i_occ]
    total = sum(v[0] for op, v in by_type.items() if op != "IDLE")
    lines = [f"{'op type (IDLE excluded from total)':<40} {'self ms':>9} {'share':>7} {'count':>7}"]
    for op, (self_us, occ) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:top]:
        if op == "IDLE":
            continue
        lines.append(f"{op:<40} {self_us / 1e3:>9.2f} {self_us / total:>7.1%} {occ:>7.0f}")
    lines.append(f"{'total host op self-time':<40} {total / 1e3:>9.2f}")
    lines.append("tf.data stages (self-time, by iterator name):")
    for stage, (self_us, occ) in sorted(by_stage.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"  {stage[-90:]:<90} {self_us / 1e3:>9.2f} ms {occ:>7.0f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
