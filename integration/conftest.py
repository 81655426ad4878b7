"""Integration tests share the unit tests' fixtures (Keras flavour `K`, ...) and
the `backend(name)` marker (``make test`` runs integration/ on TensorFlow only)."""

from tests.conftest import K  # noqa: F401
from tests.conftest import pytest_collection_finish  # noqa: F401
from tests.conftest import pytest_collection_modifyitems  # noqa: F401
from tests.conftest import pytest_configure  # noqa: F401
