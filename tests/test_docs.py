"""The documentation: docs/ builds with `mkdocs build --strict`, the README stays short, and every
relative link of the README and of docs/*.md reaches a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

#: inline Markdown links and images: [text](target) / ![alt](target "title")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The targets of the relative links in Markdown ``text``: no URLs (``scheme:``), no bare ``#anchors``,
    nothing inside fenced code blocks or code spans; the ``#anchor`` of a kept target is cut off."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    out = []
    for target in _LINK.findall(text):
        if target.startswith("#") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target):
            continue
        out.append(unquote(target.split("#", 1)[0]))
    return out


def test_relative_links_finds_what_it_should():
    text = ("[a](docs/x.md) ![img](report.png \"t\") [b](https://example.org) [c](#anchor) "
            "[d](y.md#part) [e](mailto:x@y) `[f](not-a-link.md)`\n```\n[g](inside-fence.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "report.png", "y.md"]


def test_mkdocs_build_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    # mkdocs.yml's validation settings turn a page missing from the nav and a link to a missing page or
    # anchor into warnings, which --strict makes fatal


def test_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference text to docs/"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file(page):
    broken = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files: {broken}"


#: a test the docs cite: `tests/x.py`, `tests/x.py::test_name`, and the `…::test_other` that follow one
_CITED = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`((?:(?:,\s*|\s+and\s+)`…::\w+`)*)")


def cited_tests(text: str) -> list[tuple[str, str | None]]:
    out = []
    for m in _CITED.finditer(text):
        out.append((m.group(1), m.group(2)))
        out += [(m.group(1), name) for name in re.findall(r"…::(\w+)", m.group(3))]
    return out


def test_cited_tests_finds_each_form():
    text = "`tests/a.py`, see `tests/b/c.py::test_x`, `…::test_y` and `…::test_z`"
    assert cited_tests(text) == [("tests/a.py", None), ("tests/b/c.py", "test_x"), ("tests/b/c.py", "test_y"),
                                 ("tests/b/c.py", "test_z")]


@pytest.mark.parametrize("page", [*_pages(), ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_every_test_a_page_cites_exists(page):
    """Tests move with their modules: a page that cites one names where it is now."""
    cited = cited_tests(page.read_text())
    missing = [f"{f}::{name}" if name else f for f, name in cited
               if not (ROOT / f).is_file() or name and not re.search(rf"^def {name}\b", (ROOT / f).read_text(), re.M)]
    assert missing == []
