"""Kept for the type name tests import: ``from tests.cloud_fixtures import ManagerFactory``.

The fixtures live in :mod:`tests.fixtures.cloud`, registered once by tests/conftest.py;
do not import them into test modules.
"""

from __future__ import annotations

from tests.fixtures.cloud import ManagerFactory

__all__ = ["ManagerFactory"]
