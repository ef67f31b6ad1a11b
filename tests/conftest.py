"""Test-suite wide fixtures: the loopback-only network guard."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import netguard

netguard.install()

# No AWS account is ever used: make sure nothing falls back to real credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fail any test that tried a non-loopback connection, even if it was caught."""
    before = len(netguard.violations)
    yield
    tried = netguard.violations[before:]
    if tried:
        pytest.fail(f"test tried non-loopback connections: {tried}")
