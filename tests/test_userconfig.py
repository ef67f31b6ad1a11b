"""The CLI's config file, completion scripts and version, through the real command.

No cloud is needed: ``config show``, ``completion`` and ``--version`` never open a manager.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from asyncstage import userconfig
from asyncstage.errors import InvalidArgument

EXE = Path(sys.executable).parent / "asyncstage"


def run(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ASYNCSTAGE_"))}
    return subprocess.run(
        [str(EXE), *args],
        capture_output=True,
        text=True,
        env=clean | {"HOME": str(home)} | (env or {}),
        timeout=60,
    )


def test_flags_then_environment_then_file_then_default(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('region = "eu-west-1"\nprofile = "p"\ninstance_type = "t3.small"\n')
    got = userconfig.effective(
        {"region": None, "instance_type": "m5.large"},
        path=path,
        env={"AWS_PROFILE": "from-env"},
        defaults={"on_exit": "run"},
    )
    assert {k: (s.value, s.source) for k, s in got.items()} == {
        "region": ("eu-west-1", str(path)),
        "profile": ("from-env", "$AWS_PROFILE"),
        "instance_type": ("m5.large", "--type"),
        "image": (None, "unset"),
        "username": (None, "unset"),
        "on_exit": ("run", "default"),
        "host_keys": (None, "unset"),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('regoin = "x"\n', "unknown setting"),
        ("region = 3\n", "must be a non-empty string"),
        ('on_exit = "explode"\n', "on_exit must be one of"),
        ('host_keys = "imds"\n', "host_keys must be one of console, user-data"),
        ("region = \n", "not valid TOML"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        userconfig.load(path)
    assert userconfig.load(tmp_path / "missing.toml") == {}
    with pytest.raises(InvalidArgument, match="does not exist"):
        userconfig.load(tmp_path / "missing.toml", required=True)


def test_config_show_through_the_command(tmp_path: Path) -> None:
    (tmp_path / ".asyncstage").mkdir()
    default = tmp_path / ".asyncstage" / "config.toml"
    default.write_text('region = "eu-west-1"\non_exit = "stop"\nusername = "ubuntu"\n')
    done = run(tmp_path, "config", "show", "--json", "--region", "us-west-2")
    assert done.returncode == 0, done.stderr
    shown = {s["key"]: s for s in json.loads(done.stdout)}
    assert shown["region"] == {"key": "region", "value": "us-west-2", "source": "--region"}
    assert shown["on_exit"]["value"] == "stop" and shown["on_exit"]["source"] == str(default)
    assert shown["username"]["value"] == "ubuntu"

    flagged = run(tmp_path, "config", "show", "--json", "--host-keys", "user-data").stdout
    shown = {s["key"]: s for s in json.loads(flagged)}
    assert shown["host_keys"] == {"key": "host_keys", "value": "user-data", "source": "--host-keys"}
    from_env = run(tmp_path, "config", "show", "--json", env={"ASYNCSTAGE_HOST_KEYS": "console"})
    shown = {s["key"]: s for s in json.loads(from_env.stdout)}
    assert shown["host_keys"]["source"] == "$ASYNCSTAGE_HOST_KEYS"

    env = {"ASYNCSTAGE_USERNAME": "admin"}
    text = run(tmp_path, "config", "show", env=env).stdout
    assert "username" in text and "admin" in text and "$ASYNCSTAGE_USERNAME" in text

    other = tmp_path / "other.toml"
    other.write_text('image = "ami-0123456789abcdef0"\n')
    shown = {
        s["key"]: s
        for s in json.loads(
            run(tmp_path, "--config", str(other), "config", "show", "--json").stdout
        )
    }
    assert shown["image"]["source"] == str(other) and shown["region"]["value"] is None

    bad = run(tmp_path, "--config", str(tmp_path / "nope.toml"), "config", "show")
    assert bad.returncode == 1 and "nope.toml does not exist" in bad.stderr


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    done = run(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"asyncstage {version('asyncstage')}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_options_and_cached_names(tmp_path: Path) -> None:
    script = run(tmp_path, "completion", "bash")
    assert script.returncode == 0, script.stderr
    (tmp_path / "asyncstage.bash").write_text(script.stdout)
    cache = tmp_path / ".asyncstage" / "cache"
    cache.mkdir(parents=True)
    (cache / "servers").write_text("web\nweb2\ndb\n")
    (cache / "volumes").write_text("photos\n")

    def complete(*words: str) -> list[str]:
        line = " ".join(["asyncstage", *words])
        probe = (
            f"source {tmp_path / 'asyncstage.bash'}; COMP_WORDS=({line}); "
            f"COMP_CWORD={len(words)}; _asyncstage; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        done = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, env={"HOME": str(tmp_path)}
        )
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.split())

    assert complete("ba") == ["backup"]
    assert complete("--region", "x", "ss") == ["ssh"]
    assert complete("ssh", "we") == ["web", "web2"]
    assert complete("volumes", "p") == ["photos", "provision"]
    assert complete("rsync", "ph") == ["photos:"]
    assert "--force" in complete("restore", "--f")

    zsh = run(tmp_path, "completion", "zsh").stdout
    assert zsh.startswith("#compdef asyncstage") and "bashcompinit" in zsh
