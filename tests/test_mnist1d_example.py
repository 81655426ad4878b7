"""The MNIST-1D example (examples/mnist1d.py): a data generator that is
deterministic and never downloads, row selection, and both students in two
processes. Every row in quick mode, with the plots, is checked by
tests/test_demo.py's quick demo (one run for both)."""

import math
import socket
import urllib.request

import numpy as np
import pytest

from examples import mnist1d
from examples import mnist1d_data


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    requests = pytest.importorskip("requests")  # mnist1d's own loader downloads with requests
    monkeypatch.setattr(requests, "get", refuse)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mnist1d_work"))


def test_generator_is_deterministic_cached_and_offline(tmp_path, no_network):
    state = np.random.get_state()
    first = mnist1d_data.generate(str(tmp_path / "a.npz"), num_samples=300)
    assert (tmp_path / "a.npz").exists()
    again = mnist1d_data.generate(str(tmp_path / "b.npz"), num_samples=300)  # generated afresh
    reloaded = mnist1d_data.generate(str(tmp_path / "a.npz"), num_samples=300)  # read back from the npz
    # The generator seeds NumPy's global state; the caller's state is left alone.
    assert np.array_equal(np.random.get_state()[1], state[1])
    for other in (again, reloaded):
        assert sorted(other) == ["x", "x_test", "y", "y_test"]
        for key in other:
            assert np.array_equal(first[key], other[key]), key
    assert first["x"].shape == (240, 40) and first["x_test"].shape == (60, 40)  # the generator's 80/20 split
    other_seed = mnist1d_data.generate(str(tmp_path / "c.npz"), num_samples=300, seed=7)
    assert not np.allclose(first["x"], other_seed["x"])


def test_default_split(work, no_network):
    split = mnist1d_data.load(work)
    # The generator's defaults: 4,000 train (3,600 + 400 validation) / 1,000 test, length 40, 10 classes.
    assert split.x_train.shape == (3600, 40, 1) and split.x_val.shape == (400, 40, 1)
    assert split.x_test.shape == (1000, 40, 1) and split.x_train.dtype == np.float32
    assert sorted(np.unique(split.y_train)) == list(range(10))
    assert np.bincount(split.y_val, minlength=10).min() >= 25  # every class in the validation split


def test_transfer_inputs_are_new_signals_not_the_test_split(work, no_network):
    split = mnist1d_data.load(work)
    extra = mnist1d_data.transfer_inputs(work, 300)
    assert extra.shape == (300, 40, 1)
    assert np.array_equal(extra, mnist1d_data.transfer_inputs(work, 300))
    known = np.concatenate([split.x_train, split.x_val, split.x_test]).reshape(-1, 40)
    # No transfer input equals (or nearly equals) any training, validation or test signal.
    distances = ((extra.reshape(-1, 1, 40) - known[None]) ** 2).sum(-1).min(1)
    assert distances.min() > 1e-3
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="Expected `count` to be a positive integer"):
            mnist1d_data.transfer_inputs(work, bad)


def test_noisy_labels_flip_exactly_the_share_to_other_classes():
    labels = np.repeat(np.arange(10), 50)
    noisy = mnist1d_data.noisy_labels(labels, 0.2, seed=3)
    changed = noisy != labels
    assert changed.sum() == 100  # 20% of 500, every flipped label is another class
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert np.array_equal(noisy, mnist1d_data.noisy_labels(labels, 0.2, seed=3))


def test_unknown_row_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown rows"):
        mnist1d.run(quick=True, output=str(tmp_path), plots=False, rows=["scratch", "nope"])


def test_quick_mode_both_students_side_by_side(tmp_path, no_network):
    # jobs=2: the teachers are trained here, then the CNN column runs in a spawned process.
    rows = ["scratch", "keras_kd KD (cache)"]
    results = mnist1d.run(quick=True, output=str(tmp_path), plots=False, rows=rows, students=["mlp", "cnn"],
                          jobs=2)
    assert list(results) == [f"{kind} | {name}" for kind in ("mlp", "cnn") for name in rows]
    assert all(math.isfinite(r["mean"]) for r in results.values())
    assert all(len(r["accuracies"]) == 1 and 0.0 <= r["accuracies"][0] <= 1.0 for r in results.values())
