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


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_readme_snippet_runs(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(SNIPPETS[name])
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README snippet {name!r} failed:\n{out.stderr[-3000:]}"
