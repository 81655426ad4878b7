"""MNIST-1D for the demo, built with the `mnist1d` package's procedural generator.

Greydanus 2020, "Scaling down deep learning": 1-D signals of length 40, ten
classes, 4,000 training and 1,000 test examples with the generator's default
arguments. The package's `get_dataset` would download a pickle; this module
only calls `mnist1d.data.make_dataset`, so nothing is ever downloaded. Every
array is generated once and cached as ``.npz`` under the work folder.

* `load`: the training split (less a fixed validation split carved from it)
  and the generator's own test split, as float32 ``(N, 40, 1)`` inputs.
* `transfer_inputs`: extra unlabelled inputs from the same generator with
  another seed (never the test split), for transfer sets.
* `noisy_labels`: a reproducible copy of labels with a share replaced by a
  different random class.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np

VALIDATION = 400  # examples carved from the 4,000 training examples; every choice is made on them
TRANSFER_SEED = 1042  # the generator's seed for extra unlabelled inputs (the data set's own seed is 42)


@dataclasses.dataclass
class Split:
    x_train: np.ndarray  # (N, 40, 1) float32
    y_train: np.ndarray  # (N,) int32
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _generator():
    """`mnist1d.data`, the installed package (never this folder's mnist1d.py)."""
    module = importlib.import_module("mnist1d")
    if not hasattr(module, "__path__"):
        raise ImportError(
            f"`import mnist1d` found {module.__file__}, not the installed generator package: the examples "
            "folder is on sys.path. Run the demo as a module from the repository root "
            "(`python -m examples.demo` or `python -m examples.mnist1d`)."
        )
    return importlib.import_module("mnist1d.data")


def generate(path: str, **overrides) -> dict:
    """The generator's data set for ``get_dataset_args()`` with ``overrides``,
    cached in ``path`` (``.npz``). Deterministic: the generator seeds NumPy
    from ``args.seed``."""
    if os.path.exists(path):
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    generator = _generator()
    args = generator.get_dataset_args()
    for key, value in overrides.items():
        setattr(args, key, value)
    state = np.random.get_state()  # the generator seeds NumPy's global state; leave the caller's alone
    try:
        data = generator.make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return arrays


def _inputs(x) -> np.ndarray:
    return np.asarray(x, dtype="float32")[..., None]


def load(work: str, validation: int = VALIDATION) -> Split:
    """The default MNIST-1D split: 4,000 training examples, of which the last
    ``validation`` (the generator already shuffled them) form the validation
    split, and the 1,000 test examples."""
    data = generate(os.path.join(work, "mnist1d_default.npz"))
    x, y = _inputs(data["x"]), data["y"].astype("int32")
    cut = len(x) - validation
    return Split(x[:cut], y[:cut], x[cut:], y[cut:], _inputs(data["x_test"]), data["y_test"].astype("int32"))


def transfer_inputs(work: str, count: int) -> np.ndarray:
    """``count`` extra unlabelled inputs from the generator with seed
    `TRANSFER_SEED`: all the examples (its train and test parts) of a data set
    of ``count`` rounded up to a multiple of 10 signals, never the default
    data set's test split."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"Expected `count` to be a positive integer. Received: count={count!r}")
    size = -(-count // 10) * 10  # the generator makes num_samples // 10 signals per class
    path = os.path.join(work, f"mnist1d_transfer_seed{TRANSFER_SEED}_{size}.npz")
    data = generate(path, seed=TRANSFER_SEED, num_samples=size)
    return _inputs(np.concatenate([data["x"], data["x_test"]])[:count])


def noisy_labels(labels: np.ndarray, share: float, seed: int = 0, num_classes: int = 10) -> np.ndarray:
    """``labels`` with ``round(share * N)`` examples given a different class,
    uniformly among the other ``num_classes - 1`` classes."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flip = rng.choice(len(labels), size=int(round(share * len(labels))), replace=False)
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return noisy
