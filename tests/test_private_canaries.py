"""Canaries for the private parts of TensorFlow, Keras, tf_keras, tfmot and keras-tuner that keras_kd reads.

keras_kd relies on a few attributes, modules and methods its dependencies do
not promise to keep. Each canary below checks that one of them still exists
with the shape keras_kd relies on, and fails with the attribute's name, the
dependency and its installed version, so that an upgrade breaks here, loudly,
instead of silently in the library (most reads are guarded with a default
that turns a rename into a wrong answer: no reshuffle detected, no mask, ...).

Three more tests keep this list honest:
* the installed versions are inside the bounds of setup.cfg;
* a scan of keras_kd/ for private reads (``x._name``, ``getattr(x, "_name")``,
  imports of ``keras_tuner.src``, ``tensorflow.python``, ...) fails on any read
  that has no canary here and is not in the allow-list of keras_kd's own names;
* a scan for ``self._name`` that collides with a private name of a Keras,
  tf_keras or keras-tuner base class (an override or a write into its state).

To add a private read: add a canary to ``CANARIES`` (keyed by the name as the
scan reports it), and say where the library reads it.
"""

import ast
import configparser
import importlib
import importlib.metadata
import inspect
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "keras_kd"

TF, KERAS, TF_KERAS, TFMOT, TUNER = (
    "tensorflow",
    "keras",
    "tf-keras",
    "tensorflow-model-optimization",
    "keras-tuner",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require(condition, dist: str, attribute: str, relied_on: str):
    """Fails, naming the attribute, the dependency and its version, unless ``condition``."""
    if not condition:
        pytest.fail(
            f"{dist} {_version(dist)} changed `{attribute}`: keras_kd relies on {relied_on}. Update the code "
            "that reads it (see the canary's docstring) and this canary, or bound the version in setup.cfg.",
            pytrace=False,
        )


def require_parameters(fn, parameters: list, dist: str, attribute: str):
    """Fails unless ``fn`` takes exactly ``parameters``, in this order."""
    require(
        list(inspect.signature(fn).parameters) == parameters, dist, attribute, f"the parameters {parameters}"
    )


def _get(obj, attribute: str, dist: str, relied_on: str):
    require(hasattr(obj, attribute), dist, attribute, relied_on)
    return getattr(obj, attribute)


def _import(module: str, dist: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        require(False, dist, module, f"importing the module ({e})")


def _functional(K):
    inp = K.Input((3,), name="x")
    out = K.layers.Dense(2, name="dense")(inp)
    return K.Model(inp, out), inp, out


# ---------------------------------------------------------------------------
# The canaries. Keys are the names the source scan reports.
# ---------------------------------------------------------------------------


def canary_reshuffle_each_iteration():
    """cache (randomness detection): ``getattr(ds, "_reshuffle_each_iteration")`` on a shuffle dataset."""
    ds = tf.data.Dataset.range(8)
    relied_on = "a bool on `ds.shuffle(n)` that is True unless reshuffle_each_iteration=False"
    value = _get(ds.shuffle(4), "_reshuffle_each_iteration", TF, relied_on)
    require(value is True, TF, "_reshuffle_each_iteration", relied_on)
    require(
        ds.shuffle(4, reshuffle_each_iteration=False)._reshuffle_each_iteration is False,
        TF,
        "_reshuffle_each_iteration",
        relied_on,
    )
    require(
        "Shuffle" in type(ds.shuffle(4)).__name__,
        TF,
        "type(ds.shuffle(n)).__name__",
        "the class name of a shuffle dataset containing 'Shuffle'",
    )


def canary_deterministic():
    """cache (randomness detection): ``getattr(ds, "_deterministic")`` on parallel map datasets."""
    ds = tf.data.Dataset.range(8)
    relied_on = "`str(ds._deterministic).lower() == 'false'` exactly for map(..., deterministic=False)"
    unordered = ds.map(lambda x: x + 1, num_parallel_calls=2, deterministic=False)
    ordered = ds.map(lambda x: x + 1, num_parallel_calls=2)
    require(
        str(_get(unordered, "_deterministic", TF, relied_on)).lower() == "false",
        TF,
        "_deterministic",
        relied_on,
    )
    require(str(getattr(ordered, "_deterministic", "")).lower() != "false", TF, "_deterministic", relied_on)


def canary_dataset_inputs():
    """cache (randomness detection): ``ds._inputs()`` lists the datasets a dataset reads from."""
    source = tf.data.Dataset.range(8)
    mapped = source.map(lambda x: x * 2)
    relied_on = "`ds._inputs()` returning the input datasets"
    inputs = _get(mapped, "_inputs", TF, relied_on)()
    require(len(inputs) == 1 and inputs[0] is source, TF, "_inputs", relied_on)


def canary_dataset_function_graphs():
    """cache (randomness detection): a dataset's attributes hold its functions as ``.function.graph``."""
    mapped = tf.data.Dataset.range(8).map(lambda x: tf.random.uniform(()) + tf.cast(x, tf.float32))
    relied_on = "an attribute of a map dataset with `.function.graph` whose ops include the mapped function's"
    graphs = [
        value.function.graph
        for value in vars(mapped).values()
        if hasattr(getattr(getattr(value, "function", None), "graph", None), "as_graph_def")
    ]
    require(graphs, TF, "<map dataset>.<attribute>.function.graph", relied_on)
    ops = {op.type for g in graphs for op in g.get_operations()}
    require(any("Random" in op for op in ops), TF, "<map dataset>.<attribute>.function.graph", relied_on)


def canary_eager_tensor():
    """losses (softmax-input warning): ``tf.__internal__.EagerTensor`` tells eager from graph tensors."""
    relied_on = "`tf.__internal__.EagerTensor` matching eager tensors only"
    eager_type = _get(tf.__internal__, "EagerTensor", TF, relied_on)
    require(isinstance(tf.constant(1.0), eager_type), TF, "tf.__internal__.EagerTensor", relied_on)
    traced = tf.function(lambda x: tf.constant(isinstance(x, eager_type)))(tf.constant(1.0))
    require(not bool(traced), TF, "tf.__internal__.EagerTensor", relied_on)


def canary_eager_record():
    """losses (training-step detection): ``tensorflow.python.eager.record.could_possibly_record()``."""
    record = _import("tensorflow.python.eager.record", TF)
    relied_on = "`record.could_possibly_record()`: False outside a GradientTape, True inside one"
    fn = _get(record, "could_possibly_record", TF, relied_on)
    require(fn() is False or fn() == 0, TF, "tensorflow.python.eager.record.could_possibly_record", relied_on)
    with tf.GradientTape():
        require(bool(fn()), TF, "tensorflow.python.eager.record.could_possibly_record", relied_on)


def canary_keras_mask():
    """_compat.get_keras_mask: masks travel on tensors as ``_keras_mask`` in both flavours."""
    for K, dist in ((keras, KERAS), (tf_keras, TF_KERAS)):
        out = K.layers.Embedding(5, 2, mask_zero=True)(np.array([[1, 0, 2]]))
        mask = getattr(out, "_keras_mask", None)
        relied_on = "the mask of Embedding(mask_zero=True)'s output as `tensor._keras_mask`"
        require(mask is not None, dist, "_keras_mask", relied_on)
        require(np.array_equal(np.asarray(mask), [[True, False, True]]), dist, "_keras_mask", relied_on)


def canary_keras_history():
    """_compat.input_name, data (softmax teacher): ``tensor._keras_history[0]`` is the producing layer."""
    for K, dist in ((keras, KERAS), (tf_keras, TF_KERAS)):
        model, inp, out = _functional(K)
        relied_on = "`symbolic_tensor._keras_history`, a tuple whose first item is the layer that produced it"
        history = _get(out, "_keras_history", dist, relied_on)
        require(
            isinstance(history, tuple) and history[0] is model.get_layer("dense"),
            dist,
            "_keras_history",
            relied_on,
        )
        require(getattr(inp._keras_history[0], "name", None) == "x", dist, "_keras_history", relied_on)


def canary_keras_logits():
    """losses (probabilities-instead-of-logits warning): softmax outputs carry ``_keras_logits``."""
    for K, dist in ((keras, KERAS), (tf_keras, TF_KERAS)):
        relied_on = "`_keras_logits` on the output of a softmax activation (eager and traced)"
        eager = K.layers.Dense(2, activation="softmax")(np.ones((1, 3), "float32"))
        require(hasattr(eager, "_keras_logits"), dist, "_keras_logits", relied_on)
        traced = tf.function(lambda x, K=K: tf.constant(hasattr(K.activations.softmax(x), "_keras_logits")))
        require(bool(traced(tf.ones((1, 2)))), dist, "_keras_logits", relied_on)
        require(
            not hasattr(K.layers.Dense(2)(np.ones((1, 3), "float32")), "_keras_logits"),
            dist,
            "_keras_logits",
            "its absence on plain logits",
        )


def canary_nodes_by_depth():
    """_compat.graph_calls: walks ``model._nodes_by_depth`` (both flavours, their own Node shapes)."""
    relied_on = "`model._nodes_by_depth`: {depth: [Node]}, the Dense call at depth 0 with its symbolic input"
    model, inp, out = _functional(keras)
    nodes = _get(model, "_nodes_by_depth", KERAS, relied_on)
    node = next(n for n in nodes[0] if not n.is_input)
    require(node.operation is model.get_layer("dense"), KERAS, "_nodes_by_depth[0][0].operation", relied_on)
    require(
        node.arguments.args[0] is inp and node.arguments.kwargs == {},
        KERAS,
        "_nodes_by_depth[0][0].arguments",
        relied_on,
    )
    require(list(node.outputs)[0] is out, KERAS, "_nodes_by_depth[0][0].outputs", relied_on)
    model, inp, out = _functional(tf_keras)
    nodes = _get(model, "_nodes_by_depth", TF_KERAS, relied_on)
    node = next(n for n in nodes[0] if not n.is_input)
    require(node.layer is model.get_layer("dense"), TF_KERAS, "_nodes_by_depth[0][0].layer", relied_on)
    require(
        node.call_args[0] is inp and isinstance(node.call_kwargs, dict),
        TF_KERAS,
        "_nodes_by_depth[0][0].call_args",
        relied_on,
    )
    require(tf.nest.flatten(node.outputs)[0] is out, TF_KERAS, "_nodes_by_depth[0][0].outputs", relied_on)


def canary_functional():
    """_compat.graph_of: a built Keras 3 Sequential keeps its graph in ``_functional``."""
    seq = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    relied_on = "`Sequential._functional`, a Functional model with `_nodes_by_depth`"
    inner = _get(seq, "_functional", KERAS, relied_on)
    require(
        inner is not None and hasattr(inner, "_nodes_by_depth"), KERAS, "Sequential._functional", relied_on
    )


def canary_is_graph_network():
    """_compat.graph_of: tf_keras marks Functional and built Sequential models with ``_is_graph_network``."""
    relied_on = "`_is_graph_network` True for Functional and built Sequential, False for subclassed models"
    model, _, _ = _functional(tf_keras)
    seq = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])

    class Sub(tf_keras.Model):
        def call(self, x):
            return x

    require(getattr(model, "_is_graph_network", None) is True, TF_KERAS, "_is_graph_network", relied_on)
    require(getattr(seq, "_is_graph_network", None) is True, TF_KERAS, "_is_graph_network", relied_on)
    require(not getattr(Sub(), "_is_graph_network", False), TF_KERAS, "_is_graph_network", relied_on)


def canary_model_io_structs():
    """_compat.model_io: Keras 3's ``_inputs_struct``/``_outputs_struct`` and tf_keras's
    ``_nested_inputs``/``_nested_outputs`` keep the nesting the user gave."""
    for K, dist, names in (
        (keras, KERAS, ("_inputs_struct", "_outputs_struct")),
        (tf_keras, TF_KERAS, ("_nested_inputs", "_nested_outputs")),
    ):
        a, b = K.Input((2,), name="a"), K.Input((3,), name="b")
        out = K.layers.Dense(1)(K.layers.Concatenate()([a, b]))
        model = K.Model({"a": a, "b": b}, {"y": out})
        relied_on = f"`model.{names[0]}` / `{names[1]}` holding the nested inputs/outputs as given"
        inputs, outputs = (_get(model, name, dist, relied_on) for name in names)
        ok = isinstance(inputs, dict) and inputs["a"] is a and inputs["b"] is b
        require(ok and isinstance(outputs, dict) and outputs["y"] is out, dist, "/".join(names), relied_on)


def canary_input_layers_outbound_nodes():
    """optimize (QAT pre-check): tf_keras's ``_input_layers``, ``_outbound_nodes[i].outbound_layer``."""
    model, _, _ = _functional(tf_keras)
    relied_on = "`model._input_layers` (InputLayers) whose `_outbound_nodes` name the consuming layer"
    layers = _get(model, "_input_layers", TF_KERAS, relied_on)
    require(
        len(layers) == 1 and type(layers[0]).__name__ == "InputLayer", TF_KERAS, "_input_layers", relied_on
    )
    nodes = _get(layers[0], "_outbound_nodes", TF_KERAS, relied_on)
    require([n.outbound_layer.name for n in nodes] == ["dense"], TF_KERAS, "_outbound_nodes", relied_on)


def canary_lambda_output_shape():
    """bridge: a Lambda layer's ``output_shape`` argument is kept as ``_output_shape`` (both flavours)."""
    for K, dist in ((keras, KERAS), (tf_keras, TF_KERAS)):
        layer = K.layers.Lambda(lambda t: t, output_shape=(3,))
        relied_on = "`Lambda(output_shape=s)._output_shape == s`"
        require(
            tuple(_get(layer, "_output_shape", dist, relied_on)) == (3,),
            dist,
            "Lambda._output_shape",
            relied_on,
        )


def canary_flatten_layers():
    """bridge: ``layer._flatten_layers(include_self=True, recursive=True)``: the layer and its sublayers."""
    for K, dist in ((keras, KERAS), (tf_keras, TF_KERAS)):
        model, _, _ = _functional(K)
        relied_on = "`_flatten_layers(include_self=True, recursive=True)` listing the model and its layers"
        flatten = _get(model, "_flatten_layers", dist, relied_on)
        found = list(flatten(include_self=True, recursive=True))
        require(found[0] is model and model.get_layer("dense") in found, dist, "_flatten_layers", relied_on)


def canary_allow_sum_over_batch_size():
    """_compat.loss_base: tf_keras's compile sets ``loss._allow_sum_over_batch_size = True`` on its losses."""
    relied_on = (
        "`Loss._allow_sum_over_batch_size`: False on a new loss, set True by compile for the losses it runs"
    )
    loss = tf_keras.losses.MeanSquaredError()
    require(
        _get(loss, "_allow_sum_over_batch_size", TF_KERAS, relied_on) is False,
        TF_KERAS,
        "_allow_sum_over_batch_size",
        relied_on,
    )
    model, _, _ = _functional(tf_keras)
    model.compile(loss=loss)
    model.evaluate(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0)
    require(loss._allow_sum_over_batch_size is True, TF_KERAS, "_allow_sum_over_batch_size", relied_on)


def canary_name_scope():
    """_compat.loss_base: tf_keras's ``Loss.__call__`` opens ``self._name_scope``, set by ``__init__``."""
    relied_on = "`Loss._name_scope`, set from the name by __init__ and read by __call__"
    loss = tf_keras.losses.Loss(name="kd")
    require(_get(loss, "_name_scope", TF_KERAS, relied_on) == "kd", TF_KERAS, "Loss._name_scope", relied_on)
    require(
        "_name_scope" in inspect.getsource(tf_keras.losses.Loss.__call__),
        TF_KERAS,
        "Loss._name_scope",
        relied_on,
    )


def canary_extension_type_decoding():
    """targets: TeacherTargets.Spec replaces the ``_from_compatible_tensor_list`` method and the
    ``_flat_tensor_specs`` property of TensorFlow's batchable ExtensionType specs (a faster decoder);
    tf.data must keep rebuilding each element through them."""

    class Pair(tf.experimental.BatchableExtensionType):
        a: tf.Tensor
        b: tf.Tensor

    spec = Pair.Spec
    relied_on = (
        "`Spec._from_compatible_tensor_list(tensors)` (a method) and `Spec._flat_tensor_specs` "
        "(a property), both used by tf.data"
    )
    decode = _get(spec, "_from_compatible_tensor_list", TF, relied_on)
    flat = inspect.getattr_static(spec, "_flat_tensor_specs", None)
    require(callable(decode) and isinstance(flat, property), TF, "ExtensionType Spec decoding", relied_on)
    calls = []

    def spy(self, tensors):
        calls.append(len(tensors))
        return decode(self, tensors)

    spec._from_compatible_tensor_list = spy  # a test-local class: nothing else sees this
    spec._flat_tensor_specs = property(lambda self: calls.append("flat") or flat.fget(self))
    ds = tf.data.Dataset.from_tensor_slices(Pair(a=tf.zeros((4,)), b=tf.ones((4,)))).batch(2)
    value = next(iter(ds))
    require(2 in calls and "flat" in calls, TF, "ExtensionType Spec decoding", relied_on)
    require(
        isinstance(value, Pair) and value.b.numpy().tolist() == [1.0, 1.0],
        TF,
        "ExtensionType Spec decoding",
        relied_on,
    )


def canary_layer_tracked_metric():
    """_compat.layer_mean_metric: Keras 3 logs a metric a layer holds as an attribute (alignment's
    ``feature_loss``); keras_kd sets it as ``layer._kd_mean_metric``."""
    relied_on = (
        "a `keras.metrics.Mean` assigned to a layer attribute being tracked and logged by fit/evaluate"
    )

    class Logged(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self._kd_mean_metric = keras.metrics.Mean(name="feature_loss")

        def call(self, x):
            self._kd_mean_metric.update_state(tf.reduce_mean(x))
            return x

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(Logged()(inp)))
    model.compile("sgd", "mse")
    logs = model.evaluate(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0, return_dict=True)
    require(logs.get("feature_loss") == 1.0, KERAS, "layer-tracked metrics", relied_on)


def canary_tf_data_map_internals():
    """data/_pack_map (issue 15): a map dataset built from tf.data's private pieces, whose function is
    marked ``experimental_ints_on_device`` (instantiated without Grappler): ``UnaryDataset`` (its
    ``__init__(input_dataset, variant_tensor)``, ``_common_args``, ``_functions``, the ``_input_dataset``,
    ``_map_func`` and ``_name`` state a subclass sets), ``StructuredFunctionWrapper`` and
    ``gen_dataset_ops.map_dataset`` on ``_variant_tensor``."""
    dataset_ops = _import("tensorflow.python.data.ops.dataset_ops", TF)
    structured = _import("tensorflow.python.data.ops.structured_function", TF)
    gen = _import("tensorflow.python.ops.gen_dataset_ops", TF)
    unary = _get(dataset_ops, "UnaryDataset", TF, "the base class of one-input datasets")
    require_parameters(
        unary.__init__, ["self", "input_dataset", "variant_tensor"], TF, "UnaryDataset.__init__"
    )
    require(
        isinstance(inspect.getattr_static(unary, "_common_args", None), property),
        TF,
        "DatasetV2._common_args",
        "a property giving map_dataset's output_types/output_shapes/metadata",
    )
    require(callable(getattr(unary, "_functions", None)), TF, "DatasetV2._functions", "a method to override")
    ds = tf.data.Dataset.range(4)
    mapped = ds.map(lambda v: v * 2)
    for name in ("_input_dataset", "_map_func", "_name"):
        require(
            hasattr(mapped, name),
            TF,
            f"MapDataset.{name}",
            "the state a map dataset keeps (set by a subclass)",
        )
    relied_on = (
        "StructuredFunctionWrapper(fn, name, dataset=, defun_kwargs=) with .function and .output_structure"
    )
    wrapper = _get(structured, "StructuredFunctionWrapper", TF, relied_on)(
        lambda v: v * 2, "Dataset.map()", dataset=ds, defun_kwargs={"experimental_ints_on_device": True}
    )
    require(
        wrapper.function.captured_inputs == []
        and wrapper.output_structure == tf.TensorSpec((), tf.int64)
        and wrapper.function.function_def.attr["experimental_ints_on_device"].b,
        TF,
        "StructuredFunctionWrapper",
        relied_on,
    )
    relied_on = "map_dataset(variant, captured, f=, use_inter_op_parallelism=, preserve_cardinality=, ...)"
    map_dataset = _get(gen, "map_dataset", TF, relied_on)
    variant = map_dataset(
        _get(ds, "_variant_tensor", TF, "a dataset's variant tensor"),
        wrapper.function.captured_inputs,
        f=wrapper.function,
        use_inter_op_parallelism=True,
        preserve_cardinality=True,
        force_synchronous=False,
        **mapped._common_args,
    )
    values = list(tf.data.experimental.from_variant(variant, wrapper.output_structure).as_numpy_iterator())
    require(values == [0, 2, 4, 6], TF, "gen_dataset_ops.map_dataset", relied_on)


_PRUNE_REGISTRY = "tensorflow_model_optimization.python.core.sparsity.keras.prune_registry"
_QUANT_ACTIVATION = "tensorflow_model_optimization.python.core.quantization.keras.quantize_aware_activation"


def canary_prune_registry():
    """optimize (pruning pre-check): tfmot's ``PruneRegistry`` and its private tables."""
    registry = _get(_import(_PRUNE_REGISTRY, TFMOT), "PruneRegistry", TFMOT, "the `PruneRegistry` class")
    require(
        callable(getattr(registry, "supports", None)), TFMOT, "PruneRegistry.supports", "a `supports(layer)`"
    )
    require(
        registry.supports(tf_keras.layers.Dense(2)), TFMOT, "PruneRegistry.supports", "Dense being supported"
    )
    layers = _get(
        registry, "_LAYERS_WEIGHTS_MAP", TFMOT, "a dict {tf_keras layer class: [weight attribute path]}"
    )
    require(
        layers.get(tf_keras.layers.Dense) == ["kernel"],
        TFMOT,
        "PruneRegistry._LAYERS_WEIGHTS_MAP",
        "Dense -> ['kernel'] (tf_keras classes as keys)",
    )
    rnn = _get(registry, "_RNN_LAYERS", TFMOT, "a set of tf_keras recurrent layer classes")
    require(tf_keras.layers.LSTM in rnn, TFMOT, "PruneRegistry._RNN_LAYERS", "tf_keras.layers.LSTM in it")
    cells = _get(registry, "_RNN_CELLS_WEIGHTS_MAP", TFMOT, "a dict {cell class: [weight attribute]}")
    names = {c.__name__: n for c, n in cells.items()}
    require(
        names.get("LSTMCell") == ["kernel", "recurrent_kernel"],
        TFMOT,
        "PruneRegistry._RNN_CELLS_WEIGHTS_MAP",
        "LSTMCell -> ['kernel', 'recurrent_kernel']",
    )


def canary_pruning_vars():
    """optimize.sparsity: a built ``PruneLowMagnitude`` lists ``pruning_vars`` (undocumented, no underscore)
    as (weight, mask, threshold) triples."""
    import tensorflow_model_optimization as tfmot

    relied_on = "`PruneLowMagnitude.pruning_vars`: [(weight, mask, threshold)] of a built wrapper"
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    )
    wrapper = next(layer for layer in pruned.layers if type(layer).__name__ == "PruneLowMagnitude")
    triples = _get(wrapper, "pruning_vars", TFMOT, relied_on)
    require(len(triples) == 1 and len(triples[0]) == 3, TFMOT, "PruneLowMagnitude.pruning_vars", relied_on)
    weight, mask, _ = triples[0]
    require(
        weight is wrapper.layer.kernel and tuple(mask.shape) == (3, 2),
        TFMOT,
        "PruneLowMagnitude.pruning_vars",
        relied_on,
    )


def canary_quantize_aware_activations():
    """optimize (QAT activation message): ``QuantizeAwareActivation._PRE/_POST_QUANT_ACTIVATIONS``."""
    aware = _get(_import(_QUANT_ACTIVATION, TFMOT), "QuantizeAwareActivation", TFMOT, "the class")
    relied_on = "sets of activation names whose union is what QAT supports inside a layer"
    pre = _get(aware, "_PRE_QUANT_ACTIVATIONS", TFMOT, relied_on)
    post = _get(aware, "_POST_QUANT_ACTIVATIONS", TFMOT, relied_on)
    union = set(pre) | set(post)
    require(
        all(isinstance(n, str) for n in union) and {"relu", "linear", "softmax"} <= union,
        TFMOT,
        "QuantizeAwareActivation._PRE_QUANT_ACTIVATIONS | _POST_QUANT_ACTIVATIONS",
        relied_on,
    )


def canary_tfmot_wrapper_names():
    """bridge/optimize: tfmot's wrappers are recognised by class name and module (no public class)."""
    import tensorflow_model_optimization as tfmot

    relied_on = (
        "the wrapper class names PruneLowMagnitude / QuantizeLayer / QuantizeWrapperV2 in tfmot modules"
    )
    base = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    pruned = {
        type(layer).__name__: type(layer).__module__
        for layer in tfmot.sparsity.keras.prune_low_magnitude(base).layers
    }
    quantized = {
        type(layer).__name__: type(layer).__module__
        for layer in tfmot.quantization.keras.quantize_model(base).layers
    }
    require(
        pruned.get("PruneLowMagnitude", "").startswith("tensorflow_model_optimization"),
        TFMOT,
        "PruneLowMagnitude",
        relied_on,
    )
    for name in ("QuantizeLayer", "QuantizeWrapperV2"):
        require(quantized.get(name, "").startswith("tensorflow_model_optimization"), TFMOT, name, relied_on)
    annotate = importlib.import_module(
        "tensorflow_model_optimization.python.core.quantization.keras.quantize_annotate"
    )
    wrapper = importlib.import_module(
        "tensorflow_model_optimization.python.core.quantization.keras.quantize_wrapper"
    )
    require(
        hasattr(annotate, "QuantizeAnnotate") and hasattr(wrapper, "QuantizeWrapper"),
        TFMOT,
        "QuantizeAnnotate / QuantizeWrapper",
        relied_on,
    )


def canary_tuner_utils():
    """tuning: ``keras_tuner.src.engine.tuner_utils``: SaveBestEpoch, TunerCallback, validate_trial_results"""
    module = _import("keras_tuner.src.engine.tuner_utils", TUNER)
    import keras_tuner

    objective = keras_tuner.Objective("val_loss", "min")
    save = _get(module, "SaveBestEpoch", TUNER, "the per-trial checkpoint callback")(objective, "/tmp/x")
    require(
        (getattr(save, "objective", None), getattr(save, "filepath", None)) == (objective, "/tmp/x"),
        TUNER,
        "SaveBestEpoch.objective / .filepath",
        "SaveBestEpoch(objective, filepath) keeping both",
    )
    callback = _get(module, "TunerCallback", TUNER, "the base of the tuner's own callbacks")("tuner", "trial")
    require(
        (getattr(callback, "tuner", None), getattr(callback, "trial", None)) == ("tuner", "trial"),
        TUNER,
        "TunerCallback.tuner / .trial",
        "TunerCallback(tuner, trial) keeping both",
    )
    validate = _get(
        module, "validate_trial_results", TUNER, "validate_trial_results(results, objective, func_name)"
    )
    require_parameters(
        validate, ["results", "objective", "func_name"], TUNER, "tuner_utils.validate_trial_results"
    )


def canary_tuner_save_json():
    """tuning: ``keras_tuner.src.utils.save_json(path, obj)`` (saves the build config like keras-tuner)."""
    module = _import("keras_tuner.src.utils", TUNER)
    save_json = _get(module, "save_json", TUNER, "save_json(path, obj)")
    require_parameters(save_json, ["path", "obj"], TUNER, "keras_tuner.src.utils.save_json")


def canary_tuner_private_methods():
    """tuning: ``Tuner._try_build`` and ``_build_and_fit_model`` (overridden), ``_build_hypermodel`` and
    ``_get_build_config_fname`` (called): overriding only works while run_trial reaches them."""
    import keras_tuner

    tuner = keras_tuner.Tuner
    for name, params in (
        ("_try_build", ["self", "hp"]),
        ("_build_hypermodel", ["self", "hp"]),
        ("_build_and_fit_model", ["self", "trial", "args", "kwargs"]),
        ("_get_build_config_fname", ["self", "trial_id"]),
    ):
        require_parameters(
            _get(tuner, name, TUNER, f"the method Tuner.{name}"), params, TUNER, f"Tuner.{name}"
        )
    require(
        "self._build_and_fit_model(" in inspect.getsource(tuner.run_trial),
        TUNER,
        "Tuner.run_trial",
        "run_trial calling self._build_and_fit_model",
    )
    require(
        "self._try_build(" in inspect.getsource(tuner._build_and_fit_model),
        TUNER,
        "Tuner._build_and_fit_model",
        "_build_and_fit_model calling self._try_build",
    )


def canary_multi_objective():
    """tuning: a list objective is a ``MultiObjective`` whose ``objectives`` lists the single ones."""
    import keras_tuner

    module = _import("keras_tuner.src.engine.objective", TUNER)
    multi = _get(module, "MultiObjective", TUNER, "the class of list objectives")
    single = [keras_tuner.Objective("a", "min"), keras_tuner.Objective("b", "max")]
    require(
        list(getattr(multi(single), "objectives", [])) == single,
        TUNER,
        "MultiObjective.objectives",
        "MultiObjective(list).objectives == list",
    )


def canary_keras_masking_module():
    """_compat.get_keras_mask on JAX: Keras keeps JAX arrays' masks in a table read by
    ``keras.src.backend.common.masking.get_keras_mask``."""
    module = _import("keras.src.backend.common.masking", KERAS)
    getter = _get(module, "get_keras_mask", KERAS, "Keras 3's mask getter for tensors that take no attributes")
    out = keras.layers.Embedding(5, 2, mask_zero=True)(np.array([[1, 0, 2]]))
    mask = getter(out)
    require(mask is not None and np.array_equal(np.asarray(mask), [[True, False, True]]), KERAS,
            "get_keras_mask", "get_keras_mask(Embedding(mask_zero=True) output) is its mask")


# Key: the name as the source scan reports it (attribute, or imported module / name).
CANARIES = {
    "keras.src.backend.common.masking": canary_keras_masking_module,
    "_reshuffle_each_iteration": canary_reshuffle_each_iteration,
    "_deterministic": canary_deterministic,
    "_inputs": canary_dataset_inputs,
    "dataset function graphs": canary_dataset_function_graphs,
    "tf.__internal__.EagerTensor": canary_eager_tensor,
    "tensorflow.python.eager.record": canary_eager_record,
    "_keras_mask": canary_keras_mask,
    "_keras_history": canary_keras_history,
    "_keras_logits": canary_keras_logits,
    "_nodes_by_depth": canary_nodes_by_depth,
    "_functional": canary_functional,
    "_is_graph_network": canary_is_graph_network,
    "_inputs_struct": canary_model_io_structs,
    "_outputs_struct": canary_model_io_structs,
    "_nested_inputs": canary_model_io_structs,
    "_nested_outputs": canary_model_io_structs,
    "_input_layers": canary_input_layers_outbound_nodes,
    "_outbound_nodes": canary_input_layers_outbound_nodes,
    "_output_shape": canary_lambda_output_shape,
    "_flatten_layers": canary_flatten_layers,
    "_allow_sum_over_batch_size": canary_allow_sum_over_batch_size,
    "_name_scope": canary_name_scope,
    "_from_compatible_tensor_list": canary_extension_type_decoding,
    "_flat_tensor_specs": canary_extension_type_decoding,
    _PRUNE_REGISTRY: canary_prune_registry,
    "_LAYERS_WEIGHTS_MAP": canary_prune_registry,
    "_RNN_LAYERS": canary_prune_registry,
    "_RNN_CELLS_WEIGHTS_MAP": canary_prune_registry,
    _QUANT_ACTIVATION: canary_quantize_aware_activations,
    "private module sparsity.keras.prune_registry": canary_prune_registry,
    "private module quantization.keras.quantize_aware_activation": canary_quantize_aware_activations,
    "pruning_vars": canary_pruning_vars,
    "_PRE_QUANT_ACTIVATIONS": canary_quantize_aware_activations,
    "_POST_QUANT_ACTIVATIONS": canary_quantize_aware_activations,
    "tfmot wrapper class names": canary_tfmot_wrapper_names,
    "tensorflow.python.data.ops.dataset_ops": canary_tf_data_map_internals,
    "tensorflow.python.data.ops.structured_function": canary_tf_data_map_internals,
    "tensorflow.python.ops.gen_dataset_ops": canary_tf_data_map_internals,
    "_variant_tensor": canary_tf_data_map_internals,
    "_common_args": canary_tf_data_map_internals,
    "_functions": canary_tf_data_map_internals,
    "_input_dataset": canary_tf_data_map_internals,
    "_map_func": canary_tf_data_map_internals,
    # `_name` is also a private name of Keras layers: a Keras subclass that sets it would pass here unseen.
    "_name": canary_tf_data_map_internals,
    "_kd_mean_metric (Keras 3 logs layer-tracked metrics)": canary_layer_tracked_metric,
    "keras_tuner.src.engine.tuner_utils": canary_tuner_utils,
    "keras_tuner.src.utils": canary_tuner_save_json,
    "_try_build": canary_tuner_private_methods,
    "_build_and_fit_model": canary_tuner_private_methods,
    "_build_hypermodel": canary_tuner_private_methods,
    "_get_build_config_fname": canary_tuner_private_methods,
    "MultiObjective.objectives": canary_multi_objective,
}


# What these two guard runs on Keras 3's TensorFlow backend only (the probabilities
# warning and alignment's logged `feature_loss` are TensorFlow-only; see the README's
# "Keras 3 on JAX"), so the JAX job deselects them.
_TF_BACKEND_CANARIES = {canary_keras_logits, canary_layer_tracked_metric}


@pytest.mark.parametrize(
    "canary",
    [
        pytest.param(c, marks=[pytest.mark.backend("tensorflow")] if c in _TF_BACKEND_CANARIES else [])
        for c in sorted(set(CANARIES.values()), key=lambda f: f.__name__)
    ],
    ids=lambda f: f.__name__,
)
def test_canary(canary):
    canary()


# ---------------------------------------------------------------------------
# Version bounds.
# ---------------------------------------------------------------------------

_CORE = {TF, KERAS, TF_KERAS, TFMOT, TUNER}


def _requirements():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra in (
        config["options.extras_require"].values() if config.has_section("options.extras_require") else ()
    ):
        lines += extra.splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def test_setup_cfg_bounds_cover_the_installed_versions():
    requirements = _requirements()
    named = {
        importlib.metadata.distribution(r.name).metadata["Name"].lower()
        if _version(r.name) != "not installed"
        else r.name.lower()
        for r in requirements
    }
    assert _CORE <= {n.replace("_", "-") for n in named}, (
        f"setup.cfg must bound every dependency canaried here: {_CORE}"
    )
    problems = []
    for r in requirements:
        installed = _version(r.name)
        if installed == "not installed":
            if r.name.lower().replace("_", "-") in _CORE:
                problems.append(f"{r.name} is not installed (setup.cfg: {r})")
            continue
        if r.specifier and not r.specifier.contains(installed, prereleases=True):
            problems.append(f"setup.cfg requires {r} but {r.name} {installed} is installed")
        if r.name.lower().replace("_", "-") in _CORE and not r.specifier:
            problems.append(f"setup.cfg gives no bounds for {r.name}, whose private parts keras_kd reads")
    assert not problems, "\n".join(problems)


def test_core_dependencies_have_an_upper_bound():
    # The canaries hold for the versions tested; an unbounded upgrade could change any of them.
    for r in _requirements():
        if r.name.lower().replace("_", "-") in _CORE:
            assert any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier), f"{r} has no upper bound"


# ---------------------------------------------------------------------------
# The inventory: every private read in keras_kd/ has a canary.
# ---------------------------------------------------------------------------

_PRIVATE_MODULES = re.compile(
    r"^(keras_tuner\.src|tensorflow\.python|tensorflow_model_optimization\.python"
    r"|keras\.src|tf_keras\.src)(\.|$)"
)
_ATTRIBUTE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\.\s*(_[A-Za-z][A-Za-z0-9_]*)\b")
_GETATTR = re.compile(
    r"\b(?:getattr|hasattr|setattr|delattr)\(\s*[^,()]+,\s*[\"'](_[A-Za-z][A-Za-z0-9_]*)[\"']"
)
_NAME = re.compile(r"_[A-Za-z][A-Za-z0-9_]*")
# keras_kd's guarded readers: `_compat.private_attribute(obj, "name", package)` (any name, underscore or
# not) and `optimize._common._tfmot_private_module("dotted.path")`.
_PRIVATE_ATTRIBUTE_CALL = re.compile(r"\bprivate_attribute\(\s*[^,()]+,\s*[\"']([A-Za-z_]\w*)[\"']")
_PRIVATE_MODULE_CALL = re.compile(r"\b\w*private_module\(\s*[\"']([\w.]+)[\"']")
_INTERNAL = re.compile(r"\btf\.__internal__\.([A-Za-z_][A-Za-z0-9_.]*)")

# Reads that are not of a dependency's private parts.
ALLOWED = {
    "_getframe": "sys._getframe: the Python standard library (warning stack levels)",
    "_activation": "optimize/bridge: the suffix of layer-config keys such as `recurrent_activation`",
}
# keras_kd's own marks on foreign objects carry one of these prefixes.
_OWN_PREFIXES = ("_kd_", "_keras_kd_")


def _own_names() -> set:
    """Private names keras_kd defines itself: its modules, functions, classes, attributes and aliases."""
    own = {p.stem for p in LIBRARY.rglob("*.py") if p.stem.startswith("_")}
    own |= {p.name for p in LIBRARY.rglob("*") if p.is_dir() and p.name.startswith("_")}
    for path in LIBRARY.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Name):
                            own.add(t.id)
                        elif (
                            isinstance(t, ast.Attribute)
                            and isinstance(t.value, ast.Name)
                            and t.value.id in ("self", "cls")
                        ):
                            own.add(t.attr)
    return {n for n in own if n.startswith("_")}


def _own_import_aliases(tree) -> set:
    """Names bound by ``import keras_kd...`` / ``from keras_kd... import`` in one file."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_kd"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative import: our own
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("keras_kd")}
    return names


def private_reads(paths=None) -> dict:
    """``{name: ["file:line", ...]}`` for every read of a dependency's private part in keras_kd/."""
    own = _own_names()
    found = {}

    def add(name, path, line):
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        found.setdefault(name, []).append(f"{where}:{line}")

    for path in sorted(LIBRARY.rglob("*.py")) if paths is None else paths:
        text = path.read_text()
        tree = ast.parse(text, str(path))
        own_aliases = _own_import_aliases(tree) | {"self", "cls", "keras_kd"}
        in_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            # A private name as a string: getattr/hasattr, `_compat.private_attribute(obj, "_x", ...)`, tables
            # (not the literal parts of f-strings, e.g. f"{name}_pool").
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _NAME.fullmatch(node.value)
                and id(node) not in in_fstrings
            ):
                if node.value not in own and not node.value.startswith(_OWN_PREFIXES):
                    add(node.value, path, node.lineno)
            if isinstance(node, ast.ImportFrom) and node.module and _PRIVATE_MODULES.match(node.module):
                for alias in node.names:
                    add(f"{node.module}.{alias.name}", path, node.lineno)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _PRIVATE_MODULES.match(alias.name):
                        add(alias.name, path, node.lineno)
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            for receiver, name in _ATTRIBUTE.findall(code):
                if receiver in own_aliases or name.startswith(_OWN_PREFIXES) or name.startswith("__"):
                    continue
                if name in own and name not in CANARIES:
                    continue
                add(name, path, number)
            for name in _GETATTR.findall(code):
                if not name.startswith(_OWN_PREFIXES) and not name.startswith("__"):
                    add(name, path, number)
            for name in _PRIVATE_ATTRIBUTE_CALL.findall(code):
                add(name, path, number)
            for name in _PRIVATE_MODULE_CALL.findall(code):
                add(f"private module {name}", path, number)
            for name in _INTERNAL.findall(code):
                add(f"tf.__internal__.{name}", path, number)
    return found


def test_every_private_read_has_a_canary():
    missing = {
        name: where for name, where in private_reads().items() if name not in CANARIES and name not in ALLOWED
    }
    assert not missing, (
        "keras_kd reads private parts of its dependencies that no canary in tests/test_private_canaries.py "
        "covers. Add a canary (keyed by the name) checking the shape the code relies on, or use a "
        "public API:\n"
        + "\n".join(f"  {name}: {', '.join(where)}" for name, where in sorted(missing.items()))
    )


def test_the_scan_finds_known_reads():
    # The scan itself must work: these reads are in the library today (they move between files, not away).
    found = private_reads()
    for name in (
        "_nodes_by_depth",
        "_keras_mask",
        "_reshuffle_each_iteration",
        "keras_tuner.src.engine.tuner_utils",
    ):
        assert name in found, f"the private-read scan no longer finds {name!r}: fix the scan's patterns"


@pytest.mark.parametrize("module", ["keras_kd._compat", "keras_kd.optimize._common"])
def test_private_reads_tables_have_canaries(module):
    # keras_kd lists the private attributes it reads through `private_attribute` in `PRIVATE_READS`
    # tables of (package, owner, attribute).
    table = getattr(importlib.import_module(module), "PRIVATE_READS", ())
    missing = [entry for entry in table if entry[-1] not in CANARIES]
    assert not missing, f"{module}.PRIVATE_READS entries without a canary here: {missing}"


def test_the_scan_finds_new_reads(tmp_path):
    # A new private read in any of the forms the scan knows is reported under its name.
    source = tmp_path / "new_module.py"
    source.write_text(
        "from keras.src.backend import config\n"
        "import tensorflow.python.ops.gen_math_ops\n"
        "def f(model, tensor):\n"
        "    a = model._brand_new_private\n"
        "    b = getattr(tensor, '_hidden_thing', None)\n"
        "    e = private_attribute(tensor, '_read_via_helper', 'keras')\n"
        "    g = _compat.private_attribute(layer, 'public_looking', 'tfmot')\n"
        "    h = _tfmot_private_module('sparsity.keras.new_module')\n"
        "    c = tf.__internal__.nest.flatten\n"
        "    d = self._own_state  # self is never reported\n"
        "    return model._keras_kd_mark  # keras_kd's own marks are not either\n"
    )
    found = private_reads([source])
    assert set(found) == {
        "keras.src.backend.config",
        "tensorflow.python.ops.gen_math_ops",
        "_brand_new_private",
        "_hidden_thing",
        "_read_via_helper",
        "public_looking",
        "private module sparsity.keras.new_module",
        "tf.__internal__.nest.flatten",
    }, found
    assert found["_brand_new_private"] == [f"{source}:4"]


def test_a_failing_canary_names_the_attribute_the_dependency_and_its_version():
    with pytest.raises(pytest.fail.Exception) as failure:
        require(False, TF, "_some_attribute", "its shape")
    message = str(failure.value)
    assert f"tensorflow {tf.__version__} changed `_some_attribute`" in message
    assert "its shape" in message


def _foreign_bases():
    import keras_tuner

    return [
        keras.losses.Loss(),
        tf_keras.losses.Loss(),
        keras.layers.Layer(),
        tf_keras.layers.Layer(),
        keras.Model(),
        tf_keras.Model(),
        keras.metrics.Mean(),
        tf_keras.metrics.Mean(),
        keras.callbacks.Callback(),
        tf_keras.callbacks.Callback(),
        keras_tuner.Tuner,
        keras_tuner.HyperModel(),
        tf.data.Dataset.range(1).map(lambda v: v),
    ]


def test_self_attributes_that_touch_a_base_class_have_a_canary():
    # `self._x` in a subclass of a Keras / keras-tuner class that also has `_x` overrides or writes the
    # base class's private state (e.g. tf_keras's `_allow_sum_over_batch_size`, keras-tuner's `_try_build`).
    names = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"\bself\.(_[A-Za-z]\w*)", line) + re.findall(
                r"^\s*def (_[A-Za-z]\w*)\(self", line
            ):
                if not name.startswith(_OWN_PREFIXES):
                    names.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{number}")
    bases = _foreign_bases()
    touching = {
        name: (where, [getattr(b, "__name__", type(b).__name__) for b in bases if hasattr(b, name)])
        for name, where in names.items()
        if any(hasattr(b, name) for b in bases)
    }
    missing = {name: v for name, v in touching.items() if name not in CANARIES}
    assert not missing, (
        "keras_kd uses `self._name` where a Keras / tf_keras / keras-tuner base class has the same private "
        "name (an override or a write into the base's state). Rename it, or add a canary:\n"
        + "\n".join(f"  {n} (also on {bases_}): {', '.join(w)}" for n, (w, bases_) in sorted(missing.items()))
    )


def canary_keras_tree_registration():
    """_jax_targets.register (JAX backend only): ``keras.src.tree.tree_api.register_tree_node_class(cls)``
    makes TeacherTargets a node of keras.tree, and Keras's TFDatasetAdapter converts JAX batches with
    ``tree.map_structure`` (so the node's fields are converted, not the object)."""
    module = _import("keras.src.tree.tree_api", KERAS)
    register = _get(module, "register_tree_node_class", KERAS, "registering a class with keras.tree")
    require_parameters(register, ["cls"], KERAS, "keras.src.tree.tree_api.register_tree_node_class")
    adapter = _import("keras.src.trainers.data_adapters.tf_dataset_adapter", KERAS).TFDatasetAdapter
    require(
        "tree.map_structure(convert_to_jax" in inspect.getsource(adapter.get_jax_iterator),
        KERAS,
        "TFDatasetAdapter.get_jax_iterator",
        "get_jax_iterator converting each batch with keras.tree.map_structure",
    )


CANARIES["keras.src.tree.tree_api.register_tree_node_class"] = canary_keras_tree_registration


def test_canary_keras_tree_registration():  # added after `test_canary`'s parameter list was built
    canary_keras_tree_registration()
