"""rsync's output parser and exit codes (pure; no root, no rsync run)."""

from __future__ import annotations

import pytest

from asyncstage.transfer.base import Progress, Reporter
from asyncstage.transfer.rsyncout import RSYNC_MARK, RsyncOutput, rsync_error, unescape

pytestmark = pytest.mark.anyio

# What rsync 3.2 prints with -a -s --info=progress2 --out-format=<<asyncstage-file>>%n --stats
SAMPLE = (
    f"{RSYNC_MARK}dir/\n"
    f"{RSYNC_MARK}dir/sp ace\\#012line\n"
    "        524,288  50%   10.00MB/s    0:00:00 (xfr#1, ir-chk=1000/1002)\r"
    "      1,048,576 100%   12.50MB/s    0:00:00 (xfr#2, to-chk=0/3)\n"
    f"{RSYNC_MARK}dir/ünï\n"
    "\n"
    "Number of files: 3 (reg: 2, dir: 1)\n"
    "Number of regular files transferred: 2\n"
    "Total file size: 1,048,576 bytes\n"
    "Total transferred file size: 1,048,576 bytes\n"
    "Total bytes sent: 1,049,000\n"
    "Total bytes received: 123\n"
)


async def test_output_parsed_in_any_pieces() -> None:
    for step in (len(SAMPLE), 1, 7):
        seen: list[Progress] = []
        out = RsyncOutput(Reporter(seen.append, "test"))
        data = SAMPLE.encode()
        for i in range(0, len(data), step):
            await out.feed(data[i : i + step])
        await out.close()
        assert out.files == 2
        assert out.file_bytes == 1 << 20
        assert out.wire_bytes == 1_049_000 + 123
        assert out.total == 1 << 20 and out.bytes_done == 1 << 20
        # a report per batch of lines, from its latest progress line
        if step == len(SAMPLE):
            assert [p.bytes_done for p in seen] == [1 << 20]
        else:
            assert [p.bytes_done for p in seen] == [524_288, 1 << 20]
            assert seen[0].total is None
        assert seen[-1].total == 1 << 20 and seen[-1].rate == 12.5 * (1 << 20)
        assert seen[-1].current == "dir/sp ace\nline"  # the file then, not the next one's
        assert out.reporter.current == "dir/ünï"


async def test_a_batch_of_many_files_is_one_report_of_its_latest_line() -> None:
    seen: list[Progress] = []
    out = RsyncOutput(Reporter(seen.append, "test"))
    batch = "".join(
        f"{RSYNC_MARK}f{i}\n      {(i + 1) * 10:,} {i + 1}%   1.00kB/s    0:00:00 "
        f"(xfr#{i + 1}, to-chk={99 - i}/100)\r"
        for i in range(50)
    )
    await out.feed(batch)
    assert [(p.bytes_done, p.total, p.current) for p in seen] == [(500, 1000, "f49")]
    await out.feed(f"{RSYNC_MARK}f50\n")  # a file started, no progress line yet
    assert len(seen) == 1 and out.reporter.current == "f50"


async def test_total_estimated_from_percentage() -> None:
    out = RsyncOutput(Reporter(None, "test"))
    await out.feed("      250,000  25%   1.00kB/s    0:00:01 (xfr#1, to-chk=3/4)\n")
    assert out.total == 1_000_000


def test_unescape() -> None:
    assert unescape("plain") == "plain"
    assert unescape("a\\#012b") == "a\nb"
    assert unescape("caf\\#303\\#251") == "café"  # UTF-8 bytes escaped one by one
    assert unescape("back\\slash") == "back\\slash"


def test_rsync_error_message() -> None:
    err = rsync_error(23, "rsync: x failed\n\nrsync error: some files\n", "a -> b")
    assert err.exit_code == 23
    assert "partial transfer due to error" in str(err)
    assert str(err).endswith("rsync: x failed\nrsync error: some files")
    assert "unexplained error" in str(rsync_error(99, "", "a -> b"))
