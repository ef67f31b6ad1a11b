"""The local cloud's tag look-ups answer exactly as moto's own scan does (plain moto, no
hosts): one literal resource id from the tag table, every other filter left to moto."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from moto.ec2.models import EC2Backend

from asyncstage.localcloud._moto import LocalBackend, make_backend
from asyncstage.localcloud._records import uninstall_backend

REGION = "us-east-1"


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    made = make_backend(REGION, "".join(str(secrets.randbelow(10)) for _ in range(12)))
    try:
        yield made
    finally:
        uninstall_backend(made)


def _scan(backend: LocalBackend, filters: dict[str, list[str]] | None) -> list[dict[str, str]]:
    """moto's own answer (every tag of every resource matched against the filters)."""
    return list(EC2Backend.describe_tags(backend, filters))


def test_one_resource_id_answers_as_the_scan_does(backend: LocalBackend) -> None:
    ids = ["vol-0123456789abcdef0", "vol-0123456789abcdef01", "snap-0123456789abcdef0"]
    for n, resource_id in enumerate(ids):
        backend.create_tags([resource_id], {"Name": f"n{n}", "asyncstage:of": "b", f"k{n}": ""})
    shapes: list[dict[str, list[str]] | None] = [
        {"resource-id": [ids[0]]},  # a prefix of the next id: not its tags
        {"resource-id": [ids[2]]},
        {"resource-id": ["vol-00000000000000000"]},  # no tags at all
        {"resource-id": ["vol-0123456789abcdef0*"]},  # a wildcard: moto's scan
        {"resource-id": ids[:2]},
        {"resource-id": [ids[0]], "key": ["Name"]},
        {"key": ["asyncstage:*"]},
        None,
    ]
    for filters in shapes:
        assert backend.describe_tags(filters) == _scan(backend, filters), filters
    assert [t["key"] for t in backend.describe_tags({"resource-id": [ids[0]]})] == [
        "Name",
        "asyncstage:of",
        "k0",
    ]
    assert backend.describe_tags({"resource-id": [ids[2]]})[0]["resource_type"] == "snapshot"
    backend.delete_tags([ids[0]], {"Name": "n0"})
    filters = {"resource-id": [ids[0]]}
    assert backend.describe_tags(filters) == _scan(backend, filters)
    assert len(backend.describe_tags(filters)) == 2
