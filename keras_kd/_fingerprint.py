"""Digests that fingerprint a teacher and a dataset (shared by the logit cache
and the alignment feature cache)."""

import hashlib

import numpy as np
import tensorflow as tf


def weights_digest(model) -> str:
    """A digest of all a model's weights (dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w.numpy() if hasattr(w, "numpy") else w))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_element(h, element):
    """Feeds every tensor of a dataset element into the hash ``h``."""
    for t in tf.nest.flatten(element, expand_composites=True):
        h.update(tf.io.serialize_tensor(t).numpy())


def sample_digest(dataset: tf.data.Dataset, n: int) -> str:
    """A digest of the first ``n`` elements of a dataset (all their tensors)."""
    h = hashlib.blake2b(digest_size=16)
    for element in dataset.take(n):
        hash_element(h, element)
    return h.hexdigest()
