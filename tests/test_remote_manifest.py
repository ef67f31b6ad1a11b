"""asyncstage.remote.manifest run locally (no ssh): what a manifest lists, and what a check
of a tree against it finds, metadata only and with the content read."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncstage import remote
from asyncstage.remote import manifest
from tests.sshd import _DROP_LOOP_MOUNTS, in_private_mounts


def helper(*args: str) -> dict[str, object]:
    """The script as a server runs it (``python3 -c``), answering on its last line."""
    done = subprocess.run(remote.argv("manifest", *args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return remote.answer("local", done.stdout)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "lost+found").mkdir()  # a filesystem's own: never listed
    (root / "a" / "b" / "data.bin").write_bytes(os.urandom(3 << 20))  # several chunks
    (root / "a" / "one.txt").write_text("one\n")
    (root / "a-b.txt").write_text("sorts after a/ as bytes, before it as text\n")
    (root / "empty").write_bytes(b"")
    os.symlink("a/one.txt", root / "link")
    (root / os.fsdecode(b"caf\xe9")).write_text("a name that is not UTF-8\n")
    os.mkfifo(root / "pipe")
    return root


def _write(root: Path) -> str:
    reply = helper("write", str(root))
    digest = str(reply["sha256"])
    assert hashlib.sha256((root / manifest.NAME).read_bytes()).hexdigest() == digest
    return digest


def _check(root: Path, digest: str, *flags: str) -> dict[str, object]:
    return helper("check", str(root), str(root / manifest.NAME), digest, *flags)


def _flip_byte(path: Path, offset: int) -> None:
    """One bit of the file changed in place, its size and times set back as they were."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_manifest_lists_every_path_once_in_walk_order(tree: Path) -> None:
    listed = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    reply = helper("write", str(tree))
    assert reply["files"] == 5 and reply["bytes"] == sum(p.stat().st_size for p in listed)
    lines = (tree / manifest.NAME).read_bytes().splitlines()
    assert json.loads(lines[0]) == {"asyncstage-manifest": 1}
    entries = [json.loads(line) for line in lines[1:]]
    paths = [e["path"] for e in entries]
    assert paths == [
        "a",
        "a/b",
        "a/b/data.bin",
        "a/one.txt",
        "a-b.txt",
        os.fsdecode(b"caf\xe9"),
        "empty",
        "link",
        "pipe",
    ]
    by_path = {e["path"]: e for e in entries}
    data = tree / "a" / "b" / "data.bin"
    assert by_path["a/b/data.bin"] == {
        "path": "a/b/data.bin",
        "type": "file",
        "size": data.stat().st_size,
        "mode": data.stat().st_mode & 0o7777,
        "mtime_ns": data.stat().st_mtime_ns,
        "ctime_ns": data.stat().st_ctime_ns,
        "ino": data.stat().st_ino,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
    }
    assert by_path["link"] == {"path": "link", "type": "symlink", "target": "a/one.txt"}
    assert by_path["pipe"]["type"] == "fifo" and by_path["a"]["type"] == "dir"


def test_a_clean_tree_checks_clean(tree: Path) -> None:
    digest = _write(tree)
    for flags in ((), ("read-data",)):
        reply = _check(tree, digest, *flags)
        assert reply["manifest"] == "ok" and reply["entries"] == 9
        assert reply["counts"] == dict.fromkeys(manifest.KINDS, 0)
    assert _check(tree, digest, "read-data")["files_read"] == 5


def test_a_byte_changed_in_place_is_found_only_by_reading_the_data(tree: Path) -> None:
    digest = _write(tree)
    _flip_byte(tree / "a" / "b" / "data.bin", 2 << 20)

    assert _check(tree, digest)["counts"] == dict.fromkeys(manifest.KINDS, 0)
    reply = _check(tree, digest, "read-data")
    assert reply["damaged"] == [{"path": "a/b/data.bin", "error": "content differs"}]
    assert reply["counts"] == {"missing": 0, "changed": 0, "extra": 0, "damaged": 1}


def test_missing_changed_and_extra_paths_are_named(tree: Path) -> None:
    digest = _write(tree)
    (tree / "a" / "one.txt").unlink()
    (tree / "empty").write_bytes(b"now with content")
    os.chmod(tree / "a-b.txt", 0o600)
    (tree / "link").unlink()
    os.symlink("elsewhere", tree / "link")
    (tree / "a" / "b" / "new").write_text("new\n")
    (tree / "zz").mkdir()

    reply = _check(tree, digest, "read-data")
    assert reply["missing"] == ["a/one.txt"]
    assert reply["extra"] == ["a/b/new", "zz"]
    changed = {c["path"]: c["fields"] for c in reply["changed"]}  # type: ignore[attr-defined]
    assert changed["empty"][0] == "size" and changed["a-b.txt"] == ["mode"]
    assert changed["link"] == ["target"]
    assert "a/b" not in changed or changed["a/b"] == ["mtime_ns"]  # a new file in it
    # a restore merged into a directory that had files of its own does not list them
    merged = _check(tree, digest, "ignore-extra")
    assert merged["extra"] == [] and merged["missing"] == ["a/one.txt"]


def test_a_manifest_that_does_not_match_its_digest_is_never_used(tree: Path) -> None:
    digest = _write(tree)
    text = (tree / manifest.NAME).read_text()
    (tree / manifest.NAME).write_text(text.replace('"size":0', '"size":1'))
    (tree / "a" / "one.txt").unlink()  # would be found by a manifest that were trusted
    reply = _check(tree, digest, "read-data")
    assert reply == {
        "manifest": "mismatch",
        "sha256": hashlib.sha256((tree / manifest.NAME).read_bytes()).hexdigest(),
    }
    assert _check(tree, "0" * 64)["manifest"] == "mismatch"
    assert _check(tree, "not-a-digest")["manifest"] == "unreadable"
    (tree / manifest.NAME).unlink()
    assert _check(tree, digest) == {"manifest": "missing"}


def _entries(root: Path) -> dict[str, dict[str, object]]:
    lines = (root / manifest.NAME).read_bytes().splitlines()[1:]
    return {e["path"]: e for e in map(json.loads, lines)}


def test_a_rewrite_keeps_the_digests_of_unchanged_files_and_hashes_the_rest(
    tree: Path,
) -> None:
    first = _write(tree)
    # the same size and times as before, the content not: only its ctime tells
    data = tree / "a" / "b" / "data.bin"
    _flip_byte(data, 1 << 20)
    # replaced as rsync does (a new file renamed over it), same size and time
    one = tree / "a" / "one.txt"
    old_one = one.stat()
    (tree / "a" / ".one.tmp").write_text("two\n")
    os.utime(tree / "a" / ".one.tmp", ns=(old_one.st_atime_ns, old_one.st_mtime_ns))
    os.rename(tree / "a" / ".one.tmp", one)
    (tree / "new.txt").write_text("new\n")

    reply = helper("write", str(tree), first)
    entries = _entries(tree)
    for path, entry in entries.items():
        if entry["type"] == "file":
            real = (tree / os.fsencode(path).decode("utf-8", "surrogateescape")).read_bytes()
            assert entry["sha256"] == hashlib.sha256(real).hexdigest(), path
    assert reply["files"] == 6 and reply["reused"] == 3  # a-b.txt, café, empty
    changed = data.stat().st_size + one.stat().st_size + len("new\n")
    assert reply["hashed"] == changed
    # the same tree again: nothing to read
    again = helper("write", str(tree), str(reply["sha256"]))
    assert again["reused"] == 6 and again["hashed"] == 0
    assert again["sha256"] == reply["sha256"]


def test_an_earlier_manifest_is_reused_only_when_its_digest_is_the_one_expected(
    tree: Path,
) -> None:
    first = _write(tree)
    # the manifest there changed since its digest was taken (a forged digest for a file
    # that did not change): were it trusted, the forgery would be kept
    text = (tree / manifest.NAME).read_text()
    real = _entries(tree)["a/one.txt"]["sha256"]
    (tree / manifest.NAME).write_text(text.replace(str(real), "0" * 64))
    for expected in (first, "0" * 64, "not-a-digest"):
        reply = helper("write", str(tree), expected)
        assert reply["reused"] == 0 and reply["hashed"] == reply["bytes"]
        assert _entries(tree)["a/one.txt"]["sha256"] == real
        (tree / manifest.NAME).write_text(text.replace(str(real), "0" * 64))
    # no earlier manifest at all, or one without inode and ctime: every file hashed
    (tree / manifest.NAME).unlink()
    assert helper("write", str(tree), first)["reused"] == 0
    old_style = "".join(
        line
        if '"ino"' not in line
        else json.dumps(
            {k: v for k, v in json.loads(line).items() if k not in ("ino", "ctime_ns")},
            sort_keys=True,
            separators=(",", ":"),
        )
        + "\n"
        for line in (tree / manifest.NAME).read_text().splitlines(keepends=True)
    )
    (tree / manifest.NAME).write_text(old_style)
    digest = hashlib.sha256(old_style.encode()).hexdigest()
    assert helper("write", str(tree), digest)["reused"] == 0


@pytest.mark.parametrize(
    "body",
    [
        '{"asyncstage-manifest": 2}\n',
        "not json\n",
        '{"asyncstage-manifest": 1}\n{"path": "../etc", "type": "dir", "mode": 1, "mtime_ns": 1}\n',
        '{"asyncstage-manifest": 1}\n{"path": "b", "type": "dir", "mode": 1, "mtime_ns": 1}\n'
        '{"path": "a", "type": "dir", "mode": 1, "mtime_ns": 1}\n',
        '{"asyncstage-manifest": 1}\n{"path": "f", "type": "file", "size": -1, "mode": 1, '
        '"mtime_ns": 1, "sha256": "' + "0" * 64 + '"}\n',
        '{"asyncstage-manifest": 1}\n{"path": "l", "type": "symlink"}\n',
    ],
)
def test_a_matching_manifest_that_is_not_one_is_unreadable(tmp_path: Path, body: str) -> None:
    """Its digest matches (whoever wrote the tag wrote it too), and it is still refused."""
    (tmp_path / manifest.NAME).write_text(body)
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert _check(tmp_path, digest)["manifest"] == "unreadable"


def test_a_local_check_can_be_cancelled_between_files(tree: Path) -> None:
    digest = _write(tree)
    with pytest.raises(InterruptedError):
        manifest.check(
            str(tree), str(tree / manifest.NAME), digest, read_data=True, cancelled=lambda: True
        )


# -- the follow pass ----------------------------------------------------------------------


class Following:
    """The follow pass as a server runs it, on a local tree: its progress lines as they
    come, its answer once its stdin is closed."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            remote.argv("manifest", "follow", str(root), *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def until(self, files: int) -> dict[str, int]:
        """Read its walks' lines until one says ``files`` files are hashed."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "the follow pass ended before hashing them"
            walked = json.loads(line)
            if walked["files"] >= files:
                return dict(walked)

    def finish(self) -> dict[str, object]:
        """Its stdin closed (the copy done): the answer of the manifest it wrote."""
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0
        return remote.answer("local", out)


def _regular(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _plain(root: Path, *args: str) -> bytes:
    """The manifest a plain write gives the tree (written there, then read)."""
    helper("write", str(root), *args)
    return (root / manifest.NAME).read_bytes()


def test_the_follow_pass_hashes_what_landed_and_its_final_pass_the_rest(tree: Path) -> None:
    follow = Following(tree)
    for i in range(20):  # files landing while the follow pass runs, as rsync's do
        (tree / "a" / f"late{i}.bin").write_bytes(os.urandom(10_000 + i))
    files = _regular(tree)
    assert follow.until(len(files))["hashed"] == sum(p.stat().st_size for p in files)
    # rewritten in place after it was hashed, its size and mtime set back: read again
    data = tree / "a" / "b" / "data.bin"
    _flip_byte(data, 7)

    reply = follow.finish()
    assert reply["followed"] == len(files) - 1 and reply["reused"] == 0
    assert reply["hashed"] == data.stat().st_size
    assert isinstance(reply["passes"], int) and reply["passes"] >= 1
    assert sorted(p.name for p in tree.iterdir() if p.name.startswith(manifest.NAME)) == [
        manifest.NAME
    ]
    followed = (tree / manifest.NAME).read_bytes()
    assert _plain(tree) == followed  # byte for byte what a plain write lists
    assert hashlib.sha256(followed).hexdigest() == reply["sha256"]


def test_a_follow_pass_over_an_earlier_manifest_hashes_only_what_changed(tree: Path) -> None:
    earlier = _write(tree)
    # replaced as rsync replaces a file: a new one renamed over it
    (tree / "a" / ".one.txt.Ab12Cd").write_text("two\n")
    os.rename(tree / "a" / ".one.txt.Ab12Cd", tree / "a" / "one.txt")
    follow = Following(tree, earlier)
    assert follow.until(1)["hashed"] == len("two\n")
    reply = follow.finish()
    assert (reply["reused"], reply["followed"], reply["hashed"]) == (4, 1, 0)
    followed = (tree / manifest.NAME).read_bytes()
    assert _plain(tree) == followed


def test_rsyncs_files_in_the_making_are_left_to_the_final_pass(tree: Path) -> None:
    making = tree / "a" / ".two.txt.x9Y8z7"
    making.write_text("half")
    follow = Following(tree)
    follow.until(len(_regular(tree)) - 1)
    reply = follow.finish()
    # every file but the one in the making (and the manifest, there now)
    assert reply["followed"] == len(_regular(tree)) - 2
    assert reply["hashed"] == len("half")  # still listed: the final pass read it
    assert "a/.two.txt.x9Y8z7" in _entries(tree)


def test_leftovers_of_a_write_that_died_are_never_used_and_always_swept(tree: Path) -> None:
    """A file of the reserved names at the root, left by a run that died or planted in a
    snapshot, listing a forged digest for a file whose stat it has right: never used;
    deleted by the next write, and never listed by a check."""
    data = tree / "a" / "b" / "data.bin"
    st = data.stat()
    forged = {
        "path": "a/b/data.bin",
        "type": "file",
        "size": st.st_size,
        "mode": st.st_mode & 0o7777,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "sha256": "0" * 64,
    }
    text = json.dumps({"asyncstage-manifest": 1}) + "\n" + json.dumps(forged) + "\n"
    leftovers = [tree / f"{manifest.NAME}.tmp-follow", tree / f"{manifest.NAME}.tmp-4242"]
    for path in leftovers:
        path.write_text(text)
    reply = helper("write", str(tree))
    assert not any(p.exists() for p in leftovers)
    assert reply["followed"] == 0
    assert _entries(tree)["a/b/data.bin"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    digest = _write(tree)
    for path in leftovers:
        path.write_text(text)
    assert _check(tree, digest)["counts"] == dict.fromkeys(manifest.KINDS, 0)


def _settled_follow(root: Path) -> manifest.Follow:
    """A follow pass over ``root`` that walked it until nothing was left to hash (the
    tree's times older than the pass's clock: one tick of the kernel's clock later)."""
    time.sleep(0.05)
    follow = manifest.Follow(str(root).encode(), None, lambda: False)
    while follow.step():
        pass
    return follow


class _Calls:
    """How often ``os.scandir`` and ``os.lstat`` were called, and on what."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listed: list[bytes] = []
        self.stated: list[bytes] = []
        scandir, lstat = os.scandir, os.lstat

        def counted_scandir(path: bytes) -> object:
            self.listed.append(path)
            return scandir(path)

        def counted_lstat(path: bytes) -> os.stat_result:
            self.stated.append(path)
            return lstat(path)

        monkeypatch.setattr(os, "scandir", counted_scandir)
        monkeypatch.setattr(os, "lstat", counted_lstat)


def test_a_follow_walk_lists_only_the_directories_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a tree of many files, a walk reads again only the directories whose entries
    changed since the last one; of the others it looks at their subdirectories alone."""
    root = tmp_path / "big"
    for d in range(10):
        for sub in ("x", "y"):
            (root / f"d{d}" / sub).mkdir(parents=True)
            for i in range(20):
                (root / f"d{d}" / sub / f"f{i}").write_bytes(b"%d" % i)
    dirs = 1 + 10 + 20
    follow = _settled_follow(root)
    assert len(follow.index) == 400
    calls = _Calls(monkeypatch)
    assert follow.step() == 0
    assert calls.listed == [] and len(calls.stated) == dirs  # no file looked at
    # one file lands deep in the tree, as rsync's do (a temporary name renamed)
    landed = root / "d7" / "y" / "new"
    (root / "d7" / "y" / ".new.Ab12Cd").write_bytes(b"late")
    os.rename(root / "d7" / "y" / ".new.Ab12Cd", landed)
    time.sleep(0.05)
    calls.listed.clear()
    assert follow.step() == 1
    assert calls.listed == [str(root / "d7" / "y").encode()]
    assert follow.index[(b"d7", b"y", b"new")][1] == hashlib.sha256(b"late").hexdigest()
    follow.close()


def test_a_follow_walk_reads_again_a_directory_that_held_a_file_left_for_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file changed in place within the tick a walk started in (its ctime not older
    than the walk's clock) is left for later; its directory, unchanged since that walk
    read it, is read again by the next walk, which hashes the file."""
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    racy = root / "a" / "racy"
    racy.write_bytes(b"old")
    time.sleep(0.05)
    with racy.open("r+b") as f:  # in place: the directory's times stay as they were
        f.write(b"new")
    same_tick = racy.stat().st_ctime_ns
    assert (root / "a").stat().st_ctime_ns < same_tick
    follow = manifest.Follow(str(root).encode(), None, lambda: False)
    with monkeypatch.context() as m:
        m.setattr(follow, "now", lambda: same_tick)
        assert follow.step() == 0  # left for later
    time.sleep(0.05)
    assert follow.step() == 1
    assert follow.index[(b"a", b"racy")][1] == hashlib.sha256(b"new").hexdigest()
    follow.close()


def test_a_file_changed_after_the_follow_pass_hashed_it_is_read_again_by_the_final_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk does not look again at a file an earlier walk hashed (its directory is
    read for the names that landed since, the file is not stated): a change since stamps
    the file anew, so the final pass does not take the follow pass's digest for it."""
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    (root / "a" / "kept").write_bytes(b"kept")
    changed = root / "a" / "changed"
    changed.write_bytes(b"old")
    follow = _settled_follow(root)
    with changed.open("r+b") as f:
        f.write(b"new")
    (root / "a" / "landed").write_bytes(b"landed")
    time.sleep(0.05)
    calls = _Calls(monkeypatch)
    assert follow.step() == 1  # what landed
    assert str(changed).encode() not in calls.stated
    assert follow.index[(b"a", b"changed")][1] == hashlib.sha256(b"old").hexdigest()
    monkeypatch.undo()
    reply = manifest.write(str(root), None, follow)
    follow.close()
    assert (reply["followed"], reply["hashed"]) == (2, len(b"new"))
    assert _entries(root)["a/changed"]["sha256"] == hashlib.sha256(b"new").hexdigest()


def test_a_follow_pass_stopped_by_a_signal_leaves_nothing(tree: Path) -> None:
    follow = Following(tree)
    follow.until(1)
    follow.proc.terminate()
    follow.proc.communicate(timeout=60)
    assert follow.proc.returncode != 0
    assert sorted(p.name for p in tree.iterdir() if p.name.startswith(manifest.NAME)) == []


_RACY = """
import hashlib, json, os, sys
from asyncstage.remote import manifest as m

root = sys.argv[1].encode()
path = os.path.join(root, b"f")
seen = []
for _ in range(40):
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
    before = os.stat(path)
    follow = m.Follow(root, None, lambda: False)
    follow.step()  # right after the write: in the same clock tick, mostly
    with open(path, "r+b") as f:  # rewritten in place at once, its mtime set back
        f.write(b"b" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    racy = m._stamp(os.stat(path)) == m._stamp(before)
    reply = m.write(root.decode(), None, follow)
    follow.close()
    with open(os.path.join(root, m.NAME.encode())) as f:
        listed = [json.loads(line) for line in f][1:]
    right = listed[0]["sha256"] == hashlib.sha256(b"b" * 4096).hexdigest()
    seen.append({"racy": racy, "right": right, "hashed": reply["hashed"]})
    os.unlink(path)
print(json.dumps(seen))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a ramfs in a mount namespace (root)")
def test_a_file_rewritten_within_the_tick_it_was_hashed_in_is_hashed_again(
    tmp_path: Path,
) -> None:
    """On a filesystem whose timestamps are the kernel's coarse clock (ramfs: no
    fine-grained ctime after a stat), a file rewritten in place right after it was
    hashed, in the same tick, keeps its size, times and inode: the follow pass must not
    have kept its digest, and the final pass reads it again."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    root = Path(__file__).resolve().parent.parent
    # the namespace's copy of the machine's loop mounts let go of first, so that it
    # keeps no other test's volume busy
    code = f"import sys; sys.path.insert(0, {str(root)!r})\n{_RACY}"
    python = [sys.executable, "-I", "-c", code, str(mnt)]
    done = in_private_mounts(f"{_DROP_LOOP_MOUNTS}; mount -t ramfs none {mnt}", python)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert all(s["right"] for s in seen), seen
    racy = [s for s in seen if s["racy"]]
    assert racy, "no rewrite kept the file's stat: nothing was shown"
    assert all(s["hashed"] == 4096 for s in racy)
