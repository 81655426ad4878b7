"""The teacher-logit cache: run the teacher once, distill for many epochs.

`cache_teacher_logits` returns a ``Dataset -> Dataset`` transform. Applied to
an **unbatched** dataset of ``(x, y)`` or ``(x, y, sample_weight)`` elements,
it runs the teacher over the dataset once (in inference mode, batched), writes
its logits to disk, and yields
``(x, TeacherTargets(labels=y, logits=..., example_id=i)[, sample_weight])``
for every element, in order. Later epochs and later processes only read the
files, so a distillation epoch costs what a student-only epoch costs.

Storage (format version 2) is `keras_kd._storage`'s, shared with the
alignment feature cache: a directory keras_kd owns (marker
``.keras_kd-teacher_logit_cache``), data files
``logits-PPPPP-FFFFF-G.bin`` of whole raw little-endian blocks (``G`` names
the build), one journal per build part, ``manifest.json`` switched
atomically, and ``fcntl.flock`` lock files. A block holds ``block_rows``
consecutive examples (the teacher batch); its fields follow one another,
each a C-order array with the per-example shapes listed in the manifest:

- dense: ``values``, ``(views,) + teacher_shape``, float16 or float32;
- top-k: ``values`` ``(views, ..., k)`` float16/float32, then ``indices``
  ``(views, ..., k)`` int16 (int32 for more than 32767 classes), then
  ``logsumexp`` ``(views, ...)`` float32.

Only the very last block of the cache is padded with zeros. The manifest
records the fingerprint (teacher function and weights, every element's
inputs, settings), the layout and every file with its size and CRC32; it is
validated against a schema before anything is read.

Nothing is pickled; any NumPy user can read the files with ``np.fromfile``
and the offsets in the manifest.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil  # noqa: F401 - tests replace shutil.disk_usage through this module
import warnings
import weakref
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from keras_kd import _build
from keras_kd import _compat
from keras_kd import _fingerprint
from keras_kd import _storage
from keras_kd import targets as targets_lib
from keras_kd._storage import CacheCorruptedError
from keras_kd._storage import CacheMismatchError

FORMAT = "keras_kd.teacher_logit_cache"
VERSION = _storage.VERSION
MANIFEST = _storage.MANIFEST

_DTYPES = {"float16": "<f2", "float32": "<f4"}
_SAMPLE_SIZE = 64  # elements read twice to detect a dataset that changes between passes
_AUGMENT_SAMPLE = 4  # elements whose augmented views are hashed
_PROBE_ROWS = 64  # examples the teacher re-runs when an existing cache is opened
_TARGET_FILE_BYTES = 64 << 20  # default size of one data file
_FLOAT16_MAX = 65504.0

__all__ = [
    "CacheCorruptedError",
    "CacheMismatchError",
    "TeacherLogitCache",
    "cache_teacher_logits",
    "read_manifest",
]

# Ops that make a tf.data pipeline yield different elements on each pass.
_RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformInt",
        "RandomStandardNormal",
        "TruncatedNormal",
        "ParameterizedTruncatedNormal",
        "RandomShuffle",
        "RandomCrop",
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
        "StatefulUniform",
        "StatefulUniformInt",
        "StatefulUniformFullInt",
        "StatefulStandardNormal",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulRandomBinomial",
        "RngReadAndSkip",
        "RngSkip",
        "SampleDistortedBoundingBox",
        "SampleDistortedBoundingBoxV2",
        "RandomDataset",
        "RandomDatasetV2",
        "ExperimentalRandomDataset",
        "ShuffleDatasetV2",
        "ShuffleAndRepeatDatasetV2",
        # A map function that assigns a variable (e.g. a Keras random layer's
        # seed generator) changes its output from one pass to the next.
        "AssignVariableOp",
        "AssignAddVariableOp",
        "AssignSubVariableOp",
    }
)


def _warn(message: str):
    """Warns at the first caller outside keras_kd and TensorFlow (the user's line)."""
    import sys

    level, frame = 1, sys._getframe(1)  # noqa: SLF001
    here = os.path.dirname(os.path.abspath(__file__))
    tf_dir = os.path.dirname(os.path.abspath(tf.__file__))
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not (filename.startswith(here) or filename.startswith(tf_dir)):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


# Traced teacher steps, per teacher model (see `TeacherLogitCache._teacher_step`).
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _store(directory: str) -> _storage.Store:
    return _storage.Store(directory, "teacher_logit_cache", FORMAT, "logits", "teacher-logit cache")


# ---------------------------------------------------------------------------
# Layout of one block.
# ---------------------------------------------------------------------------


def _logit_layout(block_rows, views, teacher_shape, top_k, dtype) -> _storage.Layout:
    """The storage layout of dense or top-k teacher outputs."""
    teacher_shape = tuple(int(d) for d in teacher_shape)
    if top_k is None:
        fields = [("values", _DTYPES[dtype], (views, *teacher_shape))]
    else:
        inner = (views, *teacher_shape[:-1])
        index_dtype = "<i2" if teacher_shape[-1] <= 32767 else "<i4"
        fields = [
            ("values", _DTYPES[dtype], (*inner, top_k)),
            ("indices", index_dtype, (*inner, top_k)),
            ("logsumexp", "<f4", inner),
        ]
    return _storage.Layout(block_rows, fields)


def _manifest_extra(layout, teacher_shape, top_k, dtype, views):
    return {
        "num_classes": int(teacher_shape[-1]),
        "teacher_shape": list(teacher_shape),
        "top_k": top_k,
        "dtype": dtype,
        "views": views,
        "block_rows": layout.block_rows,
        "fields": layout.fields(),
    }


def _validate_extra(schema, m):
    """The logit-specific manifest keys: consistent with the layout and the fingerprint."""
    shape = schema.get(m, "teacher_shape", list)
    if not 1 <= len(shape) <= 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 31 for d in shape
    ):
        schema.fail("teacher_shape", f"must be 1 to 8 positive integers, got {shape!r:.80}")
    top_k = schema.int(m, "top_k", 1, shape[-1], allow_none=True)
    dtype = schema.get(m, "dtype", str)
    if dtype not in _DTYPES:
        schema.fail("dtype", f"must be 'float16' or 'float32', got {dtype!r:.80}")
    views = schema.int(m, "views", 1, 1 << 16)
    rows = m["layout"]["block_rows"]
    expected = _logit_layout(rows, views, shape, top_k, dtype)
    if expected.to_json() != m["layout"]:
        schema.fail(
            "layout", f"does not match teacher_shape={shape}, top_k={top_k}, dtype={dtype!r}, views={views}"
        )
    if _manifest_extra(expected, shape, top_k, dtype, views) != {
        k: m.get(k) for k in _manifest_extra(expected, shape, top_k, dtype, views)
    }:
        schema.fail("num_classes", "or `block_rows`/`fields` do not follow from the layout")
    fp = m["fingerprint"]
    teacher = fp.get("teacher") if isinstance(fp.get("teacher"), dict) else {}
    settings = fp.get("settings") if isinstance(fp.get("settings"), dict) else {}
    if teacher.get("output_shape") != [None, *shape]:
        schema.fail(
            "fingerprint.teacher.output_shape",
            f"must be {[None, *shape]} (teacher_shape), got {teacher.get('output_shape')!r:.80}",
        )
    if settings.get("top_k") != top_k or settings.get("dtype") != dtype or settings.get("views", 1) != views:
        schema.fail("fingerprint.settings", "disagree with the manifest's top_k, dtype or views")


# ---------------------------------------------------------------------------
# Fingerprint.
# ---------------------------------------------------------------------------


def _describe_spec(spec) -> list:
    out = []
    for path, s in keras.tree.flatten_with_path(spec):
        shape = getattr(s, "shape", None)
        if shape is not None:
            shape = shape.as_list() if shape.rank is not None else "?"
        dtype = getattr(getattr(s, "dtype", None), "name", None)
        where = "/".join(str(p) for p in path) or "."
        out.append(f"{where}: {type(s).__name__} shape={shape} dtype={dtype}")
    return out


def _fingerprint_diff(old: dict, new: dict, num_examples: Optional[int]) -> list:
    """Human-readable list of what changed between two fingerprints."""
    changes = []
    ot = old.get("teacher") if isinstance(old.get("teacher"), dict) else {}
    nt = new.get("teacher", {})
    if ot.get("output_shape") != nt.get("output_shape"):
        changes.append(
            f"the teacher's output shape changed: {ot.get('output_shape')} -> {nt.get('output_shape')}"
        )
    if ot.get("weights_digest") != nt.get("weights_digest"):
        changes.append(
            "the teacher's weights changed (digest "
            f"{str(ot.get('weights_digest'))[:12]} -> {str(nt.get('weights_digest'))[:12]})"
        )
    if ot.get("architecture_digest") != nt.get("architecture_digest") or ot.get("flavour") != nt.get(
        "flavour"
    ):
        changes.append(
            "the teacher's architecture or configuration changed (its layers, activations or "
            f"connections; digest {str(ot.get('architecture_digest'))[:12]} -> {str(nt.get('architecture_digest'))[:12]})"
        )
    od = old.get("dataset") if isinstance(old.get("dataset"), dict) else {}
    nd = new.get("dataset", {})
    if od.get("element_spec") != nd.get("element_spec"):
        changes.append(
            f"the dataset's element_spec changed: {od.get('element_spec')} -> {nd.get('element_spec')}"
        )
    if nd.get("count") is not None and num_examples is not None and nd["count"] != num_examples:
        changes.append(f"the dataset's size changed: {num_examples} -> {nd['count']} examples")
    if od.get("inputs_digest") != nd.get("inputs_digest"):
        changes.append(
            "the dataset's contents changed: the inputs `x` of its elements, or their order, are not "
            f"those the cache was built from (digest of all its inputs {str(od.get('inputs_digest'))[:12]} -> "
            f"{str(nd.get('inputs_digest'))[:12]}); if it shuffles or randomly augments before this "
            "transform, move that after the transform (or pass `augment=` for augmentation the teacher must see)"
        )
    os_ = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    ns = new.get("settings", {})
    for key in sorted(set(os_) | set(ns)):
        if os_.get(key) != ns.get(key):
            changes.append(f"the setting `{key}` changed: {os_.get(key)!r} -> {ns.get(key)!r}")
    return changes


# ---------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------


def _check_dataset(dataset, teacher):
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"Expected `dataset` to be a tf.data.Dataset. Received: {type(dataset).__name__}. "
            "Wrap arrays with tf.data.Dataset.from_tensor_slices((x, y))."
        )
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            "Expected a dataset of unbatched `(x, y)` or `(x, y, sample_weight)` elements, or of `x` "
            f"alone (unlabelled data). Received element_spec={spec}."
        )
    if isinstance(spec[1], targets_lib.TeacherTargets.Spec):
        raise ValueError(
            "The dataset already carries teacher targets; apply the teacher-logit cache to the raw dataset."
        )
    if not isinstance(spec[1], tf.TensorSpec):
        raise ValueError(
            f"Expected the labels `y` of each element to be a single tensor. Received: y spec={spec[1]}."
        )
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "The dataset given to `cache_teacher_logits` is infinite (it repeats forever). "
            "The cache needs a finite dataset: apply the transform before `.repeat()`."
        )
    if cardinality == 0:
        raise ValueError("The dataset given to `cache_teacher_logits` is empty.")
    inputs = getattr(teacher, "inputs", None)
    x_specs = tf.nest.flatten(spec[0])
    if inputs and x_specs and getattr(x_specs[0], "shape", None) is not None:
        try:
            rank = len(inputs[0].shape)
        except (TypeError, AttributeError):
            rank = None
        if rank is not None and x_specs[0].shape.rank == rank:
            raise ValueError(
                f"`cache_teacher_logits` received batched elements (x of shape {x_specs[0].shape}, "
                f"the teacher expects {tuple(inputs[0].shape)}). Apply it to the unbatched "
                "dataset and batch afterwards: raw.apply(cache).shuffle(n).batch(b)."
            )
    return cardinality if cardinality >= 0 else None


def _with_labels(dataset):
    """``(dataset of (x, y[, w]), labelled)``: a dataset of ``x`` alone (or ``(x,)``) gets placeholder labels."""
    spec = getattr(dataset, "element_spec", None)
    if not isinstance(dataset, tf.data.Dataset) or (isinstance(spec, tuple) and len(spec) != 1):
        return dataset, True  # `_check_dataset` judges it
    if isinstance(spec, tuple) and isinstance(spec[0], tuple) and len(spec[0]) in (2, 3):
        return dataset, True  # ((x, y),): refused there, not guessed
    return dataset.map(lambda x: (x, tf.constant(0, tf.int32))), False


def _random_ops(dataset) -> list:
    """What makes the dataset differ from pass to pass: random ops, reshuffles.

    Walks the dataset's inputs and the graphs of their functions in Python
    (serializing the dataset would copy all in-memory data).
    """
    found, seen, stack = set(), set(), [dataset]
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        name = type(ds).__name__
        if "Random" in name:
            found.add("Dataset.random")
        if "Shuffle" in name and getattr(ds, "_reshuffle_each_iteration", False) is True:
            found.add("shuffle(reshuffle_each_iteration=True)")
        if str(getattr(ds, "_deterministic", "")).lower() == "false":
            found.add(f"{name.strip('_')}(deterministic=False)")
        for value in vars(ds).values():
            graph = getattr(getattr(value, "function", None), "graph", None)
            if graph is not None and hasattr(graph, "as_graph_def"):
                found.update(_graph_random_ops(graph))
        try:
            stack.extend(ds._inputs())  # noqa: SLF001
        except Exception:  # pragma: no cover - datasets without inputs
            pass
    try:
        if dataset.options().deterministic is False:
            found.add("options.deterministic=False")
    except Exception:  # pragma: no cover
        pass
    return sorted(found)


def _graph_random_ops(graph) -> set:
    try:
        graph_def = graph.as_graph_def()
    except Exception:  # pragma: no cover
        return set()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    found = {node.op for node in nodes if node.op in _RANDOM_OPS}
    for node in nodes:
        if node.op.startswith("ShuffleDataset") and node.attr["reshuffle_each_iteration"].b:
            found.add("shuffle(reshuffle_each_iteration=True)")
    return found


def _seed_of(seed, example_id, view, views):
    """The documented per-view augmentation seed ``[seed, id * views + view]``."""
    example_id = tf.cast(example_id, tf.int64)
    view = tf.cast(view, tf.int64)
    return tf.stack(
        [tf.broadcast_to(tf.constant(seed, tf.int64), tf.shape(example_id)), example_id * views + view],
        axis=-1,
    )


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def cache_teacher_logits(
    teacher,
    directory,
    *,
    top_k: Optional[int] = None,
    dtype: str = "float16",
    batch_size: int = 256,
    augment: Optional[Callable] = None,
    views: int = 1,
    seed: int = 0,
    num_shards: Optional[int] = None,
    shard_index: Optional[int] = None,
    input_context=None,
    on_mismatch: str = "error",
    output_index=0,
    shard_size: Optional[int] = None,
    verify: str = "checksum",
    wait_timeout: Optional[float] = None,
    verbose: int = 1,
    in_memory: Optional[bool] = None,
) -> "TeacherLogitCache":
    """Caches a teacher's logits on disk, as a ``Dataset -> Dataset`` transform.

    Apply it to the **unbatched** training dataset, then shuffle, batch and
    train as usual with `keras_kd.DistillationLoss`. The first use runs the
    teacher over the dataset once (``teacher(x, training=False)``, batched,
    with a progress bar) and writes its logits to ``directory``; later uses
    (later epochs, later processes) only read the files.

    Each element ``(x, y[, sample_weight])`` becomes
    ``(x, TeacherTargets(labels=y, logits=..., example_id=i)[, sample_weight])``,
    where ``i`` is the element's position in the dataset as given to the
    transform (``int64``). A dataset of ``x`` alone (unlabelled data, as for
    `keras_kd.add_example_ids`) becomes
    ``(x, TeacherTargets(labels=0, has_labels=False, logits=..., example_id=i))``:
    the loss then has no hard-label term. Labels are not part of the
    fingerprint: a cache is reused when only the labels change (the teacher
    never sees them), and every element carries its own current labels.
    Pairing is by that position, so ``shuffle``,
    ``batch``, ``repeat`` and augmentation applied **after** the transform
    keep every example with its own teacher logits. The dataset given to the
    transform must yield the same elements in the same order on every pass:
    a random augmentation or a reshuffle **before** the transform would pair
    the student with logits of other pixels (this is detected where possible
    and warned about; pass ``augment=`` instead).

    Storage: dense logits (``top_k=None``) in ``dtype``, or the teacher's
    ``top_k`` largest logits with their class indices and the log-sum-exp of
    all its logits, so that `DistillationLoss`'s ``topk_fill="uniform"``
    policy gives the missing classes exactly the teacher's missing mass (see
    `keras_kd.targets.dense_teacher_logits`). Targets carry dense logits in
    ``dtype``, or ``topk_values`` in ``dtype``, ``int32`` ``topk_indices`` and
    float32 ``topk_logsumexp``; the loss computes in float32.

    Augmentation-consistent mode (``augment=fn``): ``fn(x, seed)`` must
    augment one example's inputs ``x`` deterministically given ``seed``, a
    ``[2]`` int64 tensor, using stateless ops (``tf.image.stateless_*``,
    ``tf.random.stateless_*``). The cache stores the teacher's logits for
    ``views`` views of every example, view ``v`` of example ``i`` made with
    ``seed = [seed, i * views + v]``. Each pass over the output picks one
    stored view per example (a new choice on every pass, reproducible from
    ``seed``) and re-creates its inputs with the same seed, so the student
    sees exactly the pixels the teacher saw.

    The cache records a fingerprint: the teacher (digests of its weights and
    of its architecture/config, i.e. layers, activations and connections;
    its output shape), the dataset (element spec, count and a digest of
    **every** element's inputs ``x`` in order, computed in one pass each
    time the transform is applied, before any epoch) and the settings
    (``top_k``, ``dtype``, ``output_index``, and ``views``, ``seed`` and a
    digest of ``augment``'s output when augmenting). When an existing cache is
    opened, the teacher also re-runs on the first 64 examples and must
    reproduce the stored logits. A cache that does not match is refused with
    a `CacheMismatchError` saying what changed, or rebuilt with
    ``on_mismatch="rebuild"``. ``batch_size``, ``shard_size`` and
    ``num_shards`` only change the layout, not the fingerprint.

    Storage guarantees (see the README's table): keras_kd only creates,
    reads and deletes its own names in ``directory`` (a marker file records
    that keras_kd created it; a ``manifest.json`` it did not write is never
    touched, whatever ``on_mismatch`` says); it reads only regular files and
    at most their recorded size; manifests and journals are validated
    against a schema (a violation is a `CacheCorruptedError` naming the
    entry, repaired by ``on_mismatch="rebuild"``); one writer per part at a
    time (``fcntl.flock``); a build writes fresh names and switches the
    manifest atomically after verifying every file, so a reader never sees a
    mix of two builds (a streaming reader holds a shared ``flock`` on its
    build's lock file while its pipeline lives, and a rebuild by another job
    keeps that build's files until then; a rebuild never rewrites the names
    of the build it replaces).

    Crash safety: every file is written to a temporary name, fsynced and
    renamed; the manifest is written last. A build killed at any point leaves
    no manifest, so nothing is accepted as a cache; the next run checks the
    finished files of the interrupted build (size and CRC32), keeps them and
    resumes after them; its temporaries are removed by the next holder of the
    part's lock. Before use, every file is checked against the manifest.

    Multi-worker build: with ``num_shards=N`` and ``shard_index=i`` (or a
    ``tf.distribute.InputContext``), worker ``i`` runs the teacher on its own
    contiguous ``1/N`` of the dataset and writes that part. When all parts
    are there, any process writes the manifest and reads the cache as a
    whole; applying the transform waits for the other parts (see
    ``wait_timeout``), `TeacherLogitCache.build` does not. The directory must
    be on a filesystem all workers share.

    Memory: a cache of up to 32 MiB is read once (checksums verified in the
    same read) and held in host memory, which is faster for small data; a
    larger one streams blocks of ``batch_size`` examples from disk, so
    memory does not grow with the number of examples. ``in_memory=True`` or
    ``False`` forces either.

    Speed: when all elements have one fixed shape, the output moves in blocks
    (``batch`` -> one function call per block -> ``unbatch``), with no
    per-example function call. Elements of varying shape (e.g. token
    sequences) work too: the teacher then sees each example alone, unpadded,
    and the output pairs elements one by one, which is slower. Batch such
    output with ``.ragged_batch(b)`` or pad each element, then ``.batch(b)``
    (``padded_batch`` does not accept `TeacherTargets`).

    Class count: `TeacherLogitCache.num_classes` and the manifest's
    ``num_classes`` give the teacher's class count;
    `TeacherLogitCache.check_student` compares a student with it (the loss
    also refuses a mismatch at the first batch).

    Args:
        teacher: a Keras 3 or tf_keras model that outputs logits.
        directory: where the cache lives (created if needed). Reading needs
            only read access.
        top_k: keep only the teacher's ``top_k`` largest logits per example
            (and their log-sum-exp), or ``None`` for dense logits. Defaults to
            None.
        dtype: ``"float16"`` or ``"float32"``, how logits (or top-k values)
            are stored. Defaults to "float16".
        batch_size: the teacher's batch size while building; also the number
            of examples per stored block. Defaults to 256.
        augment: ``fn(x, seed) -> x`` for the augmentation-consistent mode,
            or None. Defaults to None.
        views: number of augmented views stored per example (needs
            ``augment``). Defaults to 1.
        seed: integer seed of the augmentation views and of the per-pass view
            choice. Defaults to 0.
        num_shards: number of build workers, or None for one. Defaults to None.
        shard_index: this worker's index in ``[0, num_shards)``. Defaults to
            None.
        input_context: a ``tf.distribute.InputContext`` giving
            ``num_shards``/``shard_index`` instead. Defaults to None.
        on_mismatch: ``"error"`` to refuse a cache built for something else
            (or damaged), ``"rebuild"`` to rebuild it. Defaults to "error".
        output_index: which output holds the logits when the teacher has
            several. Defaults to 0.
        shard_size: examples per data file (rounded to whole blocks), or None
            for files of about 64 MiB. Files are the unit of resumption.
            Defaults to None.
        verify: ``"checksum"`` (size and CRC32 of every file before use) or
            ``"size"`` (sizes only, for very large caches). Defaults to
            "checksum".
        wait_timeout: seconds a worker that finished its part waits for the
            other parts before raising `TimeoutError`; None waits for ever.
            Defaults to None.
        verbose: 0 silent, 1 progress bar, 2 one line per part. Defaults to 1.
        in_memory: None to hold caches up to 32 MiB in memory and stream
            larger ones, True/False to force either. Defaults to None.

    Returns:
        A `TeacherLogitCache`: use it with ``dataset.apply(...)``.

    Raises:
        ValueError: for invalid arguments (at construction); when applied, for
            an infinite, empty or batched dataset, a dataset reshuffled before
            the transform, labels that are not one tensor, teacher outputs with NaN/Inf or out of float16 range, or
            an ``augment`` that is not deterministic given its seed.
        CacheMismatchError: when the cache was built for another teacher,
            dataset or settings and ``on_mismatch="error"``.
        CacheCorruptedError: when a cache file is missing, truncated or
            corrupted, or a manifest or journal breaks the schema, and
            ``on_mismatch="error"``.
        CacheMismatchError: (whatever ``on_mismatch``) when ``directory``
            holds a ``manifest.json`` keras_kd did not write, or another kind
            of keras_kd cache.
        OSError: when ``directory`` cannot be written or the disk is full.

    Example:

    ```python
    cache = keras_kd.cache_teacher_logits(teacher, "cache/digits-t1")
    train = raw_ds.apply(cache)   # runs the teacher once; later runs only read
    train = train.shuffle(10_000).batch(64).prefetch(tf.data.AUTOTUNE)
    cache.check_student(student)
    student.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    student.fit(train, epochs=50)

    # Top-k storage, and views the student replays pixel for pixel:
    def augment(x, seed):
        return tf.image.stateless_random_flip_left_right(x, seed)

    train = raw_images.apply(keras_kd.cache_teacher_logits(
        teacher, "cache/imgs-k10", top_k=10, augment=augment, views=4))

    # Two workers build halves of one cache; any process then reads it whole:
    keras_kd.cache_teacher_logits(teacher, "cache/big", num_shards=2,
                                  shard_index=worker).build(raw_ds)
    ```
    """
    return TeacherLogitCache(
        teacher,
        directory,
        top_k=top_k,
        dtype=dtype,
        batch_size=batch_size,
        augment=augment,
        views=views,
        seed=seed,
        num_shards=num_shards,
        shard_index=shard_index,
        input_context=input_context,
        on_mismatch=on_mismatch,
        output_index=output_index,
        shard_size=shard_size,
        verify=verify,
        wait_timeout=wait_timeout,
        verbose=verbose,
        in_memory=in_memory,
    )


def _positive_int(value, argument, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected `{argument}` to be an integer >= 1. Received: {argument}={value!r}")
    return int(value)


def read_manifest(directory) -> dict:
    """Reads the manifest of a finished teacher-logit cache.

    The manifest records ``num_examples``, ``num_classes``, the layout
    (``block_rows``, ``fields``), the fingerprint and the files with their
    sizes and CRC32s. It is validated against the schema first.

    Args:
        directory: the cache directory.

    Returns:
        The manifest as a dict.

    Raises:
        FileNotFoundError: when the directory holds no finished cache.
        CacheCorruptedError: when the manifest is unreadable or breaks the
            schema (the message names the entry).
        CacheMismatchError: when it has another format version, or is not
            a keras_kd teacher-logit cache.
    """
    store = _store(_storage.resolve_directory(directory, "teacher-logit cache"))
    if not os.path.lexists(store.manifest_path):
        raise FileNotFoundError(
            f"No finished teacher-logit cache in {os.fspath(directory)!r} (no {MANIFEST})."
        )
    if not store.owned():
        raise CacheMismatchError(
            f"{store.manifest_path!r} was not written by keras_kd (the directory has no "
            f"{os.path.basename(store.marker)} marker); it is not a teacher-logit cache."
        )
    return store.read_manifest(_validate_extra)


class TeacherLogitCache:
    """The transform returned by `cache_teacher_logits` (see there for the arguments).

    Call it on a dataset (or pass it to ``dataset.apply``) to build the cache
    if needed and get the dataset with teacher targets; use `build` to only
    write this worker's part. The object holds configuration only; every call
    checks the directory afresh.

    Attributes:
        manifest: the manifest of the cache once it is complete, else None.
        num_classes: the teacher's class count (last axis of its logits),
            known after the first use.

    Example:

    ```python
    cache = keras_kd.cache_teacher_logits(teacher, "cache/run1", top_k=10)
    train = raw_ds.apply(cache)
    print(cache.num_classes, cache.manifest["num_examples"])
    ```
    """

    def __init__(
        self,
        teacher,
        directory,
        *,
        top_k=None,
        dtype="float16",
        batch_size=256,
        augment=None,
        views=1,
        seed=0,
        num_shards=None,
        shard_index=None,
        input_context=None,
        on_mismatch="error",
        output_index=0,
        shard_size=None,
        verify="checksum",
        wait_timeout=None,
        verbose=1,
        in_memory=None,
    ):
        _compat.check_model(teacher, "teacher")
        self.teacher = teacher
        # Checked (valid UTF-8, absolute, symlinks resolved) before the teacher runs.
        self.directory = _storage.resolve_directory(directory, "teacher-logit cache")
        self.top_k = _positive_int(top_k, "top_k", allow_none=True)
        dtype_name = getattr(dtype, "name", None) or str(dtype)
        if dtype_name not in _DTYPES:
            raise ValueError(f"Expected `dtype` to be 'float16' or 'float32'. Received: dtype={dtype!r}")
        self.dtype = dtype_name
        self.batch_size = _positive_int(batch_size, "batch_size")
        if augment is not None and not callable(augment):
            raise ValueError(
                f"Expected `augment` to be None or a callable fn(x, seed). Received: augment={augment!r}"
            )
        self.augment = augment
        self.views = _positive_int(views, "views")
        if self.views > 1 and augment is None:
            raise ValueError(
                f"views={views} needs an `augment` function: without augmentation every view is the same example."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"Expected `seed` to be an integer. Received: seed={seed!r}")
        self.seed = int(seed)
        if input_context is not None:
            if num_shards is not None or shard_index is not None:
                raise ValueError("Pass either `input_context` or `num_shards`/`shard_index`, not both.")
            num_shards = input_context.num_input_pipelines
            shard_index = input_context.input_pipeline_id
        if (num_shards is None) != (shard_index is None):
            raise ValueError(
                "Expected `num_shards` and `shard_index` to be given together. "
                f"Received: num_shards={num_shards!r}, shard_index={shard_index!r}"
            )
        if num_shards is not None:
            num_shards = _positive_int(num_shards, "num_shards")
            if (
                isinstance(shard_index, bool)
                or not isinstance(shard_index, (int, np.integer))
                or not 0 <= shard_index < num_shards
            ):
                raise ValueError(
                    f"Expected `shard_index` in [0, {num_shards}). Received: shard_index={shard_index!r}"
                )
        self.num_shards = 1 if num_shards is None else int(num_shards)
        self.shard_index = 0 if shard_index is None else int(shard_index)
        if on_mismatch not in ("error", "rebuild"):
            raise ValueError(
                f"Expected `on_mismatch` to be 'error' or 'rebuild'. Received: on_mismatch={on_mismatch!r}"
            )
        self.on_mismatch = on_mismatch
        self.output_index = output_index
        self.shard_size = _positive_int(shard_size, "shard_size", allow_none=True)
        if verify not in ("checksum", "size"):
            raise ValueError(f"Expected `verify` to be 'checksum' or 'size'. Received: verify={verify!r}")
        self.verify = verify
        if wait_timeout is not None and (not isinstance(wait_timeout, (int, float)) or wait_timeout < 0):
            raise ValueError(
                f"Expected `wait_timeout` to be None or >= 0. Received: wait_timeout={wait_timeout!r}"
            )
        self.wait_timeout = wait_timeout
        if verbose not in (0, 1, 2):
            raise ValueError(f"Expected `verbose` in (0, 1, 2). Received: verbose={verbose!r}")
        self.verbose = verbose
        if in_memory not in (None, True, False):
            raise ValueError(
                f"Expected `in_memory` to be None (automatic), True or False. Received: in_memory={in_memory!r}"
            )
        self.in_memory = in_memory
        self.manifest = None
        self.num_classes = None

    # -- public -----------------------------------------------------------

    def __call__(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Builds the cache if needed and returns the dataset with teacher targets.

        Args:
            dataset: the unbatched ``(x, y[, sample_weight])`` dataset.

        Returns:
            A dataset of ``(x, TeacherTargets, [sample_weight])`` elements,
            with the same number of elements, in the same order.

        Raises:
            See `cache_teacher_logits`; with several workers, `TimeoutError`
            when the other parts do not appear within ``wait_timeout``.
        """
        dataset, labelled = _with_labels(dataset)
        manifest = self._ensure(dataset, wait=True)
        blocks = self.__dict__.pop("_opened_blocks", None)
        if blocks is None:
            blocks = self._blocks(_store(self.directory), manifest)
        out = self._reader(dataset, manifest, blocks)
        if labelled:
            return out
        # Unlabelled data, as `keras_kd.add_example_ids` marks it: no hard-label term.
        out = out.map(lambda x, targets: (x, targets.replace(has_labels=False)))
        return out.apply(tf.data.experimental.assert_cardinality(int(manifest["num_examples"])))

    def build(self, dataset: tf.data.Dataset) -> dict:
        """Writes this worker's part of the cache (all of it without sharding).

        Does not wait for the other workers: use it for build-only jobs. The
        worker that completes the last part writes the manifest.

        Args:
            dataset: the unbatched ``(x, y[, sample_weight])`` dataset, the
                same for every worker.

        Returns:
            The manifest (a dict) when the cache is complete, else this
            part's journal (``"complete": True`` once the part is written).
        """
        return self._ensure(_with_labels(dataset)[0], wait=False)

    def check_student(self, student):
        """Checks that ``student`` outputs as many classes as the cached teacher.

        Call it after the cache was built or read (e.g. after
        ``dataset.apply``). `DistillationLoss` also refuses a mismatch, but
        only at the first training step.

        Args:
            student: a Keras 3 or tf_keras model.

        Raises:
            ValueError: when the class counts differ, or the cache was not
                used yet.
        """
        if self.num_classes is None:
            raise ValueError("The cache has not been built or read yet; apply it to the dataset first.")
        _compat.check_model(student, "student")
        shape = _model_output_shape(student, self.output_index)
        if shape is not None and shape[-1] is not None and int(shape[-1]) != self.num_classes:
            raise ValueError(
                f"The student outputs {int(shape[-1])} classes but the teacher-logit cache at "
                f"{self.directory!r} holds logits for {self.num_classes} classes."
            )

    # -- fingerprint ------------------------------------------------------

    def _say(self, message):
        if self.verbose:
            print(f"keras_kd cache: {message}", flush=True)

    def _fingerprint(self, dataset, count_hint):
        static = _model_output_shape(self.teacher, self.output_index)
        if static is not None and len(static) >= 2 and all(d is not None for d in static[1:]):
            # Known from the model: the teacher runs only in the build pass.
            teacher_shape = tuple(int(d) for d in static[1:])
        else:
            x0 = next(iter(dataset.take(1)))[0]
            if self.augment is not None:
                x0 = self.augment(x0, _seed_of(self.seed, tf.constant(0, tf.int64), 0, self.views))
            probe = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), x0)
            out = targets_lib.teacher_output(self.teacher(probe, training=False), self.output_index)
            teacher_shape = tuple(int(d) for d in out.shape[1:])
            if not teacher_shape or any(d is None for d in teacher_shape):
                raise ValueError(
                    f"Expected the teacher to output logits of shape (batch, ..., classes). Received: {out.shape}"
                )
        if self.top_k is not None and self.top_k > teacher_shape[-1]:
            raise ValueError(
                f"Expected `top_k` <= the teacher's {teacher_shape[-1]} classes. Received: top_k={self.top_k}"
            )
        settings = {"top_k": self.top_k, "dtype": self.dtype, "output_index": repr(self.output_index)}
        if self.augment is not None:
            settings.update(
                views=self.views,
                seed=self.seed,
                augment=getattr(self.augment, "__qualname__", type(self.augment).__name__),
                augment_digest=self._augment_digest(dataset),
            )
        digest, count = _fingerprint.inputs_digest(dataset)
        if count_hint is not None and count != count_hint:
            raise ValueError(
                f"The dataset reports {count_hint} elements (its cardinality) but yields {count}."
            )
        if count == 0:
            raise ValueError("The dataset given to `cache_teacher_logits` is empty.")
        fp = {
            "teacher": {
                "flavour": _compat.flavour_of(self.teacher),
                "output_shape": [None, *teacher_shape],
                "weights_digest": _fingerprint.weights_digest(self.teacher),
                "architecture_digest": _fingerprint.architecture_digest(self.teacher),
            },
            "dataset": {
                "element_spec": _describe_spec(dataset.element_spec),
                "count": count,
                "inputs_digest": digest,
            },
            "settings": settings,
        }
        return fp, teacher_shape, count

    def _augment_digest(self, dataset):
        h = hashlib.blake2b(digest_size=16)
        for i, element in enumerate(dataset.take(_AUGMENT_SAMPLE)):
            x = element[0]
            views = []
            for v in range(self.views):
                s = _seed_of(self.seed, tf.constant(i, tf.int64), v, self.views)
                a, b = self.augment(x, s), self.augment(x, s)
                for ta, tb in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
                    if not np.array_equal(np.asarray(ta), np.asarray(tb)):
                        raise ValueError(
                            "`augment` is not deterministic given its seed: two calls with the same seed "
                            "returned different inputs, so the student could not see the pixels the "
                            "teacher saw. Use stateless ops (tf.image.stateless_*, tf.random.stateless_*) "
                            "seeded with the `seed` argument."
                        )
                _fingerprint.hash_element(h, a)
                views.append(a)
            if self.views > 1 and i == 0:
                same = all(
                    all(
                        np.array_equal(np.asarray(p), np.asarray(q))
                        for p, q in zip(tf.nest.flatten(views[0]), tf.nest.flatten(w))
                    )
                    for w in views[1:]
                )
                if same:
                    _warn(
                        f"`augment` returned the same inputs for all {self.views} views of the first "
                        "example: it seems to ignore its `seed` argument."
                    )
        return h.hexdigest()

    # -- build or read ------------------------------------------------------

    def _ensure(self, dataset, wait):
        known_count = _check_dataset(dataset, self.teacher)
        suspicious = _random_ops(dataset)
        if suspicious:
            _warn(
                "The dataset given to `cache_teacher_logits` looks random before the transform "
                f"(it contains {', '.join(suspicious)}). The cache pairs teacher logits with "
                "elements by position, so random augmentation or reshuffling before it gives the "
                "student logits of other inputs. Apply shuffling and augmentation after the "
                "transform, or pass `augment=fn(x, seed)` to cache augmentation-consistent views."
            )
        store = _store(self.directory)
        store.owned()  # refuses a directory of another keras_kd cache kind before any work
        fp, teacher_shape, count = self._fingerprint(dataset, known_count)
        self.num_classes = teacher_shape[-1]
        layout = _logit_layout(
            max(1, self.batch_size // self.views), self.views, teacher_shape, self.top_k, self.dtype
        )
        build = _build.Build(
            store,
            fp,
            layout,
            count,
            self.shard_index,
            self.num_shards,
            diff=lambda old, n: _fingerprint_diff(old, fp, n),
            extra=lambda lay: _manifest_extra(lay, teacher_shape, self.top_k, self.dtype, self.views),
            validate_extra=_validate_extra,
            checksum=self.verify == "checksum",
            say=self._say,
        )
        manifest, problem = self._open(build, dataset)
        if manifest is not None:
            return manifest
        fresh = False
        if problem is not None:
            if self.on_mismatch == "error":
                raise problem
            self._say(f"rebuilding: {problem}")
            fresh = isinstance(problem, _ProbeMismatch)
        elif _fingerprint.sample_digest(dataset, _SAMPLE_SIZE) != _fingerprint.sample_digest(
            dataset, _SAMPLE_SIZE
        ):
            reshuffles = [s for s in suspicious if "shuffle" in s or "Dataset.random" in s]
            if reshuffles:
                # Another order on every pass: every element would get another example's logits.
                raise ValueError(
                    "The dataset given to `cache_teacher_logits` reshuffles on every pass (it contains "
                    f"{', '.join(reshuffles)} and yields its elements in another order each time it is "
                    "read), so the cached logits would belong to other examples. Shuffle after the "
                    "transform: raw.apply(cache).shuffle(n), or pass reshuffle_each_iteration=False "
                    "or a fixed seed before it."
                )
            _warn(
                "The dataset given to `cache_teacher_logits` yields different elements each time it "
                "is iterated (random augmentation or reshuffling before the transform?). The cache "
                "pairs logits with elements by position, so the student would be trained on logits "
                "of other inputs. Make the dataset deterministic before the transform, or pass "
                "`augment=fn(x, seed)`."
            )
        store.claim(refuse_foreign_files=False)
        build = build.with_layout(self._resume_layout(store, build))
        if fresh:
            build = build.replacing(_current_manifest(store))

        def recheck():
            # Another job may have finished a cache while this one waited for the lock.
            if problem is not None:
                return None  # rebuilding what was found wrong
            found, why = build.open()
            if found is not None and found["generation"] == build.gen and build.verify(found) is None:
                return found
            if found is None and why is not None and self.on_mismatch == "error":
                raise why  # e.g. another job's cache for another teacher: never served, never replaced
            return None

        found, part = build.build_part(
            lambda start, rows, writer: self._produce(dataset, start, rows, build.layout, writer),
            self._blocks_per_file(build.layout),
            fresh=fresh,
            recheck=recheck,
        )
        if found is not None:
            return self._opened(found)
        if self.verbose == 2:
            self._say(f"part {self.shard_index} of {self.num_shards} written")
        manifest = build.assemble()
        if manifest is None and wait:
            manifest = build.wait_for_parts(self.wait_timeout)
        if manifest is None:
            return part
        return self._opened(manifest)

    def _opened(self, manifest):
        self.manifest = manifest
        return manifest

    def _open(self, build, dataset):
        """``(manifest, problem)`` for an existing cache: schema, fingerprint, files, teacher probe."""
        manifest, problem = build.open()
        if manifest is None:
            return None, problem
        if not self._will_hold_in_memory(manifest):
            problem = build.verify(manifest)
            if problem is not None:
                return None, problem
        try:
            blocks = self._blocks(build.store, manifest)
        except CacheCorruptedError as e:
            return None, CacheCorruptedError(
                f"The teacher-logit cache at {self.directory!r} is damaged: {e}. Pass "
                "on_mismatch='rebuild' to rebuild it, or use another `directory`."
            )
        problem = self._probe(dataset, manifest, blocks)
        if problem is not None:
            return None, problem
        self._opened_blocks = blocks
        return self._opened(manifest), None

    def _will_hold_in_memory(self, manifest):
        return _build.choose_in_memory(self.in_memory, manifest)

    def _blocks(self, store, manifest):
        return _storage.Stored(
            store, manifest, self._will_hold_in_memory(manifest), checksum=self.verify == "checksum"
        )

    def _probe(self, dataset, manifest, blocks):
        """Re-runs the teacher on the first examples and compares with the stored logits.

        A cheap guard against a teacher whose function changed in a way the
        fingerprint cannot see (e.g. a subclassed model without a config).
        """
        rows = min(_PROBE_ROWS, manifest["num_examples"], manifest["layout"]["block_rows"])
        layout = _storage.Layout(manifest["layout"]["block_rows"], [])
        x = next(iter(self._teacher_inputs(dataset, 0, rows, layout)))
        fresh, _ = self._teacher_step(layout)(x)
        for name in ("values", "logsumexp"):
            if name not in fresh:
                continue
            a = np.asarray(fresh[name], np.float32)
            b = np.asarray(blocks.first_rows(len(a))[name], np.float32)
            if a.shape != b.shape:
                return _ProbeMismatch(
                    f"The teacher's outputs have shape {a.shape[1:]}, the cache at {self.directory!r} holds {b.shape[1:]}."
                )
            scale = 1.0 + np.abs(a)
            worst = float(np.max(np.abs(a - b) / scale)) if a.size else 0.0
            if not np.isfinite(worst) or worst > 1e-2:
                return _ProbeMismatch(
                    f"The teacher-logit cache at {self.directory!r} was built by a teacher that computes "
                    f"something else: re-run on the first {rows} examples, the teacher's logits differ from "
                    f"the stored ones (max relative difference {worst:.3g}) although its fingerprint matches. "
                    "Pass on_mismatch='rebuild' to rebuild it, or use another `directory`."
                )
        return None

    def _resume_layout(self, store, build):
        """The layout of an interrupted build of this part with the same fingerprint, to resume it."""
        old = store.read_journal(self.shard_index, self.num_shards)
        if old is None or old["fingerprint"] != build.fp:
            return build.layout
        rows = old["layout"]["block_rows"]
        if rows > max(build.count, self.batch_size):  # bounded: never more rows than this build needs
            return build.layout
        candidate = _storage.Layout(rows, build.layout.specs)
        return candidate if candidate.to_json() == old["layout"] else build.layout

    def _produce(self, dataset, start_row, rows, layout, writer):
        inputs = self._teacher_inputs(dataset, start_row, rows, layout)
        step = self._teacher_step(layout)
        target = math.ceil(rows / layout.block_rows)
        where = "" if self.num_shards == 1 else f" (part {self.shard_index + 1} of {self.num_shards})"
        self._say(f"running the teacher once over {rows} examples{where}; writing to {self.directory}")
        bar = keras.utils.Progbar(target, verbose=self.verbose, unit_name="batch") if self.verbose else None
        first_block, first = writer.block, True
        want = None
        for x in inputs:
            arrays, stats = step(x)
            self._check_stats(stats, first)
            first = False
            arrays = {k: v.numpy() for k, v in arrays.items()}
            got = arrays["values"].shape[1:]
            want = want or tuple(layout.specs[0][2])
            if tuple(got) != want:
                raise ValueError(
                    f"The teacher's output shape varies between examples ({want} then {tuple(got)} per "
                    "example); the cache needs one fixed output shape."
                )
            yield arrays
            if bar is not None:
                bar.update(writer.block - first_block)
        if bar is not None:
            bar.update(target, finalize=True)

    def _blocks_per_file(self, layout):
        if self.shard_size is not None:
            return max(1, math.ceil(self.shard_size / layout.block_rows))
        return max(1, _TARGET_FILE_BYTES // layout.block_bytes)

    def _teacher_inputs(self, dataset, start_row, rows_left, layout):
        ds = dataset
        if start_row:
            ds = ds.skip(start_row)
        if rows_left is not None:
            ds = ds.take(rows_left)
        if self.augment is None:
            ds = ds.map(lambda x, *rest: x)
        else:
            augment, seed, views = self.augment, self.seed, self.views
            ids = tf.data.Dataset.range(start_row, tf.int64.max)

            def all_views(i, element):
                x = element[0]
                out = [augment(x, _seed_of(seed, i, v, views)) for v in range(views)]
                return tf.nest.map_structure(lambda *t: tf.stack(t), *out)

            ds = tf.data.Dataset.zip((ids, ds)).map(
                all_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        if _batchable(ds.element_spec):
            return ds.batch(layout.block_rows).prefetch(tf.data.AUTOTUNE)
        # Elements of varying shape: the teacher sees each one alone, unpadded.
        return ds.batch(1).prefetch(tf.data.AUTOTUNE)

    def _teacher_step(self, layout):
        # One traced function per teacher and settings, reused by later builds
        # (as `Model.predict` reuses its `predict_function`).
        key = (repr(self.output_index), self.top_k, self.views, self.augment is not None)
        try:
            steps = _STEPS.setdefault(self.teacher, {})
        except TypeError:  # pragma: no cover - unhashable model
            steps = {}
        if key not in steps:
            steps[key] = self._make_teacher_step()
        return steps[key]

    def _make_teacher_step(self):
        # A weak reference: `_STEPS` is keyed by the teacher, so the step must
        # not keep it alive.
        teacher_ref = weakref.ref(self.teacher)
        output_index, top_k, views = self.output_index, self.top_k, self.views
        augmented = self.augment is not None

        @tf.function(reduce_retracing=True, autograph=False)
        def step(x):
            if augmented:
                n = tf.shape(tf.nest.flatten(x)[0])[0]
                x = tf.nest.map_structure(lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), x)
            out = targets_lib.teacher_output(teacher_ref()(x, training=False), output_index)
            out = tf.cast(out, tf.float32)
            if augmented:
                out = tf.reshape(out, tf.concat([[n, views], tf.shape(out)[1:]], 0))
            else:
                out = out[:, None]
            # Inputs too: TensorFlow's fused kernels (MatMul + ReLU) can turn a
            # NaN input into finite logits, which would be cached silently.
            floats = [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(x) if t.dtype.is_floating]
            stats = {
                "finite": tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(out)), *floats])),
                "max_abs": tf.reduce_max(tf.abs(out)),
                "probabilities": tf.logical_and(
                    tf.logical_and(tf.reduce_min(out) >= 0.0, tf.reduce_max(out) <= 1.0),
                    tf.reduce_all(tf.abs(tf.reduce_sum(out, -1) - 1.0) < 1e-3),
                ),
            }
            if top_k is None:
                return {"values": out}, stats
            values, indices = tf.math.top_k(out, k=top_k)
            return {"values": values, "indices": indices, "logsumexp": tf.reduce_logsumexp(out, -1)}, stats

        return step

    def _check_stats(self, stats, first):
        if not bool(stats["finite"]):
            raise ValueError(
                "The teacher's inputs or outputs contain NaN or Inf; refusing to cache them (the "
                "teacher runs here, outside the training step, so this is where it is checked). "
                "Check the dataset and the teacher."
            )
        if self.dtype == "float16" and float(stats["max_abs"]) > _FLOAT16_MAX:
            raise ValueError(
                f"The teacher's logits reach {float(stats['max_abs']):.4g}, beyond float16's range "
                f"({_FLOAT16_MAX:g}). Use dtype='float32'."
            )
        if first and bool(stats["probabilities"]):
            _warn(
                "The teacher's outputs look like probabilities (in [0, 1], rows summing to 1), "
                "but the cache stores logits and DistillationLoss applies a softmax to them. "
                "Remove the teacher's final softmax (or cache its pre-softmax output via "
                "`output_index`)."
            )

    # -- reading ----------------------------------------------------------

    def _reader(self, dataset, manifest, stored):
        """The output pipeline.

        ``blocks`` yields the stored blocks as ``{field: (block_rows, ...)}``
        (from host memory for a small cache, else one
        ``FixedLengthRecordDataset`` record per block). When the elements
        have fixed shapes, the dataset is batched into the same blocks,
        zipped with them, turned into `TeacherTargets` by one function call
        per block and split again with ``unbatch``: there is no per-example
        function call. Elements of varying shape are paired one by one.
        """
        top_k = manifest["top_k"]
        self.num_classes = int(manifest["num_classes"])
        n = int(manifest["num_examples"])
        rows, views, seed, augment = (
            int(manifest["layout"]["block_rows"]),
            int(manifest["views"]),
            self.seed,
            self.augment,
        )
        if int(dataset.cardinality()) < 0:
            # Unknown size: fail loudly rather than pair a longer or shorter dataset.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(n))
        if augment is None and _batchable(dataset.element_spec):
            # Row by row: the stored rows (view 0, indices as int32) are
            # selected once for all rows in memory, or once per block when
            # streaming, zipped with the elements and their positions, and the
            # per-element map only wraps ready tensors in TeacherTargets.
            # Measured (1,257 x 64, shuffle + batch 64): as fast as
            # TeacherTargets sliced from memory; any op per element (even an
            # index) or splitting dataset batches (batch -> zip -> unbatch) was
            # 2.5-5x slower.
            if top_k is None:
                rows_of = stored.rows(lambda a: (a["values"][:, 0],), lambda b: (b["values"][:, 0],))
            else:
                rows_of = stored.rows(
                    lambda a: (a["values"][:, 0], a["indices"][:, 0].astype(np.int32), a["logsumexp"][:, 0]),
                    lambda b: (
                        b["values"][:, 0],
                        tf.cast(b["indices"][:, 0], tf.int32),
                        b["logsumexp"][:, 0],
                    ),
                )

            def pair(element, row, example_id):
                x, y, *sample_weight = element
                if top_k is None:
                    targets = targets_lib.TeacherTargets(labels=y, logits=row[0], example_id=example_id)
                else:
                    targets = targets_lib.TeacherTargets(
                        labels=y,
                        topk_values=row[0],
                        topk_indices=row[1],
                        topk_logsumexp=row[2],
                        example_id=example_id,
                    )
                return (x, targets, *sample_weight)

            out = tf.data.Dataset.zip((dataset, rows_of, tf.data.Dataset.range(n))).map(pair)
            return out.apply(tf.data.experimental.assert_cardinality(n))
        blocks = stored.blocks()
        blocks = tf.data.Dataset.zip((tf.data.Dataset.range(int(manifest["num_blocks"])), blocks))
        if augment is not None:
            # One key per block and pass: a new choice of views on every pass
            # (epoch), reproducible from `seed`.
            keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            blocks = tf.data.Dataset.zip((blocks, keys))
        else:
            blocks = blocks.map(lambda i, r: ((i, r), tf.constant(0, tf.int64)))

        def targets_of(block, key, labels, count):
            """TeacherTargets for the first `count` examples of a block, and view seeds."""
            block_id, stored = block
            stored = {k: v[:count] for k, v in stored.items()}
            example_id = block_id * rows + tf.range(tf.cast(count, tf.int64))
            view_seed = None
            if augment is not None:
                view = tf.random.stateless_uniform(
                    tf.reshape(count, [1]),
                    seed=tf.stack([key, block_id]),
                    minval=0,
                    maxval=views,
                    dtype=tf.int64,
                )
                stored = {k: tf.gather(v, view, batch_dims=1) for k, v in stored.items()}
                view_seed = _seed_of(seed, example_id, view, views)
            else:
                stored = {k: v[:, 0] for k, v in stored.items()}
            if top_k is None:
                targets = targets_lib.TeacherTargets(
                    labels=labels, logits=stored["values"], example_id=example_id
                )
            else:
                targets = targets_lib.TeacherTargets(
                    labels=labels,
                    topk_indices=tf.cast(stored["indices"], tf.int32),
                    topk_values=stored["values"],
                    topk_logsumexp=stored["logsumexp"],
                    example_id=example_id,
                )
            return targets, view_seed

        def replay(x, targets, view_seed, *sample_weight):
            return (augment(x, view_seed), targets, *sample_weight)

        if _batchable(dataset.element_spec):

            def attach(batch, blocks):
                x, y, *sample_weight = batch
                targets, view_seed = targets_of(*blocks, y, tf.shape(y, out_type=tf.int64)[0])
                if augment is None:
                    return (x, targets, *sample_weight)
                return (x, targets, view_seed, *sample_weight)

            out = tf.data.Dataset.zip((dataset.batch(rows), blocks)).map(attach).unbatch()
            if augment is not None:
                out = out.map(replay, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:

            def per_block(block, key):
                count = tf.minimum(tf.cast(rows, tf.int64), n - block[0] * rows)
                targets, view_seed = targets_of(block, key, tf.zeros([count], tf.int8), count)
                return targets, (tf.zeros([count, 2], tf.int64) if view_seed is None else view_seed)

            def attach(element, per_example):
                x, y, *sample_weight = element
                targets, view_seed = per_example
                targets = targets.with_labels(y)
                if augment is not None:
                    x = augment(x, view_seed)
                return (x, targets, *sample_weight)

            per_example = blocks.map(per_block).unbatch()
            out = tf.data.Dataset.zip((dataset, per_example)).map(
                attach, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        return out.apply(tf.data.experimental.assert_cardinality(n))


def _current_manifest(store):
    try:
        return store.read_manifest(_validate_extra)
    except (CacheCorruptedError, CacheMismatchError):
        return None


class _ProbeMismatch(CacheMismatchError):
    """The teacher, re-run on the first examples, disagrees with the stored logits."""


def _batchable(spec) -> bool:
    """Whether elements of this spec can be batched (fixed shapes, plain tensors)."""
    return all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in tf.nest.flatten(spec))


def _model_output_shape(model, output_index=0):
    outputs = getattr(model, "outputs", None)
    if outputs:
        out = (
            outputs[output_index]
            if isinstance(output_index, int) and output_index < len(outputs)
            else outputs[0]
        )
        return tuple(out.shape)
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape) if shape is not None else None
