"""`TeacherLogitCache`: the ``Dataset -> Dataset`` transform of the teacher-logit cache.

It validates its settings at construction, and when applied: checks the
dataset, fingerprints teachers, dataset and settings
(`keras_kd.cache.fingerprint`), opens the matching cache or builds it
(`keras_kd.cache.build.Build.ensure`), and pairs every element with its row
(`keras_kd.cache.reader`).
"""

import math

import keras
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd import targets as targets_lib
from keras_kd.cache import build as build_lib
from keras_kd.cache import files as fs
from keras_kd.cache import fingerprint
from keras_kd.cache import manifest as manifest_lib
from keras_kd.cache import reader
from keras_kd.cache.errors import warn
from keras_kd.cache.teacher import Teachers

_SAMPLE_SIZE = 64  # elements read twice to detect a dataset that changes between passes


def _with_labels(dataset):
    """``(dataset of (x, y[, w]), labelled)``: ``x`` alone (or ``(x,)``) gets placeholder labels."""
    spec = getattr(dataset, "element_spec", None)
    if not isinstance(dataset, tf.data.Dataset) or (isinstance(spec, tuple) and len(spec) != 1):
        return dataset, True  # `_check_dataset` judges it
    if isinstance(spec, tuple) and isinstance(spec[0], tuple) and len(spec[0]) in (2, 3):
        return dataset, True  # ((x, y),): refused there, not guessed
    return dataset.map(lambda x: (x, tf.constant(0, tf.int32))), False


def _callable_or_none(fn, name, signature):
    if fn is not None and not callable(fn):
        raise ValueError(f"Expected `{name}` to be None or a callable {signature}. Received: {name}={fn!r}")
    return fn


class TeacherLogitCache:
    """The transform returned by `cache_teacher_logits` (see there for the arguments).

    Call it on a dataset (or pass it to ``dataset.apply``) to build the cache
    if needed and get the dataset with teacher targets; use `build` to only
    write this worker's part. The object holds configuration only; every call
    checks the directory afresh.

    Attributes:
        manifest: the manifest of the cache once it is complete, else None.
        num_classes: the teacher's class count (last axis of its logits),
            known after the first use.

    Example:

    ```python
    cache = keras_kd.cache_teacher_logits(teacher, "cache/run1", top_k=10)
    train = raw_ds.apply(cache)
    print(cache.num_classes, cache.manifest["num_examples"])
    ```
    """

    def __init__(
        self,
        teacher,
        directory,
        *,
        top_k=None,
        dtype="float16",
        batch_size=256,
        augment=None,
        views=1,
        seed=0,
        num_shards=None,
        shard_index=None,
        input_context=None,
        on_mismatch="error",
        output_index=0,
        shard_size=None,
        verify="checksum",
        wait_timeout=None,
        verbose=1,
        in_memory=None,
        ensemble="mean_logits",
        teacher_inputs=None,
        student_inputs=None,
    ):
        models = _checks.teacher_list(teacher, output_index if isinstance(output_index, int) else 0)
        for i, model in enumerate(models):
            _compat.check_model(model, "teacher" if len(models) == 1 else f"teacher[{i}]")
        self.teacher = teacher
        self.ensemble = _checks.one_of(ensemble, "ensemble", targets_lib.ENSEMBLES)
        # Checked (valid UTF-8, absolute, symlinks resolved) before the teacher runs.
        self.directory = fs.resolve_directory(directory, "teacher-logit cache")
        self.top_k = _checks.positive_int(top_k, "top_k", allow_none=True)
        dtype = getattr(dtype, "name", None) or str(dtype)
        self.dtype = _checks.one_of(dtype, "dtype", tuple(manifest_lib.DTYPES))
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.augment = _callable_or_none(augment, "augment", "fn(x, seed)")
        self.views = _checks.positive_int(views, "views")
        if self.views > 1 and augment is None:
            raise ValueError(
                f"views={views} needs an `augment` function: without augmentation every view is the "
                "same example."
            )
        self.seed = _checks.integer(seed, "seed")
        self.teacher_inputs = _callable_or_none(teacher_inputs, "teacher_inputs", "fn(x)")
        self.student_inputs = _callable_or_none(student_inputs, "student_inputs", "fn(x)")
        self._set_shards(num_shards, shard_index, input_context)
        self.on_mismatch = _checks.one_of(on_mismatch, "on_mismatch", ("error", "rebuild"))
        self.output_index = output_index
        self.shard_size = _checks.positive_int(shard_size, "shard_size", allow_none=True)
        self.verify = _checks.one_of(verify, "verify", ("checksum", "size"))
        self.wait_timeout = _checks.number(wait_timeout, "wait_timeout", low=0, allow_none=True)
        self.verbose = _checks.one_of(verbose, "verbose", (0, 1, 2))
        self.in_memory = _checks.one_of(in_memory, "in_memory", (None, True, False))
        self.teachers = Teachers(
            models, self.ensemble, output_index, self.top_k, self.dtype, self.augment, self.views, self.seed,
            self.teacher_inputs, self.student_inputs,
        )  # fmt: skip
        self.manifest = None
        self.num_classes = None

    def _set_shards(self, num_shards, shard_index, input_context):
        if input_context is not None:
            if num_shards is not None or shard_index is not None:
                raise ValueError("Pass either `input_context` or `num_shards`/`shard_index`, not both.")
            num_shards = input_context.num_input_pipelines
            shard_index = input_context.input_pipeline_id
        if (num_shards is None) != (shard_index is None):
            raise ValueError(
                "Expected `num_shards` and `shard_index` to be given together. "
                f"Received: num_shards={num_shards!r}, shard_index={shard_index!r}"
            )
        self.num_shards = _checks.positive_int(num_shards, "num_shards", allow_none=True) or 1
        if shard_index is not None:
            if not 0 <= _checks.integer(shard_index, "shard_index") < self.num_shards:
                raise ValueError(
                    f"Expected `shard_index` in [0, {self.num_shards}). Received: shard_index={shard_index!r}"
                )
        self.shard_index = 0 if shard_index is None else int(shard_index)

    # -- public -----------------------------------------------------------

    def __call__(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Builds the cache if needed and returns the dataset with teacher targets.

        Args:
            dataset: the unbatched ``(x, y[, sample_weight])`` dataset.

        Returns:
            A dataset of ``(x, TeacherTargets, [sample_weight])`` elements,
            with the same number of elements, in the same order.

        Raises:
            See `cache_teacher_logits`; with several workers, `TimeoutError`
            when the other parts do not appear within ``wait_timeout``.
        """
        dataset, labelled = _with_labels(dataset)
        manifest, stored = self._ensure(dataset, wait=True, read=True)
        # Unlabelled data, as `keras_kd.add_example_ids` marks it: no hard-label term.
        return reader.read(dataset, manifest, stored, self.teachers, labelled)

    def build(self, dataset: tf.data.Dataset) -> dict:
        """Writes this worker's part of the cache (all of it without sharding).

        Does not wait for the other workers: use it for build-only jobs. The
        worker that completes the last part writes the manifest.

        Args:
            dataset: the unbatched ``(x, y[, sample_weight])`` dataset, the
                same for every worker.

        Returns:
            The manifest (a dict) when the cache is complete, else this
            part's journal (``"complete": True`` once the part is written).
        """
        return self._ensure(_with_labels(dataset)[0], wait=False, read=False)[0]

    def check_student(self, student):
        """Checks that ``student`` outputs as many classes as the cached teacher.

        Call it after the cache was built or read (e.g. after
        ``dataset.apply``). `DistillationLoss` also refuses a mismatch, but
        only at the first training step.

        Args:
            student: a Keras 3 or tf_keras model.

        Raises:
            ValueError: when the class counts differ, or the cache was not
                used yet.
        """
        if self.num_classes is None:
            raise ValueError("The cache has not been built or read yet; apply it to the dataset first.")
        _compat.check_model(student, "student")
        index = self.output_index if isinstance(self.output_index, int) else 0
        classes = _checks.num_classes_of(student, index)
        if classes is not None and classes != self.num_classes:
            raise ValueError(
                f"The student outputs {classes} classes but the teacher-logit cache at "
                f"{self.directory!r} holds logits for {self.num_classes} classes."
            )

    # -- fingerprint ------------------------------------------------------

    def _say(self, message):
        if self.verbose:
            print(f"keras_kd cache: {message}", flush=True)

    def _check_dataset(self, dataset):
        _checks.require_dataset(dataset, hint="Wrap arrays with tf.data.Dataset.from_tensor_slices((x, y)).")
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(
                "Expected a dataset of unbatched `(x, y)` or `(x, y, sample_weight)` elements, or of `x` "
                f"alone (unlabelled data). Received element_spec={spec}."
            )
        if isinstance(spec[1], targets_lib.TeacherTargets.Spec):
            raise ValueError(
                "The dataset already carries teacher targets; apply the teacher-logit cache to the raw "
                "dataset."
            )
        if not isinstance(spec[1], tf.TensorSpec):
            raise ValueError(
                f"Expected the labels `y` of each element to be a single tensor. Received: y spec={spec[1]}."
            )
        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "The dataset given to `cache_teacher_logits` is infinite (it repeats forever). "
                "The cache needs a finite dataset: apply the transform before `.repeat()`."
            )
        if cardinality == 0:
            raise ValueError("The dataset given to `cache_teacher_logits` is empty.")
        first = self.teachers.models[0]
        # The labels decide when the teacher cannot (unbuilt Sequential, callables).
        if self.teacher_inputs is None and _checks.is_batched(spec[0], first, spec[1]) is True:
            raise ValueError(
                f"`cache_teacher_logits` received batched elements (x spec {spec[0]}, y spec {spec[1]}; "
                f"the teacher's inputs have rank {_checks.model_input_ranks(first)} with the batch axis, "
                "None when unknown). Apply it to the "
                "unbatched dataset and batch afterwards: raw.apply(cache).shuffle(n).batch(b)."
            )
        return cardinality if cardinality >= 0 else None

    def _fingerprint(self, dataset, count_hint):
        teacher_shape = self.teachers.output_shape(dataset)
        settings = {"top_k": self.top_k, "dtype": self.dtype, "output_index": repr(self.output_index)}
        if len(self.teachers.models) > 1:
            settings["ensemble"] = self.ensemble
        settings.update(self.teachers.transform_settings(dataset))
        digest, count = fingerprint.inputs_digest(dataset)
        if count_hint is not None and count != count_hint:
            raise ValueError(
                f"The dataset reports {count_hint} elements (its cardinality) but yields {count}."
            )
        if count == 0:
            raise ValueError("The dataset given to `cache_teacher_logits` is empty.")
        fp = {
            "teacher": {"output_shape": [None, *teacher_shape]},
            "teachers": [
                {
                    "flavour": _compat.flavour_of(m),
                    "weights_digest": fingerprint.weights_digest(m),
                    "architecture_digest": fingerprint.architecture_digest(m),
                }
                for m in self.teachers.models
            ],
            "dataset": {
                "element_spec": fingerprint.describe_spec(dataset.element_spec),
                "count": count,
                "inputs_digest": digest,
            },
            "settings": settings,
        }
        return fp, teacher_shape, count

    # -- build or read ------------------------------------------------------

    def _ensure(self, dataset, wait, read):
        known_count = self._check_dataset(dataset)
        suspicious = fingerprint.random_ops(dataset)
        if suspicious:
            warn(
                "The dataset given to `cache_teacher_logits` looks random before the transform "
                f"(it contains {', '.join(suspicious)}). The cache pairs teacher logits with "
                "elements by position, so random augmentation or reshuffling before it gives the "
                "student logits of other inputs. Apply shuffling and augmentation after the "
                "transform, or pass `augment=fn(x, seed)` to cache augmentation-consistent views."
            )
        store = manifest_lib.store(self.directory)
        store.owned()  # refuses a directory of another keras_kd cache kind before any work
        fp, teacher_shape, count = self._fingerprint(dataset, known_count)
        self.num_classes = teacher_shape[-1]
        top_k, dtype, views = self.top_k, self.dtype, self.views
        build = build_lib.Build(
            store,
            fp,
            manifest_lib.layout(max(1, self.batch_size // views), views, teacher_shape, top_k, dtype),
            count,
            self.shard_index,
            self.num_shards,
            diff=lambda old, n: manifest_lib.diff(old, fp, n),
            extra=lambda lay: manifest_lib.extra(lay, teacher_shape, top_k, dtype, views),
            validate_extra=manifest_lib.validate_extra,
            checksum=self.verify == "checksum",
            say=self._say,
        )
        doc, stored = build.ensure(
            probe=lambda stored, manifest: self._probe(dataset, manifest, stored),
            produce=lambda start, rows, layout: self._produce(dataset, start, rows, layout),
            blocks_per_file=self._blocks_per_file,
            on_mismatch=self.on_mismatch,
            in_memory=self.in_memory,
            before_build=lambda: self._refuse_changing(dataset, suspicious),
            wait=wait,
            wait_timeout=self.wait_timeout,
            read=read,
        )
        if "num_blocks" in doc:  # a manifest, not a part's journal
            self.manifest = doc
        elif self.verbose == 2:
            self._say(f"part {self.shard_index} of {self.num_shards} written")
        return doc, stored

    def _refuse_changing(self, dataset, suspicious):
        """Before a build: a dataset that differs between passes is refused (reshuffles) or warned about."""
        if not fingerprint.changes_between_passes(dataset, _SAMPLE_SIZE):
            return
        reshuffles = [s for s in suspicious if "shuffle" in s or "Dataset.random" in s]
        if reshuffles:
            # Another order on every pass: every element would get another example's logits.
            raise ValueError(
                "The dataset given to `cache_teacher_logits` reshuffles on every pass (it contains "
                f"{', '.join(reshuffles)} and yields its elements in another order each time it is "
                "read), so the cached logits would belong to other examples. Shuffle after the "
                "transform: raw.apply(cache).shuffle(n), or pass reshuffle_each_iteration=False "
                "or a fixed seed before it."
            )
        warn(
            "The dataset given to `cache_teacher_logits` yields different elements each time it "
            "is iterated (random augmentation or reshuffling before the transform?). The cache "
            "pairs logits with elements by position, so the student would be trained on logits "
            "of other inputs. Make the dataset deterministic before the transform, or pass "
            "`augment=fn(x, seed)`."
        )

    def _probe(self, dataset, manifest, stored):
        """Re-runs the teachers on the first examples: a `ProbeMismatch` if they disagree with the rows."""
        rows = build_lib.probe_rows(manifest)
        x = next(iter(self.teachers.build_inputs(dataset, 0, rows, rows)))
        fresh, _ = self.teachers.step()(x)
        fresh = {k: v.numpy() for k, v in fresh.items() if k in ("values", "logsumexp")}
        first = stored.first_rows(len(fresh["values"]))
        return build_lib.probe_mismatch(fresh, first, "teacher-logit cache", self.directory, rows)

    def _produce(self, dataset, start_row, rows, layout):
        inputs = self.teachers.build_inputs(dataset, start_row, rows, layout.block_rows)
        step = self.teachers.step()
        target = math.ceil(rows / layout.block_rows)
        where = "" if self.num_shards == 1 else f" (part {self.shard_index + 1} of {self.num_shards})"
        self._say(f"running the teacher once over {rows} examples{where}; writing to {self.directory}")
        bar = keras.utils.Progbar(target, verbose=self.verbose, unit_name="batch") if self.verbose else None
        want, done = tuple(layout.specs[0][2]), 0
        for x in inputs:
            arrays, stats = step(x)
            self.teachers.check(stats, first=done == 0)
            arrays = {k: v.numpy() for k, v in arrays.items()}
            got = tuple(arrays["values"].shape[1:])
            if got != want:
                raise ValueError(
                    f"The teacher's output shape varies between examples ({want} then {got} per "
                    "example); the cache needs one fixed output shape."
                )
            yield arrays
            done += len(arrays["values"])
            if bar is not None:
                bar.update(min(target, done // layout.block_rows))
        if bar is not None:
            bar.update(target, finalize=True)

    def _blocks_per_file(self, layout):
        if self.shard_size is not None:
            return max(1, math.ceil(self.shard_size / layout.block_rows))
        return build_lib.files_of(layout)
