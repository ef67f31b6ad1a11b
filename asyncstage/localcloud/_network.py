"""The local cloud's network: instances in namespaces of their own, behind a router.

With ``network="vpc"`` every instance lives in a network namespace the cloud made
(``asl-<run token>-<instance id>``), with its private address from its subnet's CIDR
on ``eth0`` and routes to its VPC's router only. The pieces, all named with the run's
token so that the next cloud recognises and sweeps what a crashed one left:

- the **router** namespace (``asl-<token>-router``): one veth pair into the machine
  (``asl<token>`` on the machine's side, the "internet" segment ``198.19.B.0/30``), a
  route per public address to the router of the instance's VPC, and the ``checkip``
  service at ``198.18.B.1``;
- a **VPC router** namespace per VPC (``asl-<token>-<vpc id>``): the VPC's bridge
  ``br0`` with each subnet's first host address as its gateway, a link to the router,
  and the 1:1 NAT of its instances' public addresses (``198.18.B.0/24``) in nftables,
  hairpin included (an instance that reaches another's public address arrives from its
  own public address). VPCs of one cloud may overlap (every region's default VPC is
  ``172.31.0.0/16``): each has a namespace, so its addresses never meet another's;
- on the machine: the route of the cloud's public range into the router, ``unreachable``
  routes for the rest of ``198.18.0.0/15`` and for every VPC CIDR the cloud hands out.

Nothing leaves: no namespace has a default route, the routers forward only what is
destined for the cloud's ranges (the rest is dropped and counted by the named nftables
counter ``outside``), and IP forwarding is on only inside the router namespaces.

All methods block; the engine calls them from its worker threads.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asyncstage.errors import InvalidArgument, MissingDependency
from asyncstage.localcloud._netns import NETNS_DIR, in_netns
from asyncstage.localcloud._netns import nft as load_nft
from asyncstage.localcloud._system import run, which
from asyncstage.localcloud.errors import LocalCloudError

log = logging.getLogger("asyncstage.localcloud")

NetworkMode = Literal["auto", "vpc", "loopback"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("auto", "vpc", "loopback")
PUBLIC_RANGE = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: never routed on the internet
NFT_TABLE = "asyncstage_net"  # the routers' table (instances' namespaces hold none of ours)

# The public ranges of the clouds running in this process (the test suite's network
# guard lets connections to these through, and nothing else outside the loopback range).
RUNNING_RANGES: set[ipaddress.IPv4Network] = set()


def checked_mode(value: str) -> NetworkMode:
    for mode in NETWORK_MODES:
        if value == mode:
            return mode
    raise InvalidArgument(f"network={value!r}: one of {', '.join(NETWORK_MODES)}")


def netns_prefix(token: str) -> str:
    """The names of a run's namespaces start with this."""
    return f"asl-{token}-"


def machine_link(token: str) -> str:
    """The run's veth on the machine's side (15 characters at most)."""
    return f"asl{token}"


@dataclass(frozen=True)
class Placement:
    """Where an instance sits: its VPC (and that VPC's CIDR) and its subnet's CIDR."""

    vpc_id: str
    vpc_cidr: str
    subnet_cidr: str


@dataclass
class _Vpc:
    index: int
    vpc_id: str
    netns: str
    cidr: ipaddress.IPv4Network
    subnets: set[str] = field(default_factory=set)


@dataclass
class _Port:
    """An instance's namespace and its link to its VPC's bridge."""

    netns: str
    vpc: _Vpc
    address: str
    public: str = ""  # NATed to ``address`` now ("": none)


# -- running things in namespaces -----------------------------------------------------------


def _ip(*args: str, netns: str | None = None) -> str:
    where = ["-n", netns] if netns else []
    return run(which("ip"), *where, *args, what=f"ip {' '.join(args[:3])}")


def _ip_batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Several ``ip`` commands in one process (a boot's links and routes)."""
    where = ["-n", netns] if netns else []
    text = "".join(line + "\n" for line in lines)
    done = subprocess.run(
        [which("ip"), *where, "-batch", "-"], input=text, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise LocalCloudError(f"ip -batch in {netns or 'the machine'}: {done.stderr.strip()}")


def _in_netns(netns: str, *argv: str, stdin: str | None = None, what: str) -> str:
    """Run a program inside ``netns`` (its network namespace only)."""
    done = subprocess.run(
        [which("nsenter"), f"--net={NETNS_DIR / netns}", *argv],
        input=stdin,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise LocalCloudError(f"{what} in {netns}: {done.stderr.strip()}")
    return done.stdout


def _nft(netns: str, script: str) -> None:
    load_nft(netns, script, "nft")


def _add_netns(name: str) -> None:
    _ip("netns", "add", name)


def _del_netns(name: str) -> None:
    with contextlib.suppress(LocalCloudError):
        _ip("netns", "delete", name)


def netns_names(prefix: str = "asl-") -> list[str]:
    """The namespaces (``ip netns`` names) whose names start with ``prefix``."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except OSError:
        return []


def possible() -> str | None:
    """Why this machine cannot make the cloud's network (None: it can)."""
    for program in ("ip", "nft", "nsenter", "sysctl"):
        try:
            which(program)
        except MissingDependency:
            return f"no {program} program (Debian: iproute2, nftables, util-linux)"
    if not Path("/proc/self/ns/net").exists():
        return "the kernel has no network namespaces"
    return None


# -- the machine's routes ---------------------------------------------------------------


def _own_networks() -> list[ipaddress.IPv4Network]:
    """The networks the machine's own interfaces are on (their kernel routes)."""
    found = []
    for route in json.loads(_ip("-4", "-json", "route", "show", "proto", "kernel") or "[]"):
        with contextlib.suppress(KeyError, ValueError):
            found.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return found


def add_unreachable(prefix: str) -> bool:
    """An ``unreachable`` route on the machine; False if one for ``prefix`` is there, or
    if ``prefix`` overlaps a network the machine is on (that one stays reachable)."""
    network = ipaddress.IPv4Network(prefix)
    for own in _own_networks():
        if own.overlaps(network) and not own.subnet_of(PUBLIC_RANGE):
            log.warning(
                "local cloud: no unreachable route for %s: the machine is on %s", network, own
            )
            return False
    try:
        _ip("route", "add", "unreachable", prefix)
    except LocalCloudError as e:
        if "File exists" in str(e):
            return False
        raise
    return True


def del_unreachable(prefix: str) -> None:
    with contextlib.suppress(LocalCloudError):
        _ip("route", "del", "unreachable", prefix)


def sweep(token: str, routes: Iterable[str]) -> None:
    """Remove what a dead run left: its namespaces, its machine link and ``routes``."""
    with contextlib.suppress(LocalCloudError):
        if Path("/sys/class/net", machine_link(token)).exists():
            _ip("link", "delete", machine_link(token))
    for name in netns_names(netns_prefix(token)):
        _del_netns(name)
    for prefix in routes:
        del_unreachable(prefix)


# -- the checkip service -----------------------------------------------------------------


class _CheckIpHandler(http.server.BaseHTTPRequestHandler):
    """checkip.amazonaws.com: the caller's address as the cloud's edge sees it."""

    server_version = "checkip"

    def do_GET(self) -> None:
        body = (self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _CheckIp:
    def __init__(self, netns: str, address: str) -> None:
        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, 80))
            sock.listen(64)
            return sock

        self.server = http.server.ThreadingHTTPServer(
            (address, 80), _CheckIpHandler, bind_and_activate=False
        )
        self.server.socket.close()
        self.server.socket = in_netns(netns, listen)
        self.server.daemon_threads = True
        self.url = f"http://{address}/"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


# -- the network of one run ---------------------------------------------------------------


class Network:
    """The router, VPC routers, instance namespaces and machine routes of one run.

    ``claim_route`` records an ``unreachable`` route on the machine in the run's record
    and makes it (:func:`add_unreachable`; recorded first, so that a crash is swept);
    ``release_routes`` removes those that no other running cloud still claims.
    """

    def __init__(
        self,
        token: str,
        block: int,
        claim_route: Callable[[str], None],
        release_routes: Callable[[], None],
    ) -> None:
        self.token = token
        self.block = block
        self.public_range = ipaddress.IPv4Network(f"198.18.{block}.0/24")
        self.segment = ipaddress.IPv4Network(f"198.19.{block}.0/30")
        self.machine_address = str(self.segment[1])
        self.router_address = str(self.segment[2])
        self.checkip_address = str(self.public_range[1])
        self.router = netns_prefix(token) + "router"
        self.link = machine_link(token)
        self.checkip_url = ""
        self._claim_route = claim_route
        self._release_routes = release_routes
        self._lock = threading.RLock()
        self._vpcs: dict[str, _Vpc] = {}
        self._ports: dict[str, _Port] = {}
        self._next_port = 0
        self._next_public = 2  # .1 is checkip's
        self._checkip: _CheckIp | None = None
        self._started = False

    @property
    def ranges(self) -> list[ipaddress.IPv4Network]:
        """What the machine reaches of the cloud: its public range and the segment."""
        return [self.public_range, self.segment]

    def _cloud_ranges(self) -> str:
        return ", ".join(str(r) for r in self.ranges)

    def start(self) -> None:
        """The router, its link into the machine, the machine's routes, checkip."""
        self._started = True
        self._claim(str(PUBLIC_RANGE))
        _add_netns(self.router)
        _ip("link", "add", self.link, "type", "veth", "peer", "name", "up0", "netns", self.router)
        _ip_batch(
            [
                "link set lo up",
                f"addr add {self.router_address}/30 dev up0",
                "link set up0 up",
                f"addr add {self.checkip_address}/32 dev lo",
                # what every VPC router needs, tried now: a bridge
                "link add probe0 type bridge",
                "link delete probe0",
            ],
            self.router,
        )
        _ip_batch(
            [
                f"addr add {self.machine_address}/30 dev {self.link}",
                f"link set {self.link} up",
                f"route add {self.public_range} via {self.router_address} dev {self.link}",
            ]
        )
        self._forwarding(self.router)
        _nft(self.router, self._filter_table(self._cloud_ranges()))
        # ... and NAT (the kernel's nf_nat), so that "auto" falls back now, not at a boot
        _nft(
            self.router,
            "table ip asl_probe {\n chain probe { type nat hook prerouting priority dstnat; }\n}\n"
            "delete table ip asl_probe\n",
        )
        RUNNING_RANGES.add(self.public_range)
        self._checkip = _CheckIp(self.router, self.checkip_address)
        self.checkip_url = self._checkip.url

    def _claim(self, prefix: str) -> None:
        """An ``unreachable`` route on the machine (recorded first, for the sweep)."""
        self._claim_route(prefix)

    @staticmethod
    def _forwarding(netns: str) -> None:
        # nsenter's sysctl writes the namespace's own /proc/sys/net: never the machine's
        _in_netns(netns, which("sysctl"), "-qw", "net.ipv4.ip_forward=1", what="sysctl ip_forward")

    @staticmethod
    def _filter_table(ranges: str, nat: str = "") -> str:
        return f"""
table inet {NFT_TABLE} {{
  counter outside {{ }}
  set cloud_ranges {{ type ipv4_addr; flags interval; elements = {{ {ranges} }}; }}
  {nat}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip daddr @cloud_ranges accept
    counter name outside drop
  }}
}}
"""

    # -- VPCs --------------------------------------------------------------------------

    def _vpc(self, placement: Placement) -> _Vpc:
        vpc = self._vpcs.get(placement.vpc_id)
        if vpc is not None:
            return vpc
        index = len(self._vpcs) + 1
        if index > 254:
            raise LocalCloudError("the local cloud's network has room for 254 VPCs")
        cidr = ipaddress.IPv4Network(placement.vpc_cidr)
        vpc = _Vpc(index, placement.vpc_id, netns_prefix(self.token) + placement.vpc_id, cidr)
        self._vpcs[placement.vpc_id] = vpc
        self._claim(str(cidr))
        _add_netns(vpc.netns)
        near, far = f"169.254.{index}.1", f"169.254.{index}.2"
        _ip(
            "link", "add", f"v{index}", "type", "veth", "peer", "name", "up0", "netns", vpc.netns,
            netns=self.router,
        )  # fmt: skip
        _ip_batch([f"addr add {near}/30 dev v{index}", f"link set v{index} up"], self.router)
        _ip_batch(
            [
                "link set lo up",
                f"addr add {far}/30 dev up0",
                "link set up0 up",
                "link add br0 type bridge",
                "link set br0 up",
                *(f"route add {r} via {near}" for r in self.ranges),
            ],
            vpc.netns,
        )
        self._forwarding(vpc.netns)
        nat = """
  map to_private { type ipv4_addr : ipv4_addr; }
  map to_public { type ipv4_addr : ipv4_addr; }
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    dnat ip to ip daddr map @to_private
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "up0" snat ip to ip saddr map @to_public
    ct status dnat snat ip to ip saddr map @to_public
  }"""
        _nft(vpc.netns, self._filter_table(f"{cidr}, {self._cloud_ranges()}", nat))
        return vpc

    # -- instances ---------------------------------------------------------------------

    def attach(self, instance_id: str, placement: Placement, address: str) -> str:
        """The instance's namespace (made at its first boot; it keeps it until terminated)."""
        with self._lock:  # the shared parts: its VPC's router and its subnet's gateway
            port = self._ports.get(instance_id)
            if port is not None:
                return port.netns
            vpc = self._vpc(placement)
            subnet = ipaddress.IPv4Network(placement.subnet_cidr)
            gateway = str(subnet[1])
            if placement.subnet_cidr not in vpc.subnets:
                _ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", "br0", netns=vpc.netns)
                vpc.subnets.add(placement.subnet_cidr)
            self._next_port += 1
            link = f"i{self._next_port}"
            netns = netns_prefix(self.token) + instance_id
            port = _Port(netns, vpc, address)
            self._ports[instance_id] = port
        # its own parts, beside other instances' boots: most of the time a namespace and
        # a link take is the kernel's, waiting (not working), so a fleet's overlap
        _add_netns(netns)
        _ip_batch(
            [
                f"link add {link} type veth peer name eth0 netns {netns}",
                f"link set {link} master br0",
                f"link set {link} up",
            ],
            vpc.netns,
        )
        routes = [str(vpc.cidr), *(str(r) for r in self.ranges)]
        _ip_batch(
            [
                "link set lo up",
                f"addr add {address}/{subnet.prefixlen} dev eth0",
                "link set eth0 up",
                *(f"route add {r} via {gateway}" for r in routes if r != str(subnet)),
            ],
            netns,
        )
        return netns

    def new_public_address(self, taken: set[str]) -> str:
        """A free address of the cloud's public range (never one in ``taken``)."""
        with self._lock:
            size = self.public_range.num_addresses - 3  # network, checkip, broadcast
            for _ in range(size):
                offset = self._next_public
                self._next_public = 2 + (self._next_public - 1) % size
                address = str(self.public_range[offset])
                if address not in taken:
                    return address
        raise LocalCloudError(f"no free public address left in {self.public_range}")

    def publish(self, instance_id: str, public: str) -> None:
        """NAT ``public`` 1:1 to the instance's private address, and route it to its VPC."""
        with self._lock:
            port = self._ports[instance_id]
        # one instance's publish, unpublish and remove never overlap (the engine holds
        # its lock of the instance); other instances' go on beside
        if port.public == public:
            return
        self._unpublish(port)
        table = f"inet {NFT_TABLE}"
        _nft(
            port.vpc.netns,
            f"add element {table} to_private {{ {public} : {port.address} }}\n"
            f"add element {table} to_public {{ {port.address} : {public} }}\n",
        )
        port.public = public
        _ip_batch([f"route add {public}/32 via 169.254.{port.vpc.index}.2"], self.router)

    def unpublish(self, instance_id: str) -> None:
        """The instance's public address reaches it no more (it stopped)."""
        with self._lock:
            port = self._ports.get(instance_id)
        if port is not None:
            self._unpublish(port)

    def _unpublish(self, port: _Port) -> None:
        if not port.public:
            return
        public, port.public = port.public, ""
        with contextlib.suppress(LocalCloudError):
            _ip("route", "del", f"{public}/32", netns=self.router)
        with contextlib.suppress(LocalCloudError):
            table = f"inet {NFT_TABLE}"
            _nft(
                port.vpc.netns,
                f"delete element {table} to_private {{ {public} }}\n"
                f"delete element {table} to_public {{ {port.address} }}\n",
            )

    def remove(self, instance_id: str) -> None:
        """The instance is terminated: its namespace (and its link) go."""
        with self._lock:
            port = self._ports.pop(instance_id, None)
        if port is not None:
            self._unpublish(port)
            _del_netns(port.netns)

    def close(self) -> None:
        """Remove everything of the run (after its hosts are dead)."""
        if not self._started:
            return
        self._started = False
        if self._checkip is not None:
            self._checkip.close()
            self._checkip = None
        self.checkip_url = ""
        RUNNING_RANGES.discard(self.public_range)
        with self._lock:
            self._ports.clear()
            self._vpcs.clear()
            with contextlib.suppress(LocalCloudError):
                if Path("/sys/class/net", self.link).exists():
                    _ip("link", "delete", self.link)
            for name in netns_names(netns_prefix(self.token)):
                _del_netns(name)
            self._release_routes()
