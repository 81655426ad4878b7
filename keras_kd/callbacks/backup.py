"""The backup file of `keras_kd.HardSampleReweighting` (``backup_dir=``).

One file, ``<backup_dir>/hard_sample_reweighting.npz``, holding the weight
table, the per-example statistics, the epoch after which it was written and
the identity of the run that wrote it. The guarantees:

* **Written whole or not at all.** It is written through a fresh temporary
  name (`keras_kd.cache.files.AtomicFile`: ``O_EXCL``, fsync, atomic rename), so
  concurrent writers never collide and readers never see a partial file.
* **Validated when read.** A file that is not a keras_kd backup, truncated,
  damaged, for another table size, with non-finite weights or weights outside
  the callback's ``clip`` range raises `BackupCorruptedError` naming the path.
* **Restored only into the run that wrote it**: the callback decides (see
  `HardSampleReweighting`), from the epoch and the run identity recorded here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from typing import Optional

import numpy as np

from keras_kd.cache import files as _storage
from keras_kd.cache import fingerprint as _fingerprint

FILE_NAME = "hard_sample_reweighting.npz"
FORMAT = "keras_kd.reweighting_backup/1"
_KEYS = ("format", "run_identity", "epoch", "weights", "stats")
# Slack on the clip bounds: the weights went through float32.
_CLIP_SLACK = 1e-5


class BackupCorruptedError(_storage.CacheCorruptedError):
    """The reweighting backup file is unreadable, damaged or does not fit the table."""


def run_identity(config: dict, num_examples: int, model) -> str:
    """The identity of a run at an epoch end: callback settings, table size, model state.

    The model state is the cache's own digest of every weight (dtypes, shapes,
    values): what a model restored by ``BackupAndRestore`` has at the start of
    the resumed epoch.
    """
    settings = json.dumps({**config, "num_examples": int(num_examples)}, sort_keys=True, default=str)
    return hashlib.sha256(f"{settings}|{_fingerprint.weights_digest(model)}".encode()).hexdigest()


class ReweightingBackup:
    """Reads, writes and removes the backup file in ``directory``.

    Args:
        directory: the callback's ``backup_dir``.
    """

    def __init__(self, directory):
        self.directory = _storage.resolve_directory(directory, "reweighting backup")
        self.path = os.path.join(self.directory, FILE_NAME)

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def save(self, epoch: int, identity: str, weights: np.ndarray, stats: np.ndarray):
        """Writes the table atomically (fresh temporary name, fsync, rename).

        Raises:
            OSError: naming the path when the directory is not writable or the
                disk is full; no temporary file is left behind.
        """
        os.makedirs(self.directory, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.array(FORMAT),
            run_identity=np.array(identity),
            epoch=np.array(int(epoch), np.int64),
            weights=np.asarray(weights, np.float32),
            stats=np.asarray(stats, np.float32),
        )
        f = _storage.AtomicFile(self.path, "reweighting backup")
        f.write(buffer.getvalue())
        f.commit()

    def load(self, num_examples: int, clip) -> Optional[dict]:
        """The validated content, or None if there is no backup.

        Returns:
            ``{"run_identity": str, "epoch": int, "weights": (N,) float32,
            "stats": (N, 2) float32}``.

        Raises:
            BackupCorruptedError: naming the path, for anything but a complete
                keras_kd backup of a table of ``num_examples`` examples with
                finite weights in ``clip``.
        """
        if not self.exists():
            return None
        fix = "Delete it to start the table afresh, or point `backup_dir` elsewhere."
        # weights (4 B) + stats (8 B) per example, plus the zip and npy headers.
        limit = 12 * int(num_examples) + (1 << 16)
        try:
            data = _storage.read_bytes(self.path, limit)
        except _storage.CacheCorruptedError as e:
            raise BackupCorruptedError(f"The reweighting backup {self.path!r} is unusable: {e} {fix}") from e
        except OSError as e:
            raise BackupCorruptedError(f"The reweighting backup {self.path!r} cannot be read: {e}. {fix}") from e
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                missing = [k for k in _KEYS if k not in npz.files]
                if missing:
                    raise ValueError(f"it lacks {missing}")
                content = {k: npz[k] for k in _KEYS}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, UnicodeError) as e:
            raise BackupCorruptedError(
                f"The reweighting backup {self.path!r} is truncated, damaged or not a keras_kd backup ({e}). {fix}"
            ) from e
        return self._validate(content, int(num_examples), clip, fix)

    def _validate(self, content, num_examples, clip, fix):
        def bad(reason):
            return BackupCorruptedError(f"The reweighting backup {self.path!r} {reason}. {fix}")

        if content["format"].shape != () or str(content["format"]) != FORMAT:
            raise bad(f"has format {content['format']!r}, expected {FORMAT!r}")
        if content["run_identity"].dtype.kind != "U" or content["epoch"].shape != () or content["epoch"].dtype.kind != "i":
            raise bad("has a run identity or epoch of the wrong type")
        weights, stats = content["weights"], content["stats"]
        if weights.dtype != np.float32 or stats.dtype != np.float32:
            raise bad(f"holds {weights.dtype}/{stats.dtype} arrays, expected float32")
        if weights.shape != (num_examples,) or stats.shape != (num_examples, 2):
            raise bad(
                f"is for a table of weights {weights.shape} and stats {stats.shape}; this table has "
                f"{num_examples} examples, i.e. ({num_examples},) and ({num_examples}, 2)"
            )
        if not np.isfinite(weights).all():
            raise bad(f"has {int((~np.isfinite(weights)).sum())} non-finite weights")
        low, high = clip
        if weights.size and (weights.min() < low - _CLIP_SLACK or weights.max() > high + _CLIP_SLACK):
            raise bad(f"has weights in [{weights.min():g}, {weights.max():g}], outside clip={tuple(clip)}")
        if np.isinf(stats).any():
            raise bad("has infinite difficulty statistics")
        wrong = stats[:, 1][~np.isnan(stats[:, 1])]
        if wrong.size and (wrong.min() < 0 or wrong.max() > 1):
            raise bad("has teacher-wrong shares outside [0, 1]")
        epoch = int(content["epoch"])
        if epoch < 0:
            raise bad(f"records epoch {epoch}")
        return {"run_identity": str(content["run_identity"]), "epoch": epoch, "weights": weights, "stats": stats}

    def remove(self):
        """Removes the backup file (our own name only); no-op if absent."""
        try:
            if os.path.isfile(self.path) and not os.path.islink(self.path):
                os.remove(self.path)
        except FileNotFoundError:
            pass
