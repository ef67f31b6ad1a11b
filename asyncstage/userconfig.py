"""The command line's optional config file: defaults without repeating flags.

``~/.asyncstage/config.toml`` (or ``--config PATH``, or ``$ASYNCSTAGE_CONFIG``)::

    region = "eu-west-1"
    profile = "staging"
    instance_type = "t3.small"
    image = "ami-0123456789abcdef0"   # or a name pattern
    username = "admin"
    on_exit = "stop"                  # run, stop or terminate
    host_keys = "user-data"           # console (default) or user-data

Each value is taken from, in this order: the command's flag, the environment, the file,
the built-in default. ``asyncstage config show`` prints the effective values and where
each one came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from asyncstage.errors import InvalidArgument
from asyncstage.settings import HOST_KEY_SOURCES, ON_EXIT

__all__ = ["DEFAULT_PATH", "ENVIRONMENT", "KEYS", "Setting", "config_path", "effective", "load"]

DEFAULT_PATH = "~/.asyncstage/config.toml"

KEYS = ("region", "profile", "instance_type", "image", "username", "on_exit", "host_keys")
"""The settings a config file may hold."""

ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "profile": ("AWS_PROFILE",),
    "instance_type": ("ASYNCSTAGE_INSTANCE_TYPE",),
    "image": ("ASYNCSTAGE_IMAGE",),
    "username": ("ASYNCSTAGE_USERNAME",),
    "on_exit": ("ASYNCSTAGE_ON_EXIT",),
    "host_keys": ("ASYNCSTAGE_HOST_KEYS",),
}
"""The environment variables that override the file, per setting (first set wins)."""

FLAGS = {
    "region": "--region",
    "profile": "--profile",
    "instance_type": "--type",
    "image": "--image",
    "username": "--username",
    "on_exit": "--on-exit",
    "host_keys": "--host-keys",
}


@dataclass(frozen=True)
class Setting:
    """One effective setting: its value (None: not set) and where it came from."""

    key: str
    value: str | None
    source: str
    """``--region``, ``$AWS_REGION``, the config file's path, ``default`` or ``unset``."""


def config_path(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file: ``--config``, else ``$ASYNCSTAGE_CONFIG``, else the default."""
    env = os.environ if env is None else env
    chosen = explicit or env.get("ASYNCSTAGE_CONFIG") or DEFAULT_PATH
    return Path(chosen).expanduser()


def load(path: Path, *, required: bool = False) -> dict[str, str]:
    """The file's settings (an empty dict when it does not exist and is not ``required``).

    Unknown keys, values that are not strings and a bad ``on_exit`` are
    :class:`~asyncstage.errors.InvalidArgument` naming the file.
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise InvalidArgument(f"config file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config file {path} is not valid TOML: {e}") from e
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InvalidArgument(
            f"config file {path}: unknown setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(KEYS)})"
        )
    settings: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"config file {path}: {key} must be a non-empty string")
        settings[key] = value
    if settings.get("on_exit", "run") not in ON_EXIT:
        raise InvalidArgument(
            f"config file {path}: on_exit must be one of {', '.join(ON_EXIT)}, "
            f"not {settings['on_exit']!r}"
        )
    if settings.get("host_keys", "console") not in HOST_KEY_SOURCES:
        raise InvalidArgument(
            f"config file {path}: host_keys must be one of {', '.join(HOST_KEY_SOURCES)}, "
            f"not {settings['host_keys']!r}"
        )
    return settings


def effective(
    flags: Mapping[str, str | None],
    *,
    path: Path,
    required: bool = False,
    env: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
) -> dict[str, Setting]:
    """Every setting of :data:`KEYS`, from the flags, the environment, the file at ``path``
    and ``defaults``, in that order of precedence."""
    env = os.environ if env is None else env
    from_file = load(path, required=required)
    result = {}
    for key in KEYS:
        setting = Setting(key, None, "unset")
        if flags.get(key):
            setting = Setting(key, flags[key], FLAGS[key])
        elif any(env.get(var) for var in ENVIRONMENT[key]):
            var = next(var for var in ENVIRONMENT[key] if env.get(var))
            setting = Setting(key, env[var], f"${var}")
        elif key in from_file:
            setting = Setting(key, from_file[key], str(path))
        elif defaults and key in defaults:
            setting = Setting(key, defaults[key], "default")
        result[key] = setting
    if result["on_exit"].value not in (None, *ON_EXIT):
        raise InvalidArgument(
            f"{result['on_exit'].source}: on_exit must be one of {', '.join(ON_EXIT)}"
        )
    if result["host_keys"].value not in (None, *HOST_KEY_SOURCES):
        raise InvalidArgument(
            f"{result['host_keys'].source}: host_keys must be one of {', '.join(HOST_KEY_SOURCES)}"
        )
    return result
