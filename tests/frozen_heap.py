"""A module-scoped fixture that keeps full garbage collections cheap.

Every keras-tuner trial (keras-tuner's own tuners and keras_kd's) calls
``clear_session()`` and ``gc.collect()``; in a test process a full collection
walks the ~0.5 M objects of TensorFlow, Keras and the rest already imported,
about 0.3 s each time, twice a trial. ``gc.freeze()`` after a collection moves
those objects (none of them garbage) to the permanent generation, so each
collection walks only what the module has created since; ``gc.unfreeze()``
hands them back when the module ends. Nothing created during the module is
frozen, so its garbage is collected as before, and ``gc.get_objects()`` (used
to count live layers) lists just those objects: the frozen ones are the same
set before and after every trial.

Use it in a test module by importing it (autouse, module-scoped):
``from tests.frozen_heap import frozen_heap  # noqa: F401``.
"""

import gc

import pytest


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Freezes what is alive when the module starts; unfreezes it at the end."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
