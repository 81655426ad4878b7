"""Shared by the benchmark scripts: epoch timing, interleaved rounds, arguments
and the machine description printed with every result."""

import datetime
import os
import platform
import statistics
import subprocess
import time

import keras


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch of one `fit`."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


class EpochClock:
    """Wall time of every epoch including the other callbacks' epoch hooks.

    Pass ``[clock.start, *callbacks, clock.end]``: ``start`` runs first at the
    beginning of an epoch and ``end`` last at its end, so work a callback does
    in ``on_epoch_begin``/``on_epoch_end`` (e.g. updating a weight table) is
    part of the measured epoch.
    """

    def __init__(self):
        self.times = []
        clock = self

        class _Start(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock._t = time.perf_counter()

        class _End(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                clock.times.append(time.perf_counter() - clock._t)

        self.start, self.end = _Start(), _End()


def interleaved_epoch_medians(configs, rounds, epochs):
    """Runs each configuration's fit once per round, in rotating order (so no
    configuration always follows the same one), and returns the median epoch
    time of each (the first epoch of every fit, tracing, dropped). The clock
    spans every callback's epoch hooks (`EpochClock`).

    ``configs`` maps a name to ``make() -> (model, dataset, callbacks)``.
    """
    times = {name: [] for name in configs}
    for r in range(rounds):
        for name in rotated(list(configs), r):
            model, ds, callbacks = configs[name]()
            clock = EpochClock()
            model.fit(ds, epochs=epochs, verbose=0, callbacks=[clock.start, *callbacks, clock.end])
            times[name].extend(clock.times[1:])
    return {name: statistics.median(t) for name, t in times.items()}


def rotated(names, shift):
    """``names`` rotated left by ``shift``: round ``r`` runs them in this order."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def common_parser(description, rounds=3):
    """Arguments every benchmark takes: ``--rounds`` and ``--quick``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds of interleaved epochs (default {rounds}; fewer with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: fewer rounds, noisier figures")
    parser.set_defaults(default_rounds=rounds)
    return parser


def synthetic_parser(description, epochs):
    """Arguments shared by the synthetic-data benchmarks."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs per fit (first one dropped)")
    return parser


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state(directory):
    try:
        head = subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        changed = len([line for line in dirty.stdout.splitlines() if line.strip()])
        return f"commit {head.stdout.strip()}" + (f" + {changed} uncommitted file(s)" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "git unavailable"


def machine_info(package_dir):
    """Lines describing the run: date, machine, load, versions, code state."""
    import tensorflow as tf

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    gpus = tf.config.list_physical_devices("GPU")
    return [
        f"date: {now}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"GPU: {', '.join(g.name for g in gpus) if gpus else 'none'}, load average {load}",
        f"versions: Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}",
        f"code: {package_dir} ({_git_state(package_dir)})",
    ]
