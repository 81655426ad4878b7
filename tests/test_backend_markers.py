"""The `backend(name)` marker of tests/conftest.py: tests for the other Keras 3
backend are deselected (never skipped); unmarked tests run on both; on JAX the
`K` fixture's tf_keras cases are deselected."""

import contextlib
import io
import os
import sys
import textwrap

import keras
import pytest

from tests import conftest

OTHER = {"tensorflow": "jax", "jax": "tensorflow"}


def run_pytest(tmp_path, body, args=()):
    """Runs pytest on `body` with tests/conftest.py's hooks and returns its terminal output.

    In this process (pytest.main, as pytester's in-process runs do): a fresh interpreter would import
    TensorFlow, Keras and JAX again (~10 CPU-s) for hooks that only read the already-chosen Keras backend.
    The modules it imports from tmp_path (its conftest, test_marked) are dropped again afterwards."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import K, pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa\n")
    (tmp_path / "test_marked.py").write_text(textwrap.dedent(body))
    modules, path, cwd = set(sys.modules), list(sys.path), os.getcwd()
    output = io.StringIO()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(output):
            code = pytest.main([str(tmp_path), "--rootdir", str(tmp_path), "-p", "no:xdist",
                                "-p", "no:cacheprovider", "--capture=sys", "-q", "-rA", *args])
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]
    return int(code), output.getvalue()


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
    returncode, stdout = res
    assert returncode == 0, stdout
    # On JAX the tf_keras case of `K` is deselected too (the TensorFlow job runs it).
    expected = "3 passed, 2 deselected" if here == "jax" else "4 passed, 1 deselected"
    assert expected in stdout, stdout
    assert "PASSED test_marked.py::test_flavours[keras]" in stdout
    assert "PASSED test_marked.py::test_this_backend" in stdout
    assert "PASSED test_marked.py::test_unmarked" in stdout
    assert "test_other_backend" not in stdout and "skipped" not in stdout


def test_unknown_backend_name_is_a_usage_error():
    class Item:  # what the hook reads of a collected test
        nodeid = "test_x.py::test_x"

        def iter_markers(self, name):
            return [pytest.mark.backend("torch").mark]

    with pytest.raises(pytest.UsageError, match=r"backend takes one of \('tensorflow', 'jax'\), got \('torch',\)"):
        conftest._marked_backends(Item())


@pytest.mark.parametrize("split", [False, True])
def test_tf_keras_split_runs_each_case_in_one_job(tmp_path, monkeypatch, split):
    """With --tf-keras-split (`make test`), the tf_keras cases of TF_KERAS_IN_JAX_JOB's
    files run in the JAX job and not in the TensorFlow job; without it, in the
    TensorFlow job only. The Keras 3 case runs in both. A case marked
    ``backend("tensorflow")`` stays in the TensorFlow job (moved, it would run nowhere)."""
    monkeypatch.setattr(conftest, "TF_KERAS_IN_JAX_JOB", frozenset({"test_marked.py"}))
    here = keras.backend.backend()
    returncode, stdout = run_pytest(tmp_path, """
        import pytest

        def test_flavours(K):
            pass

        @pytest.mark.backend("tensorflow")
        def test_marked(K):
            pass
    """, args=["--tf-keras-split"] if split else [])
    assert returncode == 0, stdout
    runs_tf_keras = (here == "jax") == split
    assert ("PASSED test_marked.py::test_flavours[tf_keras]" in stdout) == runs_tf_keras, stdout
    assert "PASSED test_marked.py::test_flavours[keras]" in stdout
    marked = here == "tensorflow"
    assert ("PASSED test_marked.py::test_marked[tf_keras]" in stdout) == marked, stdout
    assert ("PASSED test_marked.py::test_marked[keras]" in stdout) == marked, stdout
    passed = 1 + runs_tf_keras + 2 * marked
    assert (f"{passed} passed, {4 - passed} deselected" if passed < 4 else "4 passed in") in stdout, stdout
