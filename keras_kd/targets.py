"""The targets contract: how teacher outputs travel next to the labels.

Every element a distillation dataset yields is ``(x, TeacherTargets, [sample_weight])``.
`TeacherTargets` is a batchable `tf.experimental.ExtensionType` that holds the
user's labels together with what the teacher said about the same example.

Why an extension type rather than a dict or a packed tensor: for a
single-output model both Keras flavours refuse a dict ``y`` ("y_true and y_pred
have different structures"), and a packed tensor breaks the user's metrics.
`TeacherTargets` converts to its ``labels`` wherever Keras asks for a tensor
(``__tf_tensor__``) and reports the labels' ``shape`` and ``dtype``, so
``metrics=["accuracy"]`` and every other metric keep measuring the hard labels,
while `keras_kd.DistillationLoss` reads the teacher fields. The few tensor ops
that Keras applies to ``y_true`` before the loss (``tf.cast``,
``tf.expand_dims``, ``tf.squeeze``) are dispatched to the labels and keep the
teacher fields.

In tf.data, whose cost per element grows with its number of tensors, the
tensor fields (labels, logits, top-k fields, example ids) travel as one
tensor, bit-exactly reinterpreted in the logits' dtype (`_TargetsBatchEncoder`),
so ``(x, TeacherTargets)`` is as many tensors as ``(x, y)``.

Producers: `keras_kd.with_teacher` (online teacher) and the teacher-logit
cache. Consumers: `DistillationLoss`, keras_kd metrics and callbacks.
Nothing here knows about disk or models.
"""


import collections
import typing
import warnings
import weakref

import tensorflow as tf

from keras_kd import _compat
from keras_kd import _jax_targets
from keras_kd._jax_targets import JaxTeacherTargets

# Tuples and mappings first: tried in order, a tuple of same-shaped tensors
# would otherwise be stacked into one tensor (with the batch on axis 1).
Nested = typing.Union[typing.Tuple[tf.Tensor, ...], typing.Mapping[str, tf.Tensor], tf.Tensor]


# The fields that travel in the packed tensor, in field order. ``inputs`` (the
# model's inputs for in-step teachers: images, token ids, ...) keeps its own
# tensors: widening its narrow integers to the carrier would multiply its bytes.
_PACKED_FIELDS = ("labels", "logits", "topk_indices", "topk_values", "topk_logsumexp", "example_id")
# Dtypes a bitcast reinterprets exactly; floats can be the carrier.
_FLOAT_DTYPES = frozenset([tf.float16, tf.bfloat16, tf.float32, tf.float64])
_INT_DTYPES = frozenset([tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64])


class _TargetsBatchEncoder(tf.experimental.ExtensionTypeBatchEncoder):
    """The tf.data encoding of `TeacherTargets`: its tensor fields as one tensor.

    tf.data's cost of an element grows with its number of tensors (about as
    much per extra scalar as the rest of a small element), not with its bytes.
    Where every field of `_PACKED_FIELDS` that is set (labels, logits, top-k
    fields, example ids) is a dense tensor of a bitcastable dtype, they travel
    as one tensor, so a distillation element ``(x, targets)`` has as many
    tensors as the plain ``(x, y)``; see `_Packing` for the layout (bit-exact
    reinterpretation, concatenated on the last axis). Batching, unbatching,
    rebatching and shuffling stack or split the first axes, which the packing
    leaves alone. ``inputs`` keeps its own tensors. Any other spec (a single
    packable field, bool or complex fields, unknown ranks, per-example sizes
    that are not static, fields whose leading axes disagree) keeps
    TensorFlow's default encoding: the decision depends only on dtypes, ranks
    and the static sizes after the common leading axes, the same for a spec
    and its batched or unbatched spec.

    Args:
        pack: False gives TensorFlow's default encoding for every spec; a
            tuple of field names packs only those (the benchmark's earlier
            layout, labels with example ids).
    """

    def __init__(self, pack=True):
        self.pack = pack

    def packing(self, spec):
        """The `_Packing` of ``spec``, or None when it keeps the default encoding."""
        if not self.pack:
            return None
        return _Packing.of(spec, _PACKED_FIELDS if self.pack is True else tuple(self.pack))

    def packs(self, spec):
        """Whether ``spec``'s fields travel packed."""
        return self.packing(spec) is not None

    # The default components are the spec's tensor leaves in field order; the
    # packed encoding is the packed tensor, then the other components in order.
    def encoding_specs(self, spec):
        specs = super().encoding_specs(spec)
        packing = self.packing(spec)
        if packing is None:
            return specs
        return (packing.spec,) + tuple(specs[i] for i in packing.rest)

    def encode(self, spec, value, minimum_rank=0):
        components = super().encode(spec, value, minimum_rank)
        packing = self.packing(spec)
        if packing is None:
            return components
        if minimum_rank > packing.rank:
            # The default encoding's scalar component would refuse this too;
            # the packed tensor would silently be split along its fields.
            raise ValueError(f"A field of {spec} has rank {packing.rank}: it cannot be unbatched.")
        packed = packing.encode([components[i] for i in packing.picks])
        return (packed,) + tuple(components[i] for i in packing.rest)

    def decode(self, spec, encoded_value):
        packing = self.packing(spec)
        if packing is not None:
            components = [None] * (len(packing.picks) + len(packing.rest))
            for i, field in zip(packing.picks, packing.decode(encoded_value[0])):
                components[i] = field
            for i, rest in zip(packing.rest, encoded_value[1:]):
                components[i] = rest
            encoded_value = tuple(components)
        return super().decode(spec, encoded_value)


class _Field(typing.NamedTuple):
    """One packed field: its dtype, the dtype it travels as, and its slice of the carrier."""

    name: str
    dtype: tf.DType
    wide: tf.DType  # dtype, or an integer of the carrier's size for a narrower integer
    tail: tuple  # its static shape after the common leading axes
    ratio: int  # carrier elements per ``wide`` element
    width: int  # carrier elements per example


class _Packing:
    """The packed layout of one spec: fields bitcast into one carrier tensor.

    The carrier dtype is the narrowest float of the fields (int64 without
    floats), so the float fields of that dtype (the logits, usually the most
    bytes) are copied as they are and decoding them is a slice. Every other
    field is reinterpreted: a bitcast to the carrier (an int64 label becomes
    four float16 elements), after a lossless cast to an integer of the
    carrier's size where it is narrower (int8 in a float32 carrier travels as
    int32). Bit patterns are kept (NaN payloads, -0.0, integer extremes):
    tf.data and device copies move bytes and never do float arithmetic on the
    carrier. Each field is flattened after the ``rank`` leading axes that all
    fields share (the smallest rank: the batch axes) and the fields are
    concatenated on the last axis: shape ``leading + (sum of widths,)``.
    """

    def __init__(self, fields, rank, lead, carrier, picks, rest):
        self.fields, self.rank, self.carrier = fields, rank, carrier
        self.names = tuple(f.name for f in fields)
        self.widths = [f.width for f in fields]
        self.offsets = [sum(self.widths[:i]) for i in range(len(fields) + 1)]
        self.spec = tf.TensorSpec(lead.concatenate(self.offsets[-1]), carrier)
        self.picks, self.rest = picks, rest  # component indices of the packed and the other fields

    @classmethod
    def of(cls, spec, names):
        """The packing of the fields ``names`` of ``spec`` that are set, or None."""
        owners = [name for name, value in spec.__dict__.items()
                  for leaf in tf.nest.flatten(value) if isinstance(leaf, tf.TypeSpec)]
        picked = [(name, getattr(spec, name)) for name in names if getattr(spec, name) is not None]
        if len(picked) < 2 or any(type(s) is not tf.TensorSpec or s.shape.rank is None
                                  or s.dtype not in _FLOAT_DTYPES | _INT_DTYPES for _, s in picked):
            return None
        rank = min(s.shape.rank for _, s in picked)
        lead = tf.TensorShape(None)
        for _, s in picked:
            if not (s.shape[:rank].is_compatible_with(lead) and s.shape[rank:].is_fully_defined()):
                return None
            lead = lead.merge_with(s.shape[:rank])
        floats = [s.dtype for _, s in picked if s.dtype in _FLOAT_DTYPES]
        carrier = min(floats, key=lambda d: d.size) if floats else tf.int64
        fields = tuple(_field(name, s, rank, carrier) for name, s in picked)
        picks = [owners.index(name) for name, _ in picked]
        rest = [i for i, name in enumerate(owners) if name not in names]
        return cls(fields, rank, lead, carrier, picks, rest)

    def encode(self, tensors):
        """The carrier tensor of the fields ``tensors`` (in `names` order)."""
        parts = []
        for field, t in zip(self.fields, tensors):
            if field.wide != field.dtype:
                t = tf.cast(t, field.wide)
            if field.wide != self.carrier:
                t = tf.bitcast(t, self.carrier)
            parts.append(_reshape(t, t.shape[:self.rank], lambda: tf.shape(t)[:self.rank], (field.width,)))
        return parts[0] if len(parts) == 1 else tf.concat(parts, -1)

    def decode(self, packed):
        """The fields (in `names` order) from their carrier tensor.

        In a graph: one split, then per field a reshape, a bitcast and a cast
        only where its dtype needs them. An eager tensor on the host (every
        ``next()`` of an eager iterator, the JAX backend's data path) is split
        in NumPy (``view`` is the bitcast) and wrapped as new eager tensors
        on its device: a few microseconds, where eager ops would cost more
        than tf.data saves on a small batch.
        """
        if isinstance(packed, _EAGER_TENSOR) and "/device:CPU:" in packed.device:
            return self._decode_numpy(packed)
        parts = tf.split(packed, self.widths, axis=-1) if len(self.fields) > 1 else [packed]
        out = []
        for field, part in zip(self.fields, parts):
            ratio = (field.ratio,) if field.ratio > 1 else ()
            part = _reshape(part, packed.shape[:-1], lambda: tf.shape(packed)[:-1], field.tail + ratio)
            if field.wide != self.carrier:
                part = tf.bitcast(part, field.wide)
            if field.wide != field.dtype:
                part = tf.cast(part, field.dtype)
            out.append(part)
        return out

    def _decode_numpy(self, packed):
        array, device = packed.numpy(), packed.device
        lead, out = array.shape[:-1], []
        for field, start, stop in zip(self.fields, self.offsets, self.offsets[1:]):
            part = array[..., start:stop]  # its last axis is contiguous: `view` reinterprets it
            if field.wide != self.carrier:
                part = part.view(field.wide.as_numpy_dtype)
            if field.wide != field.dtype:
                part = part.astype(field.dtype.as_numpy_dtype)
            out.append(_EAGER_TENSOR(part.reshape(lead + field.tail), device, field.dtype.as_datatype_enum))
        return out


def _field(name, spec, rank, carrier):
    """The `_Field` of ``spec`` in a packing of ``rank`` leading axes into ``carrier``."""
    dtype, wide = spec.dtype, spec.dtype
    if dtype.size < carrier.size:  # only integers: the carrier is the narrowest float
        wide = tf.as_dtype(f"{'u' if dtype.is_unsigned else ''}int{8 * carrier.size}")
    tail = tuple(spec.shape[rank:].as_list())
    ratio = wide.size // carrier.size
    return _Field(name, dtype, wide, tail, ratio, ratio * spec.shape[rank:].num_elements())


def _reshape(t, lead, dynamic_lead, tail):
    """``t`` reshaped to ``lead + tail``, statically where at most one leading size is unknown."""
    if t.shape.rank == len(lead) + len(tail) and t.shape[len(lead):].as_list() == list(tail):
        return t
    sizes = [-1 if d is None else d for d in lead.as_list()]
    if sizes.count(-1) <= 1:
        return tf.reshape(t, sizes + list(tail))
    return tf.reshape(t, tf.concat([dynamic_lead(), tail], 0))


# TensorFlow's eager tensor type; its constructor ``(array, device, dtype enum)``
# is what ``tf.constant`` calls eagerly (canary in tests/test_targets_encoding.py).
_EAGER_TENSOR = tf.__internal__.EagerTensor


TEACHER_IGNORED_MESSAGE = (
    "A Keras loss that is not keras_kd.DistillationLoss received teacher targets (data from "
    "`keras_kd.with_teacher` or the teacher-logit cache): it reads their labels only, so the teacher is "
    "ignored and training with it distils nothing. Compile the student with "
    "`loss=keras_kd.DistillationLoss(...)` (metrics such as 'accuracy' read the labels, as intended)."
)


def warn_if_a_keras_loss_ignores_the_teacher(training_only=False):
    """Warns when a built-in Keras loss asks teacher targets for a tensor (it gets the labels
    alone). Called while a step is traced (or per eager step): the check reads a few frames.

    Args:
        training_only: warn only where a gradient tape records (TensorFlow: a training step,
            not ``evaluate``).
    """
    if not _compat.called_from_a_keras_loss():
        return
    if training_only:
        from keras_kd.losses import guards  # noqa: PLC0415 - the losses import this module

        if guards.in_training_step() is False:
            return
    warnings.warn(TEACHER_IGNORED_MESSAGE, UserWarning, stacklevel=3)


class TeacherTargets(tf.experimental.BatchableExtensionType):
    """Labels plus teacher targets for one example or one batch.

    Exactly one of three teacher forms is set:

    * ``logits``: dense teacher logits, shape ``labels-batch + (..., classes)``.
    * ``topk_indices`` and ``topk_values``: the teacher's ``k`` largest logits and
      their class indices, optionally with ``topk_logsumexp``, the log-sum-exp of
      all the teacher's logits (see `dense_teacher_logits` for the policy that
      fills the classes outside the top k).
    * ``inputs`` with ``teacher_key``: the teacher has not run yet; the loss runs
      the registered teacher on ``inputs`` inside the training step (this keeps
      the teacher on the accelerator, see `keras_kd.with_teacher`).

    Attributes:
        labels: the user's labels, unchanged (sparse class ids or one-hot).
        logits: dense teacher logits or ``None``.
        topk_indices: ``int32`` class indices of the top-k logits or ``None``.
        topk_values: the top-k logits or ``None``.
        topk_logsumexp: log-sum-exp of all teacher logits (shape of the batch
            and time axes) or ``None``.
        inputs: the model inputs, for in-step teacher placement, or ``None``.
        teacher_key: name of the registered teacher for ``inputs``; ``""`` if none.
        example_id: ``int64`` example ids or ``None`` (used by reweighting).
        has_labels: ``False`` for unlabelled data (``labels`` is then a
            placeholder and the loss has no hard-label term).
    """

    # A registered name makes the type serializable (tf.data service,
    # SavedModel signatures).
    __name__ = "keras_kd.TeacherTargets"
    # tf.data carries the tensor fields as one tensor (see _TargetsBatchEncoder).
    __batch_encoder__ = _TargetsBatchEncoder()

    labels: tf.Tensor
    logits: typing.Optional[tf.Tensor] = None
    topk_indices: typing.Optional[tf.Tensor] = None
    topk_values: typing.Optional[tf.Tensor] = None
    topk_logsumexp: typing.Optional[tf.Tensor] = None
    inputs: typing.Optional[Nested] = None
    teacher_key: str = ""
    example_id: typing.Optional[tf.Tensor] = None
    has_labels: bool = True

    class Spec:
        # tf.data and tf.distribute ask a spec for its shape: the labels'.
        @property
        def shape(self):
            return self.labels.shape

        @property
        def dtype(self):
            return self.labels.dtype

        def _create_empty_value(self):
            # tf.distribute feeds replicas without data an empty batch.
            def empty(spec):
                dims = [0 if d is None else d for d in spec.shape.as_list()]
                return tf.zeros([0] + dims[1:] if dims else [], spec.dtype)

            def empty_or_none(spec):
                return None if spec is None else tf.nest.map_structure(empty, spec)

            return TeacherTargets(
                labels=empty(self.labels),
                logits=empty_or_none(self.logits),
                topk_indices=empty_or_none(self.topk_indices),
                topk_values=empty_or_none(self.topk_values),
                topk_logsumexp=empty_or_none(self.topk_logsumexp),
                inputs=empty_or_none(self.inputs),
                teacher_key=self.teacher_key,
                example_id=empty_or_none(self.example_id),
                has_labels=self.has_labels,
            )

    # Keras looks at y_true.shape / y_true.dtype to pick metrics and reshape
    # labels: both describe the labels.
    @property
    def shape(self):
        return self.labels.shape

    @property
    def dtype(self):
        return self.labels.dtype

    @property
    def device(self):
        return self.labels.device

    def __tf_tensor__(self, dtype=None, name=None):
        # Metrics and any other consumer that asks for a tensor get the labels.
        if self.has_teacher:
            warn_if_a_keras_loss_ignores_the_teacher(training_only=True)
        labels = self.labels
        if dtype is not None and labels.dtype != dtype:
            labels = tf.cast(labels, dtype)
        return labels

    def replace(self, **fields):
        """A copy with some fields replaced, e.g. ``targets.replace(logits=z)``."""
        values = {name: getattr(self, name) for name in _FIELDS}
        values.update(fields)
        return TeacherTargets(**values)

    def with_labels(self, labels):
        """A copy whose labels are replaced by ``labels``."""
        return self.replace(labels=labels)

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher form (dense, top-k or in-step inputs) is set."""
        return self.kind != "none"

    @property
    def kind(self) -> str:
        """``"dense"``, ``"topk"`` or ``"inputs"``: which teacher form is set."""
        if self.logits is not None:
            return "dense"
        if self.topk_values is not None:
            return "topk"
        if self.inputs is not None:
            return "inputs"
        return "none"


_FIELDS = (
    "labels",
    "logits",
    "topk_indices",
    "topk_values",
    "topk_logsumexp",
    "inputs",
    "teacher_key",
    "example_id",
    "has_labels",
)


def is_targets(y) -> bool:
    """Whether ``y`` is a `TeacherTargets` (or, on JAX, the `JaxTeacherTargets` the step receives)."""
    return isinstance(y, (TeacherTargets, JaxTeacherTargets))


# On the JAX backend only: Keras's data adapter converts the fields of a
# TeacherTargets batch and hands the step a JaxTeacherTargets (see
# `keras_kd._jax_targets`). Never on TensorFlow, where it would make `y` nested.
if _compat.is_jax_backend():
    _jax_targets.register(TeacherTargets)


def carries_teacher(y_spec) -> bool:
    """Whether a ``y`` spec already holds teacher targets (logits, top-k or in-step inputs)."""
    return isinstance(y_spec, TeacherTargets.Spec) and (
        y_spec.logits is not None or y_spec.topk_values is not None or y_spec.inputs is not None
    )


class _Decoder:
    """Rebuilds a `TeacherTargets` of one spec from its flat tensor list.

    For specs whose tensor fields are plain ``tf.TensorSpec`` (possibly nested
    in ``inputs``), the flat list holds the packed tensor where the spec's
    encoder packs (see `_TargetsBatchEncoder`), then one tensor per other
    spec leaf, in ``tf.nest.flatten`` order of the fields: each field is a
    constant, one tensor, a nest packed from a slice, or one of the packed
    fields. ``plan`` is None for specs with a composite field (ragged,
    sparse, ...): those take TensorFlow's generic path.
    """

    def __init__(self, spec):
        self.ref = weakref.ref(spec)
        self.value_type = spec.value_type
        self.plan, self.flat_specs = None, None
        encoder = type(spec).__batch_encoder__
        self.packing = encoder.packing(spec) if isinstance(encoder, _TargetsBatchEncoder) else None
        packed = () if self.packing is None else self.packing.names
        plan, flat_specs = [], [] if self.packing is None else [self.packing.spec]
        for name, value in spec.__dict__.items():
            leaves = tf.nest.flatten(value)
            specs = [leaf for leaf in leaves if isinstance(leaf, tf.TypeSpec)]
            if any(type(leaf) is not tf.TensorSpec for leaf in specs):
                return
            start = len(flat_specs)
            if name in packed:
                plan.append((name, "packed", None, 0, 0))
                continue
            if not specs:
                plan.append((name, "constant", value, 0, 0))
            elif isinstance(value, tf.TensorSpec):
                plan.append((name, "tensor", None, start, 0))
            elif len(specs) == len(leaves):
                plan.append((name, "nest", value, start, start + len(specs)))
            else:  # a nest that mixes specs and constants
                return
            flat_specs.extend(specs)
        self.plan, self.flat_specs = tuple(plan), flat_specs

    def decode(self, tensor_list):
        if len(tensor_list) != len(self.flat_specs):
            raise ValueError(f"Expected {len(self.flat_specs)} tensors for TeacherTargets, got {len(tensor_list)}.")
        packed = {} if self.packing is None else dict(zip(self.packing.names, self.packing.decode(tensor_list[0])))
        fields = {}
        for name, kind, value, start, stop in self.plan:
            if kind == "tensor":
                fields[name] = tensor_list[start]
            elif kind == "nest":
                fields[name] = tf.nest.pack_sequence_as(value, list(tensor_list[start:stop]))
            elif kind == "packed":
                fields[name] = packed[name]
            else:
                fields[name] = value
        targets = object.__new__(self.value_type)
        targets.__dict__.update(fields)
        return targets


_DECODERS: "dict[int, _Decoder]" = {}


def _decoder(spec):
    """The cached `_Decoder` of ``spec``, or None (use TensorFlow's generic decoding)."""
    key = id(spec)
    decoder = _DECODERS.get(key)
    if decoder is None or decoder.ref() is not spec:
        decoder = _DECODERS[key] = _Decoder(spec)
        weakref.finalize(spec, _DECODERS.pop, key, None)
    return decoder if decoder.plan is not None else None


# Decoding (installed on the spec class after its creation: TensorFlow
# reserves these names in an ExtensionType's class body): every eager `next()` of a dataset iterator rebuilds the
# targets from their flat tensors. TensorFlow's generic decoder walks
# the nested specs with `tf.nest` on every batch, which costs more than
# reading the batch; the specs are immutable, so the mapping from flat
# tensors to fields is worked out once per spec (`_decoder`). The
# components were validated when the value was built (and tf.data
# checked their dtypes and shapes), so the value is rebuilt without
# `__init__`, exactly as TensorFlow's own `_from_components` does.
def _spec_from_compatible_tensor_list(self, tensor_list):
    decoder = _decoder(self)
    if decoder is None:
        return _GENERIC_FROM_TENSOR_LIST(self, tensor_list)
    return decoder.decode(tensor_list)

def _spec_flat_tensor_specs(self):
    decoder = _decoder(self)
    return _GENERIC_FLAT_SPECS.fget(self) if decoder is None else decoder.flat_specs


_GENERIC_FROM_TENSOR_LIST = TeacherTargets.Spec._from_compatible_tensor_list
_GENERIC_FLAT_SPECS = TeacherTargets.Spec._flat_tensor_specs
TeacherTargets.Spec._from_compatible_tensor_list = _spec_from_compatible_tensor_list
TeacherTargets.Spec._flat_tensor_specs = property(_spec_flat_tensor_specs)


# Ops that Keras applies to y_true before calling the loss or a metric: they act
# on the labels and keep the teacher fields.
@tf.experimental.dispatch_for_api(tf.cast)
def _cast(x: TeacherTargets, dtype, name=None):
    return x.with_labels(tf.cast(x.labels, dtype, name=name))


@tf.experimental.dispatch_for_api(tf.expand_dims)
def _expand_dims(input: TeacherTargets, axis, name=None):  # noqa: A002 - tf's name
    return input.with_labels(tf.expand_dims(input.labels, axis, name=name))


@tf.experimental.dispatch_for_api(tf.squeeze)
def _squeeze(input: TeacherTargets, axis=None, name=None):  # noqa: A002
    return input.with_labels(tf.squeeze(input.labels, axis, name=name))


def dense_teacher_logits(targets: TeacherTargets, num_classes: int, topk_fill: str = "uniform"):
    """Dense teacher logits from a `TeacherTargets` with dense or top-k logits.

    Missing-mass policy for top-k targets (classes outside the top k):

    * ``"uniform"`` (default): every missing class gets one common logit ``m``
      chosen so that, at temperature 1, the missing classes together hold
      exactly the teacher's missing probability mass,
      ``(C - k) * exp(m) = exp(lse) - sum(exp(top-k))``, where ``lse`` is
      ``topk_logsumexp``. At temperature 1 the top-k probabilities are then
      exact, and at any temperature the tail is spread evenly. Requires
      ``topk_logsumexp``.
    * ``"renormalize"``: the missing classes get no mass (logit ``-inf``); the
      teacher distribution is renormalised over its top k.

    Args:
        targets: a `TeacherTargets`.
        num_classes: the class count ``C`` (the student's last dimension).
        topk_fill: ``"uniform"`` or ``"renormalize"``.

    Returns:
        A float32 tensor of shape ``batch_dims + (num_classes,)``.
    """
    jax_side = isinstance(targets, JaxTeacherTargets)
    if targets.logits is not None:
        return _jax_targets.dense_teacher_logits(targets, num_classes, topk_fill) if jax_side else tf.cast(
            targets.logits, tf.float32)
    if targets.topk_values is None:
        raise ValueError(
            "The targets carry no teacher logits (neither dense `logits` nor "
            "`topk_values`). Build the dataset with `keras_kd.with_teacher` or "
            "`keras_kd.cache_teacher_logits`."
        )
    k = targets.topk_values.shape[-1]
    if k is not None and k > num_classes:
        raise ValueError(
            f"The teacher's top-k targets have k={k} but the student has "
            f"{num_classes} classes."
        )
    if topk_fill not in ("uniform", "renormalize"):
        raise ValueError(
            "Expected `topk_fill` to be 'uniform' or 'renormalize'. "
            f"Received: topk_fill={topk_fill!r}"
        )
    if topk_fill == "uniform" and targets.topk_logsumexp is None:
        raise ValueError(
            "Top-k teacher targets without `topk_logsumexp` cannot use "
            "topk_fill='uniform'. Store the log-sum-exp with the top-k "
            "logits, or use topk_fill='renormalize'."
        )
    if jax_side:
        return _jax_targets.dense_teacher_logits(targets, num_classes, topk_fill)
    values = tf.cast(targets.topk_values, tf.float32)
    indices = tf.cast(targets.topk_indices, tf.int32)
    if topk_fill == "uniform":
        lse = tf.cast(targets.topk_logsumexp, tf.float32)
        lse_k = tf.reduce_logsumexp(values, axis=-1)
        missing = num_classes - tf.shape(values)[-1]
        # log(exp(lse) - exp(lse_k)) = lse + log(1 - exp(lse_k - lse)), stably.
        gap = tf.minimum(lse_k - lse, -1e-7)
        tail = lse + tf.math.log(-tf.math.expm1(gap))
        fill = tail - tf.math.log(tf.cast(tf.maximum(missing, 1), tf.float32))
        fill = tf.where(missing > 0, fill, tf.fill(tf.shape(fill), -float("inf")))
    else:  # "renormalize"
        fill = tf.fill(tf.shape(values)[:-1], -float("inf"))
    one_hot = tf.one_hot(indices, num_classes, dtype=tf.float32)  # (..., k, C)
    placed = tf.reduce_sum(one_hot * values[..., None], axis=-2)
    chosen = tf.reduce_sum(one_hot, axis=-2) > 0
    return tf.where(chosen, placed, fill[..., None])


# In-step teacher placement: the dataset carries the inputs and the name of a
# registered teacher function; the loss asks `materialize` for the logits, so
# the teacher runs inside the (accelerator-placed, possibly compiled) step.
_TEACHERS: "dict[str, typing.Callable]" = {}


def register_teacher(fn: typing.Callable, key: str) -> str:
    """Registers ``fn(inputs) -> logits`` under ``key`` for in-step placement.

    On JAX, a ``fn.refresh()`` is called on the host before each batch of
    targets with this key reaches the step (`keras_kd.data.teachers.jax_function`
    retraces there after the teacher's weights changed).
    """
    _TEACHERS[key] = fn
    refresh = getattr(fn, "refresh", None)
    if refresh is not None:
        _jax_targets.HOST_REFRESH[key] = refresh
    return key


def unregister_teacher(key: str) -> None:
    """Forgets the teacher registered under ``key`` (no-op if absent)."""
    _TEACHERS.pop(key, None)
    _jax_targets.HOST_REFRESH.pop(key, None)


def materialize(targets: TeacherTargets) -> TeacherTargets:
    """Runs the registered teacher for targets that carry only inputs.

    Targets that already hold dense or top-k logits are returned unchanged.
    Within one traced step the teacher runs once per batch however many
    consumers (the loss, metrics) ask: results are memoised on the inputs
    tensor. `JaxTeacherTargets` (the JAX backend) run the teacher's JAX
    function registered by `with_teacher` inside the jitted step.
    """
    if targets.kind != "inputs":
        return targets
    fn = _TEACHERS.get(targets.teacher_key)
    if fn is None:
        raise ValueError(
            f"No teacher is registered under {targets.teacher_key!r} in this "
            "process. Targets with in-step placement must come from "
            "`keras_kd.with_teacher(..., placement='step')` in the same process."
        )
    if isinstance(targets, JaxTeacherTargets):
        # JAX arrays are unhashable: keyed by id, holding the input (an id
        # alone could be reused once its array is freed).
        first = _jax_first_leaf(targets.inputs)
        anchor, stop_gradient = id(first), _jax_targets.stop_gradient
    else:
        first, anchor, stop_gradient = None, tf.nest.flatten(targets.inputs)[0].ref(), tf.stop_gradient
    held, logits = _MEMO.get(anchor, (None, None))
    if logits is None or held is not first:
        logits = stop_gradient(fn(targets.inputs))
        _MEMO[anchor] = (first, logits)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return targets.replace(logits=logits, inputs=None, teacher_key="")


def _jax_first_leaf(inputs):
    import jax

    return jax.tree_util.tree_leaves(inputs)[0]


# A few recent (inputs -> logits) pairs: enough for one traced step's consumers.
_MEMO: "collections.OrderedDict" = collections.OrderedDict()
_MEMO_SIZE = 8


def teacher_output(outputs, output_index):
    """The teacher output that carries its logits: ``outputs[output_index]`` of
    a list, tuple or dict (a dict without that key gives its first value), or
    the single output itself. Shared by the online teacher and the caches."""
    if isinstance(outputs, (list, tuple)):
        return outputs[output_index]
    if isinstance(outputs, dict):
        return outputs[output_index] if output_index in outputs else list(outputs.values())[0]
    return outputs


ENSEMBLES = ("mean_logits", "mean_probs")


def ensemble_logits(logits, ensemble: str = "mean_logits"):
    """One set of teacher logits from several teachers' float32 logits.

    ``"mean_logits"``: the mean of the teachers' logits.
    ``"mean_probs"``: ``log(mean_i softmax(t_i))``, the log of the ensemble's
    predictive distribution (a softmax of it gives that distribution back).
    A one-logit (binary) teacher is a Bernoulli logit: ``"mean_probs"`` then
    gives the logit of ``mean_i sigmoid(t_i)``. Shared by the online teacher
    and the cache.

    Args:
        logits: a list of tensors of one shape ``(..., classes)``.
        ensemble: ``"mean_logits"`` or ``"mean_probs"``.

    Returns:
        A tensor of that shape.
    """
    if len(logits) == 1:
        return logits[0]
    if _compat.backend_of(logits[0]) == "jax":
        return _jax_targets.ensemble_logits(logits, ensemble)
    stacked = tf.stack(list(logits))
    if ensemble == "mean_logits":
        return tf.reduce_mean(stacked, 0)
    log_n = tf.math.log(tf.cast(len(logits), stacked.dtype))
    if stacked.shape[-1] == 1:  # Bernoulli logits: log p - log(1 - p) of the mean probability
        log_p = tf.reduce_logsumexp(tf.math.log_sigmoid(stacked), 0) - log_n
        log_q = tf.reduce_logsumexp(tf.math.log_sigmoid(-stacked), 0) - log_n
        return log_p - log_q
    return tf.reduce_logsumexp(tf.nn.log_softmax(stacked, -1), 0) - log_n
