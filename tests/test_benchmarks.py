"""The issue-15 benchmark script runs end to end (tiny sizes, no timing asserted)."""

import contextlib
import io
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench_workloads():
    sys.path.insert(0, BENCHMARKS)
    try:
        import bench_workloads

        yield bench_workloads
    finally:
        sys.path.remove(BENCHMARKS)


def test_quick_run_prints_every_ratio_with_goal_and_verdict(bench_workloads):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        bench_workloads.main(["--quick", "--rounds", "1", "--workloads", "small", "--max-rows", "200",
                              "--no-streaming"])
    text = out.getvalue()
    assert "# date:" in text and "# machine:" in text
    assert "ERROR" not in text, text  # every configuration ran
    quoted = [label for label, *_ in bench_workloads.RATIOS if not label.startswith(("EXTRA", "REFERENCE"))]
    for label in quoted:
        row = [line for line in text.splitlines() if line.strip().startswith(label) and "goal" in line]
        assert len(row) == 1, (label, text)
        assert "PASS" in row[0] or "FAIL" in row[0]
    assert "== summary" in text


def test_unknown_workload_is_refused(bench_workloads, capsys):
    with pytest.raises(SystemExit):
        bench_workloads.main(["--workloads", "tiny"])
    assert "unknown workload(s) ['tiny']" in capsys.readouterr().err
