"""Security groups enforced: one instance's groups as an nftables table in its namespace.

EC2's semantics, compiled for one instance by :func:`ruleset`:

- the rules of all the instance's groups add up; ingress is denied unless a rule admits
  it, and egress is allowed only by egress rules (a group in a VPC is created with
  ``0.0.0.0/0`` all traffic; revoke it, and the instance may send nothing new);
- stateful: the replies of an admitted connection pass both ways, whatever the rules
  of the other direction say (``ct state established,related``), and a revoked rule
  stops new connections only;
- a rule naming a group (``UserIdGroupPairs``) matches the *private* addresses of that
  group's members, never their public ones;
- loopback is always allowed, and IPv6 neighbour discovery (the link's own upkeep,
  which EC2 does not filter either).

Everything in the text comes from parsed values (integers, :mod:`ipaddress` objects,
a checked group id): whatever a record holds, it cannot add nft syntax. A rule that
does not parse raises :class:`~asyncstage.errors.InvalidArgument`.

:func:`apply` loads the text into a network namespace in one transaction (the old table
goes in the same one), so a change is atomic and applying the same text twice is the
same as once.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from asyncstage.errors import InvalidArgument
from asyncstage.localcloud._netns import nft as load_nft
from asyncstage.localcloud.errors import LocalCloudError

TABLE = "asyncstage_sg"  # the table's name in each instance's namespace (family inet)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Direction = Literal["ingress", "egress"]
log = logging.getLogger("asyncstage.localcloud")

ALL, ICMP, TCP, UDP, ICMPV6 = None, 1, 6, 17, 58
# IpProtocol as EC2 takes it: a name or a number; "-1" (or "all") is every protocol
_PROTOCOL_NAMES = {"-1": ALL, "all": ALL, "icmp": ICMP, "tcp": TCP, "udp": UDP, "icmpv6": ICMPV6}
_GROUP_ID = re.compile(r"sg-[0-9a-f]{1,32}\Z")
_NETNS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
# The link's own upkeep (IPv6 neighbour and router discovery): never filtered.
# The longest a refresh waits for more changes to join it (it waits as long as the last
# one took): a change reaches every table within about twice that.
_MAX_PAUSE = 1.0
_ND = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert"


@dataclass(frozen=True)
class Permission:
    """One rule of a group, parsed: a protocol, its ports, and a peer.

    ``low``/``high``: the port range of TCP and UDP; the ICMP type and code of ICMP and
    ICMPv6 (``None``: every one); unused for other protocols (EC2 admits them whole).
    ``peer``: a CIDR, or the id of a group whose members' private addresses it means.
    """

    protocol: int | None  # None: every protocol (EC2's -1)
    low: int | None
    high: int | None
    peer: Network | str


@dataclass(frozen=True)
class GroupRules:
    """The parsed ingress and egress rules of one security group."""

    group_id: str
    ingress: tuple[Permission, ...] = ()
    egress: tuple[Permission, ...] = ()


@dataclass(frozen=True)
class Policy:
    """What :func:`ruleset` needs for one instance: its groups, and the private addresses
    of the members of every group their rules name (group id -> addresses)."""

    groups: tuple[GroupRules, ...]
    members: Mapping[str, tuple[Address, ...]] = field(default_factory=dict)


def group_id(value: object) -> str:
    """A security group id, checked (``sg-`` and hex digits)."""
    if not isinstance(value, str) or not _GROUP_ID.match(value):
        raise InvalidArgument(f"not a security group id: {value!r}")
    return value


def protocol(value: object) -> int | None:
    """EC2's IpProtocol as a protocol number (None: all); a name or a number 0-255."""
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in _PROTOCOL_NAMES:
        return _PROTOCOL_NAMES[text]
    if text.isdigit() and text.isascii() and int(text) <= 255:
        return int(text)
    raise InvalidArgument(f"not an IP protocol: {value!r}")


def _number(value: object, what: str, top: int) -> int | None:
    """An int in -1..top (-1 and None: any)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{what}: not a number: {value!r}")
    text = str(value).strip()
    if not re.fullmatch(r"-?[0-9]{1,5}", text):
        raise InvalidArgument(f"{what}: not a number: {value!r}")
    number = int(text)
    if not -1 <= number <= top:
        raise InvalidArgument(f"{what}: {number} is out of range (-1 to {top})")
    return None if number == -1 else number


def network(value: object) -> Network:
    """A CIDR (IPv4 or IPv6); host bits are cleared, as EC2 stores it."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidArgument(f"not a CIDR: {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise InvalidArgument(f"not a CIDR: {value!r}") from None


def permission(
    ip_protocol: object,
    from_port: object,
    to_port: object,
    *,
    cidr: object = None,
    group: object = None,
) -> Permission:
    """One rule from EC2's fields, validated; exactly one of ``cidr`` and ``group``."""
    if (cidr is None) == (group is None):
        raise InvalidArgument("a rule names either a CIDR or a group")
    peer: Network | str = network(cidr) if cidr is not None else group_id(group)
    proto = protocol(ip_protocol)
    if proto in (TCP, UDP):
        low, high = _number(from_port, "FromPort", 65535), _number(to_port, "ToPort", 65535)
        if low is None or high is None:  # EC2: -1 is no port range of TCP or UDP
            raise InvalidArgument("a TCP or UDP rule needs FromPort and ToPort (0-65535)")
        if low > high:
            raise InvalidArgument(f"port range {low}-{high}: FromPort exceeds ToPort")
        if (low, high) == (0, 65535):
            low = high = None
        return Permission(proto, low, high, peer)
    if proto in (ICMP, ICMPV6):
        icmp_type = _number(from_port, "ICMP type", 255)
        code = _number(to_port, "ICMP code", 255)
        return Permission(proto, icmp_type, None if icmp_type is None else code, peer)
    return Permission(proto, None, None, peer)


# -- the ruleset ---------------------------------------------------------------------------


def _protocol_match(rule: Permission, version: int) -> str | None:
    """The nft match of the rule's protocol and ports (None: never for this IP version)."""
    proto = rule.protocol
    if proto is ALL:
        return ""
    if proto in (ICMP, ICMPV6):
        if (proto == ICMP) != (version == 4):
            return None  # ICMP of the other IP version: matches nothing here
        keyword = "icmp" if proto == ICMP else "icmpv6"
        if rule.low is None:
            return f"meta l4proto {keyword}"
        code = "" if rule.high is None else f" {keyword} code {rule.high}"
        return f"{keyword} type {rule.low}{code}"
    if proto in (TCP, UDP):
        keyword = "tcp" if proto == TCP else "udp"
        if rule.low is None or rule.high is None:
            return f"meta l4proto {keyword}"
        ports = str(rule.low) if rule.low == rule.high else f"{rule.low}-{rule.high}"
        return f"{keyword} dport {ports}"
    return f"meta l4proto {proto}"


def _peers(rule: Permission, members: Mapping[str, tuple[Address, ...]]) -> list[Network]:
    if isinstance(rule.peer, str):
        return [ipaddress.ip_network(a) for a in members.get(rule.peer, ())]
    return [rule.peer]


def _address_match(peers: list[Network], version: int, direction: Direction) -> str | None:
    """The nft match of the rule's peers of one IP version (None: it has none)."""
    # nft refuses overlapping intervals in a set: merge them first
    nets: list[Network] = []
    if version == 4:
        nets += ipaddress.collapse_addresses(
            n for n in peers if isinstance(n, ipaddress.IPv4Network)
        )
    else:
        nets += ipaddress.collapse_addresses(
            n for n in peers if isinstance(n, ipaddress.IPv6Network)
        )
    if not nets:
        return None
    family = "ip" if version == 4 else "ip6"
    if any(n.prefixlen == 0 for n in nets):
        return f"meta nfproto {'ipv4' if version == 4 else 'ipv6'}"
    side = "saddr" if direction == "ingress" else "daddr"
    listed = ", ".join(
        str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets
    )
    return f"{family} {side} {{ {listed} }}"


def _rules(
    permissions: Iterable[Permission],
    members: Mapping[str, tuple[Address, ...]],
    direction: Direction,
) -> list[str]:
    lines: list[str] = []
    for rule in permissions:
        peers = _peers(rule, members)
        for version in (4, 6):
            where = _address_match(peers, version, direction)
            what = _protocol_match(rule, version)
            if where is None or what is None:
                continue
            line = " ".join(p for p in (where, what, "accept") if p)
            if line not in lines:
                lines.append(line)
    return lines


def ruleset(policy: Policy) -> str:
    """The nftables script that makes ``policy`` the instance's firewall, atomically.

    Loaded with ``nft -f``: it creates the table if missing, deletes it and writes it
    anew, all in one transaction.
    """
    ingress = _rules((p for g in policy.groups for p in g.ingress), policy.members, "ingress")
    egress = _rules((p for g in policy.groups for p in g.egress), policy.members, "egress")
    ids = ", ".join(g.group_id for g in policy.groups) or "none"
    return "\n".join(
        [
            f"# security groups: {ids}",
            f"add table inet {TABLE}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            _chain("ingress", "input", "iif", ingress),
            _chain("egress", "output", "oif", egress),
            "}",
            "",
        ]
    )


def _chain(name: str, hook: str, interface: str, rules: list[str]) -> str:
    body = [
        f"type filter hook {hook} priority filter; policy drop;",
        f"{interface} lo accept",
        "ct state established,related accept",
        "ct state invalid drop",
        f"icmpv6 type {{ {_ND} }} accept",
        *rules,
        "counter drop",
    ]
    return "\n".join([f"    chain {name} {{", *(f"        {line}" for line in body), "    }"])


# -- applying it ---------------------------------------------------------------------------


def netns_name(value: object) -> str:
    """A network namespace's name, checked (it goes on a command line)."""
    if not isinstance(value, str) or not _NETNS.match(value) or value in (".", ".."):
        raise InvalidArgument(f"not a network namespace name: {value!r}")
    return value


def _nft(netns: str, script: str, what: str) -> None:
    load_nft(netns_name(netns), script, what)


def apply(netns: str, script: str) -> None:
    """Load a :func:`ruleset` into network namespace ``netns`` (atomic, idempotent)."""
    _nft(netns, script, "security groups")


def remove(netns: str) -> None:
    """Delete the table from ``netns`` (nothing to do if it has none)."""
    _nft(netns, f"add table inet {TABLE}\ndelete table inet {TABLE}\n", "removing security groups")


# -- keeping them up to date ---------------------------------------------------------------


class Firewalls:
    """Each running instance's table, kept to its groups by one worker thread.

    ``running()`` (called under ``lock``) names the instances that have a namespace
    and are up (instance id -> namespace); ``policies(instance_ids)`` (under ``lock``)
    reads their records in one go (an instance not found is left out; instances with the
    same groups may share one :class:`Policy`). :meth:`changed` asks for a refresh of
    them all. Refreshes coalesce: one runs at a time, it first waits as long as the last
    one took (so a burst of boots makes few refreshes, and the worker never takes more
    than half a core), then reads the records, so the last one applied is always the
    newest. The lock is held only to read the records; a policy is compiled once per
    refresh whatever the number of instances that share it (and not again while it does
    not change), and a table whose text did not change is not loaded again.

    ``counts``: ``refreshes``, ``compiled`` (tables' texts made) and ``loaded``.
    """

    def __init__(
        self,
        lock: threading.RLock,
        running: Callable[[], Mapping[str, str]],
        policies: Callable[[list[str]], Mapping[str, Policy]],
    ) -> None:
        self._lock = lock
        self._running = running
        self._policies = policies
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localcloud-fw")
        self._queued = False
        self._closed = threading.Event()
        self._pause = 0.0  # how long the last refresh took: the next one waits as long
        self._applied: dict[str, tuple[str, str]] = {}  # instance -> (netns, script) loaded
        self._scripts: dict[Hashable, str] = {}  # the texts of the last refresh's policies
        self.counts: collections.Counter[str] = collections.Counter()

    def changed(self) -> None:
        """Records changed: refresh every table soon (call under ``lock``)."""
        if self._queued or self._closed.is_set():
            return
        self._queued = True
        self._worker.submit(self._refresh)

    def booted(self, instance_id: str, netns: str) -> None:
        """Load the table of an instance that just booted in ``netns``; raises on failure.

        In the caller's thread, beside other boots and the refreshes: the instance is
        not running yet, so no refresh loads its table meanwhile (its first one after it
        is running brings any change since)."""
        with self._lock:
            policy = self._policies([instance_id]).get(instance_id)
        if policy is None:
            raise LocalCloudError(f"{instance_id}: no such instance: no security groups")
        self._load(instance_id, (netns, self._script(policy, {}, self._scripts)))

    def close(self) -> None:
        self._closed.set()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _script(
        self, policy: Policy, known: dict[Hashable, str], earlier: Mapping[Hashable, str]
    ) -> str:
        """The policy's text: from ``known`` or ``earlier`` if there, else compiled."""
        key = (policy.groups, tuple(sorted(policy.members.items())))
        script = known.get(key) or earlier.get(key)
        if script is None:
            script = ruleset(policy)
            self.counts["compiled"] += 1
        known[key] = script
        return script

    def _load(self, instance_id: str, loaded: tuple[str, str]) -> None:
        try:
            apply(*loaded)
        except LocalCloudError:
            self._applied.pop(instance_id, None)
            raise
        self._applied[instance_id] = loaded
        self.counts["loaded"] += 1

    def _refresh(self) -> None:
        if self._closed.wait(self._pause):  # changes meanwhile join this refresh
            return
        started = time.monotonic()
        with self._lock:  # only the records are read under it; compiling takes longer
            self._queued = False
            targets = dict(self._running())
            policies = self._policies(list(targets))
        self.counts["refreshes"] += 1
        for gone in set(self._applied) - set(targets):
            self._applied.pop(gone, None)  # (a boot may touch it meanwhile)
        previous, scripts = self._scripts, dict[Hashable, str]()
        by_policy: dict[int, str] = {}  # instances sharing a policy share its text
        for instance_id, netns in targets.items():
            policy = policies.get(instance_id)
            if policy is None:
                log.error("local cloud: %s: no security groups", instance_id)
                continue
            if id(policy) not in by_policy:
                by_policy[id(policy)] = self._script(policy, scripts, previous)
            loaded = (netns, by_policy[id(policy)])
            if self._applied.get(instance_id) == loaded:
                continue
            try:
                self._load(instance_id, loaded)
            except LocalCloudError:
                log.exception("local cloud: %s: security groups not applied", instance_id)
        self._scripts = scripts
        self._pause = min(_MAX_PAUSE, time.monotonic() - started)
