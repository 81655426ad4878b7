"""What a cache is a cache of: digests of teachers and datasets, and the
detection of datasets that change from one pass to the next.

Shared by the teacher-logit cache and the alignment feature cache.
"""

import hashlib
import json

import keras
import numpy as np
import tensorflow as tf

from keras_kd import _checks

_DIGEST_BATCH = 256  # fixed, so the digest does not depend on the caller's batch size


def weights_digest(model) -> str:
    """A digest of all a model's weights (dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w.numpy() if hasattr(w, "numpy") else w))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _canonical_names(config):
    """The config with layer names replaced by their order of appearance, without `trainable` flags.

    Auto-generated names (``dense_7``) depend on how many models the process
    made before; what the model computes does not.
    """
    names = {}

    def collect(obj):
        if isinstance(obj, dict):
            name = obj.get("name")
            if isinstance(name, str):
                names.setdefault(name, f"name_{len(names)}")
            for v in obj.values():
                collect(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                collect(v)

    def rename(obj):
        if isinstance(obj, dict):
            # `trainable` does not change what a teacher computes in inference
            # mode (the cache always calls it with training=False): freezing
            # the teacher after caching must not invalidate the cache.
            return {k: rename(v) for k, v in obj.items() if not (k == "trainable" and isinstance(v, bool))}
        if isinstance(obj, (list, tuple)):
            return [rename(v) for v in obj]
        if isinstance(obj, str):
            return names.get(obj, obj)
        return obj

    collect(config)
    return rename(config)


def _describe_layers(model) -> list:
    """For models without a config: class and config of every layer, in order."""
    out = []
    for layer in getattr(model, "layers", []) or []:
        try:
            config = layer.get_config()
        except Exception:  # noqa: BLE001 - a layer without a config: its class is what we know
            config = None
        out.append([type(layer).__module__ + "." + type(layer).__qualname__, config, _describe_layers(layer)])
    return out


def architecture_digest(model) -> str:
    """A digest of what a model computes apart from its weights: its config
    (layers, activations, connections), with layer names canonicalised."""
    try:
        config = model.get_config()
    except Exception:  # noqa: BLE001 - subclassed models may not implement get_config
        config = None
    description = {
        "class": type(model).__module__ + "." + type(model).__qualname__,
        "config": _canonical_names(config) if config is not None else None,
        "layers": _canonical_names(_describe_layers(model)),
    }
    text = json.dumps(description, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


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


def changes_between_passes(dataset: tf.data.Dataset, n: int) -> bool:
    """Whether two passes over the first ``n`` elements yield different tensors."""
    return sample_digest(dataset, n) != sample_digest(dataset, n)


def inputs_digest(dataset: tf.data.Dataset):
    """``(digest, count)``: a digest of every element's inputs ``x``, in order.

    One pass over the dataset, in batches of 256 when the inputs have fixed
    shapes (then only raw bytes are hashed), else element by element.
    Any change to any element's ``x``, or to their order, changes it.
    """
    h = hashlib.blake2b(digest_size=16)
    x_spec = dataset.element_spec[0]
    count = 0
    # No `map` (tracing a function costs more than hashing a small dataset).
    if _checks.fixed_shapes(dataset.element_spec):
        numeric = all(s.dtype.is_numpy_compatible and s.dtype != tf.string for s in tf.nest.flatten(x_spec))
        for batch in dataset.batch(_DIGEST_BATCH).prefetch(2):
            flat = tf.nest.flatten(batch[0])
            for t in flat:
                h.update(
                    np.ascontiguousarray(t.numpy()).tobytes()
                    if numeric
                    else tf.io.serialize_tensor(t).numpy()
                )
            count += int(flat[0].shape[0])
    else:
        for element in dataset.prefetch(2):
            hash_element(h, element[0])
            count += 1
    return h.hexdigest(), count


def describe_spec(spec) -> list:
    """One line per component: path, type, shape and dtype (JSON-able)."""
    out = []
    for path, s in keras.tree.flatten_with_path(spec):
        shape = getattr(s, "shape", None)
        if shape is not None:
            shape = shape.as_list() if shape.rank is not None else "?"
        dtype = getattr(getattr(s, "dtype", None), "name", None)
        where = "/".join(str(p) for p in path) or "."
        out.append(f"{where}: {type(s).__name__} shape={shape} dtype={dtype}")
    return out



# Ops that make a tf.data pipeline yield different elements on each pass.
_RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformInt",
        "RandomStandardNormal",
        "TruncatedNormal",
        "ParameterizedTruncatedNormal",
        "RandomShuffle",
        "RandomCrop",
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
        "StatefulUniform",
        "StatefulUniformInt",
        "StatefulUniformFullInt",
        "StatefulStandardNormal",
        "StatefulStandardNormalV2",
        "StatefulTruncatedNormal",
        "StatefulRandomBinomial",
        "RngReadAndSkip",
        "RngSkip",
        "SampleDistortedBoundingBox",
        "SampleDistortedBoundingBoxV2",
        "RandomDataset",
        "RandomDatasetV2",
        "ExperimentalRandomDataset",
        "ShuffleDatasetV2",
        "ShuffleAndRepeatDatasetV2",
        # A map function that assigns a variable (e.g. a Keras random layer's
        # seed generator) changes its output from one pass to the next.
        "AssignVariableOp",
        "AssignAddVariableOp",
        "AssignSubVariableOp",
    }
)



def random_ops(dataset) -> list:
    """What makes the dataset differ from pass to pass: random ops, reshuffles.

    Walks the dataset's inputs and the graphs of their functions in Python
    (serializing the dataset would copy all in-memory data).
    """
    found, seen, stack = set(), set(), [dataset]
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        name = type(ds).__name__
        if "Random" in name:
            found.add("Dataset.random")
        if "Shuffle" in name and getattr(ds, "_reshuffle_each_iteration", False) is True:
            found.add("shuffle(reshuffle_each_iteration=True)")
        if str(getattr(ds, "_deterministic", "")).lower() == "false":
            found.add(f"{name.strip('_')}(deterministic=False)")
        for value in vars(ds).values():
            graph = getattr(getattr(value, "function", None), "graph", None)
            if graph is not None and hasattr(graph, "as_graph_def"):
                found.update(graph_random_ops(graph))
        try:
            stack.extend(ds._inputs())  # noqa: SLF001
        except Exception:  # pragma: no cover - datasets without inputs
            pass
    try:
        if dataset.options().deterministic is False:
            found.add("options.deterministic=False")
    except Exception:  # pragma: no cover
        pass
    return sorted(found)


def graph_random_ops(graph) -> set:
    try:
        graph_def = graph.as_graph_def()
    except Exception:  # pragma: no cover
        return set()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    found = {node.op for node in nodes if node.op in _RANDOM_OPS}
    for node in nodes:
        if node.op.startswith("ShuffleDataset") and node.attr["reshuffle_each_iteration"].b:
            found.add("shuffle(reshuffle_each_iteration=True)")
    return found
