"""The demo (examples/demo.py, `make demo`): every row, finite numbers, the plots;
and `python -m keras_kd demo`, which points to it."""

import json
import math
import os
import runpy
import subprocess
import sys

import pytest

from examples import demo
from examples import digits
from examples import mnist1d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


# The demo is a TensorFlow-backend workflow (`make demo`; its README tables are TensorFlow runs); on JAX,
# test_demo_rows_option and tests/test_mnist1d_example.py run its code in the JAX process.
@pytest.mark.backend("tensorflow")
def test_demo_quick_table_and_plots(tmp_path):
    # As `make demo-quick` runs it: a script, from the repository root.
    out = subprocess.run(
        [sys.executable, os.path.join("examples", "demo.py"), "--quick", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "demo_table.txt").read_text()
    assert table.strip() in out.stdout
    rows = {}
    for line in table.splitlines()[2:]:
        name = line[:34].strip()
        rows[name] = [float(v) for v in line[34:].replace("+-", " ").split()]
    assert list(rows) == list(digits.ROWS)
    for name, numbers in rows.items():
        assert len(numbers) == 4 and all(math.isfinite(v) for v in numbers), (name, numbers)
        assert 0.0 < numbers[0] <= 100.0 and numbers[2] > 0 and numbers[3] > 0
    # The int8 TFLite student is smaller than the float student.
    assert rows[digits.QAT][3] < rows[digits.CACHE][3]
    for png in ("learning_curves.png", "agreement.png", "per_class_accuracy.png", "reweighting_histogram.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    # The MNIST-1D part (next to the digits part, in another process) wrote its own table: every row of
    # the quick mode, finite numbers, the tuned row's choice, the plots.
    mnist1d_table = (tmp_path / "mnist1d_table.txt").read_text()
    assert mnist1d_table.strip() in out.stdout
    results = json.loads((tmp_path / "mnist1d_results.json").read_text())
    assert list(results) == [f"{kind} | {name}" for kind in mnist1d.QUICK_STUDENTS for name in mnist1d.ROW_NAMES]
    for key, row in results.items():
        assert row["accuracies"] and all(0.0 <= a <= 1.0 for a in row["accuracies"]), key
        assert math.isfinite(row["mean"]) and math.isfinite(row["std"]), key
        assert row["epochs"] >= 1, key
    assert "alpha=" in results["cnn | keras_kd tuned (grid on validation)"]["note"]
    for name in mnist1d.ROW_NAMES:
        assert name in mnist1d_table
    for kind in mnist1d.QUICK_STUDENTS:
        for png in (f"mnist1d_curves_{kind}.png", f"mnist1d_methods_{kind}.png"):
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png


def test_demo_rows_option(tmp_path):
    results = demo.main(["--quick", "--datasets", "digits", "--rows", "scratch", "teacher", "--no-plots",
                         "--output", str(tmp_path)])
    assert list(results) == ["digits"]
    assert list(results["digits"]) == [digits.TEACHER, digits.SCRATCH]


def test_demo_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--quick", "--output", "--rows", "--no-plots", "--datasets", "--jobs"):
        assert option in help_text
    for bad in (["--label-fraction", "0"], ["--temperature", "0"], ["--alpha", "2"], ["--epochs", "0"],
                ["--rows", "nope"], ["--datasets", "cifar"], ["--jobs", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
        assert capsys.readouterr().err


def _python_m_keras_kd(capsys, *args):
    """`python -m keras_kd ARGS` as `python -m` runs it (runpy: the package's `__main__` module as
    `__main__`, argv set), in this process: a fresh interpreter would only import TensorFlow again
    (~7 CPU-s). Returns (exit status, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["keras_kd", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("keras_kd", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_module_command_points_to_the_example(capsys):
    # `python -m keras_kd demo` as a user types it: exit status 2 and where the demo went.
    status, _, err = _python_m_keras_kd(capsys, "demo")
    assert status == 2
    assert "examples/demo.py" in err and "keras-kd[demo]" in err
    status, out, _ = _python_m_keras_kd(capsys, "--help")
    assert status == 0 and "make demo" in out


def test_the_demo_uses_public_names_only():
    """No `keras_kd._private` module or `._name` attribute of keras_kd in the examples."""
    import ast

    folder = os.path.join(ROOT, "examples")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_kd"):
                assert not any(p.startswith("_") for p in node.module.split(".")), (name, node.module)
                assert not any(a.name.startswith("_") for a in node.names), (name, node.lineno)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("keras_kd"):
                        assert not any(p.startswith("_") for p in alias.name.split(".")), (name, alias.name)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                assert not (isinstance(base, ast.Name) and base.id in ("keras_kd", "optimize", "tuning")), (
                    name, node.lineno, node.attr)
