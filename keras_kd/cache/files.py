"""Files of keras_kd's caches: atomic writes, safe reads, locks, directories.

Every file keras_kd writes goes through `AtomicFile` (a fresh temporary name
opened with ``O_EXCL``, fsync, ``os.replace``, fsync of the directory), so a
reader never sees a partial file. Every file it reads is opened without
following symlinks and only when it is a regular file, and at most the
recorded number of bytes is read. Also used by the reweighting backup.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import zlib
from typing import Optional

from keras_kd.cache.errors import CacheCorruptedError

__all__ = [
    "AtomicFile",
    "CacheCorruptedError",
    "check_file",
    "generation",
    "locked",
    "read_bytes",
    "read_json",
    "read_verified",
    "remove",
    "resolve_directory",
    "write_json",
]

MAX_JSON_BYTES = 64 << 20


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




def remove(path: str):
    """Removes ``path``, ignoring a file already gone."""
    try:
        os.remove(path)
    except OSError:
        pass
