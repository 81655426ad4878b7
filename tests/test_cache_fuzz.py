"""Fuzzed cache files: random byte flips and truncations are refused with an
error naming the file, never read as logits."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_kd

# Reading damaged cache files is TensorFlow code whatever Keras 3's backend is, so the TensorFlow
# job runs it (the JAX job ran the same reads again; a JAX teacher's cache: tests/test_jax_cache.py).
pytestmark = pytest.mark.backend("tensorflow")

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = rng.integers(0, 3, size=300)
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    cache_dir = root / "cache"
    list(
        ds.apply(
            keras_kd.cache_teacher_logits(teacher, str(cache_dir), batch_size=64, shard_size=128, verbose=0)
        )
    )
    files = sorted(f for f in os.listdir(cache_dir) if f.endswith(".bin"))
    assert len(files) >= 2
    return root, cache_dir, files, teacher, ds


def _copy(root, cache_dir, name):
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cache_dir, target)
    return target


def _open(teacher, ds, directory):
    return list(ds.apply(keras_kd.cache_teacher_logits(teacher, str(directory), verbose=0)))


@FUZZ
@given(data=st.data())
def test_byte_flips_are_refused(built, data):
    root, cache_dir, files, teacher, ds = built
    work = _copy(root, cache_dir, "flip")
    name = data.draw(st.sampled_from(files))
    size = os.path.getsize(work / name)
    offset = data.draw(st.integers(0, size - 1))
    mask = data.draw(st.integers(1, 255))
    with open(work / name, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
    with pytest.raises(keras_kd.CacheCorruptedError, match=name):
        _open(teacher, ds, work)


@FUZZ
@given(data=st.data())
def test_truncations_are_refused(built, data):
    root, cache_dir, files, teacher, ds = built
    work = _copy(root, cache_dir, "trunc")
    name = data.draw(st.sampled_from(files + ["manifest.json"]))
    size = os.path.getsize(work / name)
    keep = data.draw(st.integers(0, size - 1))
    with open(work / name, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(keras_kd.CacheCorruptedError, match=name):
        _open(teacher, ds, work)


# ---------------------------------------------------------------------------
# Fuzzed manifests and journals: untrusted input (issue 12 case 15, issue 13)
# ---------------------------------------------------------------------------

HOSTILE = [
    "../victim.txt",
    "/tmp/victim.txt",
    "manifest.json",
    "",
    ".",
    "..",
    "logits-00000-00000.bin",
    "logits-00000-00000-0000000000000000.bin",
    "sub/logits-00000-00000-0000000000000000.bin",
    "\udce9.bin",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(HOSTILE),
    st.just([]),
    st.just({}),
    st.lists(st.integers(-3, 3), max_size=3),
)


def _paths(obj, prefix=()):
    """Every key path into a JSON document."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, path, value, delete):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _outside(root):
    """Everything outside the cache directories, with contents and times."""
    out = {}
    for name in os.listdir(root):
        path = root / name
        if path.is_file() and not path.is_symlink():
            out[name] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def _served_correctly(ds, teacher, x):
    ((_, t),) = list(ds.batch(1000))
    np.testing.assert_array_equal(t.example_id.numpy(), np.arange(len(x)))
    np.testing.assert_allclose(
        t.logits.numpy().astype("float32"), teacher.predict(x, verbose=0), rtol=2e-3, atol=2e-3
    )


def _prepare(root, cache_dir, name):
    work = _copy(root, cache_dir, name)
    (work / "notes.txt").write_bytes(b"a user's file")  # foreign file inside the directory
    (root / "victim.txt").write_bytes(b"precious")
    return work


def _check_outcome(teacher, ds, work, root, before, x):
    """Correct data or a named cache error; then a rebuild repairs; nothing foreign is touched."""
    try:
        _served_correctly(ds.apply(keras_kd.cache_teacher_logits(teacher, str(work), verbose=0)), teacher, x)
    except (keras_kd.CacheCorruptedError, keras_kd.CacheMismatchError) as e:
        assert str(work) in str(e) or "manifest.json" in str(e) or "journal" in str(e), str(e)
    rebuilt = ds.apply(keras_kd.cache_teacher_logits(teacher, str(work), on_mismatch="rebuild", verbose=0))
    _served_correctly(rebuilt, teacher, x)
    assert _outside(root) == before
    assert (work / "notes.txt").read_bytes() == b"a user's file"


@FUZZ
@given(data=st.data())
def test_mutated_manifests_give_correct_data_or_a_named_error(built, data):
    root, cache_dir, files, teacher, ds = built
    x = np.stack([e[0].numpy() for e in ds])
    work = _prepare(root, cache_dir, "manifest")
    before = _outside(root)
    with open(work / "manifest.json") as f:
        manifest = json.load(f)
    path = data.draw(st.sampled_from(list(_paths(manifest))))
    value = data.draw(VALUES)
    if data.draw(st.booleans()) and isinstance(value, str) and path and path[-1] == "name":
        value = data.draw(st.sampled_from(HOSTILE))
    manifest = _mutate(manifest, path, value, delete=data.draw(st.booleans()))
    with open(work / "manifest.json", "w") as f:
        json.dump(manifest, f)
    _check_outcome(teacher, ds, work, root, before, x)


@FUZZ
@given(data=st.data())
def test_mutated_journals_give_correct_data_or_a_named_error(built, data):
    root, cache_dir, files, teacher, ds = built
    x = np.stack([e[0].numpy() for e in ds])
    work = _prepare(root, cache_dir, "journal")
    os.remove(work / "manifest.json")  # an interrupted build: the journal decides what is resumed
    before = _outside(root)
    journal_path = work / "keras_kd-part-00000-of-00001.json"
    with open(journal_path) as f:
        journal = json.load(f)
    path = data.draw(st.sampled_from(list(_paths(journal))))
    journal = _mutate(journal, path, data.draw(VALUES), delete=data.draw(st.booleans()))
    with open(journal_path, "w") as f:
        json.dump(journal, f)
    _check_outcome(teacher, ds, work, root, before, x)
    # A bounded build: the data files are exactly the cache's blocks, at most 2 blocks of 256 rows.
    manifest = keras_kd.cache.read_manifest(work)
    total = sum(os.path.getsize(work / n) for n in os.listdir(work) if n.endswith(".bin"))
    assert total == manifest["num_blocks"] * manifest["block_bytes"] <= 2 * 256 * 3 * 2


@pytest.mark.parametrize(
    "kind", ["garbage", "not utf-8", "deep nesting", "empty", "fifo", "dev zero", "directory"]
)
@pytest.mark.parametrize("target", ["manifest.json", "keras_kd-part-00000-of-00001.json"])
def test_special_and_garbage_manifests_never_hang_or_crash(built, kind, target):
    root, cache_dir, files, teacher, ds = built
    x = np.stack([e[0].numpy() for e in ds])
    work = _prepare(root, cache_dir, "special")
    if target != "manifest.json":
        os.remove(work / "manifest.json")
    before = _outside(root)
    path = work / target
    os.remove(path)
    if kind == "garbage":
        path.write_bytes(os.urandom(300))
    elif kind == "not utf-8":
        path.write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "deep nesting":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    if kind == "directory":
        # Not a keras_kd file and never removed by keras_kd: a clear error naming it.
        with pytest.raises(
            (keras_kd.CacheCorruptedError, keras_kd.CacheMismatchError, OSError), match=target
        ):
            ds.apply(keras_kd.cache_teacher_logits(teacher, str(work), on_mismatch="rebuild", verbose=0))
        assert path.is_dir()
        assert _outside(root) == before
        return
    _check_outcome(teacher, ds, work, root, before, x)
