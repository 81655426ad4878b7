"""Every README snippet marked `<!-- snippet: NAME -->` runs as written."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = dict(re.findall(r"<!-- snippet: (\S+) -->\s*```python\n(.*?)```", README.read_text(), re.S))


def test_readme_has_snippets():
    assert {"quickstart", "metrics", "cache", "alignment", "optimize", "reweighting", "scheduler", "tuning"} <= set(SNIPPETS)


# Snippets that are TensorFlow code by nature, run in the TF job only. "hooks": its observer updates a
# tf.Variable with TF ops inside the step; JAX hooks compute with jax.numpy and keep state as step state
# (losses/hooks.py, contract 4; JAX observers: tests/test_jax_losses.py).
TENSORFLOW_ONLY = {"hooks"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.backend("tensorflow")) if name in TENSORFLOW_ONLY else name
    for name in sorted(SNIPPETS)
])
def test_readme_snippet_runs(name, tmp_path):
    # The subprocess inherits KERAS_BACKEND: in the JAX job every other snippet runs on JAX.
    script = tmp_path / f"{name}.py"
    script.write_text(SNIPPETS[name])
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README snippet {name!r} failed:\n{out.stderr[-3000:]}"
