"""`python -m keras_kd demo --quick`: every row, finite numbers."""

import math
import subprocess
import sys

import pytest

from keras_kd import demo


def test_demo_quick_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "keras_kd", "demo", "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "demo_table.txt").read_text()
    assert table.strip() in out.stdout
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == set(demo.ROWS)
    for name, line in rows.items():
        numbers = [float(v) for v in line[len(name):].replace("+-", " ").split()]
        assert len(numbers) == 4 and all(math.isfinite(v) for v in numbers), line
        assert 0.0 < numbers[0] <= 100.0


def test_demo_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo.main(["--label-fraction", "0"])
    assert "--label-fraction" in capsys.readouterr().err
