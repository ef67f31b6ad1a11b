"""The library on an EC2 network, as far as the EC2 API tells it (plain moto).

Which way each server is reached (directly, through a jump host, or not at all), the
temporary ssh rule of a cross-VPC transfer leg and its revocation however the leg
ends, the sweep of a rule a dead controller left, and the controller's own address.
moto's instances have addresses outside this machine: nothing here connects to them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import anyio
import pytest

from asyncstage import Manager
from asyncstage.errors import InvalidArgument, NoRoute, UnknownServer
from asyncstage.server import Server
from asyncstage.ssh import SSHHost
from asyncstage.transfer import ingress
from asyncstage.transfer.link import route
from asyncstage.transfer.run import controller_id
from tests.test_manager_moto import _launch
from tests.test_manager_moto import make as make  # the fixture, shared

pytestmark = pytest.mark.anyio


def _private(server: Server) -> Server:
    """The server as EC2 describes one launched without a public address."""
    server.instance.pop("PublicIpAddress", None)
    return server


async def _ssh_cidrs(m: Manager, group_id: str) -> dict[str, str]:
    """The group's port 22 CIDRs and their descriptions."""
    found = await m.ec2.call("DescribeSecurityGroups", GroupIds=[group_id])
    return {
        r["CidrIp"]: r.get("Description", "")
        for p in found["SecurityGroups"][0]["IpPermissions"]
        if p.get("FromPort") == 22
        for r in p.get("IpRanges", [])
    }


# -- which way a server is reached -------------------------------------------------------


async def test_a_server_without_public_address_needs_a_jump_host(make: Any) -> None:
    async with make(on_exit="terminate") as m:
        public, hidden = await _launch(m, "public-one", "hidden-one")
        _private(hidden)
        assert (
            public.host.jump is None and public.host.address == public.instance["PublicIpAddress"]
        )
        assert public.jump_host is None
        with pytest.raises(NoRoute, match="jump_host="):
            hidden.host  # noqa: B018 (the property raises)
        # the manager's jump host: a managed server by name
        m.jump_host = "public-one"
        assert hidden.jump_host == "public-one"
        assert hidden.host.jump is public.host
        assert hidden.host.address == hidden.instance["PrivateIpAddress"]
        assert public.host.jump is None  # a public address: directly, the default aside
        # one set for the server itself wins, also over a public address
        hidden.jump_host = "admin@bastion.example:2222"
        jump = hidden.host.jump
        assert jump is not None and (jump.username, jump.address, jump.port) == (
            "admin",
            "bastion.example",
            2222,
        )
        assert jump.known_hosts.path == m.known_hosts.path and jump.host_key_policy == "strict"
        assert jump.client_keys == [m.keyfile]
        assert jump in m.registry.hosts_to_close()  # closed with the manager
        hidden.jump_host = public
        public.jump_host = hidden
        with pytest.raises(InvalidArgument, match="loop"):
            public.host  # noqa: B018
        public.jump_host = None
        assert public.host.jump is None
        hidden.jump_host = "no-such-server"
        with pytest.raises(UnknownServer, match="no-such-server"):
            hidden.host  # noqa: B018


async def test_jump_host_arguments_are_checked_before_anything_is_made(make: Any) -> None:
    for bad in ("", "root@", "@host", "root@host:0", "root@host:99999", "ro ot@host", 42):
        with pytest.raises(InvalidArgument):
            make(jump_host=bad)
    async with make(on_exit="terminate") as m:
        with pytest.raises(InvalidArgument):
            await m.provision_server("checked-first", jump_host="root@a b")
        assert m.servers() == []


# -- server -> server legs ---------------------------------------------------------------


def _host(address: str, network: str | None, private: str, public: str | None) -> SSHHost:
    host = SSHHost(address, username="root", known_hosts="/nonexistent/known_hosts")
    if network is not None:
        host.private_network = (network, private)
        host.public_address = public
    return host


def test_a_leg_takes_private_addresses_inside_a_vpc_and_public_ones_across() -> None:
    a = _host("198.18.0.5", "us-east-1/vpc-a", "172.31.0.5", "198.18.0.5")
    b = _host("198.18.0.6", "us-east-1/vpc-a", "172.31.0.6", "198.18.0.6")
    c = _host("198.18.0.7", "eu-west-1/vpc-c", "172.31.0.7", "198.18.0.7")
    hidden = _host("172.31.0.8", "eu-west-1/vpc-c", "172.31.0.8", None)
    assert route(a, b) == ("172.31.0.5", "172.31.0.6")
    assert route(a, c) == ("198.18.0.5", "198.18.0.7")
    assert route(c, hidden) == ("172.31.0.7", "172.31.0.8")  # one VPC: no public address needed
    for src, dst in ((a, hidden), (hidden, a)):
        with pytest.raises(NoRoute, match="no public address"):
            route(src, dst)
    plain = _host("127.0.0.9", None, "", None)
    assert route(plain, a) == ("127.0.0.9", "198.18.0.5")


class Boom(Exception):
    pass


async def test_the_temporary_rule_is_revoked_however_the_leg_ends(make: Any) -> None:
    async with make(on_exit="terminate") as m:
        group = await m.account.admit()
        cidr = "198.18.7.7/32"
        async with ingress.temporary_ingress(m.ec2, group, cidr):
            rules = await _ssh_cidrs(m, group)
            assert rules[cidr].startswith(f"asyncstage-transfer controller={controller_id()}")
            async with ingress.temporary_ingress(m.ec2, group, cidr):  # a second leg shares it
                pass
            assert cidr in await _ssh_cidrs(m, group)
        assert cidr not in await _ssh_cidrs(m, group)
        with pytest.raises(Boom):
            async with ingress.temporary_ingress(m.ec2, group, cidr):
                assert cidr in await _ssh_cidrs(m, group)
                raise Boom
        assert cidr not in await _ssh_cidrs(m, group)
        entered = anyio.Event()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def leg() -> None:
                    async with ingress.temporary_ingress(m.ec2, group, cidr):
                        entered.set()
                        await anyio.sleep_forever()

                tg.start_soon(leg)
                await entered.wait()
                assert cidr in await _ssh_cidrs(m, group)
                scope.cancel()
        assert cidr not in await _ssh_cidrs(m, group)
        # a rule that was there before is used, never revoked by the leg
        await m.ec2.call(
            "AuthorizeSecurityGroupIngress",
            GroupId=group,
            IpPermissions=[ingress._permission("198.18.8.8/32", 22, "a standing rule")],
        )
        async with ingress.temporary_ingress(m.ec2, group, "198.18.8.8/32"):
            pass
        assert (await _ssh_cidrs(m, group))["198.18.8.8/32"] == "a standing rule"
        assert set(await _ssh_cidrs(m, group)) == {"127.0.0.1/32", "198.18.8.8/32"}
        assert ingress._users == {}


async def test_a_dead_controllers_rule_is_swept_at_the_next_set_up(make: Any) -> None:
    async with make(on_exit="terminate", security_group="sweep-test") as m:
        group = await m.account.admit()
        host, boot, _, _ = controller_id().split("/")
        dead = f"{host}/{boot}/999999999/1"
        future = 4_000_000_000
        rules = {
            "198.18.1.1/32": f"asyncstage-transfer controller={dead} expires={future}",
            "198.18.1.2/32": f"asyncstage-transfer controller={controller_id()} expires=1",
            "198.18.1.3/32": f"asyncstage-transfer controller={controller_id()} expires={future}",
            "198.18.1.4/32": f"asyncstage-transfer controller=elsewhere/x/1/1 expires={future}",
            "198.18.1.5/32": "the user's own rule",
        }
        for cidr, description in rules.items():
            await m.ec2.call(
                "AuthorizeSecurityGroupIngress",
                GroupId=group,
                IpPermissions=[ingress._permission(cidr, 22, description)],
            )
    async with make(on_exit="terminate", security_group="sweep-test") as m:
        assert await m.account.admit() == group
        left = set(await _ssh_cidrs(m, group))
    # dead here, and expired: revoked; alive, elsewhere (until expiry), foreign: kept
    assert left == {"127.0.0.1/32", "198.18.1.3/32", "198.18.1.4/32", "198.18.1.5/32"}


# -- the controller's own address ---------------------------------------------------------


class _CheckIP(BaseHTTPRequestHandler):
    answer = b"198.18.0.42\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def checkip() -> Iterator[tuple[str, type[_CheckIP]]]:
    """A checkip endpoint on loopback (the real one is never asked in tests)."""

    class Handler(_CheckIP):
        pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", Handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_the_controllers_address_comes_from_the_checkip_url(
    make: Any, checkip: tuple[str, type[_CheckIP]]
) -> None:
    url, handler = checkip
    async with make(ssh_cidr=None, checkip_url=url, security_group="checkip-test") as m:
        group = await m.account.admit()
        assert set(await _ssh_cidrs(m, group)) == {"198.18.0.42/32"}
    handler.answer = b"<html>not an address</html>"
    async with make(ssh_cidr=None, checkip_url=url, security_group="checkip-bad") as m:
        with pytest.raises(InvalidArgument, match="ssh_cidr="):
            await m.account.admit()
    # without a checkip URL a loopback endpoint stays on loopback, asking nobody
    async with make(ssh_cidr=None, security_group="checkip-none") as m:
        group = await m.account.admit()
        assert set(await _ssh_cidrs(m, group)) == {"127.0.0.1/32"}
