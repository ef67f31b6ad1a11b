"""The README is a landing page whose example runs, and whose links are pages of the site."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```\n", text, flags=re.S)


def test_readme_is_a_landing_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 200
    head = text[: text.index("## ")]
    assert "make demo" in head and "make test" in head  # the two set-up commands first
    for heading in ("## Quickstart", "## Documentation", "## Data safety"):
        assert f"\n{heading}\n" in text
    assert "## Changes in behaviour" in text


def test_readme_links_are_pages_of_the_site() -> None:
    """Every docs/ link of the README names a page in mkdocs.yml's nav (which --strict checks)."""
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    links = re.findall(r"\]\(docs/([^)#]+)\)", README.read_text())
    assert links
    assert sorted(set(links) - nav - {"index.md"}) == []


@pytest.mark.localcloud
@pytest.mark.skipif(os.geteuid() != 0, reason="the local cloud needs root")
def test_readme_async_example_runs(tmp_path: Path) -> None:
    """The README's first example runs as printed (it starts a local cloud of its own)."""
    script = tmp_path / "example.py"
    script.write_text(_python_blocks(README.read_text())[0])
    done = subprocess.run(
        [sys.executable, str(script)],
        env={"HOME": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        | {k: v for k, v in os.environ.items() if k == "PYTHONPATH"},  # a worktree's package
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Linux" in done.stdout and "hosts" in done.stdout
