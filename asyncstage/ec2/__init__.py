"""The only package that talks to EC2 (through aioboto3).

:mod:`~asyncstage.ec2.client` holds the API client and EC2's clock,
:mod:`~asyncstage.ec2.rounds` the describe rounds its callers share,
:mod:`~asyncstage.ec2.waits` the waits, :mod:`~asyncstage.ec2.creates` the idempotent
creates, :mod:`~asyncstage.ec2.console` what we read on a console and
:mod:`~asyncstage.ec2.tags` our tags, :mod:`~asyncstage.ec2.rate` EC2's request rate kept
on this side; :class:`EC2` (:mod:`~asyncstage.ec2.api`) is
the client the rest of asyncstage uses.
"""

from asyncstage.ec2.api import EC2, groups_of
from asyncstage.ec2.client import Resource, RetryMode
from asyncstage.ec2.console import console_fingerprints
from asyncstage.ec2.tags import (
    CLIENT_TOKEN_TAG,
    TAG_PREFIX,
    new_client_token,
    tag,
    tag_filters,
    tags_of,
)

__all__ = [
    "CLIENT_TOKEN_TAG",
    "EC2",
    "TAG_PREFIX",
    "Resource",
    "RetryMode",
    "console_fingerprints",
    "groups_of",
    "new_client_token",
    "tag",
    "tag_filters",
    "tags_of",
]
