"""Fixtures of the serve tests: the launcher tests' fake model folder."""

from tests.launcher.conftest import fake_model  # noqa: F401  (a fixture, registered by import)
