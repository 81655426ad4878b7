"""Integration tests share the unit tests' fixtures (Keras flavour `K`, ...)."""

from tests.conftest import K  # noqa: F401
