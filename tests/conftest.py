"""Loads the fixture modules in tests/fixtures (one per concern, each owned by its feature)."""

import pkgutil

from tests import fixtures

pytest_plugins = [f"tests.fixtures.{m.name}" for m in pkgutil.iter_modules(fixtures.__path__)]
