"""docs/outputs.md documents every output table exactly as the published schemas define it."""

import json
import re
from pathlib import Path

import pytest

from clipaudit.contract.schemas import DOCS_PAGE, TABLES, markdown_table, published, with_schema_tables

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "outputs.md"


def _page_rows(text: str, table: str) -> list[tuple[str, str, bool, str]]:
    """(column, type, nullable, meaning) of each row of docs/outputs.md's block for ``table``."""
    m = re.search(rf"<!-- schema:{table}\b[^>]*-->(.*?)<!-- /schema:{table} -->", text, flags=re.S)
    assert m, f"docs/outputs.md has no generated block for {table}"
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
def test_docs_table_lists_every_column_with_its_type_and_meaning(table):
    """Read back from docs/outputs.md itself, not through the generator, so a generator bug shows too."""
    expected = [(f["name"], f["type"], f["nullable"], f["doc"]) for f in published(table)["fields"]]
    assert _page_rows(PAGE.read_text(), table) == expected


def test_docs_tables_are_what_the_generator_writes():
    assert PAGE == ROOT / DOCS_PAGE, "the generator's usage names another page than the one tested"
    text = PAGE.read_text()
    assert with_schema_tables(text) == text, "tables drifted: run python -m clipaudit.contract.schemas"


def test_generator_fills_each_block_and_names_a_missing_one():
    stale = "\n".join(f"<!-- schema:{t} -->\nSTALE TABLE\n<!-- /schema:{t} -->" for t in TABLES)
    filled = with_schema_tables(stale)
    assert "STALE TABLE" not in filled and all(markdown_table(t) in filled for t in TABLES)
    with pytest.raises(ValueError, match="no <!-- schema:roc -->"):
        with_schema_tables(stale.replace("<!-- schema:roc -->", ""))


def test_the_schema_files_are_generated_from_the_registry(tmp_path):
    """Regenerating the current schemas changes nothing; a file that lacks an attack's columns (as
    before the attack was added) gets them, in registry order, with its version bumped."""
    from clipaudit.contract.registry import get
    from clipaudit.contract.schemas import regenerate_json

    for t in TABLES:
        (tmp_path / f"{t}.json").write_text((ROOT / "schemas" / f"{t}.json").read_text())
    assert regenerate_json(tmp_path) == []
    before = json.loads((tmp_path / "samples.json").read_text())
    owned = {c.name for c in get("partcrop").columns}
    without = {**before, "fields": [f for f in before["fields"] if f["name"] not in owned]}
    (tmp_path / "samples.json").write_text(json.dumps(without, indent=2) + "\n")
    assert regenerate_json(tmp_path) == ["samples"]
    after = json.loads((tmp_path / "samples.json").read_text())
    assert after == {**before, "version": before["version"] + 1}
    assert (tmp_path / "samples.json").read_text() == (ROOT / "schemas" / "samples.json").read_text().replace(
        f'"version": {before["version"]},', f'"version": {before["version"] + 1},')
