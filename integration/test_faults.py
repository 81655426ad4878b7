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
KILL_AT = (3, 8, 21)  # mid-epoch 1, end of epoch 1, mid-epoch 3


def _run(*runs):
    """One job process over (workdir, kill_at) pairs, run in order."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = [str(a) for run in runs for a in run]
    return subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, timeout=600, env=env)


def _value(out, key, workdir):
    return float(re.search(rf"^{key} {re.escape(str(workdir))} (\S+)$", out.stdout, re.M).group(1))


def _stamps(workdir):
    return {f: os.stat(workdir / "cache" / f).st_mtime_ns for f in sorted(os.listdir(workdir / "cache"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each kill point's run, killed in its own process; then one fresh process resumes all of them
    (each from its own folder, one after the other): a resume is a new process either way, and
    one TensorFlow start-up serves the three. The cache files' stamps are taken between the two."""
    killed, stamps = {}, {}
    for kill_at in KILL_AT:
        workdir = tmp_path_factory.mktemp(f"kill{kill_at}")
        killed[kill_at] = (workdir, _run((workdir, kill_at)))
        stamps[kill_at] = _stamps(workdir)
    resumed = _run(*[(workdir, -1) for workdir, _ in killed.values()])
    return killed, stamps, resumed


@pytest.mark.parametrize("kill_at", KILL_AT)
def test_sigkill_then_resume(runs, kill_at):
    killed, stamps, resumed = runs
    workdir, crashed = killed[kill_at]
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert stamps[kill_at]  # the cache was written before the crash
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _value(resumed, "STEPS", workdir) == STEPS
    # The cache written before the crash is read, not rewritten.
    assert _stamps(workdir) == stamps[kill_at]
