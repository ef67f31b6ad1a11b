"""Idempotent creates: one logical create per ClientToken, also when its answer never
came (then the token's tag finds what it made)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from asyncstage.ec2.client import Client, Resource
from asyncstage.ec2.tags import CLIENT_TOKEN_TAG, tag_filters

__all__ = ["CreatedKind", "Tokens"]

CreatedKind = Literal["instance", "volume"]


class Tokens:
    """What each ClientToken of a :class:`Client`'s create calls made."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._made: dict[str, list[Resource]] = {}
        self._unsettled: dict[str, CreatedKind] = {}
        self._locks: dict[str, anyio.Lock] = {}

    async def once(
        self,
        kind: CreatedKind,
        token: str,
        create: Callable[[], Awaitable[list[Resource]]],
    ) -> list[Resource]:
        """``create()`` once per token: a repeat returns what the token already made.

        EC2 itself returns the first call's result for a repeated ClientToken; this
        also covers endpoints that ignore the token (moto, the local cloud), and
        the call whose reply never came (a timeout, a cancellation): such a token
        stays *unsettled* and the next call with it looks for what it made by tag.
        """
        async with self._locks.setdefault(token, anyio.Lock()):  # a second call waits
            if token in self._made:
                return self._made[token]
            if token in self._unsettled:
                found = await self.created_with(kind, token)
                if found:
                    self._made[token] = found
                    del self._unsettled[token]
                    return found
            self._unsettled[token] = kind
            made = await create()  # an error or a cancellation leaves the token unsettled
            self._made[token] = made
            del self._unsettled[token]
            return made

    @property
    def unsettled(self) -> dict[str, CreatedKind]:
        """ClientTokens of create calls whose outcome is unknown (failed, timed out, cancelled).

        Their owner looks them up with :meth:`created_with` to clean up what they made.
        """
        return dict(self._unsettled)

    def settle(self, token: str) -> None:
        """Forget a token whose resources the caller has found (and cleaned up)."""
        self._unsettled.pop(token, None)

    async def created_with(self, kind: CreatedKind, token: str) -> list[Resource]:
        """The instances or volumes a create call with this ClientToken made (by its tag).

        Terminated instances and deleted volumes are left out.
        """
        flt = tag_filters({CLIENT_TOKEN_TAG: token})
        if kind == "instance":
            found = await self._client.describe_instances(filters=flt)
            return [i for i in found if i.get("State", {}).get("Name") != "terminated"]
        volumes = await self._client.describe_volumes(filters=flt)
        return [v for v in volumes if v.get("State") not in ("deleting", "deleted")]
