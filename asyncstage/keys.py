"""The dot directory, ssh key pairs and the known_hosts file.

The dot directory (default ``~/.asyncstage``, mode 0700) holds one ed25519 key
pair per region (``asyncstage-<region>.pem``, mode 0600, with its ``.pub``),
reused by every manager of that region, and the ``known_hosts`` file the ssh
layer pins host keys in. The EC2 key pair's name carries a digest of the public
key (``asyncstage-us-east-1-3f2a9c1b``), so that two dot directories never
fight over one EC2 key pair.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from asyncstage.ec2 import EC2, tag
from asyncstage.errors import AsyncstageError, EC2Error

__all__ = [
    "DEFAULT_DOTDIR",
    "KeyPair",
    "dotdir",
    "ensure_key_pair",
    "generate_key",
    "key_name",
    "keyfiles",
    "known_hosts_path",
    "local_key",
]

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


def dotdir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dot directory, made with mode 0700 when missing (and tightened when looser)."""
    p = Path(path if path is not None else DEFAULT_DOTDIR).expanduser().absolute()
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.stat().st_mode & 0o077:
        p.chmod(0o700)
    return p


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


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _public_of(path: Path) -> str:
    pub = path.with_suffix(".pub")
    if pub.exists():
        return pub.read_text().strip()
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise AsyncstageError(f"cannot read the private key {path}: {e}") from e
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line.decode()


def local_key(directory: Path, region: str, *, reuse: bool = True) -> KeyPair:
    """The region's key pair in the dot directory, made when missing or when not ``reuse``.

    A key made with ``reuse=False`` is kept in its own file so that the servers
    launched with it can still be reached by later managers.
    """
    path = directory / f"asyncstage-{region}.pem"
    if not reuse or not path.exists():
        private, public = generate_key(f"asyncstage-{region}")
        if reuse:
            tmp = directory / f".asyncstage-{region}-{secrets.token_hex(4)}.pem"
            _write_private(tmp, private)
            tmp.with_suffix(".pub").write_text(public + "\n")
            tmp.with_suffix(".pub").replace(path.with_suffix(".pub"))
            tmp.replace(path)
        else:
            path = directory / f"{key_name(region, public)}.pem"
            _write_private(path, private)
            path.with_suffix(".pub").write_text(public + "\n")
    elif path.stat().st_mode & 0o077:
        path.chmod(0o600)
    public = _public_of(path)
    return KeyPair(name=key_name(region, public), private_key=path, public_key=public)


def keyfiles(directory: Path, region: str) -> dict[str, Path]:
    """Every key of the region in the dot directory, by EC2 key pair name."""
    found: dict[str, Path] = {}
    for path in sorted(directory.glob(f"asyncstage-{region}*.pem")):
        try:
            found[key_name(region, _public_of(path))] = path
        except (AsyncstageError, IndexError, ValueError):
            continue
    return found


async def ensure_key_pair(ec2: EC2, directory: Path, *, reuse: bool = True) -> KeyPair:
    """The region's local key, imported as an EC2 key pair when EC2 does not have it yet."""
    pair = local_key(directory, ec2.region, reuse=reuse)
    if not await ec2.key_pair_exists(pair.name):
        try:
            await ec2.import_key_pair(pair.name, pair.public_key, tags={tag("role"): "key"})
        except EC2Error as e:
            if e.code != "InvalidKeyPair.Duplicate":  # another manager was quicker
                raise
    return pair
