"""The documentation: the README is the page read first (short, with the two commands), every docs page
it names exists, and the site builds with `mkdocs build --strict` (broken links and missing pages fail)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0].startswith("make distill") and "make test" in first_block
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)\)", readme))
    assert linked and all((ROOT / "docs" / page).is_file() for page in linked)
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}  # every page reachable


def test_the_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (
        tmp_path / "site" / "sharing" / "index.html"
    ).is_file()
