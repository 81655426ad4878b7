"""`cache_teacher_logits`: run the teacher once, distill for many epochs."""

from typing import Callable, Optional

from keras_kd.cache.transform import TeacherLogitCache


def cache_teacher_logits(
    teacher,
    directory,
    *,
    top_k: Optional[int] = None,
    dtype: str = "float16",
    batch_size: int = 256,
    augment: Optional[Callable] = None,
    views: int = 1,
    seed: int = 0,
    num_shards: Optional[int] = None,
    shard_index: Optional[int] = None,
    input_context=None,
    on_mismatch: str = "error",
    output_index=0,
    shard_size: Optional[int] = None,
    verify: str = "checksum",
    wait_timeout: Optional[float] = None,
    verbose: int = 1,
    in_memory: Optional[bool] = None,
    ensemble: str = "mean_logits",
    teacher_inputs: Optional[Callable] = None,
    student_inputs: Optional[Callable] = None,
) -> TeacherLogitCache:
    """Caches a teacher's logits on disk, as a ``Dataset -> Dataset`` transform.

    Apply it to the **unbatched** training dataset, then shuffle, batch and
    train as usual with `keras_kd.DistillationLoss`. The first use runs the
    teacher over the dataset once (``teacher(x, training=False)``, batched,
    with a progress bar) and writes its logits to ``directory``; later uses
    (later epochs, later processes) only read the files.

    Each element ``(x, y[, sample_weight])`` becomes
    ``(x, TeacherTargets(labels=y, logits=..., example_id=i)[, sample_weight])``,
    where ``i`` is the element's position in the dataset as given to the
    transform (``int64``). A dataset of ``x`` alone (unlabelled data, as for
    `keras_kd.add_example_ids`) becomes
    ``(x, TeacherTargets(labels=0, has_labels=False, logits=..., example_id=i))``:
    the loss then has no hard-label term. Labels are not part of the
    fingerprint: a cache is reused when only the labels change (the teacher
    never sees them), and every element carries its own current labels.
    Pairing is by that position, so ``shuffle``,
    ``batch``, ``repeat`` and augmentation applied **after** the transform
    keep every example with its own teacher logits. The dataset given to the
    transform must yield the same elements in the same order on every pass:
    a random augmentation or a reshuffle **before** the transform would pair
    the student with logits of other pixels (this is detected where possible
    and warned about; pass ``augment=`` instead).

    Teacher ensembles: ``teacher`` may be a non-empty list or tuple of
    models. Each one runs once per example (and view) and one set of targets
    is stored: with ``ensemble="mean_logits"`` the mean of their logits, with
    ``"mean_probs"`` ``log(mean_i softmax(t_i))``, the log of the ensemble's
    predictive distribution. The teachers must output the same shape and
    take inputs of the same shapes; the fingerprint covers each of them and a
    changed one is refused naming its index (``teacher[1]'s weights changed``).

    Different inputs for teacher and student: ``teacher_inputs=fn(x)`` is what
    the teacher(s) see of one example's inputs ``x``, ``student_inputs=fn(x)``
    what the element carries as the student's inputs (both default to the
    identity), e.g. a teacher on the full signal and a student on every second
    sample, or a teacher given privileged features the student never has.
    Both run on one example (after ``augment`` when augmenting) and must be
    deterministic; the fingerprint covers their outputs on the first
    examples, so a changed function is refused. ``student_inputs`` runs once
    per element on every pass (a ``map``), so keep it cheap.

    Storage: dense logits (``top_k=None``) in ``dtype``, or the teacher's
    ``top_k`` largest logits with their class indices and the log-sum-exp of
    all its logits, so that `DistillationLoss`'s ``topk_fill="uniform"``
    policy gives the missing classes exactly the teacher's missing mass (see
    `keras_kd.targets.dense_teacher_logits`). Targets carry dense logits in
    ``dtype``, or ``topk_values`` in ``dtype``, ``int32`` ``topk_indices`` and
    float32 ``topk_logsumexp``; the loss computes in float32.

    Augmentation-consistent mode (``augment=fn``): ``fn(x, seed)`` must
    augment one example's inputs ``x`` deterministically given ``seed``, a
    ``[2]`` int64 tensor, using stateless ops (``tf.image.stateless_*``,
    ``tf.random.stateless_*``). The cache stores the teacher's logits for
    ``views`` views of every example, view ``v`` of example ``i`` made with
    ``seed = [seed, i * views + v]``. Each pass over the output picks one
    stored view per example (a new choice on every pass, reproducible from
    ``seed``) and re-creates its inputs with the same seed, so the student
    sees exactly the pixels the teacher saw.

    The cache records a fingerprint: the teacher (digests of its weights and
    of its architecture/config, i.e. layers, activations and connections;
    its output shape), the dataset (element spec, count and a digest of
    **every** element's inputs ``x`` in order, computed in one pass each
    time the transform is applied, before any epoch) and the settings
    (``top_k``, ``dtype``, ``output_index``, and ``views``, ``seed`` and a
    digest of ``augment``'s output when augmenting). When an existing cache is
    opened, the teacher also re-runs on the first 64 examples and must
    reproduce the stored logits. A cache that does not match is refused with
    a `CacheMismatchError` saying what changed, or rebuilt with
    ``on_mismatch="rebuild"``. ``batch_size``, ``shard_size`` and
    ``num_shards`` only change the layout, not the fingerprint.

    Storage guarantees (see the README's table): keras_kd only creates,
    reads and deletes its own names in ``directory`` (a marker file records
    that keras_kd created it; a ``manifest.json`` it did not write is never
    touched, whatever ``on_mismatch`` says); it reads only regular files and
    at most their recorded size; manifests and journals are validated
    against a schema (a violation is a `CacheCorruptedError` naming the
    entry, repaired by ``on_mismatch="rebuild"``); one writer per part at a
    time (``fcntl.flock``); a build writes fresh names and switches the
    manifest atomically after verifying every file, so a reader never sees a
    mix of two builds (a streaming reader holds a shared ``flock`` on its
    build's lock file while its pipeline lives, and a rebuild by another job
    keeps that build's files until then; a rebuild never rewrites the names
    of the build it replaces).

    Crash safety: every file is written to a temporary name, fsynced and
    renamed; the manifest is written last. A build killed at any point leaves
    no manifest, so nothing is accepted as a cache; the next run checks the
    finished files of the interrupted build (size and CRC32), keeps them and
    resumes after them; its temporaries are removed by the next holder of the
    part's lock. Before use, every file is checked against the manifest.

    Multi-worker build: with ``num_shards=N`` and ``shard_index=i`` (or a
    ``tf.distribute.InputContext``), worker ``i`` runs the teacher on its own
    contiguous ``1/N`` of the dataset and writes that part. When all parts
    are there, any process writes the manifest and reads the cache as a
    whole; applying the transform waits for the other parts (see
    ``wait_timeout``), `TeacherLogitCache.build` does not. The directory must
    be on a filesystem all workers share.

    Memory and speed (automatic with ``in_memory=None``): a cache of up to
    32 MiB is read once (checksums verified in the same read) and held in
    host memory; a larger one streams blocks of ``batch_size`` examples from
    disk, so memory does not grow with the number of examples. When the rows
    are in memory, there is no ``augment`` and the elements have fixed shapes
    and total at most 64 MiB (inputs, labels, weights), the elements are read
    once too (``student_inputs`` applied then) and the output is
    ``from_tensor_slices`` of them with their targets: an epoch costs what
    in-memory ``TeacherTargets`` cost. Otherwise each pass zips the stored
    rows with the dataset's elements and wraps them in `TeacherTargets`
    (one light function call per element; with ``augment``, one per element
    that replays the view). ``in_memory=True`` or ``False`` forces holding or
    streaming the rows. Elements of varying shape (e.g. token sequences)
    work too: the teacher then sees each example alone, unpadded. Batch such
    output with ``.ragged_batch(b)`` or pad each element, then ``.batch(b)``
    (``padded_batch`` does not accept `TeacherTargets`).

    Class count: `TeacherLogitCache.num_classes` and the manifest's
    ``num_classes`` give the teacher's class count;
    `TeacherLogitCache.check_student` compares a student with it (the loss
    also refuses a mismatch at the first batch).

    Args:
        teacher: a Keras 3 or tf_keras model that outputs logits, or a
            non-empty list/tuple of them (an ensemble).
        directory: where the cache lives (created if needed). Reading needs
            only read access.
        top_k: keep only the teacher's ``top_k`` largest logits per example
            (and their log-sum-exp), or ``None`` for dense logits. Defaults to
            None.
        dtype: ``"float16"`` or ``"float32"``, how logits (or top-k values)
            are stored. Defaults to "float16".
        batch_size: the teacher's batch size while building; also the number
            of examples per stored block. Defaults to 256.
        augment: ``fn(x, seed) -> x`` for the augmentation-consistent mode,
            or None. Defaults to None.
        views: number of augmented views stored per example (needs
            ``augment``). Defaults to 1.
        seed: integer seed of the augmentation views and of the per-pass view
            choice. Defaults to 0.
        num_shards: number of build workers, or None for one. Defaults to None.
        shard_index: this worker's index in ``[0, num_shards)``. Defaults to
            None.
        input_context: a ``tf.distribute.InputContext`` giving
            ``num_shards``/``shard_index`` instead. Defaults to None.
        on_mismatch: ``"error"`` to refuse a cache built for something else
            (or damaged), ``"rebuild"`` to rebuild it. Defaults to "error".
        output_index: which output holds the logits when the teacher has
            several. Defaults to 0.
        shard_size: examples per data file (rounded to whole blocks), or None
            for files of about 64 MiB. Files are the unit of resumption.
            Defaults to None.
        verify: ``"checksum"`` (size and CRC32 of every file before use) or
            ``"size"`` (sizes only, for very large caches). Defaults to
            "checksum".
        wait_timeout: seconds a worker that finished its part waits for the
            other parts before raising `TimeoutError`; None waits for ever.
            Defaults to None.
        verbose: 0 silent, 1 progress bar, 2 one line per part. Defaults to 1.
        in_memory: None to hold caches up to 32 MiB in memory (and small
            datasets whole, see above) and stream larger ones; True/False
            to force holding or streaming the rows. Defaults to None.
        ensemble: ``"mean_logits"`` or ``"mean_probs"``, how an ensemble's
            logits are combined. Defaults to "mean_logits".
        teacher_inputs: ``fn(x)`` giving the teacher's inputs from one
            example's ``x``, or None (``x`` itself). Defaults to None.
        student_inputs: ``fn(x)`` giving the student's inputs from one
            example's ``x``, or None (``x`` itself). Defaults to None.

    Returns:
        A `TeacherLogitCache`: use it with ``dataset.apply(...)``.

    Raises:
        ValueError: for invalid arguments (at construction: an empty list of
            teachers, teachers with different class counts or input shapes,
            an unknown ``ensemble``); when applied, for an infinite, empty or
            batched dataset, a dataset reshuffled before the transform, labels
            that are not one tensor, teacher outputs with NaN/Inf or out of
            float16 range, teachers whose output shapes differ, or an
            ``augment`` that is not deterministic given its seed.
        CacheMismatchError: when the cache was built for another teacher,
            dataset or settings and ``on_mismatch="error"``.
        CacheCorruptedError: when a cache file is missing, truncated or
            corrupted, or a manifest or journal breaks the schema, and
            ``on_mismatch="error"``.
        CacheMismatchError: (whatever ``on_mismatch``) when ``directory``
            holds a ``manifest.json`` keras_kd did not write, or another kind
            of keras_kd cache.
        OSError: when ``directory`` cannot be written or the disk is full.

    Example:

    ```python
    cache = keras_kd.cache_teacher_logits(teacher, "cache/digits-t1")
    train = raw_ds.apply(cache)   # runs the teacher once; later runs only read
    train = train.shuffle(10_000).batch(64).prefetch(tf.data.AUTOTUNE)
    cache.check_student(student)
    student.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    student.fit(train, epochs=50)

    # Top-k storage, and views the student replays pixel for pixel:
    def augment(x, seed):
        return tf.image.stateless_random_flip_left_right(x, seed)

    train = raw_images.apply(keras_kd.cache_teacher_logits(
        teacher, "cache/imgs-k10", top_k=10, augment=augment, views=4))

    # One student from three teachers, the ensemble's predictive distribution:
    train = raw_ds.apply(keras_kd.cache_teacher_logits(
        [t1, t2, t3], "cache/ens", ensemble="mean_probs"))

    # A teacher on the full signal, a student on every second sample:
    train = raw_ds.apply(keras_kd.cache_teacher_logits(
        teacher, "cache/half", student_inputs=lambda x: x[::2]))

    # Two workers build halves of one cache; any process then reads it whole:
    keras_kd.cache_teacher_logits(teacher, "cache/big", num_shards=2,
                                  shard_index=worker).build(raw_ds)
    ```
    """

    return TeacherLogitCache(
        teacher,
        directory,
        top_k=top_k,
        dtype=dtype,
        batch_size=batch_size,
        augment=augment,
        views=views,
        seed=seed,
        num_shards=num_shards,
        shard_index=shard_index,
        input_context=input_context,
        on_mismatch=on_mismatch,
        output_index=output_index,
        shard_size=shard_size,
        verify=verify,
        wait_timeout=wait_timeout,
        verbose=verbose,
        in_memory=in_memory,
        ensemble=ensemble,
        teacher_inputs=teacher_inputs,
        student_inputs=student_inputs,
    )
