"""The one storage engine of keras_kd's caches (teacher logits, aligned features).

A cache is a directory that keras_kd owns. It holds only names keras_kd
generates (exact patterns below) and is marked by an empty file
``.keras_kd-<kind>``; keras_kd refuses to write into a directory holding a
``manifest.json`` it did not write (no marker), and never reads, renames or
deletes a name that does not match its own patterns.

Names (``G`` = generation, 16 hex digits derived from the fingerprint and the
layout; ``PPPPP`` part; ``NNNNN`` number of parts; ``FFFFF`` file):

* ``<prefix>-PPPPP-FFFFF-G.bin``: data files, whole blocks of ``block_rows``
  rows, the fields of a block one after the other (C-order arrays);
* ``keras_kd-part-PPPPP-of-NNNNN.json``: the journal of one build part;
* ``manifest.json``: the finished cache, switched atomically (``os.replace``);
* ``.keras_kd-<kind>``, ``.keras_kd.lock``, ``.keras_kd-part-PPPPP-of-NNNNN.lock``:
  the marker and the lock files (``fcntl.flock``);
* ``.keras_kd-gen-G.lock``: streaming readers hold a shared flock on it, and
  garbage collection deletes no file of ``G`` while one does;
* ``<name>.tmp-<hex>``: a file being written. Only the holder of the lock of
  its part (data files, journals) or of the directory (the manifest) writes
  temporaries, so one found while holding that lock is stale (a killed
  build) and is removed: no pid or host name is involved.

A build writes a new generation under fresh names, verifies every file it
assembled (size and CRC32) under the directory lock and then switches the
manifest; files under live names are never rewritten in place. Every
manifest and journal is untrusted input: `validate_manifest` and
`validate_journal` check it against a schema and raise `CacheCorruptedError`
naming the entry. Files are read only when they are regular files inside the
directory (no symlinks, FIFOs or devices), and at most the recorded bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import stat
import weakref
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

MANIFEST = "manifest.json"
VERSION = 2
MAX_BLOCK_ROWS = 1 << 16
MAX_BLOCK_BYTES = 1 << 30
MAX_JSON_BYTES = 64 << 20
MAX_PARTS = 1 << 14
MAX_ROWS = 1 << 48
_ID = r"[0-9a-f]{16}"
_JOURNAL = re.compile(r"^keras_kd-part-(\d{5})-of-(\d{5})\.json$")
_TMP = re.compile(r"^(.+)\.tmp-[0-9a-f]{16}$")
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
DTYPES = ("<f2", "<f4", "<i2", "<i4", "<i8")


class CacheMismatchError(ValueError):
    """The cache in a directory was built for another teacher, dataset or settings."""


class CacheCorruptedError(ValueError):
    """A cache file is missing, truncated, fails its checksum or breaks the schema."""


def disk_full_message(path: str, detail, what: str = "keras_kd cache") -> str:
    """The one message for a full disk, for every keras_kd file."""
    return (
        f"The disk is full: could not write the {what} file {path!r} ({detail}). Nothing "
        "partial is accepted as a cache and nothing partial is left behind; free some space and "
        "run again to resume the build, or choose another `directory`."
    )


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _open_for_write(path: str):
    """The one place that opens files for writing (tests replace it to inject faults)."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644
    )
    return os.fdopen(fd, "wb")


def write_error(e: OSError, path: str, what: str) -> OSError:
    if is_disk_full(e):
        return OSError(e.errno, disk_full_message(path, e.strerror or e, what))
    return OSError(
        e.errno, f"Could not write the {what} file {path!r}: {e}. Check that `directory` is writable."
    )


def fsync_dir(directory: str):
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


class AtomicFile:
    """Writes ``path`` through a fresh temporary name, fsyncs it and renames it.

    Tracks size and CRC32 of what was written. On any error the temporary
    file is removed and nothing appears under ``path``.
    """

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self.tmp = f"{path}.tmp-{secrets.token_hex(8)}"
        self.size = 0
        self.crc = 0
        try:
            self._f = _open_for_write(self.tmp)
        except OSError as e:
            raise write_error(e, path, what) from e

    def write(self, data: bytes):
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise write_error(e, self.path, self.what) from e
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
            raise write_error(e, self.path, self.what) from e
        fsync_dir(os.path.dirname(self.path))

    def abort(self):
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.remove(self.tmp)
        except OSError:
            pass


def write_json(path: str, obj, what: str):
    f = AtomicFile(path, what)
    f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))
    f.commit()


# ---------------------------------------------------------------------------
# Reading: regular files inside the directory, at most the recorded bytes.
# ---------------------------------------------------------------------------


def _open_regular(path: str):
    """An fd of ``path`` if it is a regular file (never follows a symlink, never blocks)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheCorruptedError(
                f"{path!r} is a symbolic link; keras_kd reads only its own regular files."
            ) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheCorruptedError(
            f"{path!r} is not a regular file; keras_kd reads only its own regular files."
        )
    return fd


def read_bytes(path: str, max_bytes: int) -> bytes:
    """The content of a regular file of at most ``max_bytes`` (else CacheCorruptedError)."""
    fd = _open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise CacheCorruptedError(f"{path!r} is larger than {max_bytes} bytes; it is not a keras_kd file.")
    return data


def read_json(path: str, what: str):
    """Parses a keras_kd JSON file; anything unreadable is a CacheCorruptedError naming it."""
    data = read_bytes(path, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CacheCorruptedError(f"The {what} {path!r} is corrupted: {e}.") from e


def check_file(path: str, size: int, crc: int, checksum: bool, want: Optional[int] = None) -> Optional[str]:
    """Why the data file ``path`` is unusable, or None. Reads at most ``size`` bytes."""
    name = os.path.basename(path)
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return f"the cache file {name!r} is missing"
    except CacheCorruptedError as e:
        return str(e)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            return f"the cache file {name!r} is truncated or damaged: it has {actual} bytes, the manifest records {size}"
        if checksum:
            got, left = 0, size
            with os.fdopen(fd, "rb", closefd=False) as f:
                while left:
                    chunk = f.read(min(left, 1 << 22))
                    if not chunk:
                        return f"the cache file {name!r} is truncated or damaged: it ended early"
                    got, left = zlib.crc32(chunk, got), left - len(chunk)
            if got != crc:
                return f"the cache file {name!r} is corrupted: its CRC32 is {got:#010x}, the manifest records {crc:#010x}"
    finally:
        os.close(fd)
    return None


def read_verified(path: str, size: int, crc: Optional[int]) -> bytes:
    """The bytes of a data file after checking size and CRC32 (one read)."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError as e:
        raise CacheCorruptedError(f"the cache file {os.path.basename(path)!r} is missing") from e
    try:
        if os.fstat(fd).st_size != size:
            raise CacheCorruptedError(
                f"the cache file {os.path.basename(path)!r} is truncated or damaged: it has "
                f"{os.fstat(fd).st_size} bytes, the manifest records {size}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(size)
    finally:
        os.close(fd)
    if len(data) != size:
        raise CacheCorruptedError(
            f"the cache file {os.path.basename(path)!r} is truncated or damaged: it ended early"
        )
    got = zlib.crc32(data) if crc is not None else None
    if got != crc:
        raise CacheCorruptedError(
            f"the cache file {os.path.basename(path)!r} is corrupted: its CRC32 is {got:#010x}, the manifest records {crc:#010x}"
        )
    return data


# ---------------------------------------------------------------------------
# Paths, ownership, locks.
# ---------------------------------------------------------------------------


def resolve_directory(directory, what: str) -> str:
    """An absolute, symlink-resolved, valid UTF-8 path (checked before any work)."""
    if not isinstance(directory, (str, bytes, os.PathLike)):
        raise TypeError(f"Expected `directory` to be a path. Received: directory={directory!r}")
    path = os.fspath(directory)
    try:
        if isinstance(path, bytes):
            path = path.decode("utf-8")
        else:
            path.encode("utf-8")
    except UnicodeError as e:
        raise ValueError(
            f"Expected `directory` to be a valid UTF-8 path. Received: directory={directory!r}. "
            f"Choose a directory name that is valid UTF-8 for the {what}."
        ) from e
    if not path:
        raise ValueError(f"Expected `directory` to be a non-empty path. Received: directory={directory!r}")
    resolved = os.path.realpath(os.path.abspath(path))
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        raise ValueError(
            f"Expected `directory` to be a directory for the {what}. Received: directory={directory!r}, "
            "which is a file."
        )
    return resolved


@contextlib.contextmanager
def locked(path: str, blocking: bool = True):
    """Holds an exclusive ``fcntl.flock`` on ``path`` (created if needed); yields False if busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def generation(*parts) -> str:
    """16 hex digits naming one build (fingerprint, layout, number of parts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


# ---------------------------------------------------------------------------
# Layout: named fields of fixed per-row shape, stored in blocks of rows.
# ---------------------------------------------------------------------------


class Layout:
    """Blocks of ``block_rows`` rows; each block holds its fields one after another.

    Args:
        block_rows: rows per block.
        fields: ``[(name, dtype, row_shape), ...]``, dtype a little-endian
            NumPy code such as ``"<f2"``.
    """

    def __init__(self, block_rows: int, fields):
        self.block_rows = int(block_rows)
        self.specs = [(str(n), str(d), tuple(int(s) for s in shape)) for n, d, shape in fields]

    def __eq__(self, other):
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    def fields(self) -> list:
        out, offset = [], 0
        for name, dtype, shape in self.specs:
            nbytes = self.block_rows * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out.append(
                {"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "bytes": int(nbytes)}
            )
            offset += nbytes
        return out

    @property
    def block_bytes(self) -> int:
        return sum(f["bytes"] for f in self.fields())

    def to_json(self) -> dict:
        return {"block_rows": self.block_rows, "fields": self.fields()}

    def encode(self, arrays: dict, rows: int) -> bytes:
        """Packs ``rows`` rows of every field into one (zero-padded) block."""
        chunks = []
        for name, dtype, shape in self.specs:
            a = np.asarray(arrays[name]).astype(dtype, copy=False)
            if rows < self.block_rows:
                padded = np.zeros((self.block_rows, *shape), dtype)
                padded[:rows] = a
                a = padded
            chunks.append(np.ascontiguousarray(a).tobytes())
        return b"".join(chunks)

    def decode_numpy(self, data: bytes, num_blocks: int) -> dict:
        """Host bytes of ``num_blocks`` whole blocks -> ``{name: (num_blocks * rows, ...)}``."""
        raw = np.frombuffer(data, np.uint8).reshape(num_blocks, self.block_bytes)
        out = {}
        for f in self.fields():
            dtype = np.dtype(f["dtype"])
            part = np.ascontiguousarray(raw[:, f["offset"] : f["offset"] + f["bytes"]])
            out[f["name"]] = (
                part.view(dtype)
                .astype(dtype.newbyteorder("="), copy=False)
                .reshape(num_blocks * self.block_rows, *f["shape"])
            )
        return out

    def decode(self, record) -> dict:
        """tf: one block record -> ``{name: (block_rows, ...)}`` tensors."""
        fields = self.fields()
        out = {}
        for f in fields:
            raw = record if len(fields) == 1 else tf.strings.substr(record, f["offset"], f["bytes"])
            dtype = tf.as_dtype(np.dtype(f["dtype"]).newbyteorder("="))
            out[f["name"]] = tf.reshape(
                tf.io.decode_raw(raw, dtype, little_endian=True), [self.block_rows, *f["shape"]]
            )
        return out


# ---------------------------------------------------------------------------
# Schema validation of manifests and journals (untrusted input).
# ---------------------------------------------------------------------------


class _Schema:
    """Checks one JSON document; every failure names the document and the entry."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what

    def fail(self, entry: str, problem: str):
        raise CacheCorruptedError(
            f"The {self.what} {self.path!r} is corrupted or was not written by keras_kd: "
            f"entry `{entry}` {problem}. Pass on_mismatch='rebuild' to rebuild the cache."
        )

    def get(self, obj, key, types, entry=None):
        entry = entry or key
        if not isinstance(obj, dict):
            self.fail(entry.rsplit(".", 1)[0] or ".", f"must be an object, got {type(obj).__name__}")
        if key not in obj:
            self.fail(entry, "is missing")
        value = obj[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
        if not ok:
            names = "/".join(t.__name__ if t is not type(None) else "null" for t in _as_tuple(types))
            self.fail(entry, f"must be {names}, got {value!r:.80}")
        return value

    def int(self, obj, key, low, high, entry=None, allow_none=False):
        value = self.get(obj, key, (int, type(None)) if allow_none else int, entry)
        if value is None:
            return None
        if not low <= value <= high:
            self.fail(entry or key, f"must be in [{low}, {high}], got {value}")
        return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _check_layout(s: _Schema, obj, entry="layout") -> Layout:
    layout = s.get(obj, "layout", dict, entry)
    rows = s.int(layout, "block_rows", 1, MAX_BLOCK_ROWS, f"{entry}.block_rows")
    fields = s.get(layout, "fields", list, f"{entry}.fields")
    if not 1 <= len(fields) <= 64:
        s.fail(f"{entry}.fields", f"must list 1 to 64 fields, got {len(fields)}")
    specs = []
    for i, f in enumerate(fields):
        where = f"{entry}.fields[{i}]"
        name = s.get(f, "name", str, f"{where}.name")
        if not _FIELD_NAME.match(name):
            s.fail(f"{where}.name", f"is not a field name: {name!r:.80}")
        dtype = s.get(f, "dtype", str, f"{where}.dtype")
        if dtype not in DTYPES:
            s.fail(f"{where}.dtype", f"must be one of {DTYPES}, got {dtype!r:.80}")
        shape = s.get(f, "shape", list, f"{where}.shape")
        if len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 31 for d in shape
        ):
            s.fail(f"{where}.shape", f"must be up to 8 positive integers, got {shape!r:.80}")
        specs.append((name, dtype, shape))
    if len({n for n, _, _ in specs}) != len(specs):
        s.fail(f"{entry}.fields", "names a field twice")
    out = Layout(rows, specs)
    if out.block_bytes > MAX_BLOCK_BYTES:
        s.fail(entry, f"describes blocks of {out.block_bytes} bytes, more than {MAX_BLOCK_BYTES}")
    if out.to_json() != layout:
        s.fail(
            entry,
            "is inconsistent: its offsets or byte counts do not follow from block_rows, dtypes and shapes",
        )
    return out


def _check_files(s: _Schema, files, pattern, layout: Layout, first: int, end: Optional[int], entry="files"):
    """Data file entries: own names, contiguous blocks from ``first``, bytes == blocks * block_bytes."""
    block = first
    seen = set()
    for i, f in enumerate(files):
        where = f"{entry}[{i}]"
        name = s.get(f, "name", str, f"{where}.name")
        if not pattern.match(name) or name in seen:
            s.fail(f"{where}.name", f"is not a keras_kd data file name of this cache: {name!r:.120}")
        seen.add(name)
        blocks = s.int(f, "blocks", 1, MAX_ROWS, f"{where}.blocks")
        s.int(f, "crc32", 0, 0xFFFFFFFF, f"{where}.crc32")
        nbytes = s.int(f, "bytes", 1, MAX_ROWS, f"{where}.bytes")
        if s.int(f, "first_block", 0, MAX_ROWS, f"{where}.first_block") != block:
            s.fail(f"{where}.first_block", f"must be {block} (blocks are contiguous), got {f['first_block']}")
        if nbytes != blocks * layout.block_bytes:
            s.fail(
                f"{where}.bytes",
                f"must be blocks * block_bytes = {blocks * layout.block_bytes}, got {nbytes}",
            )
        block += blocks
    if end is not None and block > end:
        s.fail(entry, f"cover blocks up to {block}, beyond the end {end}")
    return block


class Store:
    """One cache directory of one kind: names, ownership, locks, schema, garbage.

    Args:
        directory: the resolved directory (see `resolve_directory`).
        kind: ``"teacher_logit_cache"`` or ``"feature_cache"``.
        fmt: the ``format`` string of its manifests and journals.
        prefix: the data file prefix (``"logits"``, ``"features"``).
        what: how messages name the cache (``"teacher-logit cache"``).
    """

    KINDS = ("teacher_logit_cache", "feature_cache")

    def __init__(self, directory: str, kind: str, fmt: str, prefix: str, what: str):
        self.directory, self.kind, self.format, self.prefix, self.what = directory, kind, fmt, prefix, what
        self.data = re.compile(rf"^{prefix}-(\d{{5}})-(\d{{5}})-({_ID})\.bin$")
        self.marker = os.path.join(directory, f".keras_kd-{kind}")
        self.manifest_path = os.path.join(directory, MANIFEST)

    # -- names ---------------------------------------------------------------

    def data_name(self, gen: str, part: int, index: int) -> str:
        return f"{self.prefix}-{part:05d}-{index:05d}-{gen}.bin"

    def journal_path(self, part: int, num_parts: int) -> str:
        return os.path.join(self.directory, f"keras_kd-part-{part:05d}-of-{num_parts:05d}.json")

    def part_lock(self, part: int, num_parts: int) -> str:
        return os.path.join(self.directory, f".keras_kd-part-{part:05d}-of-{num_parts:05d}.lock")

    def generation_lock(self, gen: str) -> str:
        """Readers hold a shared flock on it while they stream that generation's files."""
        return os.path.join(self.directory, f".keras_kd-gen-{gen}.lock")

    def hold_generation(self, gen: str) -> Optional[int]:
        """A shared flock on ``gen``'s lock file (an open fd), or None where none can be had.

        `collect_garbage` keeps a generation's files while any process holds
        this lock. The lock file is opened read-only when it exists, so a
        reader of a read-only directory is protected too.
        """
        path = self.generation_lock(gen)
        flags = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
            except OSError:
                return None  # read-only directory without the lock file: nothing can delete the files
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return None
        return fd

    @property
    def dir_lock(self) -> str:
        return os.path.join(self.directory, ".keras_kd.lock")

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # -- ownership -----------------------------------------------------------

    def owned(self) -> bool:
        """Whether keras_kd created this directory as a cache of this kind (read-only check)."""
        for other in self.KINDS:
            if other != self.kind and os.path.lexists(os.path.join(self.directory, f".keras_kd-{other}")):
                raise CacheMismatchError(
                    f"{self.directory!r} holds a keras_kd {other.replace('_', ' ')}, not a {self.what}. "
                    "Use another `directory`."
                )
        return os.path.lexists(self.marker)

    def claim(self, refuse_foreign_files: bool):
        """Makes the directory a cache of this kind, refusing what keras_kd did not write."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise self.unwritable(e) from e
        if self.owned():
            return
        if os.path.lexists(self.manifest_path):
            raise CacheMismatchError(
                f"{self.directory!r} holds a {MANIFEST} that keras_kd did not write (there is no "
                f"{os.path.basename(self.marker)} marker). keras_kd never overwrites or deletes files it "
                f"did not write, whatever `on_mismatch` says; choose another `directory` for the {self.what}. "
                "(A cache written by keras_kd before storage format version 2 has no marker either: "
                "delete that directory yourself.)"
            )
        if refuse_foreign_files:
            foreign = sorted(os.listdir(self.directory))
            if foreign:
                raise CacheMismatchError(
                    f"{self.directory!r} is not empty and was not created by keras_kd (it holds "
                    f"{', '.join(map(repr, foreign[:5]))}{', ...' if len(foreign) > 5 else ''}). keras_kd never "
                    f"deletes files it did not write; choose an empty or new `directory` for the {self.what}."
                )
        try:
            os.close(
                os.open(
                    self.marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644
                )
            )
            probe = AtomicFile(os.path.join(self.directory, ".keras_kd-write-probe"), self.what)
            probe.abort()
        except OSError as e:
            raise self.unwritable(e) from e

    def unwritable(self, e: OSError) -> OSError:
        if is_disk_full(e):
            return OSError(e.errno, disk_full_message(self.directory, e.strerror or e, self.what))
        return OSError(
            e.errno,
            f"Cannot write the {self.what} to directory={self.directory!r}: {e.strerror or e}. "
            "Choose a writable `directory`.",
        )

    # -- manifest and journals -------------------------------------------------

    def read_manifest(self, validate_extra=None) -> Optional[dict]:
        """The validated manifest, None if there is none; CacheCorruptedError if it breaks the schema."""
        if not os.path.lexists(self.manifest_path):
            return None
        manifest = read_json(self.manifest_path, f"{self.what} manifest")
        self.validate_manifest(manifest)
        if validate_extra is not None:
            validate_extra(_Schema(self.manifest_path, f"{self.what} manifest"), manifest)
        return manifest

    def _common(self, s: _Schema, doc):
        if not isinstance(doc, dict):
            s.fail(".", f"must be an object, got {type(doc).__name__}")
        fmt = s.get(doc, "format", str)
        if fmt != self.format:
            s.fail("format", f"must be {self.format!r}, got {fmt!r:.80}")
        version = s.get(doc, "version", int)
        if version != VERSION:
            raise CacheMismatchError(
                f"{s.path!r} has format version {version}; this keras_kd reads version {VERSION}. "
                "Rebuild it with on_mismatch='rebuild'."
            )
        gen = s.get(doc, "generation", str)
        if not re.fullmatch(_ID, gen):
            s.fail("generation", f"must be 16 hex digits, got {gen!r:.80}")
        s.get(doc, "fingerprint", dict)
        return gen, _check_layout(s, doc)

    def validate_manifest(self, m):
        s = _Schema(self.manifest_path, f"{self.what} manifest")
        gen, layout = self._common(s, m)
        n = s.int(m, "num_examples", 1, MAX_ROWS)
        s.int(m, "num_parts", 1, MAX_PARTS)
        blocks = s.int(m, "num_blocks", 1, MAX_ROWS)
        if blocks != math.ceil(n / layout.block_rows):
            s.fail(
                "num_blocks",
                f"must be ceil(num_examples / block_rows) = {math.ceil(n / layout.block_rows)}, got {blocks}",
            )
        if s.int(m, "block_bytes", 1, MAX_BLOCK_BYTES) != layout.block_bytes:
            s.fail("block_bytes", f"must be {layout.block_bytes} (from the layout), got {m['block_bytes']}")
        files = s.get(m, "files", list)
        if not files:
            s.fail("files", "is empty")
        end = _check_files(s, files, self.data, layout, 0, None)
        if end != blocks:
            s.fail(
                "files",
                f"hold {end} blocks (sum(bytes) = {end * layout.block_bytes}), the cache has "
                f"num_blocks * block_bytes = {blocks * layout.block_bytes}",
            )
        for i, f in enumerate(files):
            if self.data.match(f["name"]).group(3) != gen:
                s.fail(f"files[{i}].name", f"belongs to another build than generation {gen}")

    def read_journal(self, part: int, num_parts: int) -> Optional[dict]:
        """The validated journal of one part; None if absent or unusable (it is then rewritten)."""
        path = self.journal_path(part, num_parts)
        if not os.path.lexists(path):
            return None
        try:
            journal = read_json(path, f"{self.what} journal")
            self.validate_journal(journal, path, part, num_parts)
        except (CacheCorruptedError, CacheMismatchError):
            return None
        return journal

    def validate_journal(self, j, path, part, num_parts):
        s = _Schema(path, f"{self.what} journal")
        gen, layout = self._common(s, j)
        if s.int(j, "part", 0, MAX_PARTS) != part or s.int(j, "num_parts", 1, MAX_PARTS) != num_parts:
            s.fail("part", f"must be {part} of {num_parts}")
        first = s.int(j, "first_block", 0, MAX_ROWS)
        end = s.int(j, "end_block", 0, MAX_ROWS, allow_none=True)
        s.int(j, "num_examples", 0, MAX_ROWS, allow_none=True)
        complete = s.get(j, "complete", bool)
        files = s.get(j, "files", list)
        last = _check_files(s, files, self.data, layout, first, end)
        for i, f in enumerate(files):
            m = self.data.match(f["name"])
            if m.group(3) != gen or int(m.group(1)) != part:
                s.fail(f"files[{i}].name", f"does not belong to part {part} of generation {gen}")
        if complete and end is not None and last != end:
            s.fail("files", f"end at block {last}, the complete part ends at {end}")

    def write_manifest(self, manifest):
        write_json(self.manifest_path, manifest, self.what)

    # -- cleaning: only own names, only what nothing refers to ---------------

    def remove_stale_temporaries(self, part: int, num_parts: int, gen: str):
        """Holding the lock of a part: its temporaries are left by killed builds."""
        own = (
            self.data_name(gen, part, 0)[: -len(f"00000-{gen}.bin")],
            os.path.basename(self.journal_path(part, num_parts)),
        )
        for name in os.listdir(self.directory):
            m = _TMP.match(name)
            if not m:
                continue
            final = m.group(1)
            dm = self.data.match(final)
            if final == own[1] or (dm and int(dm.group(1)) == part and dm.group(3) == gen):
                _remove(self.path(name))

    def remove_part_files(self, part: int, gen: str, keep):
        for name in os.listdir(self.directory):
            m = self.data.match(name)
            if m and int(m.group(1)) == part and m.group(3) == gen and name not in keep:
                _remove(self.path(name))

    def collect_garbage(self):
        """Under the directory lock: removes own data files nothing refers to.

        Referenced: the manifest's generation and every generation a part
        journal names. The listing is taken first, and builders write their
        journal before their first data file, so a file being built is
        always referenced. Temporaries of a part whose lock is free are stale.
        """
        names = os.listdir(self.directory)
        live = set()
        try:
            manifest = self.read_manifest()
        except (CacheCorruptedError, CacheMismatchError):
            manifest = None
        if manifest is not None:
            live.add(manifest["generation"])
        busy_parts, held = set(), {}
        for name in names:
            m = _JOURNAL.match(name)
            if not m:
                continue
            part, num_parts = int(m.group(1)), int(m.group(2))
            with locked(self.part_lock(part, num_parts), blocking=False) as free:
                if not free:
                    busy_parts.add(part)
            try:
                journal = read_json(self.path(name), "journal")
                if isinstance(journal, dict) and isinstance(journal.get("generation"), str):
                    live.add(journal["generation"])
            except (CacheCorruptedError, OSError):
                pass
        for name in names:
            m = self.data.match(name)
            if m and m.group(3) not in live and m.group(3) not in held:
                # Kept while a reader streams it (see `hold_generation`).
                held[m.group(3)] = self._claim_generation(m.group(3))
        for name in names:
            m = self.data.match(name)
            tmp = _TMP.match(name)
            if m and m.group(3) not in live and int(m.group(1)) not in busy_parts and held.get(m.group(3)):
                _remove(self.path(name))
            elif tmp and tmp.group(1) == MANIFEST:
                _remove(self.path(name))
            elif (
                tmp
                and self.data.match(tmp.group(1))
                and int(self.data.match(tmp.group(1)).group(1)) not in busy_parts
            ):
                _remove(self.path(name))
        for gen, fd in held.items():
            if fd is not None:
                _remove(self.generation_lock(gen))
                os.close(fd)

    def _claim_generation(self, gen: str) -> Optional[int]:
        """An exclusive flock on a dead generation's lock (an fd), or None while a reader holds it."""
        try:
            fd = os.open(
                self.generation_lock(gen),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                0o644,
            )
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd


def _remove(path: str):
    try:
        os.remove(path)
    except OSError:
        pass


class Stored:
    """The rows of a finished cache, held in host memory or streamed from its files.

    In memory, the files are read once (their CRC32 checked in the same
    read); streaming reads one ``FixedLengthRecordDataset`` record per block.

    Args:
        store: the `Store`.
        manifest: the validated manifest.
        in_memory: whether to hold the rows in memory.
        checksum: whether the in-memory read checks CRC32s.
    """

    def __init__(self, store: Store, manifest: dict, in_memory: bool, checksum: bool):
        fields = manifest["layout"]["fields"]
        self.layout = Layout(
            manifest["layout"]["block_rows"], [(f["name"], f["dtype"], f["shape"]) for f in fields]
        )
        self.num_blocks, self.count = manifest["num_blocks"], manifest["num_examples"]
        self.in_memory = in_memory
        files = manifest["files"]
        if in_memory:
            data = b"".join(
                read_verified(store.path(f["name"]), f["bytes"], f["crc32"] if checksum else None)
                for f in files
            )
            self.arrays = {
                k: v[: self.count] for k, v in self.layout.decode_numpy(data, self.num_blocks).items()
            }
        else:
            # Held while this object lives (the datasets below keep it alive):
            # another job's rebuild then keeps these files until it is gone.
            fd = store.hold_generation(manifest["generation"])
            if fd is not None:
                weakref.finalize(self, os.close, fd)
            for f in files:
                try:
                    size = os.stat(store.path(f["name"]), follow_symlinks=False).st_size
                except OSError:
                    size = None
                if size != f["bytes"]:
                    raise CacheCorruptedError(
                        f"The {store.what} at {store.directory!r} was replaced by another job while it was "
                        f"being opened ({f['name']!r} is gone or changed). Apply the transform again."
                    )
            paths = [store.path(f["name"]) for f in files]
            self.records = tf.data.FixedLengthRecordDataset(
                paths, self.layout.block_bytes, buffer_size=max(1 << 18, self.layout.block_bytes)
            )

    def first_rows(self, rows: int) -> dict:
        """NumPy arrays of the first ``rows`` rows (``rows`` <= ``block_rows``)."""
        if self.in_memory:
            return {k: v[:rows] for k, v in self.arrays.items()}
        block = next(iter(self.records.take(1).map(self.layout.decode)))
        return {k: v.numpy()[:rows] for k, v in block.items()}

    def rows(self, select_numpy, select_tf) -> tf.data.Dataset:
        """One element per row: ``select(fields of a block or of all rows) -> tuple`` of tensors.

        The selection runs once on all rows (in memory) or once per block
        (streaming), never per element.
        """
        if self.in_memory:
            return tf.data.Dataset.from_tensor_slices(select_numpy(self.arrays))
        return self._holding(
            self.records.map(lambda r: select_tf(self.layout.decode(r))).unbatch().take(self.count)
        )

    def _holding(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        # Every dataset built on this one references it (``_input_dataset``),
        # so the generation lock lives as long as the user's pipeline.
        dataset._keras_kd_stored = self  # noqa: SLF001
        return dataset

    def blocks(self) -> tf.data.Dataset:
        """One ``{field: (block_rows, ...)}`` element per block (the last block padded with zeros)."""
        if not self.in_memory:
            return self._holding(self.records.map(self.layout.decode))
        rows = self.layout.block_rows
        padded = {}
        for k, v in self.arrays.items():
            full = np.zeros((self.num_blocks * rows, *v.shape[1:]), v.dtype)
            full[: len(v)] = v
            padded[k] = full.reshape(self.num_blocks, rows, *v.shape[1:])
        return tf.data.Dataset.from_tensor_slices(padded)
