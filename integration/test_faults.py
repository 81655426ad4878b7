"""Crash recovery: a training process killed with SIGKILL at several points
resumes with BackupAndRestore and ends with the same number of steps as an
uninterrupted run; the teacher-logit cache written before the crash is reused,
not rebuilt, and the reweighting table resumes from its backup."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
JOB = os.path.join(os.path.dirname(__file__), "faults_job.py")
STEPS = 4 * (256 // 32)  # epochs x steps per epoch of an uninterrupted run


def _run(workdir, kill_at):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, JOB, str(workdir), str(kill_at)], capture_output=True, text=True,
                          timeout=600, env=env)


def _value(out, key):
    return float(re.search(rf"^{key} (\S+)$", out.stdout, re.M).group(1))


@pytest.mark.parametrize("kill_at", [3, 8, 21])  # mid-epoch 1, end of epoch 1, mid-epoch 3
def test_sigkill_then_resume(tmp_path, kill_at):
    killed = _run(tmp_path, kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    stamps = {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in cache_files}
    resumed = _run(tmp_path, -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _value(resumed, "STEPS") == STEPS
    # The cache written before the crash is read, not rewritten.
    assert {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in cache_files} == stamps
