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


def test_the_performance_table_is_the_benchmarks(tmp_path: Path) -> None:
    """docs/performance.md's table is what `kd bench --docs` wrote from its report (docs/bench.json): a
    figure typed by hand, or a report without its table, fails here."""
    import json
    import shutil

    from stages.bench import DOCS_BEGIN, DOCS_END, docs_table, write_docs

    report = json.loads((ROOT / "docs" / "bench.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    block = page.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0].strip()
    assert block == docs_table(report)
    assert not report["quick"] and report["reps"] >= 3  # a real run, not a smoke run
    # write_docs replaces the block and nothing else
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "performance.md", docs / "performance.md")
    stale = page.replace(block, "| typed | by hand |")
    (docs / "performance.md").write_text(stale)
    write_docs(report, docs)
    assert (docs / "performance.md").read_text() == page
    assert json.loads((docs / "bench.json").read_text()) == report


def test_the_data_bench_table_is_the_benchmarks(tmp_path: Path) -> None:
    """docs/data.md's table of `kd bench --workload data` is what `--docs` wrote from its report
    (docs/bench-data.json), of a full run, and write_docs replaces that block and nothing else."""
    import json
    import shutil

    from stages.bench_data import DOCS_BEGIN, DOCS_END, markdown, write_docs

    report = json.loads((ROOT / "docs" / "bench-data.json").read_text())
    page = (ROOT / "docs" / "data.md").read_text()
    block = page.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0].strip()
    assert block == markdown(report).split("\n", 2)[2].strip()
    assert report["n"] >= 1500 and report["tokens"]["text_mb"] >= 1024  # a real run, not --quick
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "data.md").write_text(page.replace(block, "| typed | by hand |"))
    write_docs(report, docs)
    assert (docs / "data.md").read_text() == page
    assert json.loads((docs / "bench-data.json").read_text()) == report
    shutil.rmtree(docs)
