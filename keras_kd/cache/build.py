"""The one build flow of keras_kd's caches: open what matches, else build it.

Shared by the teacher-logit cache and the alignment feature cache
(`Build.ensure`). A build part is written under the lock of its part
(``fcntl.flock``), a journal first, then whole-block data files under fresh
generation names; the manifest is written by whoever finds every part
complete, after verifying every file, under the directory lock. A build
writes a new generation under fresh names and files under live names are
never rewritten in place, so a reader never sees a mix of two builds.
"""

import errno
import math
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np

from keras_kd.cache import files as fs
from keras_kd.cache.errors import CacheCorruptedError
from keras_kd.cache.errors import CacheMismatchError
from keras_kd.cache.errors import ProbeMismatch
from keras_kd.cache.format import VERSION
from keras_kd.cache.format import Layout
from keras_kd.cache.store import Stored

SMALL_CACHE_BYTES = 32 << 20  # caches up to this size are held in memory by default


PROBE_ROWS = 64  # examples the teacher re-runs when an existing cache is opened
TARGET_FILE_BYTES = 64 << 20  # default size of one data file


def files_of(layout) -> int:
    """Blocks per data file for files of about `TARGET_FILE_BYTES`."""
    return max(1, TARGET_FILE_BYTES // max(1, layout.block_bytes))


def probe_rows(manifest) -> int:
    """How many rows the teacher re-runs when ``manifest``'s cache is opened (at most one block)."""
    return min(PROBE_ROWS, manifest["num_examples"], manifest["layout"]["block_rows"])


def block_range(count: int, block_rows: int, part: int, num_parts: int):
    blocks = math.ceil(count / block_rows)
    return blocks * part // num_parts, blocks * (part + 1) // num_parts


class PartWriter:
    """Packs rows into blocks and blocks into files of one part.

    Batches of any size are buffered until a block is full; only the part's
    last block may be partial (it is zero-padded).
    """

    def __init__(self, store, gen, layout, journal, blocks_per_file, start_block):
        self.store, self.gen, self.layout, self.journal = store, gen, layout, journal
        self.blocks_per_file = blocks_per_file
        self.block = start_block
        self.file_index = len(journal["files"])
        self.pending, self.pending_rows = [], 0
        self.current = None  # [AtomicFile, name, first_block, blocks]
        self.first_field = layout.specs[0][0]

    def add(self, arrays: dict):
        self.pending.append(arrays)
        self.pending_rows += len(arrays[self.first_field])
        while self.pending_rows >= self.layout.block_rows:
            self._write_block(self.layout.block_rows)

    def _write_block(self, rows):
        merged = (
            self.pending[0]
            if len(self.pending) == 1
            else {k: np.concatenate([a[k] for a in self.pending]) for k in self.pending[0]}
        )
        block = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.pending = [rest] if len(rest[self.first_field]) else []
        self.pending_rows -= rows
        if self.current is None:
            name = self.store.data_name(self.gen, self.journal["part"], self.file_index)
            self.current = [fs.AtomicFile(self.store.path(name), self.store.what), name, self.block, 0]
        self.current[0].write(self.layout.encode(block, rows))
        self.current[3] += 1
        self.block += 1
        if self.current[3] == self.blocks_per_file:
            self._finish_file()

    def _finish_file(self):
        f, name, first_block, blocks = self.current
        f.commit()
        self.journal["files"].append(
            {"name": name, "bytes": f.size, "crc32": f.crc, "first_block": first_block, "blocks": blocks}
        )
        fs.write_json(
            self.store.journal_path(self.journal["part"], self.journal["num_parts"]),
            self.journal,
            self.store.what,
        )
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


class Build:
    """One build of one cache: what it is (fingerprint, layout) and where its part lies.

    Args:
        store: the `Store`.
        fingerprint: JSON-able identity of what is cached.
        layout: the `Layout` of a new build.
        count: number of examples.
        part, num_parts: this worker's part.
        diff: ``diff(old_fingerprint, old_num_examples) -> [changes]``.
        extra: ``extra(layout) -> dict`` of kind-specific manifest keys.
        validate_extra: ``validate_extra(schema, manifest)`` for those keys.
        checksum: whether files are checked by CRC32 (else size only).
        say: ``say(message)`` for progress lines.
    """

    def __init__(
        self, store, fingerprint, layout, count, part, num_parts, diff, extra, validate_extra, checksum, say
    ):
        self.store, self.fp, self.layout, self.count = store, fingerprint, layout, count
        self.part, self.num_parts = part, num_parts
        self.diff, self.extra, self.validate_extra = diff, extra, validate_extra
        self.checksum, self.say = checksum, say
        self.gen = fs.generation(fingerprint, layout.to_json(), num_parts)

    def with_layout(self, layout):
        return Build(
            self.store,
            self.fp,
            layout,
            self.count,
            self.part,
            self.num_parts,
            self.diff,
            self.extra,
            self.validate_extra,
            self.checksum,
            self.say,
        )

    def replacing(self, old_manifest) -> "Build":
        """This build under names no reader of ``old_manifest`` uses (for a rebuild of the same fingerprint).

        A rebuild after a teacher probe mismatch has the old fingerprint and
        layout, hence the old generation: writing it would rewrite files a
        live reader streams. Every worker derives the same new name.
        """
        new = self.with_layout(self.layout)
        old = None if old_manifest is None else old_manifest.get("generation")
        if isinstance(old, str):
            # Derived from the replaced build, not only when it equals ours: an
            # older reader may still stream this fingerprint's plain name.
            new.gen = fs.generation(self.fp, self.layout.to_json(), self.num_parts, "after", old)
        return new

    # -- opening -------------------------------------------------------------

    def mismatch(self, changes) -> CacheMismatchError:
        return CacheMismatchError(
            f"The {self.store.what} at {self.store.directory!r} was built for something else:\n  - "
            + "\n  - ".join(changes)
            + "\nPass on_mismatch='rebuild' to rebuild it, or use another `directory`."
        )

    def open(self):
        """``(manifest, problem)``: the matching, intact manifest, or why there is none usable.

        Raises CacheMismatchError for a manifest keras_kd did not write (not
        recoverable by a rebuild).
        """
        if not os.path.lexists(self.store.manifest_path):
            return None, None
        if not self.store.owned():
            self.store.claim(refuse_foreign_files=False)  # raises: a foreign manifest
        try:
            manifest = self.store.read_manifest(self.validate_extra)
        except (CacheCorruptedError, CacheMismatchError) as e:
            return None, e
        changes = self.diff(manifest["fingerprint"], manifest["num_examples"])
        if changes:
            return None, self.mismatch(changes)
        return manifest, None

    def verify(self, manifest) -> Optional[CacheCorruptedError]:
        for entry in manifest["files"]:
            why = fs.check_file(
                self.store.path(entry["name"]), entry["bytes"], entry["crc32"], self.checksum
            )
            if why is not None:
                return CacheCorruptedError(
                    f"The {self.store.what} at {self.store.directory!r} is damaged: {why}. "
                    "Pass on_mismatch='rebuild' to rebuild it, or use another `directory`."
                )
        return None

    def read(self, manifest, in_memory) -> Stored:
        """The rows of ``manifest`` (verified files), held in memory or streamed."""
        return Stored(self.store, manifest, choose_in_memory(in_memory, manifest), checksum=self.checksum)

    def open_rows(self, manifest, in_memory):
        """``(stored, problem)``: the rows of an opened manifest, or why they cannot be read.

        Streaming readers verify every file first; an in-memory read checks
        each file's CRC32 in the one read it makes.
        """
        if not choose_in_memory(in_memory, manifest):
            problem = self.verify(manifest)
            if problem is not None:
                return None, problem
        try:
            return self.read(manifest, in_memory), None
        except CacheCorruptedError as e:
            return None, CacheCorruptedError(
                f"The {self.store.what} at {self.store.directory!r} is damaged: {e}. Pass "
                "on_mismatch='rebuild' to rebuild it, or use another `directory`."
            )

    def resume_layout(self) -> Layout:
        """The layout of an interrupted build of this part with the same fingerprint (to resume it).

        Otherwise, or when that layout is not usable, this build's layout.
        """
        old = self.store.read_journal(self.part, self.num_parts)
        if old is None or old["fingerprint"] != self.fp:
            return self.layout
        rows = old["layout"]["block_rows"]
        if rows > max(self.count, self.layout.block_rows):  # never more rows than this build needs
            return self.layout
        candidate = Layout(rows, self.layout.specs)
        return candidate if candidate.to_json() == old["layout"] else self.layout

    def ensure(
        self,
        *,
        probe: Callable,
        produce: Callable,
        blocks_per_file: Callable,
        on_mismatch: str,
        in_memory=None,
        refuse_foreign_files: bool = False,
        before_build: Optional[Callable] = None,
        wait: bool = True,
        wait_timeout: Optional[float] = None,
        read: bool = True,
    ):
        """Opens the matching cache, else builds this part (and waits for the others).

        Args:
            probe: ``probe(stored, manifest) -> ProbeMismatch or None``: re-runs
                the teacher on the first rows of an opened cache.
            produce: ``produce(start_row, rows, layout)`` yields dicts of row arrays.
            blocks_per_file: ``blocks_per_file(layout) -> int``.
            on_mismatch: ``"error"`` raises what is wrong with an existing
                cache; ``"rebuild"`` rebuilds it.
            in_memory: None (automatic), True or False, for the rows returned.
            refuse_foreign_files: refuse a non-empty directory keras_kd did
                not create (not only a foreign manifest).
            before_build: called once before a build that no problem
                triggered (e.g. to refuse a dataset that reshuffles).
            wait: wait for the other parts of a sharded build.
            wait_timeout: seconds to wait, None for ever.
            read: return the rows (`Stored`) of a cache this call built.

        Returns:
            ``(manifest, stored)``; ``(journal, None)`` when the other parts
            are missing and ``wait`` is False; ``stored`` is None when this
            call built the cache and ``read`` is False.
        """
        manifest, problem = self.open()
        if manifest is not None:
            stored, problem = self.open_rows(manifest, in_memory)
            if problem is None:
                problem = probe(stored, manifest)
            if problem is None:
                return manifest, stored
        fresh = isinstance(problem, ProbeMismatch)
        if problem is not None:
            if on_mismatch == "error":
                raise problem
            self.say(f"rebuilding: {problem}")
        elif before_build is not None:
            before_build()
        self.store.claim(refuse_foreign_files=refuse_foreign_files)
        build = self.with_layout(self.resume_layout())
        if fresh:
            # The same fingerprint and layout: take names no reader of the old build uses.
            try:
                build = build.replacing(self.store.read_manifest(self.validate_extra))
            except (CacheCorruptedError, CacheMismatchError):
                pass

        def recheck():
            # Another job may have finished the cache while this one waited for the lock.
            if problem is not None:
                return None  # rebuilding what was found wrong
            found, why = build.open()
            if found is not None and found["generation"] == build.gen and build.verify(found) is None:
                return found
            if found is None and why is not None and on_mismatch == "error":
                raise why  # e.g. another job's cache for another teacher: never served, never replaced
            return None

        found, part = build.build_part(
            lambda start, rows, writer: produce(start, rows, build.layout),
            blocks_per_file(build.layout),
            fresh=fresh,
            recheck=recheck,
        )
        manifest = found or build.assemble()
        if manifest is None and wait:
            manifest = build.wait_for_parts(wait_timeout)
        if manifest is None:
            return part, None
        return manifest, (build.read(manifest, in_memory) if read else None)

    # -- building ------------------------------------------------------------

    def journal(self):
        b0, b1 = block_range(self.count, self.layout.block_rows, self.part, self.num_parts)
        return {
            "format": self.store.format,
            "version": VERSION,
            "generation": self.gen,
            "fingerprint": self.fp,
            "layout": self.layout.to_json(),
            "part": self.part,
            "num_parts": self.num_parts,
            "first_block": b0,
            "end_block": b1,
            "files": [],
            "num_examples": self.count,
            "complete": False,
        }

    def check_space(self):
        blocks = math.ceil(self.count / self.layout.block_rows)
        done = 0
        for p in range(self.num_parts):
            j = self.store.read_journal(p, self.num_parts)
            if j is not None and j["generation"] == self.gen:
                done += sum(f["bytes"] for f in j["files"])
        # Every worker writes to the same filesystem: the whole cache must fit.
        needed = blocks * self.layout.block_bytes - done
        free = shutil.disk_usage(self.store.directory).free
        if needed > free:
            raise OSError(
                errno.ENOSPC,
                f"The disk is full: the {self.store.what} needs about {needed / 2**20:.1f} MiB in "
                f"{self.store.directory!r} but only {free / 2**20:.1f} MiB are free. Free some space, "
                "store less (e.g. top_k=... or dtype='float16'), or choose another `directory`.",
            )

    def build_part(self, produce: Callable, blocks_per_file: int, fresh: bool = False, recheck=None):
        """Writes this part (resuming a killed build of the same generation).

        ``produce(start_row, rows, writer)`` yields dicts of row arrays for
        rows ``start_row ..< start_row + rows``. ``recheck()``, called once
        the part's lock is held, may return a manifest another job finished
        meanwhile (or raise).

        Returns:
            ``(manifest, None)`` from ``recheck``, else ``(None, journal)``.
        """
        store = self.store
        with fs.locked(store.part_lock(self.part, self.num_parts)):
            if recheck is not None:
                manifest = recheck()
                if manifest is not None:
                    return manifest, None
            store.remove_stale_temporaries(self.part, self.num_parts, self.gen)
            journal = self.journal()
            old = None if fresh else store.read_journal(self.part, self.num_parts)
            same = old is not None and all(
                old[k] == journal[k] for k in ("generation", "first_block", "end_block")
            )
            if same:
                kept = []
                for entry in old["files"]:
                    if fs.check_file(store.path(entry["name"]), entry["bytes"], entry["crc32"], True):
                        break
                    kept.append(entry)
                if old["complete"] and len(kept) == len(old["files"]):
                    return None, old
                journal["files"] = kept
                if kept:
                    self.say(f"resuming part {self.part} after {len(kept)} finished file(s)")
            store.remove_part_files(self.part, self.gen, {e["name"] for e in journal["files"]})
            self.check_space()
            journal_path = store.journal_path(self.part, self.num_parts)
            fs.write_json(
                journal_path, journal, store.what
            )  # before any data file (see collect_garbage)
            done = sum(e["blocks"] for e in journal["files"])
            start_block = journal["first_block"] + done
            start_row = start_block * self.layout.block_rows
            rows = max(0, min(self.count, journal["end_block"] * self.layout.block_rows) - start_row)
            writer = PartWriter(store, self.gen, self.layout, journal, blocks_per_file, start_block)
            try:
                for arrays in produce(start_row, rows, writer):
                    writer.add(arrays)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            if writer.block != journal["end_block"]:
                raise CacheCorruptedError(
                    f"Part {self.part} of the {store.what} at {store.directory!r} got "
                    f"{writer.block - journal['first_block']} blocks, expected "
                    f"{journal['end_block'] - journal['first_block']}: the dataset changed while it was read."
                )
            journal["complete"] = True
            fs.write_json(journal_path, journal, store.what)
            return None, journal

    def assemble(self) -> Optional[dict]:
        """Writes and returns the manifest once all parts are complete (every file verified); else None."""
        store = self.store
        journals = [store.read_journal(p, self.num_parts) for p in range(self.num_parts)]
        if any(j is None or j["generation"] != self.gen or not j["complete"] for j in journals):
            return None
        files = [entry for j in journals for entry in j["files"]]
        with fs.locked(store.dir_lock):
            try:
                current = store.read_manifest(self.validate_extra)
            except (CacheCorruptedError, CacheMismatchError):
                current = None
            if current is not None and current["generation"] == self.gen and current["files"] == files:
                manifest = current
            else:
                manifest = {
                    "format": store.format,
                    "version": VERSION,
                    "generation": self.gen,
                    "fingerprint": self.fp,
                    "num_examples": self.count,
                    "layout": self.layout.to_json(),
                    "block_bytes": self.layout.block_bytes,
                    "num_blocks": math.ceil(self.count / self.layout.block_rows),
                    "num_parts": self.num_parts,
                    "files": files,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    **self.extra(self.layout),
                }
            # What the parts assembled is verified before it is served.
            problem = self.verify(manifest)
            if problem is not None:
                raise problem
            if manifest is not current:
                store.write_manifest(manifest)
            store.collect_garbage()
        return manifest

    def superseded(self, journal) -> CacheMismatchError:
        """Why this job's own part is gone: another job rewrote it for another build."""
        if journal is None:
            changes = ["its journal was removed"]
        else:
            changes = self.diff(journal["fingerprint"], journal["num_examples"]) or [
                "another build of the same teacher and data (another layout, or a rebuild)"
            ]
        return CacheMismatchError(
            f"Another job rewrote part {self.part} of the {self.store.what} at {self.store.directory!r} "
            "while this job built it, for something else than this job's build:\n  - "
            + "\n  - ".join(changes)
            + "\nTwo jobs with different teachers, data or settings share this directory: give each "
            "its own `directory`."
        )

    def wait_for_parts(self, wait_timeout):
        start, told = time.monotonic(), False
        while True:
            manifest, _ = self.open()
            if manifest is not None and manifest["generation"] == self.gen:
                return manifest
            manifest = self.assemble()
            if manifest is not None:
                return manifest
            # This job wrote its own part; once another job has rewritten it
            # for another build, waiting would never end.
            own = self.store.read_journal(self.part, self.num_parts)
            if own is None or own["generation"] != self.gen:
                raise self.superseded(own)
            current_gen = None if manifest is None else manifest.get("generation")
            try:
                found = self.store.read_manifest()
                current_gen = found["generation"] if found else None
            except (CacheCorruptedError, CacheMismatchError):
                pass
            missing, foreign = [], []
            for p in range(self.num_parts):
                j = self.store.read_journal(p, self.num_parts)
                if j is not None and j["generation"] == self.gen and j["complete"]:
                    continue
                missing.append(p)
                if j is not None and j["complete"] and j["generation"] != self.gen:
                    changes = self.diff(j["fingerprint"], j["num_examples"]) or ["its layout differs"]
                    foreign.append((p, j["generation"] == current_gen, changes))
            fresh = [(p, c) for p, old, c in foreign if not old]
            if fresh:
                p, changes = fresh[0]
                raise CacheMismatchError(
                    f"Part {p} of the {self.store.what} at {self.store.directory!r} is complete, but for "
                    "something else than this worker's build:\n  - "
                    + "\n  - ".join(changes)
                    + "\nRun every worker with the same teacher, dataset and settings."
                )
            if wait_timeout is not None and time.monotonic() - start >= wait_timeout:
                detail = "".join(
                    f"; part {p} holds a finished build for something else ({'; '.join(c)})"
                    for p, _, c in foreign
                )
                raise TimeoutError(
                    f"Part {self.part} of the {self.store.what} at {self.store.directory!r} is written, but "
                    f"part(s) {missing} of {self.num_parts} did not finish within "
                    f"wait_timeout={wait_timeout}s{detail}. Run the other workers; this part is kept."
                )
            if not told:
                self.say(f"waiting for part(s) {missing} of {self.num_parts}")
                told = True
            time.sleep(0.2)


def choose_in_memory(in_memory, manifest) -> bool:
    """``in_memory=None`` (auto): hold caches up to `SMALL_CACHE_BYTES` in memory."""
    if in_memory is not None:
        return bool(in_memory)
    return manifest["num_blocks"] * manifest["block_bytes"] <= SMALL_CACHE_BYTES


def probe_mismatch(fresh: dict, stored: dict, what: str, directory: str, rows: int):
    """Compares the teacher's fresh outputs on the first ``rows`` rows with the stored ones.

    Returns a `ProbeMismatch` naming the field that differs, or None.

    A cheap guard against a teacher whose function changed in a way the
    fingerprint cannot see (e.g. a subclassed model without a config).

    Args:
        fresh: ``{field: array}`` just computed.
        stored: ``{field: array}`` read from the cache (at least ``rows`` rows).
    """
    for name, a in fresh.items():
        a = np.asarray(a, np.float32)
        b = np.asarray(stored[name], np.float32)[: len(a)]
        if a.shape != b.shape:
            worst = np.inf
        else:
            worst = float(np.max(np.abs(a - b) / (1.0 + np.abs(a)))) if a.size else 0.0
        if not np.isfinite(worst) or worst > 1e-2:
            return ProbeMismatch(
                f"The {what} at {directory!r} was built by a teacher that computes something else: "
                f"re-run on the first {rows} examples, its `{name}` differ from the stored ones "
                f"(shapes {a.shape[1:]} and {b.shape[1:]}, max relative difference {worst:.3g}) although "
                "its fingerprint matches. Pass on_mismatch='rebuild' to rebuild it, or use another "
                "`directory`."
            )
    return None
