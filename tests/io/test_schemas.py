"""The README documents every output table exactly as the published schemas define it."""

import re
from pathlib import Path

import pytest

from clipaudit.io.schemas import TABLES, markdown_table, published, readme_with_tables

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _readme_rows(text: str, table: str) -> list[tuple[str, str, bool, str]]:
    """(column, type, nullable, meaning) of each row of the README's block for ``table``."""
    m = re.search(rf"<!-- schema:{table}\b[^>]*-->(.*?)<!-- /schema:{table} -->", text, flags=re.S)
    assert m, f"README.md has no generated block for {table}"
    rows = []
    for line in m.group(1).splitlines():
        cells = re.match(r"\| `([^`]+)` \| `([^`]+)`(, never null)? \| (.*) \|$", line)
        if cells:
            rows.append((cells[1], cells[2], cells[3] is None, cells[4].replace("\\|", "|")))
    return rows


def test_every_published_schema_is_a_documented_table():
    shipped = {p.stem for p in (ROOT / "schemas").glob("*.json")}
    assert shipped == set(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_readme_table_lists_every_column_with_its_type_and_meaning(table):
    """Read back from the README itself, not through the generator, so a generator bug shows too."""
    expected = [(f["name"], f["type"], f["nullable"], f["doc"]) for f in published(table)["fields"]]
    assert _readme_rows(README.read_text(), table) == expected


def test_readme_tables_are_what_the_generator_writes():
    text = README.read_text()
    assert readme_with_tables(text) == text, "README tables drifted: run python -m clipaudit.io.schemas README.md"


def test_generator_fills_each_block_and_names_a_missing_one():
    stale = "\n".join(f"<!-- schema:{t} -->\nSTALE TABLE\n<!-- /schema:{t} -->" for t in TABLES)
    filled = readme_with_tables(stale)
    assert "STALE TABLE" not in filled and all(markdown_table(t) in filled for t in TABLES)
    with pytest.raises(ValueError, match="no <!-- schema:roc -->"):
        readme_with_tables(stale.replace("<!-- schema:roc -->", ""))
