"""The launch key's user data, and how the local cloud reads anyone's user data.

No cloud here: the cloud-config the manager writes, as cloud-init (and the local
cloud) read it, and what the local cloud makes of user data it cannot trust.
"""

from __future__ import annotations

import asyncssh
import yaml  # type: ignore[import-untyped]

from asyncstage.hostkeys import LaunchKey
from asyncstage.localcloud._hosts import cloud_config_keys


def test_the_launch_key_is_a_cloud_config_of_one_ed25519_pair() -> None:
    key = LaunchKey.new()
    assert key.user_data.startswith("#cloud-config\n")
    config = yaml.safe_load(key.user_data)
    assert config["ssh_deletekeys"] is True
    assert set(config["ssh_keys"]) == {"ed25519_private", "ed25519_public"}
    private = asyncssh.import_private_key(config["ssh_keys"]["ed25519_private"])
    public = private.export_public_key("openssh").decode().split()[:2]
    assert " ".join(public) == key.public == config["ssh_keys"]["ed25519_public"]
    assert key.public.startswith("ssh-ed25519 ")
    assert LaunchKey.new().public != key.public  # one per launch
    assert "PRIVATE" not in repr(key)  # never shown in a log or a traceback


def test_the_cloud_reads_the_keys_of_a_cloud_config() -> None:
    key = LaunchKey.new()
    found, notes = cloud_config_keys(key.user_data.encode())
    assert notes == [] and set(found) == {"ed25519"}
    assert found["ed25519"][1] == key.public


def test_user_data_it_cannot_use_is_said_and_ignored() -> None:
    assert cloud_config_keys(None) == ({}, [])
    assert cloud_config_keys(b"#!/bin/sh\necho hello\n") == ({}, [])  # a script: no keys
    assert cloud_config_keys(b"#cloud-config\npackages: [rsync]\n") == ({}, [])
    found, notes = cloud_config_keys(b"#cloud-config\nssh_keys: [1, 2]\n")
    assert found == {} and notes == ["ssh_keys is not a mapping: ignored"]
    found, notes = cloud_config_keys(b"#cloud-config\nssh_keys: {a: : b\n")
    assert found == {} and notes[0].startswith("user data is not valid cloud-config")
    found, notes = cloud_config_keys(b"#cloud-config\n\xff\xfe")
    assert found == {} and notes[0].startswith("user data is not valid cloud-config")
    text = b"#cloud-config\nssh_keys:\n  dsa_private: x\n  ed25519_private: [1]\n"
    found, notes = cloud_config_keys(text)
    assert found == {}
    assert notes == [
        "ssh_keys: skipping unknown ssh key type 'dsa_private'",
        "ssh_keys: ed25519_private is not a key: ignored",
    ]
