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

Keras skips ``on_train_end`` when a ``fit`` raises (an error, a
KeyboardInterrupt), so the hooked step would stay on the model and a later
``fit`` without the callback would still train with it. With ``running``,
the installed step is `_Guarded`: called outside the fit that installed it,
it first calls ``release`` (the callback's own end of fit), then runs the
model's step that release leaves.
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
        self._model_ref = None  # weak reference: the callback must not keep a model alive
        self._plain = None
        self._hooked = None
        self._key = None

    def enter(self, model, key, running=None, release=None):
        """Makes ``model`` train with a step traced with the loss's hooks as they are now.

        Args:
            model: the model being fit (its ``train_function`` is Keras's step).
            key: what the hooked step was traced with (the loss and its hooks);
                a different key traces it again.
            running: optional ``() -> bool``, whether the fit that called
                `enter` still runs; with ``release`` (``() -> None``, which
                takes the hooks out and calls `exit`), a step called outside
                that fit releases the hooks first.
        """
        current = getattr(model, "train_function", None)
        if (
            self.reuse
            and self._hooked is not None
            and self._model_ref is not None
            and self._model_ref() is model
            and current is not None
            and current is self._plain
            and key == self._key
        ):
            model.train_function = self._hooked
            return
        # A fit that raised left the hooked step in place: there is no plain one to give back.
        plain = current if current is not self._hooked else None
        model.make_train_function(force=True)
        hooked = model.train_function
        if self.reuse and running is not None:
            hooked = model.train_function = _Guarded(hooked, model, running, release)
        self._model_ref, self._plain, self._hooked, self._key = weakref.ref(model), plain, hooked, key

    def exit(self, model):
        """Gives ``model`` a step without the hooks: the one it had before `enter` when it is
        still the model's, else a new one."""
        if self.reuse and self._plain is not None and getattr(model, "train_function", None) is self._hooked:
            model.train_function = self._plain
            return
        model.make_train_function(force=True)
        self.__init__(self.reuse)


class _Guarded:
    """A hooked training step that releases its hooks when called outside its own fit."""

    def __init__(self, step, model, running, release):
        self._step, self._model_ref, self._running, self._release = step, weakref.ref(model), running, release

    def __call__(self, *args, **kwargs):
        if self._running():
            return self._step(*args, **kwargs)
        self._release()  # replaces the model's step (`HookedStep.exit`)
        return self._model_ref().train_function(*args, **kwargs)
