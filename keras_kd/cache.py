"""The teacher-logit cache: run the teacher once, distill for many epochs.

`cache_teacher_logits` returns a ``Dataset -> Dataset`` transform. Applied to
an **unbatched** dataset of ``(x, y)`` or ``(x, y, sample_weight)`` elements,
it runs the teacher over the dataset once (in inference mode, batched), writes
its logits to disk, and yields
``(x, TeacherTargets(labels=y, logits=..., example_id=i)[, sample_weight])``
for every element, in order. Later epochs and later processes only read the
files, so a distillation epoch costs what a student-only epoch costs.

On-disk format (version 1), all inside ``directory``:

* ``logits-PPPPP-FFFFF.bin``: raw little-endian blocks, no header. A block
  holds ``block_rows`` consecutive examples (the teacher batch); its fields
  are stored one after the other (field-major), each as a C-order array:

  - dense: ``values``, shape ``(block_rows, views) + teacher_shape``, float16
    or float32;
  - top-k: ``values`` ``(block_rows, views, ..., k)`` float16/float32, then
    ``indices`` ``(block_rows, views, ..., k)`` int16 (int32 for more than
    32767 classes), then ``logsumexp`` ``(block_rows, views, ...)`` float32.

  Files hold whole blocks; only the very last block of the cache is padded
  with zeros. tf.data reads them with one ``FixedLengthRecordDataset`` record
  per block, so reading costs one op per block, not per example.
* ``part-PPPPP-of-NNNNN.json``: the journal of one build part (one per
  worker), rewritten atomically after each finished file.
* ``manifest.json``: written last, atomically. It records the format, the
  fingerprint (teacher, dataset, settings), the layout (``block_rows``,
  ``fields`` with dtypes, shapes and byte offsets) and every file with its
  size and CRC32. A cache is valid only when its manifest exists and every
  file has the recorded size and checksum.

Nothing is pickled; any NumPy user can read the files with ``np.fromfile``
and the offsets in the manifest.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import time
import warnings
import weakref
import zlib
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from keras_kd import _compat
from keras_kd import _fingerprint
from keras_kd import targets as targets_lib

FORMAT = "keras_kd.teacher_logit_cache"
VERSION = 1
MANIFEST = "manifest.json"

_DTYPES = {"float16": "<f2", "float32": "<f4"}
_SAMPLE_SIZE = 64  # elements hashed for the dataset fingerprint
_AUGMENT_SAMPLE = 4  # elements whose augmented views are hashed
_TARGET_FILE_BYTES = 64 << 20  # default size of one data file
_FLOAT16_MAX = 65504.0

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


# Traced teacher steps, per teacher model (see `TeacherLogitCache._teacher_step`).
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class CacheMismatchError(ValueError):
    """The cache in a directory was built for another teacher, dataset or settings."""


class CacheCorruptedError(ValueError):
    """A cache file is missing, truncated or fails its checksum."""


# ---------------------------------------------------------------------------
# Low-level, crash-safe file writing. `_open_for_write` is the one place that
# opens files for writing (tests replace it to inject faults such as a full
# disk).
# ---------------------------------------------------------------------------


def _open_for_write(path: str):
    return open(path, "wb")


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_error(e: OSError, path: str) -> OSError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(
            e.errno,
            f"The disk is full: could not write the teacher-logit cache file {path!r} "
            f"({e.strerror or e}). Nothing partial is accepted as a cache; free some space "
            "and run again to resume the build, or choose another `directory`.",
        )
    return OSError(
        e.errno,
        f"Could not write the teacher-logit cache file {path!r}: {e}. Check that "
        "`directory` is writable.",
    )


class _AtomicFile:
    """Writes ``path`` through a temporary file, fsyncs it and renames it.

    Tracks size and CRC32 of what was written. On any error the temporary
    file is removed and nothing appears under ``path``.
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = _tmp_name(path)
        self.size = 0
        self.crc = 0
        try:
            self._f = _open_for_write(self.tmp)
        except OSError as e:
            raise _write_error(e, path) from e

    def write(self, data: bytes):
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise _write_error(e, self.path) from e
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def commit(self):
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise _write_error(e, self.path) from e
        _fsync_dir(os.path.dirname(self.path))

    def abort(self):
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.remove(self.tmp)
        except OSError:
            pass


def _write_json(path: str, obj):
    f = _AtomicFile(path)
    f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))
    f.commit()


def _read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return crc
            crc = zlib.crc32(chunk, crc)


def _check_file(path: str, size: int, crc: Optional[int], verify: str) -> Optional[str]:
    """Returns why ``path`` is unusable, or None if it is intact."""
    try:
        actual = os.path.getsize(path)
    except OSError:
        return f"the cache file {path!r} is missing"
    if actual != size:
        return f"the cache file {path!r} is truncated or damaged: it has {actual} bytes, the manifest records {size}"
    if verify == "checksum" and crc is not None:
        got = _file_crc(path)
        if got != crc:
            return f"the cache file {path!r} is corrupted: its CRC32 is {got:#010x}, the manifest records {crc:#010x}"
    return None


def _remove_stale_tmp(directory: str):
    """Removes temporary files left by dead processes of this host (killed builds)."""
    host = socket.gethostname()
    for name in os.listdir(directory):
        if ".tmp-" not in name:
            continue
        parts = name.split(".tmp-", 1)[1].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host:
            continue
        try:
            pid = int(parts[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass


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


# ---------------------------------------------------------------------------
# Layout of one block.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    block_rows: int
    views: int
    teacher_shape: tuple  # per-example teacher output, e.g. (classes,)
    top_k: Optional[int]
    dtype: str  # "float16" or "float32"

    @property
    def num_classes(self) -> int:
        return int(self.teacher_shape[-1])

    def fields(self):
        lead = (self.block_rows, self.views)
        if self.top_k is None:
            specs = [("values", _DTYPES[self.dtype], lead + tuple(self.teacher_shape))]
        else:
            inner = lead + tuple(self.teacher_shape[:-1])
            index_dtype = "<i2" if self.num_classes <= 32767 else "<i4"
            specs = [
                ("values", _DTYPES[self.dtype], inner + (self.top_k,)),
                ("indices", index_dtype, inner + (self.top_k,)),
                ("logsumexp", "<f4", inner),
            ]
        out, offset = [], 0
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            out.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "bytes": nbytes})
            offset += nbytes
        return out

    @property
    def block_bytes(self) -> int:
        return sum(f["bytes"] for f in self.fields())

    @property
    def bytes_per_example(self) -> float:
        return self.block_bytes / self.block_rows

    def to_json(self):
        return {
            "block_rows": self.block_rows,
            "views": self.views,
            "teacher_shape": list(self.teacher_shape),
            "top_k": self.top_k,
            "dtype": self.dtype,
        }

    @classmethod
    def from_json(cls, d):
        return cls(
            block_rows=int(d["block_rows"]),
            views=int(d["views"]),
            teacher_shape=tuple(int(s) for s in d["teacher_shape"]),
            top_k=None if d["top_k"] is None else int(d["top_k"]),
            dtype=str(d["dtype"]),
        )

    def encode(self, arrays: dict, rows: int) -> bytes:
        """Packs the fields of ``rows`` examples into one (zero-padded) block."""
        chunks = []
        for field in self.fields():
            a = np.asarray(arrays[field["name"]]).astype(field["dtype"], copy=False)
            if rows < self.block_rows:
                padded = np.zeros(field["shape"], field["dtype"])
                padded[:rows] = a
                a = padded
            chunks.append(np.ascontiguousarray(a).tobytes())
        return b"".join(chunks)

    def decode(self, record):
        """tf: one block record -> dict of field tensors."""
        fields = self.fields()
        out = {}
        for field in fields:
            raw = record if len(fields) == 1 else tf.strings.substr(record, field["offset"], field["bytes"])
            dtype = tf.as_dtype(np.dtype(field["dtype"]).newbyteorder("="))
            out[field["name"]] = tf.reshape(tf.io.decode_raw(raw, dtype, little_endian=True), field["shape"])
        return out


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
    ot, nt = old.get("teacher", {}), new.get("teacher", {})
    if ot.get("output_shape") != nt.get("output_shape"):
        changes.append(f"the teacher's output shape changed: {ot.get('output_shape')} -> {nt.get('output_shape')}")
    if ot.get("weights_digest") != nt.get("weights_digest"):
        changes.append(
            "the teacher's weights changed (digest "
            f"{str(ot.get('weights_digest'))[:12]} -> {str(nt.get('weights_digest'))[:12]})"
        )
    od, nd = old.get("dataset", {}), new.get("dataset", {})
    if od.get("element_spec") != nd.get("element_spec"):
        changes.append(f"the dataset's element_spec changed: {od.get('element_spec')} -> {nd.get('element_spec')}")
    if nd.get("count") is not None and num_examples is not None and nd["count"] != num_examples:
        changes.append(f"the dataset's size changed: {num_examples} -> {nd['count']} examples")
    if od.get("sample_digest") != nd.get("sample_digest"):
        changes.append(
            f"the dataset's contents changed (digest of its first {nd.get('sample_size')} elements "
            f"{str(od.get('sample_digest'))[:12]} -> {str(nd.get('sample_digest'))[:12]}); if it "
            "shuffles or randomly augments before this transform, move that after the "
            "transform (or pass `augment=` for augmentation the teacher must see)"
        )
    os_, ns = old.get("settings", {}), new.get("settings", {})
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
            "Expected a dataset of unbatched `(x, y)` or `(x, y, sample_weight)` elements. "
            f"Received element_spec={spec}."
        )
    if isinstance(spec[1], targets_lib.TeacherTargets.Spec):
        raise ValueError("The dataset already carries teacher targets; apply the teacher-logit cache to the raw dataset.")
    if not isinstance(spec[1], tf.TensorSpec):
        raise ValueError(
            "Expected the labels `y` of each element to be a single tensor. "
            f"Received: y spec={spec[1]}."
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


def _output(outputs, output_index):
    if isinstance(outputs, (list, tuple)):
        return outputs[output_index]
    if isinstance(outputs, dict):
        return outputs[output_index] if output_index in outputs else list(outputs.values())[0]
    return outputs


def _seed_of(seed, example_id, view, views):
    """The documented per-view augmentation seed ``[seed, id * views + view]``."""
    example_id = tf.cast(example_id, tf.int64)
    view = tf.cast(view, tf.int64)
    return tf.stack([tf.broadcast_to(tf.constant(seed, tf.int64), tf.shape(example_id)), example_id * views + view], axis=-1)


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
    transform (``int64``). Pairing is by that position, so ``shuffle``,
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

    The cache records a fingerprint: the teacher (digest of its weights, its
    output shape), the dataset (element spec, count, digest of its first 64
    elements) and the settings (``top_k``, ``dtype``, ``output_index``, and
    ``views``, ``seed`` and a digest of ``augment``'s output when augmenting).
    A cache that does not match is refused with a `CacheMismatchError` saying
    what changed, or rebuilt with ``on_mismatch="rebuild"``. ``batch_size``,
    ``shard_size`` and ``num_shards`` only change the layout, not the
    fingerprint.

    Crash safety: every file is written to a temporary name, fsynced and
    renamed; the manifest is written last. A build killed at any point leaves
    no manifest, so nothing is accepted as a cache; the next run checks the
    finished files of the interrupted build (size and CRC32), keeps them and
    resumes after them. Before use, every file is checked against the
    manifest.

    Multi-worker build: with ``num_shards=N`` and ``shard_index=i`` (or a
    ``tf.distribute.InputContext``), worker ``i`` runs the teacher on its own
    contiguous ``1/N`` of the dataset and writes that part. When all parts
    are there, any process writes the manifest and reads the cache as a
    whole; applying the transform waits for the other parts (see
    ``wait_timeout``), `TeacherLogitCache.build` does not. The directory must
    be on a filesystem all workers share.

    Memory: the output streams blocks of ``batch_size`` examples from disk;
    memory does not grow with the number of examples.

    Speed: when all elements have one fixed shape, the output moves in blocks
    (``batch`` -> one function call per block -> ``unbatch``), with no
    per-example function call. Elements of varying shape (e.g. token
    sequences) work too: the teacher then sees each example alone, unpadded,
    and the output pairs elements one by one, which is slower.

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

    Returns:
        A `TeacherLogitCache`: use it with ``dataset.apply(...)``.

    Raises:
        ValueError: for invalid arguments (at construction); when applied, for
            an infinite, empty or batched dataset, labels that are not one
            tensor, teacher outputs with NaN/Inf or out of float16 range, or
            an ``augment`` that is not deterministic given its seed.
        CacheMismatchError: when the cache was built for another teacher,
            dataset or settings and ``on_mismatch="error"``.
        CacheCorruptedError: when a cache file is missing, truncated or
            corrupted and ``on_mismatch="error"``.
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
    sizes and CRC32s.

    Args:
        directory: the cache directory.

    Returns:
        The manifest as a dict.

    Raises:
        FileNotFoundError: when the directory holds no finished cache.
        CacheCorruptedError: when the manifest is unreadable.
    """
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No finished teacher-logit cache in {os.fspath(directory)!r} (no {MANIFEST}).")
    try:
        manifest = _read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheCorruptedError(f"The cache manifest {path!r} is corrupted: {e}.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptedError(f"{path!r} is not a keras_kd teacher-logit cache manifest.")
    if manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"The cache at {os.fspath(directory)!r} has format version {manifest.get('version')}; "
            f"this keras_kd reads version {VERSION}. Rebuild it with on_mismatch='rebuild'."
        )
    return manifest


class _PartWriter:
    """Packs teacher outputs into blocks and blocks into files of one part.

    Teacher batches need not be blocks: rows are buffered until a block is
    full (only the part's last block may be partial, and it is padded).
    """

    def __init__(self, owner, layout, journal, journal_path, blocks_per_file, start_block):
        self.owner, self.layout, self.journal, self.journal_path = owner, layout, journal, journal_path
        self.blocks_per_file = blocks_per_file
        self.block = start_block
        self.file_index = len(journal["files"])
        self.pending = []  # dicts of arrays not yet written
        self.pending_rows = 0
        self.current = None  # (file, name, first_block, blocks)

    def add(self, arrays):
        self.pending.append(arrays)
        self.pending_rows += len(arrays["values"])
        while self.pending_rows >= self.layout.block_rows:
            self._write_block(self.layout.block_rows)

    def _write_block(self, rows):
        if len(self.pending) == 1:
            merged = self.pending[0]
        else:
            merged = {k: np.concatenate([a[k] for a in self.pending]) for k in self.pending[0]}
        block = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.pending = [rest] if len(rest["values"]) else []
        self.pending_rows -= rows
        part = self.journal["part"]
        if self.current is None:
            name = f"logits-{part:05d}-{self.file_index:05d}.bin"
            self.current = [_AtomicFile(os.path.join(self.owner.directory, name)), name, self.block, 0]
        self.current[0].write(self.layout.encode(block, rows))
        self.current[3] += 1
        self.block += 1
        if self.current[3] == self.blocks_per_file:
            self._finish_file()

    def _finish_file(self):
        f, name, first_block, nblocks = self.current
        f.commit()
        self.journal["files"].append(
            {"name": name, "bytes": f.size, "crc32": f.crc, "first_block": first_block, "blocks": nblocks}
        )
        _write_json(self.journal_path, self.journal)
        self.current = None
        self.file_index += 1

    def close(self):
        if self.pending_rows:
            self._write_block(self.pending_rows)
        if self.current is not None:
            self._finish_file()

    def abort(self):
        if self.current is not None:
            self.current[0].abort()
            self.current = None


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
    ):
        _compat.check_model(teacher, "teacher")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"Expected `directory` to be a path. Received: directory={directory!r}")
        self.teacher = teacher
        self.directory = os.path.abspath(os.fspath(directory))
        self.top_k = _positive_int(top_k, "top_k", allow_none=True)
        dtype_name = getattr(dtype, "name", None) or str(dtype)
        if dtype_name not in _DTYPES:
            raise ValueError(f"Expected `dtype` to be 'float16' or 'float32'. Received: dtype={dtype!r}")
        self.dtype = dtype_name
        self.batch_size = _positive_int(batch_size, "batch_size")
        if augment is not None and not callable(augment):
            raise ValueError(f"Expected `augment` to be None or a callable fn(x, seed). Received: augment={augment!r}")
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
            if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < num_shards:
                raise ValueError(
                    f"Expected `shard_index` in [0, {num_shards}). Received: shard_index={shard_index!r}"
                )
        self.num_shards = 1 if num_shards is None else int(num_shards)
        self.shard_index = 0 if shard_index is None else int(shard_index)
        if on_mismatch not in ("error", "rebuild"):
            raise ValueError(f"Expected `on_mismatch` to be 'error' or 'rebuild'. Received: on_mismatch={on_mismatch!r}")
        self.on_mismatch = on_mismatch
        self.output_index = output_index
        self.shard_size = _positive_int(shard_size, "shard_size", allow_none=True)
        if verify not in ("checksum", "size"):
            raise ValueError(f"Expected `verify` to be 'checksum' or 'size'. Received: verify={verify!r}")
        self.verify = verify
        if wait_timeout is not None and (not isinstance(wait_timeout, (int, float)) or wait_timeout < 0):
            raise ValueError(f"Expected `wait_timeout` to be None or >= 0. Received: wait_timeout={wait_timeout!r}")
        self.wait_timeout = wait_timeout
        if verbose not in (0, 1, 2):
            raise ValueError(f"Expected `verbose` in (0, 1, 2). Received: verbose={verbose!r}")
        self.verbose = verbose
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
        manifest = self._ensure(dataset, wait=True)
        return self._reader(dataset, manifest)

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
        return self._ensure(dataset, wait=False)

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

    def _fingerprint(self, dataset, count):
        static = _model_output_shape(self.teacher, self.output_index)
        if static is not None and len(static) >= 2 and all(d is not None for d in static[1:]):
            # Known from the model: the teacher runs only in the build pass.
            teacher_shape = tuple(int(d) for d in static[1:])
        else:
            x0 = next(iter(dataset.take(1)))[0]
            if self.augment is not None:
                x0 = self.augment(x0, _seed_of(self.seed, tf.constant(0, tf.int64), 0, self.views))
            probe = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), x0)
            out = _output(self.teacher(probe, training=False), self.output_index)
            teacher_shape = tuple(int(d) for d in out.shape[1:])
            if not teacher_shape or any(d is None for d in teacher_shape):
                raise ValueError(
                    f"Expected the teacher to output logits of shape (batch, ..., classes). Received: {out.shape}"
                )
        settings = {"top_k": self.top_k, "dtype": self.dtype, "output_index": self.output_index}
        if self.augment is not None:
            settings.update(
                views=self.views,
                seed=self.seed,
                augment=getattr(self.augment, "__qualname__", type(self.augment).__name__),
                augment_digest=self._augment_digest(dataset),
            )
        fp = {
            "teacher": {
                "flavour": _compat.flavour_of(self.teacher),
                "output_shape": [None, *teacher_shape],
                "weights_digest": _fingerprint.weights_digest(self.teacher),
            },
            "dataset": {
                "element_spec": _describe_spec(dataset.element_spec),
                "count": count,
                "sample_size": _SAMPLE_SIZE,
                "sample_digest": _fingerprint.sample_digest(dataset, _SAMPLE_SIZE),
            },
            "settings": settings,
        }
        if self.top_k is not None and self.top_k > teacher_shape[-1]:
            raise ValueError(
                f"Expected `top_k` <= the teacher's {teacher_shape[-1]} classes. Received: top_k={self.top_k}"
            )
        return fp, teacher_shape

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
                    all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(tf.nest.flatten(views[0]), tf.nest.flatten(w)))
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
        fp, teacher_shape = self._fingerprint(dataset, known_count)
        self.num_classes = teacher_shape[-1]
        manifest_path = os.path.join(self.directory, MANIFEST)
        if os.path.exists(manifest_path):
            problem = None
            try:
                manifest = read_manifest(self.directory)
                changes = _fingerprint_diff(manifest["fingerprint"], fp, manifest["num_examples"])
                if changes:
                    problem = CacheMismatchError(
                        f"The teacher-logit cache at {self.directory!r} was built for something else:\n  - "
                        + "\n  - ".join(changes)
                        + "\nPass on_mismatch='rebuild' to rebuild it, or use another `directory`."
                    )
                else:
                    problem = self._verify(manifest)
            except (CacheCorruptedError, CacheMismatchError) as e:
                problem = e
            if problem is None:
                self.manifest = manifest
                return manifest
            if self.on_mismatch == "error":
                raise problem
            if self.verbose:
                self._say(f"rebuilding: {problem}")
            self._check_writable()
            self._discard(manifest_path)
        # Before building: a second pass over the first elements must give the same ones.
        if not suspicious and _fingerprint.sample_digest(dataset, _SAMPLE_SIZE) != fp["dataset"]["sample_digest"]:
            _warn(
                "The dataset given to `cache_teacher_logits` yields different elements each time it "
                "is iterated (random augmentation or reshuffling before the transform?). The cache "
                "pairs logits with elements by position, so the student would be trained on logits "
                "of other inputs. Make the dataset deterministic before the transform, or pass "
                "`augment=fn(x, seed)`."
            )
        self._check_writable()
        layout, count = self._plan(fp, teacher_shape, dataset, known_count)
        part = self._build_part(dataset, fp, layout, count)
        manifest = self._assemble(fp, layout, count, part)
        if manifest is None and wait:
            manifest = self._wait_for_parts(fp, layout, count)
        if manifest is None:
            return part
        self.manifest = manifest
        return manifest

    def _verify(self, manifest):
        for entry in manifest["files"]:
            why = _check_file(os.path.join(self.directory, entry["name"]), entry["bytes"], entry["crc32"], self.verify)
            if why is not None:
                return CacheCorruptedError(
                    f"The teacher-logit cache at {self.directory!r} is damaged: {why}. "
                    "Pass on_mismatch='rebuild' to rebuild it, or delete the directory."
                )
        return None

    def _discard(self, manifest_path):
        """Invalidates a finished cache: the manifest goes first, so no reader accepts it.

        A single builder also removes the old files. With several workers the
        others may already be writing the new build under the same names, so
        old files are left to be overwritten.
        """
        try:
            old = _read_json(manifest_path)
            names = [f["name"] for f in old.get("files", [])]
        except Exception:
            names = []
        os.remove(manifest_path)
        _fsync_dir(self.directory)
        if self.num_shards > 1:
            return
        names += [n for n in os.listdir(self.directory) if n.startswith("part-") and n.endswith(".json")]
        for name in names:
            try:
                os.remove(os.path.join(self.directory, name))
            except OSError:
                pass

    def _check_writable(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
            probe = _AtomicFile(os.path.join(self.directory, ".write-probe"))
            probe.abort()
        except OSError as e:
            raise OSError(
                e.errno,
                f"Cannot write the teacher-logit cache to directory={self.directory!r}: "
                f"{e.strerror or e}. Choose a writable `directory`.",
            ) from e

    def _plan(self, fp, teacher_shape, dataset, known_count):
        count = known_count
        if count is None and self.num_shards > 1:
            # Splitting the work needs the size up front.
            count = int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
            fp["dataset"]["count"] = count
        block_rows = max(1, self.batch_size // self.views)
        journal = self._journal_path()
        if os.path.exists(journal):
            # Keep the layout of an interrupted build so it can resume.
            try:
                old = _read_json(journal)
                if old.get("fingerprint") == fp:
                    block_rows = int(old["layout"]["block_rows"])
            except Exception:
                pass
        layout = _Layout(block_rows, self.views, tuple(teacher_shape), self.top_k, self.dtype)
        if count is not None:
            needed = math.ceil(count / block_rows) * layout.block_bytes / self.num_shards
            free = shutil.disk_usage(self.directory).free
            if needed > free:
                raise OSError(
                    errno.ENOSPC,
                    f"The disk is full: the teacher-logit cache needs about {needed / 2**20:.1f} MiB "
                    f"in {self.directory!r} but only {free / 2**20:.1f} MiB are free. Free some "
                    "space, use top_k=... or dtype='float16', or choose another `directory`.",
                )
        return layout, count

    def _journal_path(self, part=None, num_parts=None):
        part = self.shard_index if part is None else part
        num_parts = self.num_shards if num_parts is None else num_parts
        return os.path.join(self.directory, f"part-{part:05d}-of-{num_parts:05d}.json")

    def _block_range(self, count, block_rows, part, num_parts):
        if count is None:
            return 0, None
        blocks = math.ceil(count / block_rows)
        return blocks * part // num_parts, blocks * (part + 1) // num_parts

    def _build_part(self, dataset, fp, layout, count):
        part, num_parts = self.shard_index, self.num_shards
        journal_path = self._journal_path()
        prefix = f"logits-{part:05d}-"
        _remove_stale_tmp(self.directory)
        b0, b1 = self._block_range(count, layout.block_rows, part, num_parts)
        journal = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fp,
            "layout": layout.to_json(),
            "part": part,
            "num_parts": num_parts,
            "first_block": b0,
            "end_block": b1,
            "files": [],
            "num_examples": count,
            "complete": False,
        }
        if os.path.exists(journal_path):
            try:
                old = _read_json(journal_path)
            except Exception:
                old = None
            keys = ("format", "version", "fingerprint", "layout", "first_block")
            same = old is not None and all(old.get(k) == journal[k] for k in keys)
            # Without a known size the end of the part is only known once it is built.
            same = same and (b1 is None or old.get("end_block") == b1)
            if same:
                kept = []
                for entry in old["files"]:
                    if _check_file(os.path.join(self.directory, entry["name"]), entry["bytes"], entry["crc32"], "checksum"):
                        break
                    kept.append(entry)
                journal["files"] = kept
                if old.get("complete") and len(kept) == len(old["files"]):
                    return old
                if kept:
                    self._say(f"resuming part {part} after {len(kept)} finished file(s)")
            elif self.verbose:
                self._say(f"discarding an unfinished build of part {part} made for other settings")
        known = {e["name"] for e in journal["files"]}
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name.endswith(".bin") and name not in known:
                os.remove(os.path.join(self.directory, name))

        done_blocks = sum(e["blocks"] for e in journal["files"])
        start_block = b0 + done_blocks
        start_row = start_block * layout.block_rows
        rows_left = None if b1 is None else max(0, min(count, b1 * layout.block_rows) - start_row)
        blocks_per_file = self._blocks_per_file(layout)

        inputs = self._teacher_inputs(dataset, start_row, rows_left, layout)
        step = self._teacher_step(layout)
        target = None if b1 is None else b1 - b0
        where = "" if num_parts == 1 else f" (part {part + 1} of {num_parts})"
        size = "all" if rows_left is None else f"{rows_left}"
        self._say(f"running the teacher once over {size} examples{where}; writing to {self.directory}")
        bar = keras.utils.Progbar(target, verbose=self.verbose, unit_name="batch") if self.verbose else None
        if bar is not None and done_blocks:
            bar.update(done_blocks)
        writer = _PartWriter(self, layout, journal, journal_path, blocks_per_file, start_block)
        rows_written = start_row
        first = True
        try:
            for x in inputs:
                arrays, stats = step(x)
                self._check_stats(stats, first)
                first = False
                arrays = {k: v.numpy() for k, v in arrays.items()}
                got = tuple(arrays["values"].shape[2:-1] if layout.top_k else arrays["values"].shape[2:])
                want = tuple(layout.teacher_shape[:-1] if layout.top_k else layout.teacher_shape)
                if got != want:
                    raise ValueError(
                        f"The teacher's output shape varies between examples ({want} then {got} per "
                        "example); the cache needs one fixed output shape."
                    )
                writer.add(arrays)
                rows_written += len(arrays["values"])
                if bar is not None:
                    bar.update(writer.block - b0)
            writer.close()
            if bar is not None:
                bar.update(writer.block - b0, finalize=True)
        except BaseException:
            writer.abort()
            raise
        block = writer.block
        if count is None:
            journal["num_examples"] = rows_written
            journal["end_block"] = block
            journal["fingerprint"]["dataset"]["count"] = None
        journal["complete"] = True
        _write_json(journal_path, journal)
        if self.verbose == 2:
            self._say(f"part {part} of {num_parts} written ({block - b0} blocks)")
        return journal

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
            out = tf.cast(_output(teacher_ref()(x, training=False), output_index), tf.float32)
            if augmented:
                out = tf.reshape(out, tf.concat([[n, views], tf.shape(out)[1:]], 0))
            else:
                out = out[:, None]
            stats = {
                "finite": tf.reduce_all(tf.math.is_finite(out)),
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
                "The teacher's outputs contain NaN or Inf; refusing to cache them. Check the "
                "teacher and its inputs."
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

    def _assemble(self, fp, layout, count, own_part):
        """Writes the manifest if all parts of the build exist and match; else None."""
        num_parts = self.num_shards
        parts = []
        for p in range(num_parts):
            if p == self.shard_index:
                journal = own_part
            else:
                try:
                    journal = _read_json(self._journal_path(p, num_parts))
                except (OSError, ValueError):
                    return None
            if not journal.get("complete") or journal.get("fingerprint") != fp or journal.get("layout") != layout.to_json():
                return None
            parts.append(journal)
        files = [entry for journal in parts for entry in journal["files"]]
        for entry in files:
            path = os.path.join(self.directory, entry["name"])
            if not os.path.exists(path) or os.path.getsize(path) != entry["bytes"]:
                return None
        num_examples = parts[-1]["num_examples"] if count is None else count
        fingerprint = json.loads(json.dumps(fp))
        fingerprint["dataset"]["count"] = num_examples
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "num_examples": num_examples,
            "num_classes": layout.num_classes,
            "teacher_shape": list(layout.teacher_shape),
            "top_k": layout.top_k,
            "dtype": layout.dtype,
            "views": layout.views,
            "layout": layout.to_json(),
            "block_rows": layout.block_rows,
            "block_bytes": layout.block_bytes,
            "num_blocks": math.ceil(num_examples / layout.block_rows),
            "fields": layout.fields(),
            "num_parts": num_parts,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Another worker may have written it already: identical content either way.
        _write_json(os.path.join(self.directory, MANIFEST), manifest)
        return manifest

    def _wait_for_parts(self, fp, layout, count):
        start = time.monotonic()
        told = False
        while True:
            if os.path.exists(os.path.join(self.directory, MANIFEST)):
                try:
                    manifest = read_manifest(self.directory)
                except (CacheCorruptedError, CacheMismatchError, OSError):
                    manifest = None
                if manifest is not None and not _fingerprint_diff(manifest["fingerprint"], fp, manifest["num_examples"]):
                    return manifest
            manifest = self._assemble(fp, layout, count, _read_json(self._journal_path()))
            if manifest is not None:
                return manifest
            missing = [p for p in range(self.num_shards) if not self._part_complete(p, fp)]
            if self.wait_timeout is not None and time.monotonic() - start >= self.wait_timeout:
                raise TimeoutError(
                    f"Part {self.shard_index} of the teacher-logit cache at {self.directory!r} is "
                    f"written, but part(s) {missing} of {self.num_shards} did not finish within "
                    f"wait_timeout={self.wait_timeout}s. Run the other workers; this part is kept."
                )
            if not told:
                self._say(f"waiting for part(s) {missing} of {self.num_shards}")
                told = True
            time.sleep(0.5)

    def _part_complete(self, part, fp):
        try:
            journal = _read_json(self._journal_path(part, self.num_shards))
        except (OSError, ValueError):
            return False
        return bool(journal.get("complete")) and journal.get("fingerprint") == fp

    # -- reading ----------------------------------------------------------

    def _reader(self, dataset, manifest):
        """The output pipeline.

        Blocks are read with one ``FixedLengthRecordDataset`` record per block
        and decoded per block. When the elements have fixed shapes, the
        dataset is batched into the same blocks, zipped with them, turned into
        `TeacherTargets` by one function call per block and split again with
        ``unbatch``: there is no per-example function call, which measured
        several times slower (a tf.data map function that does more than pass
        its inputs through costs tens of microseconds per element). Elements
        of varying shape are paired one by one instead.
        """
        layout = _Layout.from_json(manifest["layout"])
        self.num_classes = layout.num_classes
        n = int(manifest["num_examples"])
        rows, views, seed, augment = layout.block_rows, layout.views, self.seed, self.augment
        files = [os.path.join(self.directory, e["name"]) for e in manifest["files"]]
        blocks = tf.data.FixedLengthRecordDataset(files, layout.block_bytes, buffer_size=max(1 << 18, layout.block_bytes))
        blocks = tf.data.Dataset.zip((tf.data.Dataset.range(int(manifest["num_blocks"])), blocks))
        if augment is not None:
            # One key per block and pass: a new choice of views on every pass
            # (epoch), reproducible from `seed`.
            keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            blocks = tf.data.Dataset.zip((blocks, keys))
        else:
            blocks = blocks.map(lambda i, r: ((i, r), tf.constant(0, tf.int64)))
        if int(dataset.cardinality()) < 0:
            # Unknown size: fail loudly rather than pair a longer or shorter dataset.
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(n))

        def targets_of(block, key, labels, count):
            """TeacherTargets for the first `count` examples of a block, and view seeds."""
            block_id, record = block
            fields = {k: v[:count] for k, v in layout.decode(record).items()}
            example_id = block_id * rows + tf.range(tf.cast(count, tf.int64))
            view_seed = None
            if augment is not None:
                view = tf.random.stateless_uniform(
                    tf.reshape(count, [1]), seed=tf.stack([key, block_id]), minval=0, maxval=views, dtype=tf.int64
                )
                fields = {k: tf.gather(v, view, batch_dims=1) for k, v in fields.items()}
                view_seed = _seed_of(seed, example_id, view, views)
            else:
                fields = {k: v[:, 0] for k, v in fields.items()}
            if layout.top_k is None:
                targets = targets_lib.TeacherTargets(labels=labels, logits=fields["values"], example_id=example_id)
            else:
                targets = targets_lib.TeacherTargets(
                    labels=labels,
                    topk_indices=tf.cast(fields["indices"], tf.int32),
                    topk_values=fields["values"],
                    topk_logsumexp=fields["logsumexp"],
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


def _batchable(spec) -> bool:
    """Whether elements of this spec can be batched (fixed shapes, plain tensors)."""
    return all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in tf.nest.flatten(spec))


def _model_output_shape(model, output_index=0):
    outputs = getattr(model, "outputs", None)
    if outputs:
        out = outputs[output_index] if isinstance(output_index, int) and output_index < len(outputs) else outputs[0]
        return tuple(out.shape)
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape) if shape is not None else None
