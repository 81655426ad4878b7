"""Fuzzed cache files: random byte flips and truncations are refused with an
error naming the file, never read as logits."""

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_kd

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = rng.integers(0, 3, size=300)
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    cache_dir = root / "cache"
    list(ds.apply(keras_kd.cache_teacher_logits(teacher, str(cache_dir), batch_size=64, shard_size=128, verbose=0)))
    files = sorted(f for f in os.listdir(cache_dir) if f.endswith(".bin"))
    assert len(files) >= 2
    return root, cache_dir, files, teacher, ds


def _copy(root, cache_dir, name):
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(cache_dir, target)
    return target


def _open(teacher, ds, directory):
    return list(ds.apply(keras_kd.cache_teacher_logits(teacher, str(directory), verbose=0)))


@FUZZ
@given(data=st.data())
def test_byte_flips_are_refused(built, data):
    root, cache_dir, files, teacher, ds = built
    work = _copy(root, cache_dir, "flip")
    name = data.draw(st.sampled_from(files))
    size = os.path.getsize(work / name)
    offset = data.draw(st.integers(0, size - 1))
    mask = data.draw(st.integers(1, 255))
    with open(work / name, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
    with pytest.raises(keras_kd.CacheCorruptedError, match=name):
        _open(teacher, ds, work)


@FUZZ
@given(data=st.data())
def test_truncations_are_refused(built, data):
    root, cache_dir, files, teacher, ds = built
    work = _copy(root, cache_dir, "trunc")
    name = data.draw(st.sampled_from(files + ["manifest.json"]))
    size = os.path.getsize(work / name)
    keep = data.draw(st.integers(0, size - 1))
    with open(work / name, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(keras_kd.CacheCorruptedError, match=name):
        _open(teacher, ds, work)
