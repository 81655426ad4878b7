"""`align` and `Aligned`: wrap a student to learn a teacher's features, then export it.

It follows tfmot's wrap/strip shape: `align` wraps for training (a separate
training model that shares the student's layers), `Aligned.export` strips
for deployment; neither changes the structure of the user's models. The
models are built in `wiring`, the data paths live in `datasets`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd import losses as losses_lib
from keras_kd.alignment import datasets
from keras_kd.alignment import wiring
from keras_kd.alignment.taps import check_graph_model
from keras_kd.alignment.taps import fmt_shape


class Aligned:
    """A student wired to learn a teacher's intermediate features.

    Build it with `align`. The pieces, in the order of use:

    * `attach` (online teacher) or `cache_features` (teacher run once): the
      dataset for `model`.
    * `model`: the training model (student inputs + teacher features in,
      student logits out). Compile it with ``loss=aligned.loss(kd)`` and your
      metrics, then ``fit``. It shares the student's layers.
    * `hint_model`: FitNets' first stage, the student up to the tapped
      layers plus the projectors, trained on the feature loss alone.
    * `export`: the clean, trained student.

    Attributes:
        student: the student given to `align` (trained in place by `model`).
        teacher: the teacher (never trained).
        pairs: a tuple of `AlignmentPair`, one per aligned pair.
        model: the training model.
        hint_model: the FitNets hint-stage model: student inputs and teacher
            features in, the student up to the tapped layers plus the
            projectors, loss = the feature loss with the weights given to
            `align` (compile it with only an optimizer). It shares its layers
            with `model`.
        feature_extractor: the teacher's feature model, outputs
            ``[logits, f_1, ..., f_P]``.
        teacher_inputs: the teacher's input function given to `align`
            (None: ``x`` itself).
        student_inputs: the student's input function (None: ``x`` itself).
    """

    def __init__(
        self,
        student,
        teacher,
        pairs,
        *,
        projector="auto",
        feature_loss="mse",
        weight=0.5,
        init="auto",
        resample="auto",
        teacher_pool_size=None,
        teacher_inputs=None,
        student_inputs=None,
    ):
        wiring.check_one_teacher(teacher)
        check_graph_model(student, "student")
        check_graph_model(teacher, "teacher")
        self.student, self.teacher = student, teacher
        wiring.check_student(student)
        pairs = wiring.check_pairs(pairs)
        options = wiring.check_options(
            len(pairs), projector, feature_loss, weight, init, resample, teacher_pool_size
        )
        self.teacher_inputs = wiring.check_input_function(teacher_inputs, "teacher_inputs")
        self.student_inputs = wiring.check_input_function(student_inputs, "student_inputs")
        if teacher_inputs is None and student_inputs is None:
            wiring.check_same_inputs(student, teacher)
        built = wiring.build(student, teacher, pairs, options)
        self.feature_extractor = built.feature_extractor
        self.pairs = built.pairs
        self.model = built.model
        self.hint_model = built.hint_model
        self._loss_layer = built.loss_layer

    # -- hyperparameters

    @property
    def feature_weight(self) -> list:
        """Per-pair weights of the feature loss in `model` (a list of floats).

        Assign a number (all pairs) or a list to change them between epochs
        (e.g. from a callback), or ``aligned.feature_weight = 0.0`` for
        FitNets' second stage. `hint_model` keeps the weights given to `align`.
        """
        return [float(w) for w in np.asarray(self._loss_layer.pair_weights)]

    @feature_weight.setter
    def feature_weight(self, value):
        values = wiring.check_weights(value, "feature_weight", len(self.pairs))
        self._loss_layer.pair_weights.assign(np.asarray(values, np.float32))

    # -- data

    def attach(
        self, dataset: tf.data.Dataset, *, num_parallel_calls: Optional[int] = None
    ) -> tf.data.Dataset:
        """Adds the online teacher's logits and features to every batch.

        Each ``(x, y[, sample_weight])`` batch becomes
        ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t)[, sample_weight])``,
        where one inference-mode pass of `feature_extractor` on ``x`` gives
        the teacher logits ``t`` and features ``f_i``. Shuffling and
        augmentation before this transform stay consistent: the teacher sees
        exactly the batch the student sees. Use it for validation data too.
        A ``y`` that is already a `TeacherTargets` without teacher (example
        ids from `keras_kd.add_example_ids`) keeps its fields. With
        ``teacher_inputs``/``student_inputs`` (see `align`), the teacher runs
        on ``teacher_inputs(x)`` and ``x`` above is ``student_inputs(x)``.

        Args:
            dataset: a **batched** dataset of ``(x, y)`` or
                ``(x, y, sample_weight)``.
            num_parallel_calls: parallelism of the teacher map; ``None`` runs
                batches one at a time. Defaults to None.

        Returns:
            A dataset for ``aligned.model.fit``.

        Raises:
            TypeError: if ``dataset`` is not a ``tf.data.Dataset``.
            ValueError: for elements that are not ``(x, y[, sample_weight])``,
                an unbatched dataset, one that already carries teacher targets,
                or input functions that fail on ``x`` or whose outputs do not
                fit the teacher's or the student's inputs.

        Example:

        ```python
        train = aligned.attach(train_ds.shuffle(1000).batch(64))
        aligned.model.fit(train, validation_data=aligned.attach(val_ds.batch(256)))
        ```
        """
        return datasets.attach(self, dataset, num_parallel_calls)

    def cache_features(
        self,
        directory: Optional[str] = None,
        *,
        dtype: str = "float16",
        batch_size: int = 256,
        on_mismatch: str = "error",
        in_memory: Optional[bool] = None,
        overwrite: Optional[bool] = None,
    ) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
        """A transform that runs the teacher once and pairs its features by position.

        Apply it with ``raw_ds.apply(aligned.cache_features(...))`` to the
        raw, **unbatched** dataset of ``(x, y[, sample_weight])`` in a fixed
        order, *before* shuffling, augmentation and batching. On first use it
        runs `feature_extractor` over the dataset (in inference mode, in
        batches of ``batch_size``) and stores the teacher logits (float32)
        and features (``dtype``; pooled if ``align`` got ``teacher_pool_size``).
        The result yields unbatched
        ``((*flat(x), f_1, ..., f_P), TeacherTargets(labels=y, logits=t, example_id=n)[, sample_weight])``,
        the n-th cached row paired with the n-th example, so shuffle, batch and
        repeat afterwards (ids already set by `keras_kd.add_example_ids` are
        kept).

        With a ``directory``, the cache is stored there by the same storage
        engine as `keras_kd.cache_teacher_logits`, with the same guarantees
        (see the README's table): fields ``logits`` and ``feature_i`` in
        whole raw blocks with CRC32s, a schema-validated ``manifest.json``
        switched atomically, locks, only keras_kd's own names (a non-empty
        directory that keras_kd did not create is refused, never deleted).
        It is reused by later calls and processes when the fingerprint
        matches: the teacher's weights and architecture, the pairs, shapes,
        dtype, the element count and a digest of **every** element's inputs
        (one pass over the dataset when the transform is applied); the
        teacher also re-runs on the first examples and must reproduce the
        stored rows. A mismatch or damage raises `keras_kd.CacheMismatchError`
        / `keras_kd.CacheCorruptedError` (both ``ValueError``), or rebuilds
        with ``on_mismatch="rebuild"``. Caches up to 32 MiB are held in memory
        (``in_memory`` forces either). Without a directory the cache lives in
        memory.

        Do not put random augmentation or shuffling before this transform:
        the cached features would then belong to other pixels or examples.
        The first examples are read twice to detect that.

        With ``teacher_inputs``/``student_inputs`` (see `align`), both run on
        each example: the teacher (and its re-run on the first examples) on
        ``teacher_inputs(x)``, and the element's ``x`` above is
        ``student_inputs(x)``; the fingerprint digests both views, and both
        must be deterministic.

        Args:
            directory: where to store the cache, or ``None`` for memory.
            dtype: ``"float16"`` (default, half the bytes) or ``"float32"``
                for the features.
            batch_size: teacher batch size for the single pass (and rows
                per stored block). Defaults to 256.
            on_mismatch: ``"error"`` or ``"rebuild"``, as in
                `keras_kd.cache_teacher_logits`. Defaults to "error".
            in_memory: None (automatic: up to 32 MiB), True or False.
                Defaults to None.
            overwrite: deprecated; ``overwrite=True`` means
                ``on_mismatch="rebuild"``. Defaults to None.

        Returns:
            A function ``dataset -> dataset`` for ``dataset.apply``.

        Raises:
            ValueError: (when applied) for a batched, infinite, empty or
                non-deterministic dataset (or input function), input functions
                whose outputs do not fit the models, or teacher outputs with
                NaN/Inf.
            keras_kd.CacheMismatchError: a stored cache built for something
                else (``on_mismatch="error"``), or a directory keras_kd did not
                create that is not empty (always).
            keras_kd.CacheCorruptedError: a damaged stored cache
                (``on_mismatch="error"``).
            OSError: an unwritable directory or a full disk.

        Example:

        ```python
        train = raw_ds.apply(aligned.cache_features("cache/digits-features"))
        train = train.shuffle(2000).batch(64)
        aligned.model.fit(train, epochs=20)
        ```
        """
        if overwrite is not None:
            warnings.warn(
                "`overwrite=` is deprecated; use on_mismatch='rebuild' (overwrite=True) or 'error'.",
                DeprecationWarning,
                stacklevel=2,
            )
            on_mismatch = "rebuild" if overwrite else on_mismatch
        # Checked (and the directory resolved) before the teacher runs.
        directory = datasets.check_cache_options(directory, dtype, batch_size, on_mismatch, in_memory)
        return datasets.cache_transform(self, directory, dtype, batch_size, on_mismatch, in_memory)

    # -- loss, summary, export

    def loss(self, kd=None):
        """The loss to compile `model` with.

        The feature loss is already inside `model` (added with ``add_loss``),
        so this returns the logit loss: ``kd`` after checking it fits the
        student and teacher, or, with ``kd=None``, hard-label cross-entropy
        from logits (`keras_kd.DistillationLoss` with ``alpha=1``), i.e.
        feature alignment without logit distillation.

        Args:
            kd: a `keras_kd.DistillationLoss` (or any Keras loss on logits),
                or ``None``.

        Returns:
            A loss for ``aligned.model.compile(loss=...)``.

        Raises:
            ValueError: if the student's and the teacher's logits have
                different class counts.
            TypeError: if ``kd`` is not a loss.

        Example:

        ```python
        kd = keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)
        aligned.model.compile("adam", loss=aligned.loss(kd), metrics=["accuracy"])
        ```
        """
        _checks.check_num_classes(
            {
                f"the student {self.student.name!r}": _checks.num_classes_of(self.student),
                f"the teacher {self.teacher.name!r}": _checks.num_classes_of(self.feature_extractor),
            },
            fix="The teacher's first output must be logits over the student's classes.",
        )
        if kd is None:
            return losses_lib.DistillationLoss(alpha=1.0, name="hard_loss")
        if not callable(kd) and not isinstance(kd, str):
            raise TypeError(f"Expected `kd` to be a Keras loss or None. Received: kd={kd!r}")
        return kd

    def summary(self, print_fn: Optional[Callable[[str], Any]] = None):
        """Prints each pair: layers, shapes, the projector chosen and why, loss, weight.

        Args:
            print_fn: function that receives each line. Defaults to ``print``.
        """
        print_fn = print_fn or print
        print_fn(
            f"Feature alignment: student {self.student.name!r} ({_compat.flavour_of(self.student)}) <- "
            f"teacher {self.teacher.name!r} ({_compat.flavour_of(self.teacher)}), {len(self.pairs)} pair(s)"
        )
        if self.teacher_inputs is not None or self.student_inputs is not None:
            view = lambda fn: "x" if fn is None else f"{getattr(fn, '__name__', 'fn')}(x)"  # noqa: E731
            teacher_view, student_view = view(self.teacher_inputs), view(self.student_inputs)
            print_fn(f"  inputs: the teacher sees {teacher_view}, the student {student_view}")
        for i, pair in enumerate(self.pairs):
            print_fn(
                f"  [{i}] {pair.student_layer} {fmt_shape(pair.student_shape)} -> "
                f"{pair.teacher_layer} {fmt_shape(pair.teacher_shape)}"
            )
            print_fn(f"      projector={pair.projector!r}: {pair.steps}; init={pair.init}")
            print_fn(f"      feature_loss={pair.feature_loss!r}, weight={pair.weight:g}")
        n_proj = sum(
            int(np.prod(w.shape))
            for layer in self.model.layers
            if layer.name.startswith("kd_proj")
            for w in layer.weights
        )
        print_fn(f"  projector parameters: {n_proj} (trained, never exported)")

    def export(self, custom_objects: Optional[dict] = None):
        """The trained student alone, as a new model of the student's Keras.

        Rebuilt from the student's own config (so ``get_config()`` equals the
        original's) with the trained weights copied: no projectors, no extra
        inputs or outputs, not compiled (compile it again, as after tfmot's
        ``strip_pruning``). Independent of `model`: training further does not
        change an exported model. Ready for tfmot (tf_keras students) and
        TFLite conversion.

        Args:
            custom_objects: custom layers of the student that are not
                registered as serializable, by class name. Defaults to None.

        Returns:
            A Functional or Sequential model with the student's config.

        Example:

        ```python
        deployable = aligned.export()
        deployable.compile("adam", loss=keras_kd.DistillationLoss())  # e.g. for tfmot fine-tuning
        ```
        """
        wrapped = [
            layer.name
            for layer in self.student.layers
            if type(layer).__module__.startswith("tensorflow_model_optimization")
        ]
        if wrapped:
            raise ValueError(
                f"The student has tensorflow-model-optimization wrappers ({wrapped[:3]}): `export()` "
                "rebuilds a plain float student. Deploy a pruned student with "
                "`keras_kd.optimize.strip(model)` and a quantization-aware one with "
                "`keras_kd.optimize.to_tflite(model)`; or align first, export, then prune or quantize "
                "the exported student."
            )
        clean = type(self.student).from_config(self.student.get_config(), custom_objects=custom_objects)
        clean.set_weights(self.student.get_weights())
        return clean


def align(
    student,
    teacher,
    pairs: Sequence,
    *,
    projector="auto",
    feature_loss="mse",
    weight=0.5,
    init="auto",
    resample="auto",
    teacher_pool_size: Optional[int] = None,
    teacher_inputs: Optional[Callable] = None,
    student_inputs: Optional[Callable] = None,
) -> Aligned:
    """Wires a student to learn a teacher's intermediate features (FitNets, AT).

    For each pair ``(student_layer, teacher_layer)`` the student's feature is
    mapped into the teacher's feature space by a trainable projector and
    compared with a feature loss; shapes are read from the models' graphs
    (no dummy forward pass). Neither model's structure changes: the returned
    `Aligned` holds a separate training model that shares the student's
    layers, and `Aligned.export` gives the clean trained student.

    Projectors (``projector="auto"`` picks the simplest chain that fits and
    `Aligned.summary` says which):

    * equal shapes: nothing (identity);
    * ``(B, F)`` vectors and ``(B, T, D)`` sequences: ``Dense`` on the last axis;
    * ``(B, H, W, C)`` maps: 1x1 conv for a channel change (``"conv3x3"`` on
      request);
    * spatial mismatch: average pooling when the student's size is a whole
      multiple of the teacher's, else bilinear resize (``resample`` forces one);
    * sequence-length mismatch: average pooling or linear interpolation;
    * ``(B, H, W, C)`` maps <-> ``(B, N, D)`` tokens: reshape (a leading class
      token is dropped when ``N - 1`` is a square);
    * with ``feature_loss="attention"`` only positions must match, so
      ``"auto"`` maps no channels.

    Args:
        student: Keras 3 or tf_keras Functional or Sequential model that
            outputs logits. Nested Functional/Sequential sub-models are fine.
        teacher: Functional or Sequential model (any flavour) whose first
            output is its logits. It only runs in inference mode.
        pairs: list of ``(student_layer, teacher_layer)``; each layer is a
            name, a path ``"submodel/layer"`` for nested models, or the layer
            object.
        projector: ``"auto"``, ``"identity"``, ``"dense"``, ``"conv1x1"``,
            ``"conv3x3"``, a Keras layer, or ``fn(student_shape,
            teacher_shape) -> layer``; one value or one per pair. Defaults to
            "auto".
        feature_loss: ``"mse"`` (FitNets), ``"l1"``, ``"cosine"``,
            ``"attention"`` (attention transfer) or a callable
            ``fn(teacher_features, student_features) -> per-example values``;
            one or one per pair. Defaults to "mse".
        weight: weight of each pair's feature loss, added to the compiled
            loss; one or one per pair. Defaults to 0.5.
        init: projector initialisation: ``"identity"`` (needs equal widths),
            ``"zeros"``, ``"glorot"``, or ``"auto"`` (identity where the
            widths match, else Glorot). Defaults to "auto".
        resample: ``"auto"``, ``"pool"`` or ``"resize"`` for spatial or
            length mismatch. Defaults to "auto".
        teacher_pool_size: average-pool teacher maps and sequences by this
            factor before comparing (bounds the size of cached features).
            Defaults to None.
        teacher_inputs: a function ``x -> inputs`` of the teacher (and so of
            its tapped features), or None for ``x`` itself. Defaults to None.
        student_inputs: a function ``x -> inputs`` of the student (the
            inputs `Aligned.model` receives), or None for ``x`` itself.
            Defaults to None.

    Teacher and student on different inputs (a teacher at a higher
    resolution, or one that reads privileged features the student never has;
    Lopez-Paz et al. 2016): with ``teacher_inputs`` and/or ``student_inputs``
    the teacher and its tapped layers see ``teacher_inputs(x)`` and the
    student sees ``student_inputs(x)``, as in `keras_kd.with_teacher` and
    `keras_kd.cache_teacher_logits`. They receive ``x`` as the dataset holds
    it: a batch in `Aligned.attach`, one example in `Aligned.cache_features`
    (write them with ``...`` indexing, e.g. ``lambda x: x[..., ::2, :]``, to
    use both). Their outputs are checked against the models' inputs when the
    dataset is attached. With the cache, the fingerprint digests both views
    of every element (a changed function is refused), the teacher re-runs on
    its view when a stored cache is opened, and both must be deterministic
    (augment after the transform). Without them the student and the teacher
    must take inputs of the same shapes.

    Returns:
        An `Aligned`.

    Raises:
        TypeError: for a subclassed model or a non-model, a list of teachers
            (`align` taps one teacher; the message names the ensemble
            alternatives), or input functions that are not callable.
        ValueError: for an unknown layer name (with the closest names), an
            ambiguous name, a pair whose shapes cannot be aligned (with both
            shapes and the projector tried), a shared layer, or a bad argument.

    Warns:
        UserWarning: when the teacher's tapped layers are trainable.

    Example:

    ```python
    aligned = keras_kd.alignment.align(
        student, teacher, pairs=[("s_conv2", "t_conv3")], weight=0.5)
    aligned.summary()
    train = aligned.attach(train_ds.batch(64))
    kd = keras_kd.DistillationLoss(temperature=4.0)
    aligned.model.compile("adam", loss=aligned.loss(kd), metrics=["accuracy"])
    aligned.model.fit(train, epochs=10)
    deployable = aligned.export()
    ```

    FitNets' two stages: fit ``aligned.hint_model`` (compiled with only an
    optimizer) on the same data, then set ``aligned.feature_weight = 0.0``
    and fit ``aligned.model`` with the distillation loss.

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
        Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
        Lopez-Paz, Bottou, Schoelkopf & Vapnik, "Unifying Distillation and
        Privileged Information", ICLR 2016.
    """
    return Aligned(
        student,
        teacher,
        pairs,
        projector=projector,
        feature_loss=feature_loss,
        weight=weight,
        init=init,
        resample=resample,
        teacher_pool_size=teacher_pool_size,
        teacher_inputs=teacher_inputs,
        student_inputs=student_inputs,
    )
