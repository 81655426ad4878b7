"""One cache directory (`Store`) and the rows of a finished cache (`Stored`).

A cache is a directory that keras_kd owns. It holds only names keras_kd
generates (exact patterns below) and is marked by an empty file
``.keras_kd-<kind>``; keras_kd refuses to write into a directory holding a
``manifest.json`` it did not write (no marker), and never reads, renames or
deletes a name that does not match its own patterns.

Names (``G`` = generation, 16 hex digits derived from the fingerprint and the
layout; ``PPPPP`` part; ``NNNNN`` number of parts; ``FFFFF`` file):

* ``<prefix>-PPPPP-FFFFF-G.bin``: data files, whole blocks (`format.Layout`);
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
"""

import fcntl
import math
import os
import re
import weakref
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_kd.cache import files as fs
from keras_kd.cache.errors import CacheCorruptedError
from keras_kd.cache.errors import CacheMismatchError
from keras_kd.cache.format import MANIFEST
from keras_kd.cache.format import MAX_PARTS
from keras_kd.cache.format import MAX_ROWS
from keras_kd.cache.format import MAX_BLOCK_BYTES
from keras_kd.cache.format import VERSION
from keras_kd.cache.format import Layout
from keras_kd.cache.format import Schema
from keras_kd.cache.format import check_files
from keras_kd.cache.format import check_layout

_ID = r"[0-9a-f]{16}"
_JOURNAL = re.compile(r"^keras_kd-part-(\d{5})-of-(\d{5})\.json$")
_TMP = re.compile(r"^(.+)\.tmp-[0-9a-f]{16}$")


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
            probe = fs.AtomicFile(os.path.join(self.directory, ".keras_kd-write-probe"), self.what)
            probe.abort()
        except OSError as e:
            raise self.unwritable(e) from e

    def unwritable(self, e: OSError) -> OSError:
        if fs.is_disk_full(e):
            return OSError(e.errno, fs.disk_full_message(self.directory, e.strerror or e, self.what))
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
        manifest = fs.read_json(self.manifest_path, f"{self.what} manifest")
        self.validate_manifest(manifest)
        if validate_extra is not None:
            validate_extra(Schema(self.manifest_path, f"{self.what} manifest"), manifest)
        return manifest

    def _common(self, s: Schema, doc):
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
        return gen, check_layout(s, doc)

    def validate_manifest(self, m):
        s = Schema(self.manifest_path, f"{self.what} manifest")
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
        end = check_files(s, files, self.data, layout, 0, None)
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
            journal = fs.read_json(path, f"{self.what} journal")
            self.validate_journal(journal, path, part, num_parts)
        except (CacheCorruptedError, CacheMismatchError):
            return None
        return journal

    def validate_journal(self, j, path, part, num_parts):
        s = Schema(path, f"{self.what} journal")
        gen, layout = self._common(s, j)
        if s.int(j, "part", 0, MAX_PARTS) != part or s.int(j, "num_parts", 1, MAX_PARTS) != num_parts:
            s.fail("part", f"must be {part} of {num_parts}")
        first = s.int(j, "first_block", 0, MAX_ROWS)
        end = s.int(j, "end_block", 0, MAX_ROWS, allow_none=True)
        s.int(j, "num_examples", 0, MAX_ROWS, allow_none=True)
        complete = s.get(j, "complete", bool)
        files = s.get(j, "files", list)
        last = check_files(s, files, self.data, layout, first, end)
        for i, f in enumerate(files):
            m = self.data.match(f["name"])
            if m.group(3) != gen or int(m.group(1)) != part:
                s.fail(f"files[{i}].name", f"does not belong to part {part} of generation {gen}")
        if complete and end is not None and last != end:
            s.fail("files", f"end at block {last}, the complete part ends at {end}")

    def write_manifest(self, manifest):
        fs.write_json(self.manifest_path, manifest, self.what)

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
                fs.remove(self.path(name))

    def remove_part_files(self, part: int, gen: str, keep):
        for name in os.listdir(self.directory):
            m = self.data.match(name)
            if m and int(m.group(1)) == part and m.group(3) == gen and name not in keep:
                fs.remove(self.path(name))

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
            with fs.locked(self.part_lock(part, num_parts), blocking=False) as free:
                if not free:
                    busy_parts.add(part)
            try:
                journal = fs.read_json(self.path(name), "journal")
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
                fs.remove(self.path(name))
            elif tmp and tmp.group(1) == MANIFEST:
                fs.remove(self.path(name))
            elif (
                tmp
                and self.data.match(tmp.group(1))
                and int(self.data.match(tmp.group(1)).group(1)) not in busy_parts
            ):
                fs.remove(self.path(name))
        for gen, fd in held.items():
            if fd is not None:
                fs.remove(self.generation_lock(gen))
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
                fs.read_verified(store.path(f["name"]), f["bytes"], f["crc32"] if checksum else None)
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
