"""The follow pass's walks against a full walk of the same tree.

While rsync copies into a backup's work volume, the manifest helper's follow pass walks
the tree every half second to hash what landed (``asyncstage/remote/manifest.py``,
``Follow``). On a tree of many files most of a walk is looking at what did not change.
A walk reads again only the directories whose entries changed since the last one (and
those that held a file left for later); of the others, it looks at their subdirectories.

Measured here, on a local tree of D directories of F small files (no server: the helper
runs where the data is, and a walk is the same walk there), in rounds that alternate the
two sides (a b, b a, ...), process CPU seconds of:

- asyncstage: one walk of the follow pass, after a file landed (a temporary name renamed
  into place, as rsync does) in 1 % of the directories since its last walk;
- baseline: one full walk of the same tree, every entry's ``lstat`` in the same order
  (the final pass's walk, which each follow walk was before it skipped directories).

Target: the full walk's CPU / the follow walk's >= 10 (median of the rounds). Quick mode:
a small tree, one round.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import Report, parse_args

from asyncstage.remote import manifest


def _tree(root: Path, dirs: int, files: int) -> list[Path]:
    """``dirs`` directories of ``files`` files each, 100 directories to a parent."""
    made = []
    for d in range(dirs):
        where = root / f"p{d // 100}" / f"d{d}"
        where.mkdir(parents=True)
        for i in range(files):
            (where / f"f{i}").write_bytes(b"%d" % i)
        made.append(where)
    return made


def _land(where: Path, name: str) -> None:
    """A file lands as rsync's do: written under a temporary name, renamed into place."""
    tmp = where / f".{name}.Ab12Cd"
    tmp.write_bytes(name.encode())
    tmp.rename(where / name)


def main() -> None:
    args = parse_args(__doc__ or "")
    dirs, files, rounds = (50, 20, 1) if args.quick else (2000, 100, 7)
    report = Report("follow", args.quick, args.results)
    report.params = {"directories": dirs, "files_per_directory": files, "rounds": rounds}
    base = Path(tempfile.mkdtemp(prefix="asyncstage-bench-follow-"))
    try:
        made = _tree(base, dirs, files)
        changed = made[::100]  # 1 % of the directories (one, in a tree of fewer than 100)
        time.sleep(0.05)  # the tree's times older than the follow pass's clock
        follow = manifest.Follow(str(base).encode(), None, lambda: False)
        while follow.step():
            pass
        follow_s: list[float] = []
        full_s: list[float] = []
        for r in range(rounds):
            for side in ("follow", "full") if r % 2 == 0 else ("full", "follow"):
                if side == "follow":
                    for where in changed:
                        _land(where, f"new{r}")
                    time.sleep(0.05)  # as between two walks: past the clock's tick
                t = time.process_time()
                if side == "follow":
                    hashed = follow.step()
                    follow_s.append(time.process_time() - t)
                    assert hashed == len(changed), (hashed, len(changed))
                else:
                    entries = sum(1 for _ in manifest.walk(str(base).encode()))
                    full_s.append(time.process_time() - t)
        follow.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratios = sorted(round(f / max(w, 1e-6), 1) for f, w in zip(full_s, follow_s, strict=True))
    walk, full = statistics.median(follow_s), statistics.median(full_s)
    report.results = {
        "entries": entries,
        "directories_changed": len(changed),
        "follow_walk_cpu_s": [round(x, 4) for x in follow_s],
        "full_walk_cpu_s": [round(x, 4) for x in full_s],
    }
    report.table(
        f"A follow walk of {entries} entries, {len(changed)} directories changed, against a "
        "full walk (process CPU s, median of the rounds)",
        ["side", "CPU s"],
        [["follow pass walk", walk], ["full walk (every lstat)", full]],
    )
    report.target(
        "follow_walk_vs_full_walk",
        round(full / max(walk, 1e-6), 1),
        ">=",
        10,
        "CPU of a full walk of the tree / a follow-pass walk after 1 % of its directories "
        f"changed ({dirs} directories of {files} files)",
        spread=[ratios[0], ratios[-1]],
    )
    report.save()


if __name__ == "__main__":
    main()
