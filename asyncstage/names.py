"""The naming rules: server, volume and backup names, login user names, mount points.

Names come from the caller, from the command line and from EC2 tags that anybody
with access to the account can write. Every one of them ends up in file names,
mount points, tables, fstab lines and shell command lines, so each is checked
here, once, wherever it enters:

- a server, volume or backup name starts with a letter or a digit, then letters,
  digits, ``.``, ``_`` and ``-``, at most 128 characters (:func:`check_name`);
- a login user name is a portable POSIX user name (:func:`check_user`);
- a mount point is absolute, normalised, and never ``/`` nor at or under a system
  directory (:func:`check_mount_point`); the default one is
  ``/mnt/Staging/<name>`` (:func:`default_mount_point`).

Each check raises a typed error that says the rule, and never changes anything.
"""

from __future__ import annotations

import re
from typing import Literal

from asyncstage.errors import InvalidName, MountPointRefused

__all__ = [
    "MAX_NAME",
    "MAX_USER",
    "MOUNT_ROOT",
    "REFUSED_MOUNT_POINTS",
    "check_mount_point",
    "check_name",
    "check_user",
    "default_mount_point",
    "is_valid_mount_point",
    "is_valid_name",
    "is_valid_user",
]

MAX_NAME = 128
"""The longest server, volume or backup name."""

MAX_USER = 32
"""The longest login user name (useradd's limit on Linux)."""

MOUNT_ROOT = "/mnt/Staging"
"""Where volumes are mounted unless told otherwise: ``/mnt/Staging/<name>``."""

REFUSED_MOUNT_POINTS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib*",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
)
"""System directories: no mount point at or under one of them (nor ``/`` itself)."""

NAME_RULE = (
    "a name starts with a letter or a digit, then only letters, digits, '.', '_' "
    f"and '-', at most {MAX_NAME} characters"
)
USER_RULE = (
    "a login user name starts with a letter or '_', then only letters, digits, "
    f"'.', '_' and '-', at most {MAX_USER} characters"
)

# ASCII only: str.isalnum and \w would let non-ASCII letters through.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
_USER = re.compile(rf"[A-Za-z_][A-Za-z0-9_.-]{{0,{MAX_USER - 1}}}")
_SAFE_PATH_CHAR = re.compile(r"[A-Za-z0-9._/+@:=,%~-]*")

Kind = Literal["server", "volume", "backup", "snapshot", "name"]


def is_valid_name(name: object) -> bool:
    """Whether ``name`` follows the naming rule (see :func:`check_name`)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, kind: Kind = "name") -> str:
    """``name`` itself when it is a valid server, volume or backup name, else InvalidName.

    The rule: it starts with an ASCII letter or digit, then ASCII letters,
    digits, ``.``, ``_`` and ``-``, at most 128 characters. So no ``/``, no
    ``..`` path, no leading ``-`` (an option to a command), no space, quote,
    newline, ``$`` or non-ASCII character.
    """
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise InvalidName(f"invalid {kind} name {_shown(name)}: {NAME_RULE}")


def is_valid_user(user: object) -> bool:
    """Whether ``user`` is a valid login user name (see :func:`check_user`)."""
    return isinstance(user, str) and _USER.fullmatch(user) is not None


def check_user(user: object) -> str:
    """``user`` itself when it is a portable POSIX login user name, else InvalidName.

    The rule (POSIX portable user names, the same as
    ``asyncstage.shell.check_login_user``): an ASCII letter or ``_``, then letters,
    digits, ``.``, ``_``, ``-``, at most 32 characters. A name starting with ``-``
    would be an option to ssh; one with ``@`` would change the host.
    """
    if isinstance(user, str) and _USER.fullmatch(user):
        return user
    raise InvalidName(f"invalid login user name {_shown(user)}: {USER_RULE}")


def _normalise(path: str) -> str:
    """``path`` with repeated and trailing slashes and ``.`` components removed."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def _refused_by(path: str) -> str | None:
    """The system directory ``path`` is at or under, if any."""
    top = path.split("/")[1] if path != "/" else ""
    for refused in REFUSED_MOUNT_POINTS:
        head = refused[1:]
        if (head.endswith("*") and top.startswith(head[:-1])) or top == head:
            return "/" + top
    return None


def check_mount_point(mtpt: object) -> str:
    """The normalised absolute mount point, or MountPointRefused saying why.

    Refused: a relative path, a ``..`` component (even one that would stay
    inside: the path must say where it goes), a control or shell-special
    character, ``/`` itself, and anything at or under ``/bin /boot /dev /etc
    /lib* /proc /root /run /sbin /sys /usr /var``. ``/mnt/x/`` and
    ``/mnt//x/./`` come back as ``/mnt/x``. The server resolves symlinks on its
    side before mounting; this check is the part that needs no server.
    """
    if not isinstance(mtpt, str) or not mtpt:
        raise MountPointRefused(f"mount point {_shown(mtpt)} is not a path")
    if not mtpt.startswith("/"):
        raise MountPointRefused(f"mount point {_shown(mtpt)} is not an absolute path")
    if _SAFE_PATH_CHAR.fullmatch(mtpt) is None:
        raise MountPointRefused(
            f"mount point {_shown(mtpt)} has a character other than ASCII letters, "
            "digits and . _ / + @ : = , % ~ -"
        )
    if ".." in mtpt.split("/"):
        raise MountPointRefused(f"mount point {_shown(mtpt)} has a '..' component")
    norm = _normalise(mtpt)
    if norm == "/":
        raise MountPointRefused("refusing to mount a volume over /: the root of the system")
    refused = _refused_by(norm)
    if refused is not None:
        raise MountPointRefused(
            f"refusing to mount a volume at {norm}: at or under {refused}, a system directory"
        )
    return norm


def is_valid_mount_point(mtpt: object) -> bool:
    """Whether ``mtpt`` passes :func:`check_mount_point` unchanged (already normalised)."""
    try:
        return check_mount_point(mtpt) == mtpt
    except MountPointRefused:
        return False


def default_mount_point(name: str) -> str:
    """``/mnt/Staging/<name>`` for a valid volume name (InvalidName otherwise)."""
    return f"{MOUNT_ROOT}/{check_name(name, 'volume')}"


def _shown(value: object) -> str:
    """The value as shown in an error message: quoted, escaped, and cut when long."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...' ({len(str(value))} characters)"
