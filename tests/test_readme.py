"""Every README snippet marked `<!-- snippet: NAME -->` runs as written.

All the snippets of a run execute in ONE fresh Python process (importing TensorFlow, Keras and JAX
costs ~10 CPU-s a process, more than most snippets): each as its own `__main__` script file, in its
own empty working directory, after Keras's global state is reset (session, mixed-precision policy,
seeds). The process records each snippet's outcome separately; each snippet is still its own test,
and a failure names the snippet, its README line and its traceback.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_MATCHES = list(re.finditer(r"<!-- snippet: (\S+) -->\s*```python\n(.*?)```", README.read_text(), re.S))
SNIPPETS = {m.group(1): m.group(2) for m in _MATCHES}
# The README line of each snippet's first code line (what a failure points to).
LINES = {m.group(1): README.read_text()[: m.start(2)].count("\n") + 1 for m in _MATCHES}


def test_readme_has_snippets():
    assert {"quickstart", "metrics", "cache", "alignment", "optimize", "reweighting", "scheduler", "tuning"} <= set(SNIPPETS)


# Snippets that are TensorFlow code by nature, run in the TF job only. "hooks": its observer updates a
# tf.Variable with TF ops inside the step; JAX hooks compute with jax.numpy and keep state as step state
# (losses/hooks.py, contract 4; JAX observers: tests/test_jax_losses.py).
TENSORFLOW_ONLY = {"hooks"}

# Runs in the fresh process: argv[1] is a JSON list of [name, script, directory]. Before each snippet
# the state a fresh process would have is restored (a new session, float32 policies, fixed seeds, its own
# cwd and argv); after each one the outcome is written to argv[2], so a crash still reports the others.
_RUNNER = r"""
import contextlib, gc, io, json, os, resource, runpy, sys, time, traceback

import keras

jobs, results_path = json.loads(sys.argv[1]), sys.argv[2]


def reset_global_state():
    keras.backend.clear_session(free_memory=False)  # one collection below, not one per flavour
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    if "tf_keras" in sys.modules:  # loaded by an earlier snippet (optimize)
        tf_keras = sys.modules["tf_keras"]
        tf_keras.backend.clear_session()
        tf_keras.mixed_precision.set_global_policy("float32")
    gc.collect()
    # What survives this collection (modules, their caches; Keras's state is cleared above) is moved out
    # of the collector's reach: the next collections, here and inside the snippets, only scan what a
    # snippet allocated (a full collection over TensorFlow's ~500k objects costs ~0.3 s).
    gc.freeze()


results = {}
for name, script, directory in jobs:
    reset_global_state()
    os.chdir(directory)
    sys.argv = [script]
    output = io.StringIO()
    start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(script, run_name="__main__")
        results[name] = {"ok": True}
    except BaseException:  # SystemExit too: a snippet that exits is a failure
        results[name] = {"ok": False, "error": traceback.format_exc()[-3000:], "output": output.getvalue()[-2000:]}
    end = resource.getrusage(resource.RUSAGE_SELF)
    results[name]["cpu_s"] = round(end.ru_utime + end.ru_stime - start[0].ru_utime - start[0].ru_stime, 2)
    results[name]["wall_s"] = round(time.perf_counter() - start[1], 2)
    with open(results_path, "w") as f:
        json.dump(results, f)
"""


def _selected_snippets(request):
    """The snippets this session runs (deselected ones, e.g. TENSORFLOW_ONLY on JAX, or `-k`, are left out)."""
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and getattr(item, "originalname", None) == "test_readme_snippet_runs"
    ]
    return names or sorted(SNIPPETS)


@pytest.fixture(scope="module")
def snippet_results(request, tmp_path_factory):
    """Runs the selected snippets in one fresh process; returns (outcomes by name, the process's stderr)."""
    root = tmp_path_factory.mktemp("readme")
    jobs = []
    for name in _selected_snippets(request):
        directory = root / name
        directory.mkdir()
        script = directory / f"{name}.py"
        script.write_text(SNIPPETS[name])
        jobs.append([name, str(script), str(directory)])
    results_path = root / "results.json"
    # The process inherits KERAS_BACKEND: in the JAX job every other snippet runs on JAX.
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(jobs), str(results_path)], cwd=root,
                          capture_output=True, text=True, timeout=600 + 120 * len(jobs))
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return results, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.backend("tensorflow")) if name in TENSORFLOW_ONLY else name
    for name in sorted(SNIPPETS)
])
def test_readme_snippet_runs(name, snippet_results):
    results, process_log = snippet_results
    where = f"README snippet {name!r} (its line 1 is README.md line {LINES[name]})"
    assert name in results, f"{where} did not finish: the snippet process ended with {process_log}"
    got = results[name]
    assert got["ok"], f"{where} failed:\n{got['error']}\n-- its output --\n{got['output']}"
