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
