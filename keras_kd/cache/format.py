"""The on-disk format: named fields in blocks of rows, and the schema of manifests.

A block holds ``block_rows`` consecutive rows; its fields follow one another,
each a C-order little-endian array of shape ``(block_rows,) + row_shape``.
Only the very last block of a cache is padded with zeros. Manifests and
journals are untrusted input: `Schema` checks every entry and raises
`CacheCorruptedError` naming it.
"""

import re
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_kd.cache.errors import CacheCorruptedError

MANIFEST = "manifest.json"
VERSION = 2
MAX_BLOCK_ROWS = 1 << 16
MAX_BLOCK_BYTES = 1 << 30
MAX_PARTS = 1 << 14
MAX_ROWS = 1 << 48
DTYPES = ("<f2", "<f4", "<i2", "<i4", "<i8")
# How a cache stores floats (its `dtype` setting), and float16's largest value.
FLOAT_DTYPES = {"float16": "<f2", "float32": "<f4"}
FLOAT16_MAX = 65504.0
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


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


class Schema:
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


def check_layout(s: Schema, obj, entry="layout") -> Layout:
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


def check_files(s: Schema, files, pattern, layout: Layout, first: int, end: Optional[int], entry="files"):
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


