"""HardSampleReweighting's backup (``backup_dir=``): resumed runs only, validated,
atomic under concurrent writers, removed after a successful fit. Both flavours."""

import os
import threading
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd.callbacks import backup as backup_lib
from keras_kd.callbacks import BackupCorruptedError
from tests.conftest import mlp

N = 48
FILE = backup_lib.FILE_NAME


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    y = rng.integers(0, 4, size=N)
    return x, y, keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y)))


def _callback_base(K):
    return keras_kd.Callback


def _crash_at(K, crash_epoch):
    class Crash(_callback_base(K)):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == crash_epoch:
                raise RuntimeError("crash")

    return Crash()


def _run(K, tmp_path, *, seed, callbacks=(), epochs=4, rew_dir="rew", backup_dir="backup", **rew_kwargs):
    """One fit with reweighting next to BackupAndRestore; the student's weights depend on ``seed``."""
    x, y, ds = _data()
    K.utils.set_random_seed(seed)
    teacher, student = mlp(K, hidden=32), mlp(K)
    kwargs = dict(signal="student_ce", warmup_epochs=0, backup_dir=str(tmp_path / rew_dir))
    kwargs.update(rew_kwargs)
    rew = keras_kd.HardSampleReweighting(**kwargs)
    student.compile(K.optimizers.SGD(0.05), loss=keras_kd.DistillationLoss())
    train = keras_kd.with_teacher(rew.attach(ds).batch(16), teacher)
    backup = K.callbacks.BackupAndRestore(str(tmp_path / backup_dir))
    history = student.fit(train, epochs=epochs, verbose=0, callbacks=[rew, backup, *callbacks])
    return rew, history


def test_resumed_run_restores_and_then_removes_the_backup(K, tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 1)])
    crashed = np.load(tmp_path / "rew" / FILE)
    assert int(crashed["epoch"]) == 1
    restored = {}

    class Probe(_callback_base(K)):
        """Sees the table at the start of the resumed epoch, after the restore."""

        def __init__(self, rew_getter):
            super().__init__()
            self.rew_getter = rew_getter

        def on_epoch_begin(self, epoch, logs=None):
            if not restored:
                restored["epoch"] = epoch
                restored["weights"] = self.rew_getter().table.weights.numpy().copy()

    holder = {}
    x, y, ds = _data()
    K.utils.set_random_seed(0)
    teacher, student = mlp(K, hidden=32), mlp(K)
    rew = holder["rew"] = keras_kd.HardSampleReweighting(signal="student_ce", warmup_epochs=0,
                                                         backup_dir=str(tmp_path / "rew"))
    student.compile(K.optimizers.SGD(0.05), loss=keras_kd.DistillationLoss())
    train = keras_kd.with_teacher(rew.attach(ds).batch(16), teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = student.fit(train, epochs=4, verbose=0, callbacks=[
            rew, K.callbacks.BackupAndRestore(str(tmp_path / "backup")), Probe(lambda: holder["rew"])])
    assert not [str(w.message) for w in caught if "restore" in str(w.message)]  # a matching backup restores silently
    assert history.epoch == [2, 3]  # resumed, not restarted
    assert restored["epoch"] == 2
    np.testing.assert_array_equal(restored["weights"], crashed["weights"])
    # Removed at the end of the successful fit, as BackupAndRestore removes its own.
    assert not (tmp_path / "rew" / FILE).exists()


def test_unrelated_later_run_starts_afresh(K, tmp_path):
    """A crashed run leaves its file; a new run (epoch 0) never reads it."""
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 2)], backup_dir="backup_a")
    stale = np.load(tmp_path / "rew" / FILE)["weights"]
    assert not np.allclose(stale, 1.0)
    # The same fit without any backup_dir: what a fresh run must give.
    want, _ = _run(K, tmp_path, seed=1, epochs=1, rew_dir="elsewhere", backup_dir="backup_c")
    got, history = _run(K, tmp_path, seed=1, epochs=1, backup_dir="backup_b")
    assert history.epoch == [0]
    np.testing.assert_allclose(got.table.weights.numpy(), want.table.weights.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got.table.difficulty, want.table.difficulty, rtol=1e-6)


def test_resume_from_another_model_state_does_not_restore(K, tmp_path):
    """The run resumes (BackupAndRestore restored epoch 2 of run A) but the
    reweighting file is from run B: other weights, so it is not restored."""
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 1)], rew_dir="rew_a", backup_dir="backup")
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=5, callbacks=[_crash_at(K, 1)], rew_dir="rew_b", backup_dir="backup_b")
    with pytest.warns(UserWarning, match="does not restore the backup .*another run"):
        rew, history = _run(K, tmp_path, seed=0, rew_dir="rew_b", backup_dir="backup")
    assert history.epoch == [2, 3]


def test_resume_from_another_epoch_does_not_restore(K, tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 1)])
    path = tmp_path / "rew" / FILE
    saved = dict(np.load(path))
    backup_lib.ReweightingBackup(str(tmp_path / "rew")).save(0, str(saved["run_identity"]), saved["weights"],
                                                             saved["stats"])
    with pytest.warns(UserWarning, match="resumes at epoch 3 but it was written after epoch 1"):
        _run(K, tmp_path, seed=0)


def test_settings_are_part_of_the_identity(K, tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 1)])
    with pytest.warns(UserWarning, match="another run"):
        _run(K, tmp_path, seed=0, signal="kl")


# --- validation: every damaged file is a clear error naming the path ---------------


def _damage(path, how, rng=np.random.default_rng(0)):
    good = dict(np.load(path))
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(rng.bytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "pickle":
        np.save(open(path, "wb"), np.array([object()], dtype=object), allow_pickle=True)
    elif how == "flipped":
        body = bytearray(data)
        body[len(body) // 2] ^= 0xFF
        path.write_bytes(bytes(body))
    else:
        arrays = dict(good)
        if how == "nan_weights":
            arrays["weights"] = arrays["weights"].copy()
            arrays["weights"][3] = np.nan
        elif how == "inf_stats":
            arrays["stats"] = arrays["stats"].copy()
            arrays["stats"][0, 0] = np.inf
        elif how == "out_of_clip":
            arrays["weights"] = np.full_like(arrays["weights"], 50.0)
        elif how == "wrong_shape":
            arrays["weights"] = arrays["weights"][:-1]
        elif how == "wrong_dtype":
            arrays["weights"] = arrays["weights"].astype(np.float64)
        elif how == "missing_key":
            del arrays["stats"]
        elif how == "foreign_format":
            arrays["format"] = np.array("something else/1")
        with open(path, "wb") as f:
            np.savez(f, **arrays)


DAMAGES = ["truncated", "garbage", "empty", "pickle", "flipped", "nan_weights", "inf_stats", "out_of_clip",
           "wrong_shape", "wrong_dtype", "missing_key", "foreign_format"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_backup_is_a_clear_error(tmp_path, how):
    store = backup_lib.ReweightingBackup(str(tmp_path))
    weights = np.linspace(0.5, 2.0, N).astype(np.float32)
    stats = np.stack([np.linspace(0, 1, N), np.zeros(N)], 1).astype(np.float32)
    store.save(3, "identity", weights, stats)
    loaded = store.load(N, (0.2, 5.0))
    np.testing.assert_array_equal(loaded["weights"], weights)
    assert loaded["epoch"] == 3 and loaded["run_identity"] == "identity"
    _damage(tmp_path / FILE, how)
    with pytest.raises(BackupCorruptedError, match=str(tmp_path / FILE)) as info:
        store.load(N, (0.2, 5.0))
    assert "Delete it" in str(info.value)
    assert isinstance(info.value, keras_kd.CacheCorruptedError)  # one family of storage errors


def test_special_files_are_refused(tmp_path):
    target = tmp_path / "elsewhere.npz"
    target.write_bytes(b"x")
    os.symlink(target, tmp_path / FILE)
    with pytest.raises(BackupCorruptedError, match="symbolic link"):
        backup_lib.ReweightingBackup(str(tmp_path)).load(N, (0.2, 5.0))
    os.remove(tmp_path / FILE)
    os.mkfifo(tmp_path / FILE)  # never blocks
    with pytest.raises(BackupCorruptedError, match="not a regular file"):
        backup_lib.ReweightingBackup(str(tmp_path)).load(N, (0.2, 5.0))


def test_damaged_backup_fails_the_resumed_fit(K, tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        _run(K, tmp_path, seed=0, callbacks=[_crash_at(K, 1)])
    _damage(tmp_path / "rew" / FILE, "nan_weights")
    with pytest.raises(BackupCorruptedError, match="non-finite weights"):
        _run(K, tmp_path, seed=0)


def test_bad_backup_dir_is_refused_at_construction(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        keras_kd.HardSampleReweighting(backup_dir=str(tmp_path / "file"))
    with pytest.raises(ValueError, match="UTF-8"):
        keras_kd.HardSampleReweighting(backup_dir=os.fsencode(str(tmp_path)) + b"/\xff")


def test_set_state_checks_the_arrays():
    _, _, ds = _data()
    rew = keras_kd.HardSampleReweighting()
    rew.attach(ds)
    with pytest.raises(ValueError, match=r"weights of shape \(48,\)"):
        rew.set_state({"weights": np.ones(47), "stats": np.zeros((48, 2))})
    with pytest.raises(ValueError, match=r"stats of shape \(48, 2\)"):
        rew.set_state({"weights": np.ones(48), "stats": np.zeros((48,))})
    with pytest.raises(ValueError, match="finite"):
        rew.set_state({"weights": np.full(48, np.nan), "stats": np.zeros((48, 2))})


# --- concurrency: unique temporary names, readers never see a partial file ---------


def test_concurrent_saves_and_reads(tmp_path):
    store = backup_lib.ReweightingBackup(str(tmp_path))
    n = 20_000  # large enough that writes overlap
    errors, loaded = [], []

    def writer(k):
        try:
            for i in range(15):
                value = np.float32(0.5 + (k * 15 + i) % 7 * 0.25)
                store.save(i, f"writer-{k}", np.full(n, value, np.float32), np.zeros((n, 2), np.float32))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def reader(stop):
        while not stop.is_set():
            try:
                content = store.load(n, (0.2, 5.0))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return
            if content is not None:
                # Whole files only: every weight is the one value its writer wrote.
                assert np.unique(content["weights"]).size == 1
                loaded.append(content["run_identity"])

    stop = threading.Event()
    readers = [threading.Thread(target=reader, args=(stop,)) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert loaded  # the readers did read while writers wrote
    assert os.listdir(tmp_path) == [FILE]  # no temporary left behind
    assert store.load(n, (0.2, 5.0))["epoch"] == 14


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = backup_lib.ReweightingBackup(str(tmp_path))
    store.save(0, "first", np.ones(N, np.float32), np.zeros((N, 2), np.float32))

    def full_disk(self, data):
        self.abort()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_lib._storage.AtomicFile, "write", full_disk)
    with pytest.raises(OSError):
        store.save(1, "second", np.ones(N, np.float32), np.zeros((N, 2), np.float32))
    assert os.listdir(tmp_path) == [FILE]
    assert store.load(N, (0.2, 5.0))["run_identity"] == "first"


def test_only_the_chief_writes(K, tmp_path, monkeypatch):
    monkeypatch.setattr(keras_kd.HardSampleReweighting, "_is_chief", lambda self: False)
    rew, history = _run(K, tmp_path, seed=0, epochs=2)
    assert not (tmp_path / "rew").exists() or FILE not in os.listdir(tmp_path / "rew")
