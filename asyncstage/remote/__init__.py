"""Scripts that run on servers, and the one runner that ships them and reads their answer.

The scripts are modules of this package (standard library only, no asyncstage
import), linted and type-checked with the rest, and unit-tested locally:

* :mod:`asyncstage.remote.rsynchelper`: work dirs, temporary keys, process groups;
* :mod:`asyncstage.remote.blockcopy`: dd's sparse block copier;
* :mod:`asyncstage.remote.manifest`: a backup's manifest, written and checked where
  the data is.

A script is sent as package data (read with :mod:`importlib.resources`) to
``python3 -I -S -c``, followed by a call of its ``main`` (:func:`program`): nothing is
installed on the server. Every script answers with one JSON object on its last
line of output; :func:`answer` is the one guard that reads it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from asyncstage.errors import TransferError

if TYPE_CHECKING:
    from asyncstage.ssh import SSHHost

__all__ = ["SCRIPTS", "SERVER_PYTHON", "answer", "argv", "program", "run_json", "source"]

SCRIPTS = ("rsynchelper", "blockcopy", "manifest")
"""The scripts this package ships."""
SERVER_PYTHON = (3, 8)
"""The oldest ``python3`` on a server that runs them (Ubuntu 20.04's; not Amazon Linux
2's 3.7): their syntax and what they use of the standard library are kept to it."""

_ENTRY = "\nimport sys as _sys\n\nraise SystemExit(main(_sys.argv[1:]))\n"


@functools.cache
def source(name: str) -> str:
    """The text of script ``name`` (one of :data:`SCRIPTS`), from package data."""
    if name not in SCRIPTS:
        raise ValueError(f"no remote script {name!r}")
    return resources.files(__package__).joinpath(f"{name}.py").read_text(encoding="utf-8")


def program(name: str) -> str:
    """What ``python3 -c`` runs for script ``name``: its text, then a call of its ``main``."""
    return source(name) + _ENTRY


def argv(name: str, *args: str) -> list[str]:
    """The argv that runs script ``name`` with ``args`` (``python3 -I -S -c PROGRAM
    ARGS...``): isolated (no ``PYTHON*`` variables, no current directory on the path: a
    module planted there or named in the environment never runs as root) and without
    ``site``, which the standard library does not need and whose ``.pth`` files a
    server may run at every start (a fleet of backups starts these scripts on every
    server at once)."""
    return ["python3", "-I", "-S", "-c", program(name), *args]


def answer(label: str, output: str, *, prefix: str = "") -> dict[str, Any]:
    """The JSON object on the last line of ``output`` (after ``prefix``, e.g. ``"R "``).

    Raises :class:`~asyncstage.errors.TransferError` when there is none.
    """
    lines = [ln for ln in output.strip().splitlines() if ln.startswith(prefix)]
    try:
        value = json.loads(lines[-1][len(prefix) :])
    except (IndexError, ValueError) as e:
        raise TransferError(f"{label}: unexpected output from a remote script: {output!r}") from e
    if not isinstance(value, dict):
        raise TransferError(f"{label}: unexpected answer from a remote script: {value!r}")
    return value


async def run_json(
    host: SSHHost,
    sudo: bool,
    name: str,
    *args: str,
    timeout: float | None = 120,
    refused: Mapping[str, type[Exception]] | None = None,
) -> dict[str, Any]:
    """Run script ``name`` on ``host`` and return its JSON answer (``timeout`` None:
    as long as it takes).

    A refusal (``{"error": ...}``) raises the error type ``refused`` maps its
    ``kind`` to (:class:`~asyncstage.errors.TransferError` by default); any other
    failure raises :class:`~asyncstage.errors.CommandFailed` or TransferError.
    """
    result = await host.run(*argv(name, *args), sudo=sudo, timeout=timeout, check=False)
    out = str(result.stdout)
    if not result.ok:
        try:
            reply = answer(host.label, out)
        except TransferError:
            reply = {}
        if "error" not in reply:
            raise result.failure(host.label)
    else:
        reply = answer(host.label, out)
    if "error" in reply:
        kind = str(reply.get("kind", ""))
        error_type = (refused or {}).get(kind, TransferError)
        raise error_type(f"{host.label}: {reply['error']}")
    return reply
