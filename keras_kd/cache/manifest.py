"""The teacher-logit cache's fields, manifest keys and fingerprint differences.

Fields of one block (per-example shapes; ``views`` is 1 without augmentation):

- dense: ``values``, ``(views,) + teacher_shape``, float16 or float32;
- top-k: ``values`` ``(views, ..., k)`` float16/float32, then ``indices``
  ``(views, ..., k)`` int16 (int32 for more than 32767 classes), then
  ``logsumexp`` ``(views, ...)`` float32.
"""

import os
from typing import Optional

from keras_kd.cache import files as fs
from keras_kd.cache.errors import CacheMismatchError
from keras_kd.cache.format import FLOAT_DTYPES as DTYPES
from keras_kd.cache.format import MANIFEST
from keras_kd.cache.format import Layout
from keras_kd.cache.store import Store

FORMAT = "keras_kd.teacher_logit_cache"


def store(directory: str) -> Store:
    return Store(directory, "teacher_logit_cache", FORMAT, "logits", "teacher-logit cache")


def layout(block_rows, views, teacher_shape, top_k, dtype) -> Layout:
    """The storage layout of dense or top-k teacher outputs."""
    teacher_shape = tuple(int(d) for d in teacher_shape)
    if top_k is None:
        fields = [("values", DTYPES[dtype], (views, *teacher_shape))]
    else:
        inner = (views, *teacher_shape[:-1])
        index_dtype = "<i2" if teacher_shape[-1] <= 32767 else "<i4"
        fields = [
            ("values", DTYPES[dtype], (*inner, top_k)),
            ("indices", index_dtype, (*inner, top_k)),
            ("logsumexp", "<f4", inner),
        ]
    return Layout(block_rows, fields)


def extra(lay, teacher_shape, top_k, dtype, views) -> dict:
    """The logit-specific manifest keys."""
    return {
        "num_classes": int(teacher_shape[-1]),
        "teacher_shape": list(teacher_shape),
        "top_k": top_k,
        "dtype": dtype,
        "views": views,
        "block_rows": lay.block_rows,
        "fields": lay.fields(),
    }


def validate_extra(schema, m):
    """The logit-specific manifest keys: consistent with the layout and the fingerprint."""
    shape = schema.get(m, "teacher_shape", list)
    if not 1 <= len(shape) <= 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 31 for d in shape
    ):
        schema.fail("teacher_shape", f"must be 1 to 8 positive integers, got {shape!r:.80}")
    top_k = schema.int(m, "top_k", 1, shape[-1], allow_none=True)
    dtype = schema.get(m, "dtype", str)
    if dtype not in DTYPES:
        schema.fail("dtype", f"must be 'float16' or 'float32', got {dtype!r:.80}")
    views = schema.int(m, "views", 1, 1 << 16)
    expected = layout(m["layout"]["block_rows"], views, shape, top_k, dtype)
    if expected.to_json() != m["layout"]:
        schema.fail(
            "layout", f"does not match teacher_shape={shape}, top_k={top_k}, dtype={dtype!r}, views={views}"
        )
    keys = extra(expected, shape, top_k, dtype, views)
    if keys != {k: m.get(k) for k in keys}:
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
    st = store(fs.resolve_directory(directory, "teacher-logit cache"))
    if not os.path.lexists(st.manifest_path):
        raise FileNotFoundError(
            f"No finished teacher-logit cache in {os.fspath(directory)!r} (no {MANIFEST})."
        )
    if not st.owned():
        raise CacheMismatchError(
            f"{st.manifest_path!r} was not written by keras_kd (the directory has no "
            f"{os.path.basename(st.marker)} marker); it is not a teacher-logit cache."
        )
    return st.read_manifest(validate_extra)


def _short(value) -> str:
    return str(value)[:12]


def _teacher_changes(old: dict, new: dict, who: str) -> list:
    changes = []
    ow, nw = old.get("weights_digest"), new.get("weights_digest")
    if ow != nw:
        changes.append(f"{who} weights changed (digest {_short(ow)} -> {_short(nw)})")
    if old.get("architecture_digest") != new.get("architecture_digest") or old.get("flavour") != new.get(
        "flavour"
    ):
        changes.append(
            f"{who} architecture or configuration changed (its layers, activations or connections; digest "
            f"{_short(old.get('architecture_digest'))} -> {_short(new.get('architecture_digest'))})"
        )
    return changes


def diff(old: dict, new: dict, num_examples: Optional[int]) -> list:
    """Human-readable list of what changed between two fingerprints."""
    changes = []
    ot = old.get("teacher") if isinstance(old.get("teacher"), dict) else {}
    nt = new.get("teacher", {})
    if ot.get("output_shape") != nt.get("output_shape"):
        changes.append(
            f"the teacher's output shape changed: {ot.get('output_shape')} -> {nt.get('output_shape')}"
        )
    olist = old.get("teachers") if isinstance(old.get("teachers"), list) else []
    nlist = new.get("teachers", [])
    if len(olist) != len(nlist):
        changes.append(f"the number of teachers changed: {len(olist)} -> {len(nlist)}")
    else:
        for i, (o, n) in enumerate(zip(olist, nlist)):
            who = "the teacher's" if len(nlist) == 1 else f"teacher[{i}]'s"
            changes += _teacher_changes(o if isinstance(o, dict) else {}, n, who)
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
            f"those the cache was built from (digest of all its inputs {_short(od.get('inputs_digest'))} -> "
            f"{_short(nd.get('inputs_digest'))}); if it shuffles or randomly augments before this "
            "transform, move that after the transform (or pass `augment=` for augmentation the teacher "
            "must see)"
        )
    os_ = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    ns = new.get("settings", {})
    for key in sorted(set(os_) | set(ns)):
        if os_.get(key) != ns.get(key):
            changes.append(f"the setting `{key}` changed: {os_.get(key)!r} -> {ns.get(key)!r}")
    return changes
