"""`python -m keras_kd demo --quick`: every row, finite numbers, the plots."""

import math
import subprocess
import sys

import pytest

from keras_kd import demo


def test_demo_quick_table_and_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "keras_kd", "demo", "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "demo_table.txt").read_text()
    assert table.strip() in out.stdout
    rows = {}
    for line in table.splitlines()[2:]:
        name = line[:34].strip()
        rows[name] = [float(v) for v in line[34:].replace("+-", " ").split()]
    assert list(rows) == list(demo.ROWS)
    for name, numbers in rows.items():
        assert len(numbers) == 4 and all(math.isfinite(v) for v in numbers), (name, numbers)
        assert 0.0 < numbers[0] <= 100.0 and numbers[2] > 0 and numbers[3] > 0
    # The int8 TFLite student is smaller than the float student.
    assert rows[demo.QAT][3] < rows[demo.CACHE][3]
    for png in ("learning_curves.png", "agreement.png", "per_class_accuracy.png", "reweighting_histogram.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png


def test_demo_rows_option(tmp_path):
    results = demo.main(["--quick", "--rows", "scratch", "teacher", "--no-plots", "--output", str(tmp_path)])
    assert list(results) == [demo.TEACHER, demo.SCRATCH]


def test_demo_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    for bad in (["--label-fraction", "0"], ["--temperature", "0"], ["--alpha", "2"], ["--epochs", "0"],
                ["--rows", "nope"]):
        with pytest.raises(SystemExit):
            demo.main(bad)
        assert capsys.readouterr().err
