"""Security groups in the EC2 backend: what each instance's firewall is made of.

:class:`GroupEffects` is the part of the EC2 backend (:class:`._moto.LocalBackend`) that
tells the engine when a change may alter any instance's firewall (rules authorized or
revoked, a group deleted, an instance's or interface's groups replaced), and keeps an
instance's groups and its primary interface's groups one set, as EC2 does (moto keeps
two). :func:`instance_policy` reads the records into the parsed, validated form that
:mod:`._firewall` compiles.

Everything here runs in the server's request threads under ``engine.lock``.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

from moto.ec2.exceptions import DependencyViolationError
from moto.ec2.models import EC2Backend
from moto.ec2.models.security_groups import SecurityGroupRule

from asyncstage.errors import InvalidArgument
from asyncstage.localcloud._firewall import Address, GroupRules, Permission, Policy, permission
from asyncstage.localcloud._hooks import EngineHooks

log = logging.getLogger("asyncstage.localcloud")


def _telling(name: str) -> Callable[..., Any]:
    """moto's operation ``name``, then the engine told. A request may change some records
    and then fail (several permissions, one refused): the engine hears of it either way."""

    def operation(self: GroupEffects, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(super(GroupEffects, self), name)(*args, **kwargs)
        finally:
            self._groups_changed()

    operation.__name__ = operation.__qualname__ = name
    return operation


class GroupEffects(EC2Backend):
    """EC2's group operations, each followed by the engine's refresh of the firewalls."""

    engine: EngineHooks | None  # given by the backend (:class:`._moto.LocalBackend`)

    def _groups_changed(self) -> None:
        if self.engine is not None:
            self.engine.security_changed()

    def create_security_group(self, *args: Any, **kwargs: Any) -> Any:
        """CreateSecurityGroup; a VPC's default group admits its own members, as on EC2."""
        group = super().create_security_group(*args, **kwargs)
        if group.is_default and not group.ingress_rules:
            account = self.account_id
            itself = {"GroupId": group.id, "UserId": account, "OwnerId": account}
            group.ingress_rules.append(
                SecurityGroupRule(self, "-1", group.id, None, None, None, itself, is_egress=False)
            )
        return group

    authorize_security_group_ingress = _telling("authorize_security_group_ingress")
    revoke_security_group_ingress = _telling("revoke_security_group_ingress")
    authorize_security_group_egress = _telling("authorize_security_group_egress")
    revoke_security_group_egress = _telling("revoke_security_group_egress")
    modify_security_group_rules = _telling("modify_security_group_rules")
    delete_security_group = _telling("delete_security_group")

    def _delete_security_group(self, vpc_id: str | None, group_id: str) -> None:
        """DeleteSecurityGroup of a found group: refused with EC2's ``DependencyViolation``
        while an instance (not terminated) is in it or another group's rule names it."""
        for instance in self.all_instances():
            if instance.state != "terminated" and any(
                str(g.id) == group_id for g in _groups_of(instance)
            ):
                raise DependencyViolationError(f"resource {group_id} has a dependent object")
        for groups in self.groups.values():
            for other in groups.values():
                if str(other.id) == group_id:
                    continue  # its own rules naming itself (a default group's) do not count
                for rule in (*other.ingress_rules, *other.egress_rules):
                    if (rule.source_group or {}).get("GroupId") == group_id:
                        raise DependencyViolationError(
                            f"resource {group_id} has a dependent object"
                        )
        super()._delete_security_group(vpc_id, group_id)

    def modify_instance_security_groups(
        self, instance_id: str, new_group_id_list: list[str]
    ) -> Any:
        """ModifyInstanceAttribute's groups: the primary interface's groups on EC2."""
        try:
            instance = super().modify_instance_security_groups(instance_id, new_group_id_list)
            primary = _primary_nic(instance)
            if primary is not None:
                primary._group_set = list(instance.security_groups)
            return instance
        finally:
            self._groups_changed()

    def modify_network_interface_attribute(
        self, eni_id: str, group_ids: list[str], *args: Any, **kwargs: Any
    ) -> None:
        """ModifyNetworkInterfaceAttribute; on a primary interface, the instance's groups."""
        try:
            super().modify_network_interface_attribute(eni_id, group_ids, *args, **kwargs)
            eni = self.get_network_interface(eni_id)
            instance = getattr(eni, "instance", None)
            if group_ids and instance is not None and _primary_nic(instance) is eni:
                instance.security_groups = list(eni._group_set)
        finally:
            self._groups_changed()


def _primary_nic(instance: Any) -> Any:
    nics = getattr(instance, "nics", {}) or {}
    return nics.get(0)


def _groups_of(instance: Any) -> list[Any]:
    """The instance's groups: its own and its interfaces' (one set on EC2), in order."""
    found: dict[str, Any] = {}
    for group in [
        *(instance.security_groups or []),
        *(g for nic in (getattr(instance, "nics", {}) or {}).values() for g in nic._group_set),
    ]:
        if group is not None:
            found.setdefault(str(group.id), group)
    return list(found.values())


def _addresses(instance: Any) -> list[Address]:
    """The instance's private addresses (every interface's, primary and secondary)."""
    texts: list[object] = []
    for nic in (getattr(instance, "nics", {}) or {}).values():
        texts.append(nic.private_ip_address)
        texts += [item.get("PrivateIpAddress") for item in nic.private_ip_addresses or []]
    found: list[Address] = []
    for text in texts:
        if not isinstance(text, str) or not text:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            log.warning("local cloud: %s: ignoring private address %r", instance.id, text)
            continue
        if address not in found:
            found.append(address)
    return found


def _permissions(group: Any, rules: Iterable[Any]) -> tuple[Permission, ...]:
    """A group's rules, parsed; one that does not parse admits nothing (and is logged)."""
    parsed: list[Permission] = []
    for rule in rules:
        ip_range = rule.ip_range or {}
        source = rule.source_group or {}
        peers: list[dict[str, object]] = []
        if ip_range.get("CidrIp") is not None:
            peers.append({"cidr": ip_range["CidrIp"]})
        if ip_range.get("CidrIpv6") is not None:
            peers.append({"cidr": ip_range["CidrIpv6"]})
        if source.get("GroupId") is not None:
            peers.append({"group": source["GroupId"]})
        if rule.prefix_list_id is not None:
            log.warning("local cloud: %s: prefix lists are not enforced (%s)", group.id, rule.id)
        for peer in peers:
            try:
                parsed.append(permission(rule.ip_protocol, rule.from_port, rule.to_port, **peer))
            except InvalidArgument as e:
                log.warning("local cloud: %s: rule %s refused: %s", group.id, rule.id, e)
    return tuple(parsed)


def instance_policy(backend: EC2Backend, instance: Any) -> Policy:
    """The firewall policy of ``instance`` from ``backend``'s records (see
    :func:`instance_policies`)."""
    return instance_policies(backend, [instance])[str(instance.id)]


def instance_policies(backend: EC2Backend, instances: Iterable[Any]) -> dict[str, Policy]:
    """The firewall policies of ``instances`` (of ``backend``), by instance id.

    A group deleted since (moto lets a group in use be deleted) counts as none; a group
    reference means the private addresses of the instances (not terminated) of that group.
    The records are read once for them all: each group's rules are parsed once, the
    members of the groups that rules name are found in one pass over the instances, and
    instances with the same groups share one :class:`Policy` (one table to compile).
    """
    existing = {str(g.id): g for groups in backend.groups.values() for g in groups.values()}
    parsed: dict[str, GroupRules] = {}
    chosen: dict[str, tuple[GroupRules, ...]] = {}
    for instance in instances:
        rules: list[GroupRules] = []
        for group in _groups_of(instance):
            record = existing.get(str(group.id))
            if record is None:
                continue
            if str(record.id) not in parsed:
                parsed[str(record.id)] = GroupRules(
                    group_id=str(record.id),
                    ingress=_permissions(record, record.ingress_rules),
                    egress=_permissions(record, record.egress_rules),
                )
            rules.append(parsed[str(record.id)])
        chosen[str(instance.id)] = tuple(rules)
    named = {
        p.peer
        for g in parsed.values()
        for p in (*g.ingress, *g.egress)
        if isinstance(p.peer, str) and p.peer in existing
    }
    members: dict[str, list[Address]] = {name: [] for name in named}
    if members:
        for other in backend.all_instances():
            if other.state == "terminated":
                continue
            for group in _groups_of(other):
                if str(group.id) in members:
                    members[str(group.id)] += _addresses(other)
    shared: dict[tuple[str, ...], Policy] = {}
    policies: dict[str, Policy] = {}
    for instance_id, groups in chosen.items():
        key = tuple(g.group_id for g in groups)
        if key not in shared:
            names = {p.peer for g in groups for p in (*g.ingress, *g.egress)}
            shared[key] = Policy(groups, {n: tuple(members[n]) for n in members if n in names})
        policies[instance_id] = shared[key]
    return policies
