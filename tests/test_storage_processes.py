"""Concurrent jobs on one cache directory, with real processes (not mocks).

Each job runs in one of two job-server processes (SERVER below, started once
for the module; the two race each other where two jobs are concurrent) with
its own teacher and reports
either the logits it was served, next to its own teacher's ``predict`` (the
independent reference), or the error it got.
"""

import json
import os
import select
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_kd.cache import cache_teacher_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A job server: one long-lived process per simulated job host. It imports
# TensorFlow/Keras once and then runs the jobs it is sent on stdin, one JSON
# line each, answering one line on stdout when a job is done. Every job still
# runs in a separate process from the test (and, where two jobs race, from
# each other); what a job creates (teacher, datasets, readers and their
# holds) is released before it answers.
SERVER = textwrap.dedent(
    """
    import gc, json, os, sys, time, traceback
    import numpy as np, tensorflow as tf, keras
    import keras_kd

    def logits_job(seed, on_mismatch, barrier, jobs):
        # One job, one or more trials: for each (directory, out) pair, wait at the barrier
        # (every job of the trial is ready) and then race the others on that directory.
        rng = np.random.default_rng(0)
        x = rng.normal(size=(512, 8)).astype("float32")
        y = rng.integers(0, 4, size=512)
        for trial, (directory, out) in enumerate(jobs):
            if barrier != "-":
                peers = barrier.split(",")
                open(os.path.join(os.path.dirname(out), f"ready-{trial}-{seed}"), "w").close()
                deadline = time.monotonic() + 240
                while not all(os.path.exists(os.path.join(os.path.dirname(out), f"ready-{trial}-{p}"))
                              for p in peers):
                    assert time.monotonic() < deadline, "the other job never reached the barrier"
                    time.sleep(0.005)
            keras.utils.set_random_seed(seed)
            teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                                        keras.layers.Dense(4)])
            try:
                ds = tf.data.Dataset.from_tensor_slices((x, y)).apply(
                    keras_kd.cache_teacher_logits(teacher, directory, batch_size=32, shard_size=64,
                                                  on_mismatch=on_mismatch, verbose=0))
                (_, t), = list(ds.batch(512))
                np.savez(out, ids=t.example_id.numpy(), got=t.logits.numpy().astype("float32"),
                         want=teacher.predict(x, verbose=0), backend=keras.backend.backend())
            except (keras_kd.CacheMismatchError, keras_kd.CacheCorruptedError) as e:
                np.savez(out, error=np.array(type(e).__name__ + ": " + str(e)), backend=keras.backend.backend())

    def features_job(directory, out):
        from tests.test_alignment import net

        keras.utils.set_random_seed(0)
        aligned = keras_kd.align(net(keras, (4, 4, 8), "s"), net(keras, (4, 4, 16), "t", frozen=True),
                                 [("feat", "feat")])
        x = np.random.default_rng(0).normal(size=(300, 8, 8, 1)).astype("float32")
        ds = tf.data.Dataset.from_tensor_slices((x, np.arange(300) % 3))
        ((inputs, t),) = list(ds.apply(aligned.cache_features(directory, batch_size=32, in_memory=False)).batch(300))
        want = aligned.feature_extractor.predict(x, verbose=0)
        np.savez(out, ids=t.example_id.numpy(), logits=t.logits.numpy(), feature=inputs[-1].numpy(),
                 want_logits=want[0], want_feature=want[1], backend=keras.backend.backend())

    for line in sys.stdin:
        command = json.loads(line)
        kind = command.pop("kind")
        try:
            (logits_job if kind == "logits" else features_job)(**command)
            answer = "done"
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            answer = "failed"
        gc.collect()  # the job's readers (and their holds) are gone before it answers
        print(answer, flush=True)
    """
)


class _Server:
    """One job-server process (see SERVER); ``submit`` sends a job, ``wait`` awaits its end."""

    def __init__(self, folder):
        script = folder / "server.py"
        script.write_text(SERVER)
        self.log = folder / "server.err"
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script)], env=env, cwd=ROOT, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            )

    def submit(self, **command):
        self.proc.stdin.write(json.dumps(command, default=str) + "\n")
        self.proc.stdin.flush()

    def wait(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        answer = self.proc.stdout.readline().strip() if ready else "timed out"
        assert answer == "done", f"job {answer}: " + self.log.read_text()[-3000:]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two job servers: two hosts that can run jobs at the same time."""
    started = [_Server(tmp_path_factory.mktemp(f"server{i}")) for i in range(2)]
    yield started
    for server in started:
        server.close()


def _run(server, seed, on_mismatch, pairs, barrier="-"):
    """Send ``server`` one job serving each (directory, out) pair in turn; ``barrier``: the seeds it waits for."""
    server.submit(kind="logits", seed=seed, on_mismatch=on_mismatch, barrier=barrier,
                  jobs=[(str(d), str(o)) for d, o in pairs])


def _outcome(server, directory, seed, on_mismatch, out):
    _run(server, seed, on_mismatch, [(directory, out)])
    server.wait()
    return _result(out)


def _result(out):
    result = dict(np.load(out))
    assert str(result["backend"]) == keras.backend.backend()  # the job inherits KERAS_BACKEND
    if "error" in result:
        return str(result["error"])
    np.testing.assert_array_equal(result["ids"], np.arange(512))
    # Its own teacher's logits, to float16 precision -- never the other's.
    np.testing.assert_allclose(result["got"], result["want"], rtol=2e-3, atol=2e-3)
    return "own"


@pytest.mark.parametrize("on_mismatch", ["error", "rebuild"])
def test_two_jobs_with_different_teachers_on_one_empty_directory(servers, tmp_path, on_mismatch):
    # Three trials, each on a fresh directory that both jobs (one per server process)
    # enter at the same moment (a barrier per trial), so one pair of processes runs all three races.
    seeds, trials = (1, 2), range(3)
    outs = {seed: [tmp_path / f"t{trial}-{seed}.npz" for trial in trials] for seed in seeds}
    for server, seed in zip(servers, seeds):
        _run(server, seed, on_mismatch, [(tmp_path / f"cache{trial}", outs[seed][trial]) for trial in trials],
             barrier="1,2")
    for server in servers:
        server.wait()
    outcomes = [[_result(outs[seed][trial]) for seed in seeds] for trial in trials]
    for pair in outcomes:
        assert "own" in pair  # one job at least gets its cache
        for outcome in pair:
            assert (
                outcome == "own"
                or outcome.startswith("CacheMismatchError: ")
                and "weights changed" in outcome
            )


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_rebuild_by_another_job_never_reaches_a_live_reader(servers, tmp_path, in_memory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = rng.integers(0, 4, size=512)
    keras.utils.set_random_seed(1)
    teacher = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)]
    )
    want = teacher.predict(x, verbose=0)
    directory = tmp_path / "cache"
    ds = tf.data.Dataset.from_tensor_slices((x, y)).apply(
        cache_teacher_logits(teacher, directory, batch_size=32, shard_size=64, in_memory=in_memory, verbose=0)
    )

    def epoch():
        ((_, t),) = list(ds.batch(512))
        return t.logits.numpy().astype("float32")

    np.testing.assert_allclose(epoch(), want, rtol=2e-3, atol=2e-3)
    # Another job (another teacher) rebuilds the directory while this reader is live.
    assert _outcome(servers[0], directory, 2, "rebuild", tmp_path / "other.npz") == "own"
    # Its own teacher's logits still: a streaming reader holds a shared flock
    # on its generation, and the other job's garbage collection keeps those files.
    np.testing.assert_allclose(epoch(), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(epoch(), want, rtol=2e-3, atol=2e-3)


def test_a_streaming_reader_keeps_its_files_only_while_it_lives(servers, tmp_path):
    import gc

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = rng.integers(0, 4, size=512)
    keras.utils.set_random_seed(1)
    teacher = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)]
    )
    directory = tmp_path / "cache"
    ds = tf.data.Dataset.from_tensor_slices((x, y)).apply(
        cache_teacher_logits(teacher, directory, batch_size=32, shard_size=64, in_memory=False, verbose=0)
    )
    old = {f["name"] for f in json.loads((directory / "manifest.json").read_text())["files"]}
    ds = ds.shuffle(512).batch(64)  # the user's pipeline on top keeps the hold
    assert _outcome(servers[0], directory, 2, "rebuild", tmp_path / "other.npz") == "own"
    assert old <= set(os.listdir(directory))  # held by this reader
    del ds
    gc.collect()
    # The next garbage collection (a third job's rebuild) removes them.
    # (Another process than the second job's.)
    assert _outcome(servers[1], directory, 3, "rebuild", tmp_path / "third.npz") == "own"
    assert not old & set(os.listdir(directory))


def test_workers_sharing_one_feature_cache_directory_each_get_the_teachers_rows(servers, tmp_path):
    """The feature cache has one build part: concurrent workers take turns (one builds, the others read)."""
    directory = tmp_path / "features"
    outs = [tmp_path / f"w{i}.npz" for i in range(len(servers))]
    for server, out in zip(servers, outs):  # both workers start before either is awaited
        server.submit(kind="features", directory=str(directory), out=str(out))
    for server, out in zip(servers, outs):
        server.wait()
        r = np.load(out)
        assert str(r["backend"]) == keras.backend.backend()  # the workers inherit KERAS_BACKEND
        np.testing.assert_array_equal(r["ids"], np.arange(300))
        np.testing.assert_allclose(r["logits"], r["want_logits"], rtol=1e-5, atol=1e-5)
        # Features stored as float16: relative error <= 2^-11.
        np.testing.assert_allclose(r["feature"].astype("float32"), r["want_feature"], rtol=2e-3, atol=2e-3)
    assert len([n for n in os.listdir(directory) if n.startswith("manifest")]) == 1
