"""The MNIST-1D demo's teacher and students (Keras 3), all outputting logits.

* teacher: three Conv1D layers (the CNN of Greydanus 2020), ~5.6k parameters;
* ``mlp``: Flatten -> Dense(64) -> Dense(10), ~3.3k parameters;
* ``cnn``: two Conv1D(16) -> Dense(10), ~2.5k parameters.

Each takes ``(length, 1)`` inputs, so a student on every second sample of the
signal is the same architecture built for ``length=20``.
"""

from __future__ import annotations

import keras

STUDENTS = ("mlp", "cnn")
STUDENT_NAMES = {"mlp": "MLP, Dense(64)", "cnn": "CNN, 2x Conv1D(16)"}


def teacher(length: int = 40, name: str = "teacher") -> keras.Model:
    inputs = keras.Input((length, 1))
    h = inputs
    for i in range(3):
        h = keras.layers.Conv1D(25, 5, strides=2, padding="same", activation="relu",
                                name=f"{name}_conv{i + 1}")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name=f"{name}_logits")(h), name=name)


def student(kind: str, length: int = 40) -> keras.Model:
    inputs = keras.Input((length, 1))
    if kind == "mlp":
        h = keras.layers.Flatten()(inputs)
        h = keras.layers.Dense(64, activation="relu", name="student_hidden")(h)
    elif kind == "cnn":
        h = keras.layers.Conv1D(16, 5, strides=2, padding="same", activation="relu",
                                name="student_conv1")(inputs)
        h = keras.layers.Conv1D(16, 3, strides=2, padding="same", activation="relu", name="student_conv2")(h)
        h = keras.layers.Flatten()(h)
    else:
        raise ValueError(f"Expected `kind` in {STUDENTS}. Received: kind={kind!r}")
    return keras.Model(inputs, keras.layers.Dense(10, name="student_logits")(h), name=f"student_{kind}")
