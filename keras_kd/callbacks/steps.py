"""The training step that a callback's loss hooks are traced into, kept across fits.

`HardSampleReweighting` adds an observer and a weighting to the model's loss
for the length of a ``fit``: the step must be traced with them, and a later
``fit`` without the callback must get a step without them. Retracing at the
start and at the end of every ``fit`` costs a trace, a Grappler pass and the
garbage of the old graph per ``fit``; on the small students of issue 15 that
was ~3% of the epochs that follow. `HookedStep` keeps both functions: the
model's own (given back at the end) and the hooked one, which the next
``fit`` with the same callback, model, compiled loss and hooks reuses.

Anything that changes the step in between makes Keras build a new one
(``compile`` drops ``model.train_function``; another callback may replace
it), and then the hooked step is traced again, as before.
"""

from __future__ import annotations

import weakref


class HookedStep:
    """The hooked and the plain training function of one model.

    Args:
        reuse: keep the functions across fits (TensorFlow); False traces the
            step at every `enter` and `exit` (Keras 3 on JAX, where the step's
            state is bound and unbound around each ``fit``).
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._model = None  # weak reference: the callback must not keep a model alive
        self._plain = None
        self._hooked = None
        self._key = None

    def enter(self, model, key):
        """Makes ``model`` train with a step traced with the loss's hooks as they are now.

        Args:
            model: the model being fit (its ``train_function`` is Keras's step).
            key: what the hooked step was traced with (the loss and its hooks);
                a different key traces it again.
        """
        current = getattr(model, "train_function", None)
        if (
            self.reuse
            and self._hooked is not None
            and self._model is not None
            and self._model() is model
            and current is not None
            and current is self._plain
            and key == self._key
        ):
            model.train_function = self._hooked
            return
        # A fit that raised left the hooked step in place: there is no plain one to give back.
        plain = current if current is not self._hooked else None
        model.make_train_function(force=True)
        self._model, self._plain, self._hooked, self._key = weakref.ref(model), plain, model.train_function, key

    def exit(self, model):
        """Gives ``model`` a step without the hooks: the one it had before `enter` when it is
        still the model's, else a new one."""
        if self.reuse and self._plain is not None and getattr(model, "train_function", None) is self._hooked:
            model.train_function = self._plain
            return
        model.make_train_function(force=True)
        self.__init__(self.reuse)
