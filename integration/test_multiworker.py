"""MultiWorkerMirroredStrategy with two worker processes on this machine (loopback).
The one-worker reference runs the same job (`multiworker_job.main`) in the test
process while they train: one TensorFlow start-up fewer.

The two workers build one teacher-logit cache together (each writes its own
part), train a student with DistillationLoss from it, with hard-sample
reweighting, and reach the same loss curve as one worker; their reweighting
tables agree with each other and with the single worker's. Only the chief
writes the reweighting backup.

The models are tf_keras: in Keras 3.15, ``fit`` under
MultiWorkerMirroredStrategy with two workers fails for any model and dataset
("Attempt to convert a value (PerReplica...) to a Tensor"), with or without
keras_kd; tf_keras trains there.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from integration import multiworker_job

pytestmark = pytest.mark.integration
JOB = os.path.join(os.path.dirname(__file__), "multiworker_job.py")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def test_two_workers_match_one(tmp_path, monkeypatch):
    ports = _free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, JOB, str(tmp_path / f"worker{index}.json"), str(tmp_path / "cache2"), "2", str(index)],
            env=_env(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    monkeypatch.delenv("TF_CONFIG", raising=False)  # one worker, no strategy
    multiworker_job.main(str(tmp_path / "single.json"), str(tmp_path / "cache1"), 1, 0)
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]

    one = json.loads((tmp_path / "single.json").read_text())
    two = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    # The two-worker cache holds two parts that any reader uses as a whole.
    # (data files are named <prefix>-PART-FILE-GENERATION.bin)
    parts = {m.group(1) for m in map(re.compile(r"^[a-z]+-(\d{5})-\d{5}-[0-9a-f]{16}\.bin$").match,
                                      os.listdir(tmp_path / "cache2")) if m}
    assert parts == {"00000", "00001"}
    for result in two:
        # Same global batches, same gradients: the same loss curve (float32 sums in
        # another order across the collective: 1e-4 relative).
        np.testing.assert_allclose(result["loss"], one["loss"], rtol=1e-4)
        np.testing.assert_allclose(result["stats"], one["stats"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result["weights"], one["weights"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(two[0]["stats"], two[1]["stats"])
    # The reweighting backup: written after every epoch by the chief only, and
    # removed at the end of the successful fit.
    assert one["backup_saves"] == [0, 1, 2] and one["is_chief"]
    assert two[0]["backup_saves"] == [0, 1, 2] and two[0]["is_chief"]
    assert two[1]["backup_saves"] == [] and not two[1]["is_chief"]
    for name in ("cache1-reweighting", "cache2-reweighting"):
        assert not (tmp_path / name / "hard_sample_reweighting.npz").exists()
    assert min(min(r) for r in one["stats"]) >= 0.0  # every example seen
