"""The issue-15 benchmark script runs end to end (tiny sizes, no timing asserted)."""

import contextlib
import importlib
import io
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _import(name):
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture
def bench_workloads():
    yield from _import("bench_workloads")


@pytest.fixture
def bench_jax():
    yield from _import("bench_jax")


@pytest.fixture
def profile_reweighting():
    yield from _import("profile_reweighting")


def _assert_every_quoted_ratio_has_a_verdict(text, ratios):
    assert "# date:" in text and "# machine:" in text
    assert "ERROR" not in text, text  # every configuration ran
    quoted = [label for label, *_ in ratios if not label.startswith(("EXTRA", "REFERENCE"))]
    for label in quoted:
        row = [line for line in text.splitlines() if line.strip().startswith(label) and "goal" in line]
        assert len(row) == 1, (label, text)
        assert "PASS" in row[0] or "FAIL" in row[0]
    assert "== summary" in text


@pytest.mark.backend("tensorflow")  # bench_workloads.py measures the TensorFlow backend; bench_jax.py: below
def test_quick_run_prints_every_ratio_with_goal_and_verdict(bench_workloads):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        bench_workloads.main(["--quick", "--rounds", "1", "--workloads", "small", "--max-rows", "200",
                              "--no-streaming"])
    _assert_every_quoted_ratio_has_a_verdict(out.getvalue(), bench_workloads.RATIOS)


@pytest.mark.backend("tensorflow")
def test_reweighting_profile_prints_every_configuration(profile_reweighting):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        profile_reweighting.main(["--quick", "--workload", "small", "--max-rows", "200"])
    text = out.getvalue()
    for name in ("cache", "reweight", "hooks_only", "flush_only", "assign_only"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), text
    assert "own on_epoch_end: median" in text


@pytest.mark.backend("jax")  # bench_jax.py measures Keras 3 on JAX (it refuses a process on another backend)
def test_jax_quick_run_prints_every_ratio_with_goal_and_verdict(bench_jax):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        bench_jax.main(["--quick", "--workloads", "small", "--max-rows", "200"])
    text = out.getvalue()
    assert "# Keras backend: jax" in text
    _assert_every_quoted_ratio_has_a_verdict(text, bench_jax.RATIOS)


def test_unknown_workload_is_refused(bench_workloads, capsys):
    with pytest.raises(SystemExit):
        bench_workloads.main(["--workloads", "tiny"])
    assert "unknown workload(s) ['tiny']" in capsys.readouterr().err
