"""Security groups read from the EC2 backend's records (moto's, as the local cloud keeps them).

API-only: a backend of the local cloud's own class without an engine (plain moto
records: no hosts, no root). What the firewall of an instance is made of, and that every
change that may alter one tells the engine.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from moto.ec2.exceptions import EC2ClientError

from asyncstage.localcloud._firewall import Permission, ruleset
from asyncstage.localcloud._groups import instance_policies, instance_policy
from asyncstage.localcloud._moto import LocalBackend, make_backend
from asyncstage.localcloud._records import uninstall_backend

REGION = "us-east-1"
ALL_OUT = Permission(None, None, None, ipaddress.ip_network("0.0.0.0/0"))


class Told:
    """Stands in for the engine's one hook these operations call (it counts the calls)."""

    def __init__(self) -> None:
        self.calls = 0

    def security_changed(self) -> None:
        self.calls += 1


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    made = make_backend(REGION, "".join(str(secrets.randbelow(10)) for _ in range(12)))
    made.image_id = made.register_image(name="local", description="local").id
    yield made
    uninstall_backend(made)


def launch(backend: LocalBackend, *group_ids: str) -> Any:
    reservation = backend.run_instances(
        backend.image_id,
        1,
        "",
        [],
        security_group_ids=list(group_ids),
        instance_type="t3.micro",
        is_instance_type_default=False,
        placement=f"{REGION}a",
    )
    return reservation.instances[0]


def test_rules_and_members(backend: LocalBackend) -> None:
    """A group reference is its members' private addresses; CIDR rules as they are."""
    web = backend.create_security_group("web", "web servers")
    app = backend.create_security_group("app", "app servers")
    backend.authorize_security_group_ingress(
        web.id, "tcp", "22", "22", [{"CidrIp": "192.0.2.0/24"}], source_groups=[{"GroupId": app.id}]
    )
    member = launch(backend, app.id)
    member.nics[0].public_ip = "198.18.0.7"  # never a member's address
    launch(backend, web.id)  # not a member of app
    server = launch(backend, web.id)
    policy = instance_policy(backend, server)
    assert [g.group_id for g in policy.groups] == [web.id]
    assert policy.groups[0].ingress == (
        Permission(6, 22, 22, ipaddress.ip_network("192.0.2.0/24")),
        Permission(6, 22, 22, app.id),
    )
    assert policy.members == {app.id: (ipaddress.ip_address(member.private_ip),)}
    text = ruleset(policy)
    assert f"ip saddr {{ {member.private_ip} }} tcp dport 22 accept" in text
    assert "198.18.0.7" not in text


def test_default_egress_and_revoked(backend: LocalBackend) -> None:
    """A group in a VPC starts with egress to 0.0.0.0/0; revoked, the instance sends nothing."""
    group = backend.create_security_group("quiet", "no egress")
    instance = launch(backend, group.id)
    assert instance_policy(backend, instance).groups[0].egress == (ALL_OUT,)
    backend.revoke_security_group_egress(group.id, "-1", "", "", [{"CidrIp": "0.0.0.0/0"}])
    assert instance_policy(backend, instance).groups[0].egress == ()
    text = ruleset(instance_policy(backend, instance))
    egress = text.split("chain egress", 1)[1]
    assert "accept" in egress and "nfproto" not in egress and "daddr" not in egress


def test_several_groups_add_up(backend: LocalBackend) -> None:
    one = backend.create_security_group("one", "one")
    two = backend.create_security_group("two", "two")
    backend.authorize_security_group_ingress(one.id, "tcp", "80", "80", [{"CidrIp": "10.0.0.0/8"}])
    backend.authorize_security_group_ingress(two.id, "udp", "53", "53", [{"CidrIpv6": "fd00::/8"}])
    instance = launch(backend, one.id, two.id)
    text = ruleset(instance_policy(backend, instance))
    assert "ip saddr { 10.0.0.0/8 } tcp dport 80 accept" in text
    assert "ip6 saddr { fd00::/8 } udp dport 53 accept" in text


def test_instance_and_interface_groups_are_one_set(backend: LocalBackend) -> None:
    """Replacing an instance's groups replaces its interface's (EC2 has one set; moto two)."""
    old = backend.create_security_group("old", "old")
    new = backend.create_security_group("new", "new")
    instance = launch(backend, old.id)
    backend.modify_instance_security_groups(instance.id, [new.id])
    assert [g.group_id for g in instance_policy(backend, instance).groups] == [new.id]
    backend.modify_network_interface_attribute(instance.nics[0].id, [old.id])
    assert [g.group_id for g in instance_policy(backend, instance).groups] == [old.id]


def test_deleted_group_admits_nothing(backend: LocalBackend) -> None:
    group = backend.create_security_group("gone", "deleted while in use")
    backend.authorize_security_group_ingress(group.id, "-1", "", "", [{"CidrIp": "10.0.0.0/8"}])
    instance = launch(backend, group.id)
    # EC2 refuses to delete a group in use (DependencyViolation), and so does the local
    # cloud; a record gone anyway (another backend's doing) admits nothing either
    with pytest.raises(EC2ClientError, match="DependencyViolation"):
        backend.delete_security_group(group_id=group.id)
    backend.groups[group.vpc_id].pop(group.id)
    assert instance_policy(backend, instance).groups == ()


def test_hostile_record_is_left_out(backend: LocalBackend) -> None:
    """A rule whose fields do not parse admits nothing, and none of it reaches the table."""
    group = backend.create_security_group("hostile", 'x" } ; flush ruleset')
    backend.authorize_security_group_ingress(
        group.id, "tcp", "22", "22", [{"CidrIp": "10.0.0.0/8"}]
    )
    backend.authorize_security_group_ingress(
        group.id, "tcp", "80", "80", [{"CidrIp": "10.0.0.0/8"}]
    )
    group.ingress_rules[0].ip_protocol = "tcp dport 1-65535 accept; flush ruleset; #"
    instance = launch(backend, group.id)
    policy = instance_policy(backend, instance)
    assert policy.groups[0].ingress == (Permission(6, 80, 80, ipaddress.ip_network("10.0.0.0/8")),)
    text = ruleset(policy)
    assert "flush" not in text and "1-65535" not in text and "hostile" not in text


def test_every_change_tells_the_engine(backend: LocalBackend) -> None:
    group = backend.create_security_group("told", "told")
    other = backend.create_security_group("other", "other")
    instance = launch(backend, group.id)
    told = Told()
    backend.engine = told  # type: ignore[assignment]  # only this hook is called
    try:
        steps = [
            lambda: backend.authorize_security_group_ingress(
                group.id, "tcp", "22", "22", [{"CidrIp": "10.0.0.0/8"}]
            ),
            lambda: backend.revoke_security_group_ingress(
                group.id, "tcp", "22", "22", [{"CidrIp": "10.0.0.0/8"}]
            ),
            lambda: backend.authorize_security_group_egress(
                group.id, "tcp", "443", "443", [{"CidrIp": "10.0.0.0/8"}]
            ),
            lambda: backend.revoke_security_group_egress(
                group.id, "tcp", "443", "443", [{"CidrIp": "10.0.0.0/8"}]
            ),
            lambda: backend.modify_instance_security_groups(instance.id, [other.id]),
            lambda: backend.modify_network_interface_attribute(instance.nics[0].id, [group.id]),
            lambda: backend.delete_security_group(group_id=other.id),
        ]
        for n, step in enumerate(steps, 1):
            step()
            assert told.calls == n
        # a refused request may have changed some records: the engine hears of it too
        with pytest.raises(EC2ClientError):
            backend.revoke_security_group_ingress(
                group.id, "tcp", "23", "23", [{"CidrIp": "10.0.0.0/8"}]
            )
        assert told.calls == len(steps) + 1
    finally:
        backend.engine = None


def test_default_group_admits_its_members(backend: LocalBackend) -> None:
    """EC2's default group of a VPC: all traffic from its own members, all egress."""
    default = backend.get_default_security_group()
    assert default is not None
    member = launch(backend, default.id)
    policy = instance_policy(backend, member)
    assert policy.groups[0].ingress == (Permission(None, None, None, default.id),)
    assert policy.groups[0].egress == (ALL_OUT,)
    assert policy.members == {default.id: (ipaddress.ip_address(member.private_ip),)}


def test_policies_of_a_fleet_read_once(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's policies in one go: the members are found in one pass over the instances
    (not one per instance), and instances with the same groups share one policy (one
    table to compile), the same as each one's own."""
    default = backend.get_default_security_group()
    assert default is not None
    web = backend.create_security_group("web", "web servers")
    fleet = [launch(backend, default.id) for _ in range(30)]
    server = launch(backend, web.id)
    passes = 0
    every = backend.all_instances

    def counted() -> Any:
        nonlocal passes
        passes += 1
        return every()

    monkeypatch.setattr(backend, "all_instances", counted)
    policies = instance_policies(backend, [*fleet, server])
    assert passes == 1
    assert len({id(policies[i.id]) for i in fleet}) == 1
    assert policies[fleet[0].id] == instance_policy(backend, fleet[0])
    assert policies[fleet[0].id].members == {
        default.id: tuple(ipaddress.ip_address(i.private_ip) for i in fleet)
    }
    assert policies[server.id] == instance_policy(backend, server)
    assert policies[server.id].members == {}  # no rule of its group names a group
