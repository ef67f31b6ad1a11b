"""A Manager's timings: one Timeouts object, or the keyword arguments one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncstage import Manager
from asyncstage.timeouts import Timeouts


def test_the_old_keyword_arguments_keep_working(tmp_path: Path) -> None:
    m = Manager(
        region="us-east-1",
        dotdir=tmp_path,
        server_timeout=5.0,
        volume_timeout=6.0,
        snapshot_timeout=7.0,
        exit_timeout=8.0,
        console_timeout=9.0,
        poll_interval=0.5,
        launch_window=0.2,
    )
    assert m.timeouts == Timeouts(
        server=5.0,
        volume=6.0,
        snapshot=7.0,
        exit=8.0,
        console=9.0,
        poll_interval=0.5,
        launch_window=0.2,
    )
    assert m.ec2.poll_interval == 0.5


def test_a_timeouts_object_and_single_timings_on_top(tmp_path: Path) -> None:
    given = Timeouts(server=30.0, volume=40.0, poll_interval=0.25)
    m = Manager(region="us-east-1", dotdir=tmp_path, timeouts=given, volume_timeout=45.0)
    assert m.timeouts == Timeouts(server=30.0, volume=45.0, poll_interval=0.25)
    assert m.timeouts.stop == 90.0  # server.stop() and m.stop_servers() wait this long
    assert m.ec2.poll_interval == 0.25
    assert Manager(region="us-east-1", dotdir=tmp_path).timeouts == Timeouts()


def test_an_unknown_timing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="server_wait"):  # a misspelt timing is no default
        Manager(region="us-east-1", dotdir=tmp_path, server_wait=1.0)  # type: ignore[call-arg]
