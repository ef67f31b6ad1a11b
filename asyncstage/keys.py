"""The dot directory, ssh key pairs and the known_hosts file.

The dot directory (default ``~/.asyncstage``, mode 0700) holds one ed25519 key
pair per region (``asyncstage-<region>.pem``, mode 0600, with its ``.pub``),
reused by every manager of that region, and the ``known_hosts`` file the ssh
layer pins host keys in. The EC2 key pair's name carries a digest of the public
key (``asyncstage-us-east-1-3f2a9c1b``), so that two dot directories never
fight over one EC2 key pair.

A manager against any endpoint other than AWS (the local cloud, moto, another
EC2-compatible service) keeps its keys and known_hosts in a directory of its own,
``<dot dir>/endpoints/<host>_<port>-<digest of the URL>/`` (:func:`dotdir_for`),
so that it never reads, replaces nor pins host keys into the files used for a
real AWS region of the same name.

Key files are written with ``O_NOFOLLOW`` (a private key with ``O_CREAT |
O_EXCL``, mode 0600), and a dot directory or key file that is a symbolic link is
refused: asyncstage often runs as root with a dot directory in a home that
another user can write.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from asyncstage.ec2 import EC2, tag
from asyncstage.errors import AsyncstageError, EC2Error

__all__ = [
    "DEFAULT_DOTDIR",
    "KeyPair",
    "dotdir",
    "dotdir_for",
    "endpoint_slug",
    "ensure_key_pair",
    "generate_key",
    "import_key",
    "is_aws_endpoint",
    "key_name",
    "keyfiles",
    "known_hosts_path",
    "local_key",
]

log = logging.getLogger("asyncstage")

DEFAULT_DOTDIR = "~/.asyncstage"


@dataclass(frozen=True)
class KeyPair:
    """A local private key and the name of its EC2 key pair."""

    name: str
    """The EC2 key pair name."""
    private_key: Path
    """The private key file (OpenSSH format, 0600)."""
    public_key: str
    """The public key line, ``ssh-ed25519 AAAA... comment``."""


def _refuse_link(path: Path, what: str) -> None:
    """AsyncstageError when ``path`` is a symbolic link (which is never followed)."""
    if path.is_symlink():
        raise AsyncstageError(
            f"refusing to use the {what} {path}: it is a symbolic link (to "
            f"{os.readlink(path)!r}); give the real path instead"
        )


def _open_dir(path: Path) -> int:
    """A descriptor of the directory ``path`` itself, never of a symlink's target."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        _refuse_link(path, "dot directory")
        raise AsyncstageError(f"cannot open the dot directory {path}: {e.strerror}") from e


def dotdir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dot directory, made with mode 0700 when missing (and tightened when looser).

    A dot directory that is a symbolic link is refused (AsyncstageError).
    """
    p = Path(path if path is not None else DEFAULT_DOTDIR).expanduser().absolute()
    _refuse_link(p, "dot directory")
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = _open_dir(p)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return p


_AWS_HOSTS = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")


def is_aws_endpoint(endpoint_url: str | None) -> bool:
    """Whether ``endpoint_url`` is AWS itself: none given, or a host under amazonaws.com."""
    if not endpoint_url:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower().rstrip(".")
    return host.endswith(_AWS_HOSTS)


def endpoint_slug(endpoint_url: str) -> str:
    """``<host>_<port>-<digest>``: a directory name of its own for an endpoint URL.

    The host and port make it readable, the digest of the whole URL keeps two
    endpoints apart that differ only in scheme or path; characters other than
    letters, digits, ``.`` and ``-`` become ``_``.
    """
    parts = urlsplit(endpoint_url)
    try:
        port: int | str | None = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme, "default")
    readable = re.sub(r"[^A-Za-z0-9.-]", "_", f"{parts.hostname or 'endpoint'}_{port}")[:64]
    digest = hashlib.sha256(endpoint_url.encode()).hexdigest()[:8]
    return f"{readable.lstrip('.') or 'endpoint'}-{digest}"


def dotdir_for(endpoint_url: str | None, path: str | os.PathLike[str] | None = None) -> Path:
    """The dot directory a manager of ``endpoint_url`` uses, made when missing.

    For AWS (no endpoint, or an ``amazonaws.com`` one) that is ``path`` itself
    (default ``~/.asyncstage``). For any other endpoint it is a directory of its
    own under it, ``<path>/endpoints/<host>_<port>-<digest>/``, so that a local
    cloud never shares a key pair or known_hosts file with a real region. Given that
    directory itself (a manager's ``dotdir`` passed on to another), it is kept.
    """
    base = dotdir(path)
    if is_aws_endpoint(endpoint_url):
        return base
    assert endpoint_url is not None  # is_aws_endpoint is true for None
    slug = endpoint_slug(endpoint_url)
    if base.name == slug and base.parent.name == "endpoints":
        return base  # already this endpoint's own (a manager's ``dotdir`` passed on)
    return dotdir(dotdir(base / "endpoints") / slug)


def known_hosts_path(directory: Path) -> Path:
    """The known_hosts file in the dot directory."""
    return directory / "known_hosts"


def generate_key(comment: str = "asyncstage") -> tuple[bytes, str]:
    """A new ed25519 key: (private key in OpenSSH PEM format, public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, f"{public.decode()} {comment}"


def key_name(region: str, public_key: str) -> str:
    """The EC2 key pair name for a public key: ``asyncstage-<region>-<digest>``."""
    blob = base64.b64decode(public_key.split()[1])
    return f"asyncstage-{region}-{hashlib.sha256(blob).hexdigest()[:8]}"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file: never through a symlink, never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_private(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _open_no_link(path: Path, what: str, verb: str) -> int:
    """A descriptor of ``path`` for reading; a symlink is refused, and any other failure
    is an AsyncstageError saying it could not ``verb`` the ``what``."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        _refuse_link(path, what)
        raise AsyncstageError(f"cannot {verb} the {what} {path}: {e.strerror}") from e


def _read(path: Path) -> bytes:
    """The contents of a regular file, refusing a symlink."""
    fd = _open_no_link(path, "key file", "read")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _public_of(path: Path) -> str:
    pub = path.with_suffix(".pub")
    if pub.exists() or pub.is_symlink():
        return _read(pub).decode().strip()
    try:
        key = serialization.load_ssh_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise AsyncstageError(f"cannot read the private key {path}: {e}") from e
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line.decode()


def _tighten(path: Path) -> None:
    """Mode 0600 for an existing private key, refusing a symlink."""
    fd = _open_no_link(path, "private key", "open")
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def local_key(directory: Path, region: str, *, reuse: bool = True) -> KeyPair:
    """The region's key pair in the dot directory, made when missing or when not ``reuse``.

    A key made with ``reuse=False`` is kept in its own file so that the servers
    launched with it can still be reached by later managers.
    """
    path = directory / f"asyncstage-{region}.pem"
    if not reuse or not (path.exists() or path.is_symlink()):
        private, public = generate_key(f"asyncstage-{region}")
        if reuse:
            _publish_key(path, private, public)
        else:
            path = directory / f"{key_name(region, public)}.pem"
            _write_private(path, private)
            _write_new(path.with_suffix(".pub"), (public + "\n").encode(), 0o644)
    else:
        _tighten(path)
    public = _public_of(path)
    return KeyPair(name=key_name(region, public), private_key=path, public_key=public)


def _publish_key(path: Path, private: bytes, public: str) -> None:
    """Put a new key pair at ``path`` unless another process was first (its key stays).

    The private key appears at once and whole: it is written under a temporary name and
    hard-linked to ``path``, which fails when anything (a key, a symlink) is there, so
    that processes starting together all end with one key. The ``.pub`` follows.
    """
    tmp = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.pem")
    _write_private(tmp, private)
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        return  # another process's key is the one: read back by the caller
    finally:
        tmp.unlink()
    pub = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.pub")
    _write_new(pub, (public + "\n").encode(), 0o644)
    pub.replace(path.with_suffix(".pub"))  # replaces a symlink planted there, not its target


def keyfiles(directory: Path, region: str) -> dict[str, Path]:
    """Every key of the region in the dot directory, by EC2 key pair name."""
    found: dict[str, Path] = {}
    for path in sorted(directory.glob(f"asyncstage-{region}*.pem")):
        try:
            found[key_name(region, _public_of(path))] = path
        except (AsyncstageError, IndexError, ValueError):
            continue
    return found


async def ensure_key_pair(
    ec2: EC2, directory: Path, *, reuse: bool = True, patience: float = 60.0
) -> KeyPair:
    """The region's local key, imported as an EC2 key pair when EC2 does not have it yet."""
    pair = local_key(directory, ec2.region, reuse=reuse)
    await import_key(ec2, pair, patience=patience)
    return pair


async def import_key(ec2: EC2, pair: KeyPair, *, patience: float = 60.0) -> None:
    """Import ``pair`` into EC2 unless it is there; safe from many processes at once.

    ``InvalidKeyPair.Duplicate`` means another process imported it first (the name
    carries the key's digest: the same key): it is looked up again until EC2 shows it,
    within ``patience`` seconds (EC2 is eventually consistent), then taken as there.
    """
    if await ec2.key_pair_exists(pair.name):
        return
    try:
        await ec2.import_key_pair(pair.name, pair.public_key, tags={tag("role"): "key"})
    except EC2Error as e:
        if e.code != "InvalidKeyPair.Duplicate":
            raise
        deadline = time.monotonic() + patience
        while not await ec2.key_pair_exists(pair.name):
            if time.monotonic() >= deadline:
                log.warning("key pair %s: said to exist, not shown in %gs", pair.name, patience)
                return  # RunInstances names it; EC2 answers there if it is really missing
            await anyio.sleep(ec2.poll_interval)
