"""Shared by the benchmark scripts: epoch timing and interleaved rounds."""

import statistics
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


def interleaved_epoch_medians(configs, rounds, epochs):
    """Runs each configuration's fit once per round, in turn, and returns the
    median epoch time of each (the first epoch of every fit, tracing, dropped).

    ``configs`` maps a name to ``make() -> (model, dataset, callbacks)``.
    """
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, make in configs.items():
            model, ds, callbacks = make()
            timer = EpochTimer()
            model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer, *callbacks])
            times[name].extend(timer.times[1:])
    return {name: statistics.median(t) for name, t in times.items()}


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
