"""The Keras 3 <-> tf_keras bridge: equal after conversion, equal after training.

For every family of supported layers and in both directions (the ``K``
fixture builds the source model), the converted model must give the
source's outputs, hold the same weights and non-trainable state, and after
the same SGD steps on the same batch have the same weights, state and
outputs. The reference is the source flavour itself, trained the same steps,
plus hand formulas (NumPy) for what the two flavours define differently.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from keras_kd import optimize

RNG = np.random.default_rng(0)


def other(K):
    if K is keras:
        return optimize.to_tf_keras, optimize.to_keras3, tf_keras
    return optimize.to_keras3, optimize.to_tf_keras, keras


def bn(K, **kwargs):
    # A tf_keras source uses the non-fused kernel: its fused kernel's moving
    # variance cannot be reproduced by Keras 3 (tested separately below).
    return K.layers.BatchNormalization(**({"fused": False} if K is tf_keras else {}), **kwargs)


def conv(K):
    L = K.layers
    inp = K.Input((8, 8, 3), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = bn(K, momentum=0.5)(h)
    h = L.DepthwiseConv2D(3, padding="same")(h)
    h = L.SeparableConv2D(4, 3, activation="hard_sigmoid")(h)
    h = L.MaxPooling2D()(h)
    h = L.Add()([h, L.AveragePooling2D(pool_size=1)(h)])
    h = L.ZeroPadding2D()(h)
    h = L.UpSampling2D()(h)
    h = L.Conv2D(2, 1, strides=2)(h)
    h = L.Concatenate()([L.GlobalAveragePooling2D()(h), L.GlobalMaxPooling2D()(h), L.Flatten()(h)])
    h = L.Dense(16)(h)
    h = bn(K)(h)
    h = L.LeakyReLU(0.2)(h)
    h = L.Activation("gelu")(h)
    h = L.ReLU(max_value=6.0)(h)
    h = L.LayerNormalization()(h)
    h = L.Lambda(lambda v: v * 2.0)(h)
    h = L.Reshape((4, 4))(h)
    h = L.Conv1D(3, 2, activation="tanh")(h)
    h = L.GlobalAveragePooling1D()(h)
    return K.Model(inp, L.Dense(5, activation="hard_sigmoid")(h), name="conv"), RNG.normal(size=(6, 8, 8, 3))


def recurrent(K):
    L = K.layers
    tokens = K.Input((6,), dtype="int32")
    h = L.Embedding(20, 8, mask_zero=True)(tokens)
    h = L.LSTM(8, return_sequences=True, recurrent_activation="hard_sigmoid")(h)
    h = L.GRU(4, recurrent_activation="hard_sigmoid")(h)
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9], [3, 0, 0, 0, 0, 0]], dtype="int32")
    return K.Model(tokens, L.Dense(3)(h), name="recurrent"), x


def masking(K):
    L = K.layers
    inp = K.Input((5, 3))
    h = L.Masking(0.0)(inp)
    h = L.SimpleRNN(4, return_sequences=True)(h)
    h = L.GlobalAveragePooling1D()(h)  # masked average: padded steps left out
    x = RNG.normal(size=(3, 5, 3))
    x[0, 3:] = 0.0
    x[2, 1:] = 0.0
    return K.Model(inp, L.Dense(2)(h), name="masking"), x


def attention(K):
    q = K.Input((4, 6))
    h = K.layers.MultiHeadAttention(2, 3)(q, q)
    h = K.layers.LayerNormalization()(K.layers.Add()([q, h]))
    return K.Model(q, K.layers.Dense(2)(K.layers.Flatten()(h)), name="mha"), RNG.normal(size=(3, 4, 6))


def sequential(K):
    model = K.Sequential(
        [K.Input((16,)), K.layers.Dense(8, activation="swish"), bn(K), K.layers.Dense(4, activation="elu")],
        name="seq",
    )
    return model, RNG.normal(size=(5, 16))


def nested(K):
    inner = K.Sequential([K.Input((8,)), K.layers.Dense(8, activation="selu")], name="inner")
    inp = K.Input((16,))
    h = inner(K.layers.Dense(8)(inp))
    return K.Model(inp, K.layers.Dense(4)(h), name="outer"), RNG.normal(size=(5, 16))


def normalization(K):
    x = RNG.normal(3.0, 2.0, size=(64, 5))
    norm = K.layers.Normalization()
    norm.adapt(x)
    inp = K.Input((5,))
    return K.Model(inp, K.layers.Dense(3)(norm(inp)), name="norm"), x[:6]


def wrappers(K):
    L = K.layers
    tokens = K.Input((6,), dtype="int32")
    h = L.Embedding(20, 4, mask_zero=True)(tokens)
    h = L.Bidirectional(L.GRU(3, return_sequences=True, recurrent_activation="hard_sigmoid"))(h)
    h = L.TimeDistributed(L.Dense(2, activation="hard_sigmoid"))(h)
    h = L.Reshape((6, 2, 1))(h)
    h = L.Cropping2D(((1, 0), (0, 1)))(L.Conv2DTranspose(2, 2)(h))
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9], [3, 0, 0, 0, 0, 0]], dtype="int32")
    return K.Model(tokens, L.Dense(3)(L.Flatten()(h)), name="wrappers"), x


def more_layers(K):
    L = K.layers
    inp = K.Input((6, 4))
    h = L.SeparableConv1D(4, 2, padding="same")(inp)
    h = L.Conv1DTranspose(4, 2)(h)
    h = L.GroupNormalization(2)(h)
    h = L.PReLU()(h)
    h = L.Attention()([h, h])
    h = L.AdditiveAttention()([h, L.Dense(4)(h)])
    h = L.Multiply()([h, L.UnitNormalization()(h)])
    h = L.Permute((2, 1))(h)
    h = L.Reshape((4, 7, 1))(h)
    h = L.Conv2D(2, 2, dilation_rate=2)(h)
    h = L.Resizing(4, 4)(h)
    h = L.ConvLSTM2D(2, 2)(L.Reshape((2, 4, 4, 1))(L.Flatten()(h)))
    return K.Model(inp, L.Dense(3)(L.Flatten()(h)), name="more"), RNG.normal(size=(3, 6, 4))


BUILDERS = [conv, recurrent, masking, attention, sequential, nested, normalization, wrappers, more_layers]


def state(model):
    """{layer path: [trainable..., non-trainable...] values}, nested models expanded."""
    found = {}

    def walk(m, prefix):
        for layer in m.layers:
            if hasattr(layer, "layers") and isinstance(layer.layers, list) and layer.layers:
                walk(layer, prefix + layer.name + "/")
            elif layer.weights:
                found[prefix + layer.name] = [np.asarray(w) for w in layer.get_weights()]

    walk(model, "")
    return found


def sgd_steps(K, model, x, target, steps=3):
    """`steps` SGD steps (lr 0.05) on the mean squared distance to `target`."""
    optimizer = K.optimizers.SGD(0.05)
    if K is keras and keras.backend.backend() == "jax":
        return _jax_sgd_steps(model, optimizer, x, target, steps)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(tf.square(out - target))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))


def _jax_sgd_steps(model, optimizer, x, target, steps):
    """The same steps for a Keras 3 model on JAX: `jax.grad` of its stateless call."""
    import jax

    def loss_fn(trainable, non_trainable):
        out, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.mean(jax.numpy.square(out - target)), non_trainable

    for _ in range(steps):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        grads, non_trainable = jax.grad(loss_fn, has_aux=True)(trainable, non_trainable)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        for variable, value in zip(model.non_trainable_variables, non_trainable):
            variable.assign(value)


def assert_same_state(a, b, atol):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert len(sa[name]) == len(sb[name]), name
        for wa, wb in zip(sa[name], sb[name]):
            np.testing.assert_allclose(wa, wb, atol=atol, rtol=atol, err_msg=name)


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_equal_after_conversion_and_after_training(K, build):
    model, x = build(K)
    x = x if x.dtype.kind == "i" else x.astype("float32")
    convert, _, target_module = other(K)
    converted = convert(model)
    # After conversion: outputs, and every weight (trainable and not).
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(model(x)), atol=1e-5)
    assert_same_state(model, converted, atol=0)
    # After the same training steps in each flavour.
    target = RNG.normal(size=tuple(np.asarray(model(x)).shape)).astype("float32")
    sgd_steps(K, model, x, target)
    sgd_steps(target_module, converted, x, target)
    # 3 SGD steps of float32 arithmetic in different kernel orders: 1e-5.
    assert_same_state(model, converted, atol=1e-5)
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(model(x)), atol=1e-5)


# ---------------------------------------------------------------------------
# What the two flavours define differently, against hand formulas
# ---------------------------------------------------------------------------


def _activation_names(module):
    return {
        n
        for n in dir(module.activations)
        if not n.startswith("_")
        and callable(getattr(module.activations, n))
        and not isinstance(getattr(module.activations, n), type)
        and n not in ("get", "serialize", "deserialize")
    }


def test_every_shared_activation_name_keeps_its_meaning():
    shared = sorted(_activation_names(keras) & _activation_names(tf_keras))
    grid = tf.constant(np.linspace(-7, 7, 141, dtype="float32")[None])
    def values(module, name):
        return np.asarray(module.activations.get(name)(grid))

    # Beyond float32 rounding (relative 1e-6: exp(7) ~ 1097 differs in its last bits on JAX vs TF).
    differ = {n for n in shared
              if not np.allclose(values(keras, n), values(tf_keras, n), rtol=1e-6, atol=1e-6)}
    # The one name that means two functions (hand formulas).
    assert differ == {"hard_sigmoid"}
    v = np.asarray(grid)
    np.testing.assert_allclose(values(keras, "hard_sigmoid"), np.clip(v / 6 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(values(tf_keras, "hard_sigmoid"), np.clip(0.2 * v + 0.5, 0, 1), atol=1e-6)
    for K in (keras, tf_keras):
        convert, back, _ = other(K)
        for name in shared:
            inp = K.Input((141,))
            model = K.Model(inp, K.layers.Activation(name)(inp))
            converted = convert(model)
            expected = np.asarray(model(grid))
            np.testing.assert_allclose(np.asarray(converted(grid)), expected, rtol=1e-6, atol=1e-6,
                                       err_msg=name)
            # Back again: the source flavour's own built-in function.
            again = back(converted)
            assert K.activations.get(again.layers[-1].get_config()["activation"]) is K.activations.get(name)
            np.testing.assert_allclose(np.asarray(again(grid)), expected, rtol=1e-6, atol=1e-6,
                                       err_msg=name)


def test_translated_activation_saves_and_loads(tmp_path):
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="hard_sigmoid")(inp))
    converted = optimize.to_tf_keras(model)
    path = str(tmp_path / "m.keras")
    converted.save(path)
    loaded = tf_keras.models.load_model(path)
    x = RNG.normal(size=(4, 4)).astype("float32") * 4
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_keras3_only_activation_is_a_clear_error():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="relu6", name="d")(inp))
    with pytest.raises(ValueError, match=r"d \(Dense\): activation 'relu6' has no equivalent in tf_keras"):
        optimize.to_tf_keras(model)


def test_adapted_normalization_survives_the_readme_chain():
    x = RNG.normal(3.0, 2.0, size=(200, 5)).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    inp = keras.Input((5,))
    model = keras.Model(inp, norm(inp))
    expected = (x - x.mean(0)) / np.sqrt(x.var(0))  # the formula, from the data
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4)
    tfk = optimize.to_tf_keras(model)
    np.testing.assert_allclose(np.asarray(tfk(x)), expected, atol=1e-4)
    back = optimize.to_keras3(optimize.strip(tfk))
    np.testing.assert_allclose(np.asarray(back(x)), expected, atol=1e-4)


def test_explicit_masks_are_kept_or_refused():
    L = keras.layers
    tokens = np.array([[1, 2, 0, 0], [3, 4, 5, 6]], dtype="int32")
    # A mask given as a model input: kept.
    tok = keras.Input((4,), dtype="int32")
    mask = keras.Input((4,), dtype="bool")
    emb = L.Embedding(10, 3)
    model = keras.Model([tok, mask], L.GlobalAveragePooling1D()(emb(tok), mask=mask))
    converted = optimize.to_tf_keras(model)
    table = emb.get_weights()[0]
    expected = np.stack([table[r[r != 0]].mean(0) for r in tokens])  # masked mean by hand
    for m in (model, converted):
        np.testing.assert_allclose(np.asarray(m([tokens, tokens != 0])), expected, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(optimize.to_keras3(converted)([tokens, tokens != 0])), expected, atol=1e-6
    )
    # A mask computed with keras.ops: refused, never dropped.
    tok = keras.Input((4,), dtype="int32")
    pooled = L.GlobalAveragePooling1D()(L.Embedding(10, 3)(tok), mask=keras.ops.not_equal(tok, 0))
    with pytest.raises(ValueError, match=r"computes an explicit `mask=`.*model input"):
        optimize.to_tf_keras(keras.Model(tok, pooled))


def test_mask_analysis_runs_once_per_model(monkeypatch):
    # The explicit-mask set is computed once per rebuilt model, not once per op
    # (it was O(ops^2)); the outputs of a deep masked model still match.
    from keras_kd.optimize import bridge

    calls = []
    original = bridge._explicit_masks
    monkeypatch.setattr(bridge, "_explicit_masks", lambda *a: calls.append(1) or original(*a))
    tok = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(tok)
    for _ in range(8):
        h = keras.layers.Dense(4)(h)
    model = keras.Model(tok, keras.layers.GlobalAveragePooling1D()(h))
    converted = optimize.to_tf_keras(model)
    assert len(calls) == 1
    tokens = np.array([[1, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8]], "int32")
    np.testing.assert_allclose(np.asarray(converted(tokens)), np.asarray(model(tokens)), atol=1e-6)


def test_batch_normalization_moving_variance_by_hand():
    # One training step, momentum 0.5, on 4 examples of a 4-D input: the
    # moving variance becomes 0.5 * 1 + 0.5 * biased batch variance (Keras 3's
    # rule; tf_keras's fused kernel would use n / (n - 1) = 4/3 times it).
    x = RNG.normal(size=(4, 1, 1, 2)).astype("float32") * 3
    inp = keras.Input((1, 1, 2))
    model = keras.Model(inp, keras.layers.BatchNormalization(momentum=0.5)(inp))
    converted = optimize.to_tf_keras(model)
    for m in (model, converted):
        m(x, training=True)
        moving_var = m.layers[-1].get_weights()[3]
        np.testing.assert_allclose(moving_var, 0.5 + 0.5 * x.reshape(4, 2).var(0), rtol=1e-5)


def test_fused_tf_keras_batch_normalization_warns():
    inp = tf_keras.Input((4, 4, 2))
    model = tf_keras.Model(inp, tf_keras.layers.BatchNormalization(name="bn")(inp))
    with pytest.warns(UserWarning, match=r"bn \(BatchNormalization\).*Bessel.*fused=False"):
        optimize.to_keras3(model)
    inp = tf_keras.Input((4, 4, 2))
    model = tf_keras.Model(inp, tf_keras.layers.BatchNormalization(fused=False)(inp))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize.to_keras3(model)


def test_batch_normalization_over_several_axes_is_refused_by_name():
    # tf_keras normalizes over a list of axes; Keras 3 takes one. Taking the
    # first axis would normalize differently: refused, naming the argument.
    inp = tf_keras.Input((3, 4, 2))
    model = tf_keras.Model(inp, tf_keras.layers.BatchNormalization(axis=[1, 3], name="bn2")(inp))
    with pytest.raises(ValueError, match=r"bn2 \(BatchNormalization\): argument `axis=\[1, 3\]`.*one axis"):
        optimize.to_keras3(model)


def test_translator_table_entries_apply_to_subclasses():
    # LSTM, GRU and SimpleRNN take the "RNN" entry by their MRO; a layer class
    # without an entry is translated generically.
    from keras_kd.optimize import bridge

    for name in ("LSTM", "GRU", "SimpleRNN"):
        for K in (keras, tf_keras):
            assert bridge.translator(getattr(K.layers, name)) is bridge.TRANSLATORS["RNN"]
    assert bridge.translator(keras.layers.Dense) == bridge.LayerTranslator()
    inp = keras.Input((5, 3))
    lstm = keras.layers.LSTM(2, zero_output_for_mask=True, name="lstm")
    model = keras.Model(inp, lstm(keras.layers.Masking()(inp)))
    converted = optimize.to_tf_keras(model)
    assert converted.get_layer("lstm").zero_output_for_mask is True
    x = RNG.normal(size=(2, 5, 3)).astype("float32")
    x[0, 3:] = 0.0  # masked time steps
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(model(x)), atol=1e-6)


def test_masking_and_spectral_normalization_errors():
    # Masking converts (its mask ops are the layer's own) ...
    inp = keras.Input((5, 3))
    model = keras.Model(inp, keras.layers.LSTM(2)(keras.layers.Masking()(inp)))
    optimize.to_tf_keras(model)
    # ... SpectralNormalization is refused by name, with the way out.
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.SpectralNormalization(keras.layers.Dense(3), name="sn")(inp))
    with pytest.raises(ValueError, match=r"sn \(SpectralNormalization\): the bridge does not rebuild"):
        optimize.to_tf_keras(model)


# ---------------------------------------------------------------------------
# custom_objects given wrongly, and a model already in the target flavour
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["to_tf_keras", "to_keras3"])
def test_bad_custom_objects_name_the_entry_and_what_is_expected(direction):
    source, target = (keras, tf_keras) if direction == "to_tf_keras" else (tf_keras, keras)
    convert = getattr(optimize, direction)

    class Doubler(source.layers.Layer):
        def call(self, x):
            return x * 2.0

    model = source.Sequential([source.Input((4,)), Doubler(name="twice")])
    target_name = target.__name__
    pattern = rf"twice \(Doubler\): `custom_objects\['Doubler'\]` is 3, not a {target_name} layer class"
    with pytest.raises(ValueError, match=pattern):
        convert(model, custom_objects={"Doubler": 3})
    pattern = rf"is {source.layers.Layer.__module__}\.Layer, not a {target_name} layer class"
    with pytest.raises(ValueError, match=pattern):
        convert(model, custom_objects={"Doubler": source.layers.Layer})  # the source flavour's class
    with pytest.raises(ValueError, match=rf"returned .* of type Identity, not a {target_name} layer"):
        convert(model, custom_objects={"Doubler": lambda layer: source.layers.Identity()})
    with pytest.raises(ValueError, match=r"keys that match no layer class of the model: \['Doublr'\]"):
        convert(model, custom_objects={"Doublr": target.layers.Layer})  # a typo

    class TargetDoubler(target.layers.Layer):
        def call(self, x):
            return x * 2.0

    converted = convert(model, custom_objects={"Doubler": lambda layer: TargetDoubler(name=layer.name)})
    x = RNG.normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(np.asarray(converted(x)), 2.0 * x)  # the hand value


def test_a_model_already_in_the_target_flavour_says_so():
    with pytest.raises(TypeError, match=r"Received a Keras 3 model .* needs no conversion"):
        optimize.to_keras3(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match=r"Received a tf_keras model .* which tfmot takes as it is"):
        optimize.to_tf_keras(tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)]))
