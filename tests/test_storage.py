"""The storage guarantees of keras_kd's caches (teacher logits and aligned
features), under Keras 3 and tf_keras.

References are independent of the code under test: the teacher's own
``predict`` on the raw inputs, files the test itself wrote, modification
times and directory listings taken by the test.
"""

import fcntl
import json
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd.cache import build as cache_build
from keras_kd.cache import files as cache_files
from keras_kd.cache import fingerprint as cache_fingerprint
from keras_kd.cache import CacheCorruptedError
from keras_kd.cache import CacheMismatchError
from keras_kd.cache import cache_teacher_logits
from keras_kd.cache import read_manifest

RNG = np.random.default_rng(0)
X = RNG.normal(size=(256, 8)).astype("float32")
Y = RNG.integers(0, 4, size=256).astype("int32")


def teacher_model(K, seed=0, activation=None, rescale=False, hidden=16):
    K.utils.set_random_seed(seed)
    layers = [K.Input((8,))]
    if rescale:
        layers.append(K.layers.Rescaling(2.0))
    layers += [K.layers.Dense(hidden, activation="relu"), K.layers.Dense(4, activation=activation)]
    return K.Sequential(layers)


def raw(x=X, y=Y):
    return tf.data.Dataset.from_tensor_slices((x, y))


def logits_of(ds):
    """(example ids, logits) of a whole cached dataset, in order."""
    ((_, t),) = list(ds.batch(100_000))
    return t.example_id.numpy(), t.logits.numpy().astype("float32")


def expect_own_logits(ds, teacher, x=X):
    ids, got = logits_of(ds)
    np.testing.assert_array_equal(ids, np.arange(len(x)))
    # float16 storage: relative error <= 2^-11, plus predict's own rounding.
    np.testing.assert_allclose(got, teacher.predict(x, verbose=0), rtol=2e-3, atol=2e-3)


def snapshot(directory):
    return {
        n: os.stat(os.path.join(directory, n), follow_symlinks=False).st_mtime_ns
        for n in os.listdir(directory)
    }


def edit_manifest(directory, change):
    path = os.path.join(directory, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


# ---------------------------------------------------------------------------
# Only its own files
# ---------------------------------------------------------------------------


def test_rebuild_never_touches_foreign_files(K, tmp_path):
    teacher, other = teacher_model(K, 0), teacher_model(K, 1)
    raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    foreign = {
        "part-00000-3f2a9c.json": b'{"spark": 1}',
        "part-00000-of-00001.json": b"a user's file",  # keras_kd's name of version 1, not its own now
        "logits-00000-00000.bin": b"user data",
        "notes.txt": b"keep me",
    }
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    stamps = {n: os.stat(tmp_path / n).st_mtime_ns for n in foreign}
    ds = raw().apply(cache_teacher_logits(other, tmp_path, on_mismatch="rebuild", verbose=0))
    expect_own_logits(ds, other)
    for name, data in foreign.items():
        assert (tmp_path / name).read_bytes() == data
        assert os.stat(tmp_path / name).st_mtime_ns == stamps[name]


@pytest.mark.parametrize("on_mismatch", ["error", "rebuild"])
def test_foreign_manifest_is_never_overwritten(K, tmp_path, on_mismatch):
    teacher = teacher_model(K)
    (tmp_path / "manifest.json").write_text('{"format": "someone else"}')
    with pytest.raises(CacheMismatchError, match="manifest.json that keras_kd did not write"):
        raw().apply(cache_teacher_logits(teacher, tmp_path, on_mismatch=on_mismatch, verbose=0))
    assert (tmp_path / "manifest.json").read_text() == '{"format": "someone else"}'
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_feature_cache_refuses_a_foreign_folder_and_deletes_nothing(K, tmp_path):
    from tests.test_alignment import net

    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    aligned = keras_kd.align(s, t, [("feat", "feat")])
    images = tf.data.Dataset.from_tensor_slices((np.zeros((6, 8, 8, 1), "float32"), np.arange(6) % 3))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    for on_mismatch in ("error", "rebuild"):
        with pytest.raises(CacheMismatchError, match="not empty and was not created by keras_kd.*thesis.tex"):
            images.apply(aligned.cache_features(str(folder), on_mismatch=on_mismatch))
    assert os.listdir(folder) == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "years of work"
    # The deprecated `overwrite=True` is `on_mismatch="rebuild"`, and refuses the same way.
    with pytest.warns(DeprecationWarning, match="overwrite"):
        transform = aligned.cache_features(str(folder), overwrite=True)
    with pytest.raises(CacheMismatchError, match="not empty"):
        images.apply(transform)
    assert os.listdir(folder) == ["thesis.tex"]


@pytest.mark.parametrize(
    "name", ["../victim.txt", "ABSOLUTE", "manifest.json", "logits-00000-00000.bin", "sub/x.bin"]
)
def test_hostile_manifest_names_are_refused_and_nothing_outside_is_touched(K, tmp_path, name):
    teacher = teacher_model(K)
    directory = tmp_path / "cache"
    raw().apply(cache_teacher_logits(teacher, directory, verbose=0))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    name = str(victim) if name == "ABSOLUTE" else name

    def hostile(m):
        m["files"][0]["name"] = name

    edit_manifest(directory, hostile)
    with pytest.raises(CacheCorruptedError, match=r"entry `files\[0\]\.name`"):
        raw().apply(cache_teacher_logits(teacher, directory, verbose=0))
    with pytest.raises(CacheCorruptedError, match=r"files\[0\]\.name"):
        read_manifest(directory)
    ds = raw().apply(cache_teacher_logits(teacher, directory, on_mismatch="rebuild", verbose=0))
    expect_own_logits(ds, teacher)
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["cache", "victim.txt"]


# ---------------------------------------------------------------------------
# The fingerprint identifies the teacher's function and every element
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["remove softmax", "add rescaling"])
def test_teacher_function_changes_without_weight_changes_are_refused(K, tmp_path, change):
    if change == "remove softmax":
        before, after = teacher_model(K, 0, activation="softmax"), teacher_model(K, 0)
    else:
        before, after = teacher_model(K, 0), teacher_model(K, 0, rescale=True)
    after.set_weights(before.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the softmax teacher's warning
        raw().apply(cache_teacher_logits(before, tmp_path, verbose=0))
    with pytest.raises(CacheMismatchError, match="architecture or configuration changed"):
        raw().apply(cache_teacher_logits(after, tmp_path, verbose=0))
    expect_own_logits(
        raw().apply(cache_teacher_logits(after, tmp_path, on_mismatch="rebuild", verbose=0)), after
    )


def test_opening_reruns_the_teacher_on_one_batch(K, tmp_path):
    """A teacher whose change the fingerprint cannot see is caught by the re-run."""
    teacher = teacher_model(K, 0)
    raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, verbose=0))
    manifest = read_manifest(tmp_path)
    first = manifest["files"][0]
    # Replace the first block's logits by plausible, checksum-valid other logits
    # (as a build by another teacher under the same fingerprint would leave).
    path = tmp_path / first["name"]
    data = bytearray(path.read_bytes())
    data[: 64 * 4 * 2] = (np.asarray(teacher.predict(X[:64], verbose=0)) + 1.0).astype("<f2").tobytes()
    path.write_bytes(bytes(data))
    import zlib

    edit_manifest(tmp_path, lambda m: m["files"][0].update(crc32=zlib.crc32(bytes(data))))
    with pytest.raises(CacheMismatchError, match="computes something else"):
        raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    expect_own_logits(
        raw().apply(cache_teacher_logits(teacher, tmp_path, on_mismatch="rebuild", verbose=0)), teacher
    )


@pytest.mark.parametrize("in_memory", [True, False])
def test_reordered_or_edited_elements_anywhere_are_refused(K, tmp_path, in_memory):
    teacher = teacher_model(K)
    raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0, in_memory=in_memory))
    reordered = X.copy()
    reordered[100:] = X[100:][::-1]  # issue 12 case 7: x[100:] of 256 reordered
    with pytest.raises(CacheMismatchError, match="contents changed"):
        raw(reordered, Y).apply(cache_teacher_logits(teacher, tmp_path, verbose=0, in_memory=in_memory))
    edited = X.copy()
    edited[255, 7] += 1e-3  # the very last element
    with pytest.raises(CacheMismatchError, match="contents changed"):
        raw(edited, Y).apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    # Labels are not teacher inputs: new labels keep the cache, and arrive fresh.
    ds = raw(X, (Y + 1) % 4).apply(cache_teacher_logits(teacher, tmp_path, verbose=0, in_memory=in_memory))
    ((_, t),) = list(ds.batch(256))
    np.testing.assert_array_equal(t.labels.numpy(), (Y + 1) % 4)


def test_feature_cache_refuses_changed_or_grown_datasets(K, tmp_path):
    from tests.test_alignment import feature_of, net

    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    aligned = keras_kd.align(s, t, [("feat", "feat")])
    images = np.random.default_rng(1).normal(size=(96, 8, 8, 1)).astype("float32")
    labels = np.arange(96) % 3
    directory = str(tmp_path / "f")
    small = tf.data.Dataset.from_tensor_slices((images[:64], labels[:64])).filter(lambda a, b: True)
    cached = small.apply(aligned.cache_features(directory, batch_size=32))
    assert sum(1 for _ in cached) == 64
    grown = tf.data.Dataset.from_tensor_slices((images, labels)).filter(lambda a, b: True)
    with pytest.raises(CacheMismatchError, match="count changed.*64 -> 96"):
        grown.apply(aligned.cache_features(directory, batch_size=32))
    swapped = images[:64].copy()
    swapped[[10, 50]] = swapped[[50, 10]]
    with pytest.raises(CacheMismatchError, match="contents changed"):
        tf.data.Dataset.from_tensor_slices((swapped, labels[:64])).apply(aligned.cache_features(directory))
    # Rebuilt for the grown dataset, every row is that example's teacher features.
    rebuilt = grown.apply(aligned.cache_features(directory, batch_size=32, on_mismatch="rebuild"))
    feats = np.concatenate([f.numpy() for (x, f), _ in rebuilt.batch(50)])
    np.testing.assert_allclose(feats, feature_of(K, t).predict(images, verbose=0), rtol=2e-3, atol=2e-3)


def test_feature_cache_refuses_a_teacher_whose_architecture_changed(K, tmp_path):
    from tests.test_alignment import net

    def teacher(rescale):
        inp = K.Input((8, 8, 1))
        h = K.layers.Flatten()(inp)
        if rescale:
            h = K.layers.Rescaling(2.0)(h)
        f = K.layers.Reshape((4, 4, 16), name="feat")(K.layers.Dense(256, name="pre")(h))
        model = K.Model(inp, K.layers.Dense(3, name="logits")(K.layers.Flatten()(f)), name="t")
        model.trainable = False
        return model

    s, t = net(K, (4, 4, 8), "s"), teacher(False)
    images = tf.data.Dataset.from_tensor_slices((np.ones((6, 8, 8, 1), "float32"), np.arange(6) % 3))
    images.apply(keras_kd.align(s, t, [("feat", "feat")]).cache_features(str(tmp_path / "f")))
    changed = teacher(True)  # the same weights, one more (weightless) layer
    changed.set_weights(t.get_weights())
    with pytest.raises(CacheMismatchError, match="teacher_architecture changed"):
        images.apply(keras_kd.align(s, changed, [("feat", "feat")]).cache_features(str(tmp_path / "f")))


# ---------------------------------------------------------------------------
# Schema: every manifest and journal entry is checked
# ---------------------------------------------------------------------------

BAD_MANIFESTS = {
    "crc32 null": (lambda m: m["files"][0].update(crc32=None), r"files\[0\]\.crc32"),
    "crc32 string": (lambda m: m["files"][0].update(crc32="0"), r"files\[0\]\.crc32"),
    "lying teacher_shape": (lambda m: m.update(teacher_shape=[5]), "teacher_shape|layout"),
    "lying dtype": (lambda m: m.update(dtype="float32"), "dtype|layout"),
    "lying block_rows": (lambda m: m["layout"].update(block_rows=32), "layout"),
    "huge block_rows": (lambda m: m["layout"].update(block_rows=20_000_000), r"layout\.block_rows"),
    "missing layout": (lambda m: m.pop("layout"), "`layout` is missing"),
    "missing fingerprint": (lambda m: m.pop("fingerprint"), "`fingerprint` is missing"),
    "bytes lie together": (
        lambda m: [f.update(bytes=f["bytes"] + 1) for f in m["files"]],
        r"files\[0\]\.bytes",
    ),
    "a file left out": (lambda m: m["files"].pop(), "files"),
    "negative num_examples": (lambda m: m.update(num_examples=-1), "num_examples"),
    "bool as int": (lambda m: m.update(num_parts=True), "num_parts"),
    "field dtype": (lambda m: m["layout"]["fields"][0].update(dtype="|O"), r"fields\[0\]\.dtype"),
    "not an object": (lambda m: m.clear() or m.update(files=7), "format"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_manifest_schema_violations_are_named_and_rebuildable(K, tmp_path, case):
    change, entry = BAD_MANIFESTS[case]
    teacher = teacher_model(K)
    raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, shard_size=128, verbose=0))
    edit_manifest(tmp_path, change)
    with pytest.raises(CacheCorruptedError, match=entry):
        raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    expect_own_logits(
        raw().apply(cache_teacher_logits(teacher, tmp_path, on_mismatch="rebuild", verbose=0)), teacher
    )


@pytest.mark.parametrize("kind", ["fifo", "dev zero", "symlink out"])
def test_special_files_named_by_a_manifest_never_hang(K, tmp_path, kind):
    teacher = teacher_model(K)
    directory = tmp_path / "cache"
    raw().apply(cache_teacher_logits(teacher, directory, verbose=0))
    name = read_manifest(directory)["files"][0]["name"]
    os.remove(directory / name)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 4096)
    if kind == "fifo":
        os.mkfifo(directory / name)
    else:
        os.symlink("/dev/zero" if kind == "dev zero" else outside, directory / name)
    for in_memory in (True, False):
        with pytest.raises(CacheCorruptedError, match=name):
            raw().apply(cache_teacher_logits(teacher, directory, verbose=0, in_memory=in_memory))
    expect_own_logits(
        raw().apply(cache_teacher_logits(teacher, directory, on_mismatch="rebuild", verbose=0)), teacher
    )
    assert outside.read_bytes() == b"\0" * 4096


def test_journal_block_rows_is_bounded(K, tmp_path):
    teacher = teacher_model(K)
    raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, verbose=0))
    journal = tmp_path / "keras_kd-part-00000-of-00001.json"
    state = json.loads(journal.read_text())
    state["layout"]["block_rows"] = 20_000_000
    state["complete"] = False
    journal.write_text(json.dumps(state))
    os.remove(tmp_path / "manifest.json")
    expect_own_logits(raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, verbose=0)), teacher)
    manifest = read_manifest(tmp_path)
    assert manifest["layout"]["block_rows"] == 64
    assert sum(f["bytes"] for f in manifest["files"]) == 4 * 64 * 4 * 2  # 4 blocks of 64 rows x 4 float16


def test_foreign_symlinked_directory_and_non_utf8_paths(K, tmp_path):
    teacher = teacher_model(K)
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    expect_own_logits(raw().apply(cache_teacher_logits(teacher, tmp_path / "link", verbose=0)), teacher)
    assert "manifest.json" in os.listdir(real)
    expect_own_logits(
        raw().apply(cache_teacher_logits(teacher, tmp_path / "link", on_mismatch="rebuild", verbose=0)),
        teacher,
    )
    bad = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    with pytest.raises(ValueError, match="valid UTF-8"):
        cache_teacher_logits(teacher, bad)  # at construction: before the teacher runs
    from tests.test_alignment import net

    aligned = keras_kd.align(net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True), [("feat", "feat")])
    with pytest.raises(ValueError, match="valid UTF-8"):
        aligned.cache_features(bad)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


# ---------------------------------------------------------------------------
# Locks, stale temporaries, parts
# ---------------------------------------------------------------------------


def test_stale_temporaries_are_recognised_by_lock_not_pid(K, tmp_path):
    teacher = teacher_model(K)
    w0 = cache_teacher_logits(teacher, tmp_path, num_shards=2, shard_index=0, batch_size=32, verbose=0)
    w1 = cache_teacher_logits(teacher, tmp_path, num_shards=2, shard_index=1, batch_size=32, verbose=0)
    w0.build(raw())
    journal = json.loads((tmp_path / "keras_kd-part-00000-of-00002.json").read_text())
    gen = journal["generation"]
    # A live builder of part 0 (same host, any pid namespace) holds its lock and writes a temporary.
    live_tmp = tmp_path / f"logits-00000-00009-{gen}.bin.tmp-{'a' * 16}"
    live_tmp.write_bytes(b"in flight")
    fd = os.open(tmp_path / ".keras_kd-part-00000-of-00002.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        manifest = w1.build(raw())  # assembles the cache, collects garbage
        assert manifest["num_examples"] == 256
        assert live_tmp.exists()  # locked: kept
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    # The builder is gone (its lock is free): the next build removes it.
    os.remove(tmp_path / "manifest.json")
    w0.build(raw())
    assert not live_tmp.exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_part_complete_for_another_teacher_is_named(K, tmp_path):
    old, new = teacher_model(K, 0), teacher_model(K, 1)
    cache_teacher_logits(old, tmp_path, num_shards=2, shard_index=1, batch_size=32, verbose=0).build(raw())
    # wait_timeout=None would wait for ever on today's main.
    with pytest.raises(
        CacheMismatchError, match=r"(?s)Part 1 .* is complete, but for something else.*weights changed"
    ):
        raw().apply(
            cache_teacher_logits(new, tmp_path, num_shards=2, shard_index=0, batch_size=32, verbose=0)
        )


def test_free_space_is_checked_for_the_whole_cache(K, tmp_path, monkeypatch):
    teacher = teacher_model(K)
    whole = 256 * 4 * 2  # bytes of the whole cache: 256 examples x 4 float16 logits
    monkeypatch.setattr(
        cache_build.shutil, "disk_usage", lambda path: type("U", (), {"free": whole * 3 // 4})()
    )
    # Half the cache would fit; both workers write to one filesystem, the whole does not.
    with pytest.raises(OSError, match="disk is full: the teacher-logit cache needs"):
        cache_teacher_logits(teacher, tmp_path, num_shards=2, shard_index=0, batch_size=64, verbose=0).build(
            raw()
        )


def test_feature_cache_full_disk_is_clear_and_leaves_nothing(K, tmp_path, monkeypatch):
    from tests.test_alignment import net

    aligned = keras_kd.align(net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True), [("feat", "feat")])
    images = tf.data.Dataset.from_tensor_slices((np.ones((64, 8, 8, 1), "float32"), np.arange(64) % 3))
    real_open = cache_files._open_for_write

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    calls = []

    def opener(path):
        calls.append(path)
        return Full(real_open(path)) if ".bin.tmp-" in path else real_open(path)

    monkeypatch.setattr(cache_files, "_open_for_write", opener)
    with pytest.raises(OSError, match="disk is full: could not write the feature cache file"):
        images.apply(aligned.cache_features(str(tmp_path / "f"), batch_size=16))
    assert not [n for n in os.listdir(tmp_path / "f") if ".tmp-" in n or n.endswith(".bin")]
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_non_finite_teacher_outputs_fail_the_cache_build(K, tmp_path):
    """The teacher runs outside the compiled step here: the build itself refuses NaN."""
    teacher = teacher_model(K)
    x = X.copy()
    x[77, 3] = np.nan  # NaN inputs (fused MatMul + ReLU kernels would hide them from the logits)
    with pytest.raises(ValueError, match="NaN or Inf"):
        raw(x, Y).apply(cache_teacher_logits(teacher, tmp_path / "c", verbose=0))
    x = X.copy()
    x[200] = 3e38  # finite inputs, logits that overflow to inf
    assert not np.isfinite(teacher.predict(x[200:201], verbose=0)).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        raw(x, Y).apply(cache_teacher_logits(teacher, tmp_path / "c", dtype="float32", verbose=0))
    assert not (tmp_path / "c" / "manifest.json").exists()
    from tests.test_alignment import net

    aligned = keras_kd.align(net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True), [("feat", "feat")])
    images = np.ones((6, 8, 8, 1), "float32")
    images[4, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        tf.data.Dataset.from_tensor_slices((images, np.arange(6) % 3)).apply(
            aligned.cache_features(str(tmp_path / "f"))
        )
    assert not (tmp_path / "f" / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["garbage manifest", "flipped byte", "float64 field", "wrong shape"])
def test_damaged_feature_cache_is_named_and_repaired(K, tmp_path, damage):
    from tests.test_alignment import feature_of, net

    t = net(K, (4, 4, 16), "t", frozen=True)
    aligned = keras_kd.align(net(K, (4, 4, 8), "s"), t, [("feat", "feat")])
    images = np.random.default_rng(2).normal(size=(40, 8, 8, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(40) % 3))
    directory = tmp_path / "f"
    ds.apply(aligned.cache_features(str(directory), batch_size=16))
    manifest = json.loads((directory / "manifest.json").read_text())
    if damage == "garbage manifest":
        (directory / "manifest.json").write_bytes(b"\xff\xfe not json")
    elif damage == "flipped byte":
        victim = directory / manifest["files"][-1]["name"]
        data = bytearray(victim.read_bytes())
        data[-7] ^= 0x40
        victim.write_bytes(bytes(data))
    else:
        field = manifest["layout"]["fields"][1]
        field.update(dtype="<f8") if damage == "float64 field" else field.update(shape=[4, 16, 4])
        (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptedError, match="manifest.json|features-"):
        ds.apply(aligned.cache_features(str(directory), batch_size=16))
    with pytest.warns(DeprecationWarning):
        repaired = ds.apply(aligned.cache_features(str(directory), batch_size=16, overwrite=True))
    feats = np.concatenate([f.numpy() for (x, f), _ in repaired.batch(40)])
    np.testing.assert_allclose(feats, feature_of(K, t).predict(images, verbose=0), rtol=2e-3, atol=2e-3)
    assert not [n for n in os.listdir(directory) if ".tmp-" in n]


def test_a_rebuild_after_a_probe_mismatch_never_rewrites_the_files_a_reader_streams(K, tmp_path, monkeypatch):
    """Same fingerprint, same layout: the rebuild still writes new names (a new generation)."""
    teacher = teacher_model(K, 0)
    monkeypatch.setattr(cache_fingerprint, "weights_digest", lambda model: "same")
    old_reader = raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, in_memory=False, verbose=0))
    old_files = {f["name"] for f in read_manifest(tmp_path)["files"]}
    other = teacher_model(K, 5)
    # The teacher's function changed in a way the fingerprint cannot see (its
    # weights digest is patched to one value, so the fingerprint and the
    # generation's plain name are identical): the probe on opening notices it.
    with pytest.raises(CacheMismatchError, match="computes something else"):
        raw().apply(cache_teacher_logits(other, tmp_path, batch_size=64, verbose=0))
    rebuilt = raw().apply(cache_teacher_logits(other, tmp_path, batch_size=64, on_mismatch="rebuild", verbose=0))
    expect_own_logits(rebuilt, other)
    assert not old_files & {f["name"] for f in read_manifest(tmp_path)["files"]}
    expect_own_logits(old_reader, teacher)  # the live reader: still its own teacher's, unmixed
    # A third teacher, again unseen by the fingerprint: the first two readers stay unmixed.
    second_reader = raw().apply(cache_teacher_logits(other, tmp_path, batch_size=64, in_memory=False, verbose=0))
    third = teacher_model(K, 9)
    third_ds = raw().apply(cache_teacher_logits(third, tmp_path, batch_size=64, on_mismatch="rebuild", verbose=0))
    expect_own_logits(third_ds, third)
    expect_own_logits(second_reader, other)
    expect_own_logits(old_reader, teacher)


@pytest.mark.parametrize("on_mismatch", ["error", "rebuild"])
def test_a_job_whose_part_another_job_rewrote_meanwhile_raises_instead_of_waiting(K, tmp_path, monkeypatch, on_mismatch):
    """The race of two jobs with different teachers on one empty directory.

    Job A writes its part; before it assembles the manifest, job B (another
    teacher) takes the part's lock and rewrites the part for its own build.
    A's part will never come back: A must say so, not wait for ever.
    """
    teacher, other = teacher_model(K, 0), teacher_model(K, 5)
    real_assemble, order = cache_build.Build.assemble, []

    def assemble(build):
        if not order:
            order.append("b")  # B runs to the end between A's part and A's manifest
            expect_own_logits(raw().apply(cache_teacher_logits(other, tmp_path, batch_size=64, verbose=0)), other)
        return real_assemble(build)

    monkeypatch.setattr(cache_build.Build, "assemble", assemble)
    with pytest.raises(CacheMismatchError, match=r"(?s)Another job rewrote part 0.*weights changed.*its own `directory`"):
        raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, on_mismatch=on_mismatch, verbose=0))
    monkeypatch.setattr(cache_build.Build, "assemble", real_assemble)
    expect_own_logits(raw().apply(cache_teacher_logits(other, tmp_path, batch_size=64, verbose=0)), other)
    if on_mismatch == "rebuild":  # asked again, alone, the job rebuilds for its own teacher
        rebuilt = raw().apply(cache_teacher_logits(teacher, tmp_path, batch_size=64, on_mismatch="rebuild", verbose=0))
        expect_own_logits(rebuilt, teacher)


@pytest.mark.parametrize("directory", [None, "f"])
def test_feature_cache_refuses_inputs_of_unknown_or_varying_shape(K, tmp_path, directory):
    from tests.test_alignment import net

    aligned = keras_kd.align(net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True), [("feat", "feat")])
    x = RNG.normal(size=(6, 8, 8, 1)).astype("float32")
    loose = tf.data.Dataset.from_generator(
        lambda: ((x[i], i % 3) for i in range(6)),
        output_signature=(tf.TensorSpec((None, None, 1), tf.float32), tf.TensorSpec((), tf.int64)),
    )
    target = None if directory is None else str(tmp_path / directory)
    with pytest.raises(ValueError, match=r"one known, fixed shape per example.*tf.ensure_shape"):
        loose.apply(aligned.cache_features(target))
    assert directory is None or not os.path.exists(target)  # refused before anything is written
    # Declaring the shape is the fix, and the rows are the extractor's own.
    fixed = loose.map(lambda x, y: (tf.ensure_shape(x, [8, 8, 1]), y))
    ((inputs, t),) = list(fixed.apply(aligned.cache_features(target)).batch(6))
    want = aligned.feature_extractor.predict(x, verbose=0)
    np.testing.assert_allclose(t.logits.numpy(), want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inputs[-1].numpy().astype("float32"), want[1], rtol=2e-3, atol=2e-3)


def test_freezing_the_teacher_or_changing_only_labels_reuses_the_cache(K, tmp_path):
    """`trainable` does not change inference outputs; labels are never seen by the teacher."""
    teacher = teacher_model(K, 0)
    raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    before = snapshot(tmp_path)
    teacher.trainable = False  # the usual step before distillation
    teacher.layers[0].trainable = False
    expect_own_logits(raw().apply(cache_teacher_logits(teacher, tmp_path, verbose=0)), teacher)
    other_labels = (Y + 1) % 4
    ds = raw(y=other_labels).apply(cache_teacher_logits(teacher, tmp_path, verbose=0))
    expect_own_logits(ds, teacher)
    ((_, t),) = list(ds.batch(1000))
    np.testing.assert_array_equal(t.labels.numpy(), other_labels)  # each element's own current labels
    assert snapshot(tmp_path) == before  # reused, not rebuilt
    # A real architecture change is still refused.
    with pytest.raises(CacheMismatchError, match="architecture or configuration changed"):
        raw().apply(cache_teacher_logits(teacher_model(K, 0, activation="tanh"), tmp_path, verbose=0))
