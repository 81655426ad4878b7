"""The loss's per-example hooks: a documented protocol for callbacks.

A callback that needs per-example values from the training step (e.g.
`keras_kd.HardSampleReweighting`) registers hooks on the compiled
`keras_kd.DistillationLoss`:

* an `Observer`, ``observer(targets, student_logits, hard, soft) -> None``,
  reads the per-example terms the loss computed (``loss.add_observer``);
* a `Weighting`, ``weighting(targets) -> per-example weights``, scales the
  sample weights of batches whose targets carry ``example_id``
  (``loss.add_weighting``).

Contract:

1. The loss calls each hook **exactly once per step** (training and
   validation steps alike), from ``DistillationLoss.__call__``, inside the
   traced step. `DistillationLoss.terms`, `DistillationLoss.components` and
   `DistillationLoss.call` are pure: they never run a hook, so metrics such as
   `keras_kd.loss_components` cannot run them twice.
2. Hooks are part of the traced step: add or remove them before Keras traces
   it, or retrace afterwards with ``model.make_train_function(force=True)``
   (and ``make_test_function(force=True)`` for validation). A callback does
   this in ``on_train_begin`` after adding its hooks and in ``on_train_end``
   after removing them: that is the only retrace the protocol needs.
3. A hook may create TF ops (variable updates, assertions); it must not
   return gradients into the loss (observers' inputs are values, weightings'
   outputs multiply the sample weights and have no gradient).
4. On Keras 3's JAX backend the hooks run inside the jitted step with JAX
   arrays (`keras_kd._jax_targets.JaxTeacherTargets`, same fields): they
   compute with ``jax.numpy``/``keras.ops`` (`keras_kd._ops.namespace` picks
   the right one) and cannot update a ``tf.Variable`` or run a TF op there.
   State they write must be step state the model threads
   (`keras_kd._step_state`, as `keras_kd.HardSampleReweighting` does); a
   plain Python side effect runs once per trace, not once per step.
"""

from __future__ import annotations

import typing
from typing import Optional

import tensorflow as tf

from keras_kd import _ops


class Observer(typing.Protocol):
    """The observer hook: ``observer(targets, student_logits, hard, soft) -> None``.

    Called by `DistillationLoss` exactly once per step (training and
    validation steps alike), inside the traced step, for batches that carry a
    teacher. ``targets`` is the batch's `TeacherTargets` with the teacher's
    **dense** float32 logits in ``targets.logits`` (top-k targets are expanded
    with the loss's ``topk_fill``; in-step teachers have run), ``labels`` and
    ``example_id`` as in the dataset. ``hard`` and ``soft`` are the
    per-example terms the loss computed (``soft = T^2 * D``, before alpha).
    It may create TF ops (e.g. variable updates).
    """

    def __call__(self, targets, student_logits, hard, soft) -> None: ...


class Weighting(typing.Protocol):
    """The weighting hook: ``weighting(targets) -> per-example weights``.

    Called by `DistillationLoss` exactly once per step for batches whose
    targets carry ``example_id``; the result is multiplied into the sample
    weights before reduction. None leaves the step unweighted (what
    `HardSampleReweighting` returns for validation steps).
    """

    def __call__(self, targets) -> Optional[tf.Tensor]: ...


class StepTerms(typing.NamedTuple):
    """What `DistillationLoss.terms` computes for one batch, and what observers receive.

    Attributes:
        targets: the batch's `TeacherTargets` with the dense float32 teacher
            logits the loss used in ``logits`` (top-k fields cleared, in-step
            teacher run), or None when the batch carries no teacher.
        hard: per-example hard-label loss.
        soft: per-example ``T^2 * D`` (before alpha), or None without teacher.
    """

    targets: typing.Any
    hard: tf.Tensor
    soft: typing.Optional[tf.Tensor]


class Hooks:
    """The registered observers and weightings of one loss (see the module docstring)."""

    def __init__(self):
        self.observers = []
        self.weightings = []

    @staticmethod
    def _add(hooks, hook):
        if not callable(hook):
            raise ValueError(f"Expected a callable hook. Received: {hook!r}")
        if hook not in hooks:
            hooks.append(hook)

    @staticmethod
    def _remove(hooks, hook):
        if hook in hooks:
            hooks.remove(hook)

    def add_observer(self, observer):
        self._add(self.observers, observer)

    def remove_observer(self, observer):
        self._remove(self.observers, observer)

    def add_weighting(self, weighting):
        self._add(self.weightings, weighting)

    def remove_weighting(self, weighting):
        self._remove(self.weightings, weighting)

    def observe(self, terms: StepTerms, student_logits):
        """Runs every observer once, for a batch that carries a teacher."""
        if terms.targets is None:
            return
        for observer in self.observers:
            observer(terms.targets, student_logits, terms.hard, terms.soft)

    def weigh(self, y_true, sample_weight):
        """``sample_weight`` times every weighting's weights (for targets with ``example_id``)."""
        if not self.weightings or getattr(y_true, "example_id", None) is None:
            return sample_weight
        for weighting in self.weightings:
            w = weighting(y_true)
            if w is None:  # this step is not weighted (a validation step)
                continue
            if sample_weight is not None:
                ops = _ops.namespace(w)
                sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32") * w
            else:
                sample_weight = w
        return sample_weight
