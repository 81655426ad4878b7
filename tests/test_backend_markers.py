"""The `backend(name)` marker of tests/conftest.py: tests for the other Keras 3
backend are deselected (never skipped); unmarked tests run on both; on JAX the
`K` fixture's tf_keras cases are deselected."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER = {"tensorflow": "jax", "jax": "tensorflow"}


def run_pytest(tmp_path, body):
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import K, pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa\n")
    (tmp_path / "test_marked.py").write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND=keras.backend.backend())
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path), "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rA"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_other_backend_is_deselected_not_skipped(tmp_path):
    here = keras.backend.backend()
    res = run_pytest(tmp_path, f"""
        import keras
        import pytest

        @pytest.mark.backend("{here}")
        def test_this_backend():
            assert keras.backend.backend() == "{here}"

        @pytest.mark.backend("{OTHER[here]}")
        def test_other_backend():
            raise AssertionError("must not run")

        def test_unmarked():
            pass

        def test_flavours(K):
            pass
    """)
    assert res.returncode == 0, res.stdout + res.stderr
    # On JAX the tf_keras case of `K` is deselected too (the TensorFlow job runs it).
    expected = "3 passed, 2 deselected" if here == "jax" else "4 passed, 1 deselected"
    assert expected in res.stdout, res.stdout
    assert "PASSED test_marked.py::test_flavours[keras]" in res.stdout
    assert "PASSED test_marked.py::test_this_backend" in res.stdout
    assert "PASSED test_marked.py::test_unmarked" in res.stdout
    assert "test_other_backend" not in res.stdout and "skipped" not in res.stdout


def test_unknown_backend_name_is_a_usage_error():
    class Item:  # what the hook reads of a collected test
        nodeid = "test_x.py::test_x"

        def iter_markers(self, name):
            return [pytest.mark.backend("torch").mark]

    with pytest.raises(pytest.UsageError, match=r"backend takes one of \('tensorflow', 'jax'\), got \('torch',\)"):
        conftest._marked_backends(Item())
