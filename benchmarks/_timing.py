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
