"""Security groups as nftables tables, proven with real sockets between network namespaces.

The module makes its own small network: three namespaces (``a``, ``b``, ``c``) joined
by veth pairs to a bridge in a fourth one, with addresses in 10.213.0.0/24 and
fd5e::/64 and no other route (no default route: nothing can leave). Every table is the
one :func:`~asyncstage.localcloud._firewall.ruleset` compiles, loaded with
:func:`~asyncstage.localcloud._firewall.apply`. Servers and clients run inside the
namespaces (``ip netns exec``); a packet the table drops shows as a client that hears
nothing back ("timeout"; "dropped" when its own table refuses a datagram), one
that it admits as an answer ("open"). Each rule kind has
a case it admits and one it refuses. The namespaces are removed at the end, and the
module checks that none of them, nor any link, is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from asyncstage.errors import InvalidArgument
from asyncstage.localcloud import _firewall as fw
from asyncstage.localcloud._firewall import GroupRules, Policy, permission

pytestmark = [
    pytest.mark.localcloud,  # root, and the shared test lock (machine-wide namespaces)
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

PREFIX = f"asfw{os.getpid()}-"
ADDRESSES = {"a": "10.213.0.1", "b": "10.213.0.2", "c": "10.213.0.3"}
ADDRESSES6 = {"a": "fd5e::1", "b": "fd5e::2", "c": "fd5e::3"}
A_PUBLIC = "10.213.0.101"  # a second address of a: not its private one
TCP_PORTS = [22, 53, 80, 81, 443, 7999, 8000, 8001, 8002, 8003]
UDP_PORTS = [53, 54]
REFUSED_AFTER = 2.0  # seconds a client waits before it calls a probe unanswered

# EC2's default egress in a VPC with IPv6 (without, only the first: no IPv6 goes out)
EVERYTHING_OUT = (
    permission("-1", None, None, cidr="0.0.0.0/0"),
    permission("-1", None, None, cidr="::/0"),
)

SERVER = textwrap.dedent(
    """
    import socket, sys, threading

    def echo(conn):
        with conn:
            conn.sendall(b"ok\\n")
            while data := conn.recv(4096):
                conn.sendall(data)

    def serve_tcp(sock):
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def serve_udp(sock):
        while True:
            data, peer = sock.recvfrom(4096)
            sock.sendto(b"ok\\n", peer)

    for kind, serve, ports in (
        (socket.SOCK_STREAM, serve_tcp, sys.argv[1]),
        (socket.SOCK_DGRAM, serve_udp, sys.argv[2]),
    ):
        for port in ports.split(","):
            sock = socket.socket(socket.AF_INET6, kind)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", int(port)))
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
            threading.Thread(target=serve, args=(sock,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it
    """
)

# Probes run at once, each in a thread; prints one JSON list of outcomes.
PROBE = textwrap.dedent(
    """
    import json, os, random, socket, struct, sys, threading, time

    WAIT = float(sys.argv[2])

    def family(address):
        return socket.AF_INET6 if ":" in address else socket.AF_INET

    def tcp(p):
        with socket.socket(family(p["to"]), socket.SOCK_STREAM) as s:
            s.settimeout(WAIT)
            if p.get("from"):
                s.bind((p["from"], 0))
            try:
                s.connect((p["to"], p["port"]))
                return "open" if s.recv(3) == b"ok\\n" else "garbled"
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "reset"

    def udp(p):
        with socket.socket(family(p["to"]), socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT)
            s.sendto(b"hello", (p["to"], p["port"]))
            try:
                return "open" if s.recv(16) == b"ok\\n" else "garbled"
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "reset"

    def checksum(data):
        total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    def icmp(p):
        ident = random.randrange(1, 0xFFFF)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"asyncstage"
        packet = header[:2] + struct.pack("!H", checksum(header)) + header[4:]
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(packet, (p["to"], 0))
            deadline = time.monotonic() + WAIT
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, peer = s.recvfrom(2048)
                except TimeoutError:
                    break
                body = data[(data[0] & 0x0F) * 4 :]
                kind, _, _, got = struct.unpack("!BBHH", body[:6])
                if kind == 0 and got == ident and peer[0] == p["to"]:
                    return "open"
            return "timeout"

    probes = json.loads(sys.argv[1])
    results = [None] * len(probes)

    def one(i, p):
        try:
            results[i] = {"tcp": tcp, "udp": udp, "icmp": icmp}[p["kind"]](p)
        except PermissionError:  # the sender's own table dropped it (EPERM)
            results[i] = "dropped"
        except OSError as e:
            results[i] = "error: %s" % e

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(probes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results))
    """
)

# Holds one connection open and echoes a line through it for each line on stdin.
HOLDER = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    assert s.recv(3) == b"ok\\n"
    print("connected", flush=True)
    for line in sys.stdin:
        s.sendall(line.encode())
        try:
            print("echo " + s.recv(4096).decode().strip(), flush=True)
        except TimeoutError:
            print("timeout", flush=True)
    """
)


def sh(*argv: str, input: str | None = None) -> str:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr}")
    return done.stdout


def links() -> set[str]:
    """The link names of the machine's own namespace, but the local clouds' (``asl...``:
    the clouds of other test processes come and go while this test runs)."""
    names = {
        line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link").splitlines()
    }
    return {name for name in names if not name.startswith("asl")}


def ours() -> set[str]:
    return {n.split()[0] for n in sh("ip", "netns", "list").splitlines() if n.startswith(PREFIX)}


@dataclass
class Net:
    """The test network: namespace names by role, and the servers' processes."""

    ns: dict[str, str]
    servers: list[subprocess.Popen[str]]

    def load(
        self, who: str, *groups: GroupRules, members: dict[str, list[str]] | None = None
    ) -> None:
        """Make ``groups`` the table of namespace ``who``."""
        import ipaddress

        parsed = {g: tuple(ipaddress.ip_address(a) for a in m) for g, m in (members or {}).items()}
        fw.apply(self.ns[who], fw.ruleset(Policy(groups, parsed)))

    def probe(self, who: str, *probes: dict[str, object]) -> list[str]:
        """Run ``probes`` from namespace ``who`` at once; their outcomes, in order."""
        out = sh(
            "ip", "netns", "exec", self.ns[who], sys.executable, "-I", "-c", PROBE,
            json.dumps(list(probes)), str(REFUSED_AFTER),
        )  # fmt: skip
        result: list[str] = json.loads(out)
        return result


def tcp(to: str, port: int, source: str | None = None) -> dict[str, object]:
    return {"kind": "tcp", "to": ADDRESSES.get(to, to), "port": port, "from": source}


def udp(to: str, port: int) -> dict[str, object]:
    return {"kind": "udp", "to": ADDRESSES.get(to, to), "port": port}


def ping(to: str) -> dict[str, object]:
    return {"kind": "icmp", "to": ADDRESSES.get(to, to)}


def only_out(*rules: fw.Permission, group: str = "sg-0e0e0e0e") -> GroupRules:
    """A group with no ingress rules and the given egress ones."""
    return GroupRules(group, (), tuple(rules))


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    before = links()
    ns = {role: PREFIX + role for role in ("sw", "a", "b", "c")}
    made = Net(ns, [])
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sw = ns["sw"]
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for role in ("a", "b", "c"):
            # made inside the namespaces: the machine's own never sees these links
            sh("ip", "-n", ns[role], "link", "add", "eth0", "type", "veth",
               "peer", "name", f"v{role}", "netns", sw)  # fmt: skip
            sh("ip", "-n", sw, "link", "set", f"v{role}", "master", "br0", "up")
            sh("ip", "-n", ns[role], "addr", "add", f"{ADDRESSES[role]}/24", "dev", "eth0")
            sh("ip", "-n", ns[role], "addr", "add", f"{ADDRESSES6[role]}/64", "dev", "eth0",
               "nodad")  # fmt: skip
            sh("ip", "-n", ns[role], "link", "set", "eth0", "up")
        sh("ip", "-n", ns["a"], "addr", "add", f"{A_PUBLIC}/24", "dev", "eth0")
        for role in ("a", "b", "c"):
            server = subprocess.Popen(
                ["ip", "netns", "exec", ns[role], sys.executable, "-I", "-c", SERVER,
                 ",".join(map(str, TCP_PORTS)), ",".join(map(str, UDP_PORTS))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            made.servers.append(server)
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
        yield made
    finally:
        for server in made.servers:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    assert not ours(), "namespaces left behind"
    assert links() == before, "links left behind in the machine's namespace"


@pytest.fixture(autouse=True)
def plain(net: Net) -> None:
    """Every namespace starts a test with a default table: no ingress, all egress."""
    for who in ("a", "b", "c"):
        net.load(who, only_out(*EVERYTHING_OUT))


def test_no_route_out(net: Net) -> None:
    """The namespaces reach only their own link: no default route anywhere."""
    for who in ("a", "b", "c"):
        assert sh("ip", "-n", net.ns[who], "route", "show", "default").strip() == ""
        assert sh("ip", "-n", net.ns[who], "-6", "route", "show", "default").strip() == ""


def test_deny_by_default(net: Net) -> None:
    assert net.probe("a", tcp("b", 22), udp("b", 53), ping("b")) == ["timeout"] * 3


def test_cidr(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("tcp", 80, 80, cidr="10.213.0.1/32"),)))
    assert net.probe("a", tcp("b", 80), tcp("b", 81)) == ["open", "timeout"]
    assert net.probe("c", tcp("b", 80)) == ["timeout"]


def test_cidr_v6(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("tcp", 80, 80, cidr="fd5e::1/128"),)))
    assert net.probe("a", tcp(ADDRESSES6["b"], 80), tcp("b", 80)) == ["open", "timeout"]
    assert net.probe("c", tcp(ADDRESSES6["b"], 80)) == ["timeout"]


def test_port_range(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("tcp", 8000, 8002, cidr="10.213.0.0/24"),)))
    ports = [7999, 8000, 8001, 8002, 8003]
    assert net.probe("a", *(tcp("b", p) for p in ports)) == [
        "timeout",
        "open",
        "open",
        "open",
        "timeout",
    ]


def test_protocol_all(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("-1", None, None, cidr="10.213.0.1/32"),)))
    outcomes = net.probe("a", tcp("b", 80), tcp("b", 443), udp("b", 53), ping("b"))
    assert outcomes == ["open"] * 4
    assert net.probe("c", tcp("b", 80), udp("b", 53), ping("b")) == ["timeout"] * 3


def test_udp(net: Net) -> None:
    """A UDP rule admits that port's datagrams (and the answer comes back), not TCP."""
    net.load("b", GroupRules("sg-01", (permission("udp", 53, 53, cidr="0.0.0.0/0"),)))
    assert net.probe("a", udp("b", 53), udp("b", 54), tcp("b", 53)) == [
        "open",
        "timeout",
        "timeout",
    ]


def test_icmp(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("icmp", 8, -1, cidr="10.213.0.0/24"),)))
    assert net.probe("a", ping("b"), tcp("b", 80)) == ["open", "timeout"]
    # an ICMP rule of another type (timestamp) does not admit an echo request
    net.load("b", GroupRules("sg-01", (permission("icmp", 13, -1, cidr="10.213.0.0/24"),)))
    assert net.probe("a", ping("b")) == ["timeout"]


def test_group_reference(net: Net) -> None:
    """A group names its members' private addresses: not another address of theirs."""
    web = GroupRules("sg-0eb", (permission("tcp", 22, 22, group="sg-0a99"),))
    members = {"sg-0a99": [ADDRESSES["a"]]}  # a is in the group, c is not
    net.load("b", web, members=members)
    assert net.probe("a", tcp("b", 22), tcp("b", 22, source=A_PUBLIC)) == ["open", "timeout"]
    assert net.probe("c", tcp("b", 22)) == ["timeout"]
    # a group without members admits nobody
    net.load("b", web, members={"sg-0a99": []})
    assert net.probe("a", tcp("b", 22)) == ["timeout"]


def test_several_groups(net: Net) -> None:
    """The rules of all an instance's groups add up, each with its own peers."""
    one = GroupRules("sg-01", (permission("tcp", 80, 80, cidr="10.213.0.1/32"),))
    two = GroupRules("sg-02", (permission("tcp", 443, 443, cidr="10.213.0.3/32"),), EVERYTHING_OUT)
    net.load("b", one, two)
    assert net.probe("a", tcp("b", 80), tcp("b", 443)) == ["open", "timeout"]
    assert net.probe("c", tcp("b", 443), tcp("b", 80)) == ["open", "timeout"]


def test_egress_revoked(net: Net) -> None:
    """Without an egress rule nothing new goes out, but admitted connections answer."""
    everything_in = (permission("-1", None, None, cidr="0.0.0.0/0"),)
    net.load("b", GroupRules("sg-01", everything_in, EVERYTHING_OUT))
    net.load("a", GroupRules("sg-0a", (permission("tcp", 80, 80, cidr="10.213.0.2/32"),)))
    # a datagram the sender's own table drops fails at once (EPERM); a SYN is retried
    assert net.probe("a", tcp("b", 80), udp("b", 53), ping("b")) == [
        "timeout",
        "dropped",
        "dropped",
    ]
    # stateful: b's connection to a is admitted, and a's answers leave
    assert net.probe("b", tcp("a", 80), tcp("a", 81)) == ["open", "timeout"]


def test_egress_rule(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("-1", None, None, cidr="0.0.0.0/0"),)))
    net.load("a", only_out(permission("tcp", 80, 80, cidr="10.213.0.2/32")))
    assert net.probe("a", tcp("b", 80), tcp("b", 81), tcp("c", 80)) == [
        "open",
        "timeout",
        "timeout",
    ]


def test_egress_group_reference(net: Net) -> None:
    net.load("b", GroupRules("sg-01", (permission("-1", None, None, cidr="0.0.0.0/0"),)))
    net.load("c", GroupRules("sg-01", (permission("-1", None, None, cidr="0.0.0.0/0"),)))
    net.load(
        "a",
        only_out(permission("-1", None, None, group="sg-0b")),
        members={"sg-0b": [ADDRESSES["b"]]},
    )
    assert net.probe("a", tcp("b", 80), tcp("c", 80)) == ["open", "timeout"]


def test_revoke_stops_new_connections(net: Net) -> None:
    """A revoked rule admits no new connection; one it admitted before stays up (as on EC2)."""
    rule = permission("tcp", 80, 80, cidr="10.213.0.1/32")
    net.load("b", GroupRules("sg-01", (rule,)))
    holder = subprocess.Popen(
        ["ip", "netns", "exec", net.ns["a"], sys.executable, "-I", "-c", HOLDER,
         ADDRESSES["b"], "80", str(REFUSED_AFTER)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "connected"
        net.load("b", GroupRules("sg-01", ()))
        assert net.probe("a", tcp("b", 80)) == ["timeout"]
        holder.stdin.write("still there\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "echo still there"
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def test_loopback_always(net: Net) -> None:
    net.load("b", GroupRules("sg-01", ()))  # no ingress, no egress
    assert net.probe("b", tcp("127.0.0.1", 80), tcp("b", 80)) == ["open", "open"]


def test_drops_are_counted(net: Net) -> None:
    """What the table refuses shows in its counter (how a reader checks it, not by sending)."""
    net.load("b", GroupRules("sg-01", ()), only_out(*EVERYTHING_OUT))
    assert net.probe("a", tcp("b", 80)) == ["timeout"]
    table = json.loads(
        sh("ip", "netns", "exec", net.ns["b"], "nft", "-j", "list", "table", "inet", fw.TABLE)
    )
    counters = [
        expr["counter"]["packets"]
        for item in table["nftables"]
        if "rule" in item and item["rule"]["chain"] == "ingress"
        for expr in item["rule"]["expr"]
        if "counter" in expr
    ]
    assert counters and counters[0] >= 1


def test_apply_is_idempotent_and_replaces(net: Net) -> None:
    """Loading the same table twice is one table; a new one replaces it whole."""
    group = GroupRules("sg-01", (permission("tcp", 80, 80, cidr="10.213.0.1/32"),))
    script = fw.ruleset(Policy((group,)))
    fw.apply(net.ns["b"], script)
    first = sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset")
    fw.apply(net.ns["b"], script)
    assert sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset") == first
    assert first.count(f"table inet {fw.TABLE}") == 1
    fw.apply(net.ns["b"], fw.ruleset(Policy((GroupRules("sg-01", ()),))))
    assert "dport 80" not in sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset")
    fw.remove(net.ns["b"])
    fw.remove(net.ns["b"])  # nothing to remove: no error
    assert sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset").strip() == ""


@pytest.mark.parametrize(
    "fields",
    [
        {
            "ip_protocol": "tcp accept; flush ruleset",
            "from_port": 22,
            "to_port": 22,
            "cidr": "10.0.0.0/8",
        },
        {"ip_protocol": "tcp", "from_port": "22 accept", "to_port": 22, "cidr": "10.0.0.0/8"},
        {"ip_protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8 } accept"},
        {"ip_protocol": "tcp", "from_port": 22, "to_port": 22, "group": 'sg-1" accept'},
        {"ip_protocol": "tcp", "from_port": 80, "to_port": 22, "cidr": "10.0.0.0/8"},
        {"ip_protocol": "tcp", "from_port": 22, "to_port": 70000, "cidr": "10.0.0.0/8"},
        {"ip_protocol": "udp", "from_port": -1, "to_port": -1, "cidr": "10.0.0.0/8"},
        {"ip_protocol": "300", "from_port": None, "to_port": None, "cidr": "10.0.0.0/8"},
        {"ip_protocol": "tcp", "from_port": 22, "to_port": 22},
    ],
)
def test_hostile_rule_refused(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        permission(
            fields["ip_protocol"],
            fields["from_port"],
            fields["to_port"],
            cidr=fields.get("cidr"),
            group=fields.get("group"),
        )


@pytest.mark.parametrize("name", ["a b", "../etc", "-n", "x;reboot", "", "."])
def test_hostile_namespace_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        fw.apply(name, fw.ruleset(Policy(())))


def test_firewalls_follow_the_records(net: Net) -> None:
    """The engine's keeper: a boot loads the table at once, a change reaches it shortly,
    and a failed boot load is an error (an instance is never left without its table)."""
    import threading
    import time

    from asyncstage.localcloud.errors import LocalCloudError

    lock = threading.RLock()
    rules: dict[str, GroupRules] = {"i-b": GroupRules("sg-01", ())}
    running: dict[str, str] = {}
    keeper = fw.Firewalls(
        lock, lambda: dict(running), lambda ids: {i: Policy((rules[i],)) for i in ids}
    )
    try:
        keeper.booted("i-b", net.ns["b"])
        running["i-b"] = net.ns["b"]
        assert net.probe("a", tcp("b", 80)) == ["timeout"]
        with lock:
            rules["i-b"] = GroupRules("sg-01", (permission("tcp", 80, 80, cidr="10.213.0.1/32"),))
            keeper.changed()
        deadline = time.monotonic() + 30
        listed = ""
        while time.monotonic() < deadline and "dport 80" not in listed:
            listed = sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset")
            time.sleep(0.05)
        assert "dport 80" in listed
        assert net.probe("a", tcp("b", 80)) == ["open"]
        with pytest.raises(LocalCloudError):
            keeper.booted("i-b", PREFIX + "missing")
    finally:
        keeper.close()


def test_firewalls_compile_a_shared_policy_once(net: Net) -> None:
    """A burst of boots into one group that admits its own members: each refresh reads
    the records once and compiles the group's table once, however many instances share
    it; every instance ends with the newest members."""
    import ipaddress
    import threading
    import time

    lock = threading.RLock()
    group = GroupRules("sg-01", (permission("tcp", 80, 80, group="sg-01"),))
    members: list[ipaddress.IPv4Address] = []
    running: dict[str, str] = {}
    reads: list[int] = []

    def policies(ids: list[str]) -> dict[str, Policy]:
        reads.append(len(ids))
        shared = Policy((group,), {"sg-01": tuple(members)})
        return {i: shared for i in ids}

    keeper = fw.Firewalls(lock, lambda: dict(running), policies)
    fleet = 40
    try:
        for n in range(fleet):
            with lock:
                running[f"i-{n}"] = net.ns["b"]
                members.append(ipaddress.IPv4Address(f"10.213.9.{n + 1}"))
                keeper.changed()
        last = str(members[-1])
        deadline = time.monotonic() + 60
        listed = ""
        while time.monotonic() < deadline and last not in listed:
            listed = sh("ip", "netns", "exec", net.ns["b"], "nft", "list", "ruleset")
            time.sleep(0.05)
        assert last in listed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and keeper.counts["refreshes"] < len(reads):
            time.sleep(0.05)
        counts = keeper.counts
        assert counts["refreshes"] == len(reads) >= 1
        # one text per refresh, not one per instance
        assert counts["compiled"] <= counts["refreshes"] < fleet
        assert counts["loaded"] <= counts["refreshes"] * fleet
    finally:
        keeper.close()
