"""Arrow schemas of the output tables.

The published contract is ``schemas/<table>.json`` (versioned; the version goes into every
file's Parquet metadata). The tables whose columns depend on the attacks — ``samples``,
``identities``, ``sample_scores`` — are built from their core columns (types and docs from
the JSON) plus what each registered attack declares; with the built-in attacks the result
is exactly the JSON (a test checks it), so a schema change stays a deliberate, versioned
edit of the JSON.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from clipaudit.contract.registry import Column, builtin_names, registered, registry_version

SCHEMA_META_NAME = b"clipaudit.schema"
SCHEMA_META_VERSION = b"clipaudit.schema_version"

_SCALARS = {
    "string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float16": pa.float16(),
    "float32": pa.float32(), "float64": pa.float64(), "bool": pa.bool_(),
}
_NAMES = {v: k for k, v in _SCALARS.items()}

#: core columns of the attack-dependent tables: (before the attacks' columns, after them)
_CORE = {
    "samples": (("shard", "key", "position", "identity", "status", "error", "error_detail", "warning", "width",
                 "height", "has_caption", "caption"), ("dhash",)),
    "identities": (("identity", "n_images", "n_errors", "in_name_pool"),
                   ("membership_pvalue", "membership_qvalue", "membership_discovery", "is_control", "label_member")),
    "sample_scores": (("shard", "key", "position", "identity", "is_control"), ()),
}

IDENTITY_PVALUE_DOC = ("empirical p-value of the score among the control identities (calibration.controls and "
                       "labelled non-members), leave-one-out for a control; small = member-like")
IDENTITY_FLAG_DOC = "{score}_pvalue <= calibration.target_fpr (null without at least 2 control identities)"
IMAGE_PVALUE_DOC = "empirical p-value of {score}_score among the control images (leave-one-out for a control)"
IMAGE_FLAG_DOC = "{score}_pvalue <= calibration.target_fpr"
QVALUE_DOC = ("Benjamini-Hochberg q-value of {score}_pvalue over the candidate (non-control) {units}; null for a "
              "control")
DISCOVERY_DOC = "{score}_qvalue <= calibration.fdr (a discovery at that false-discovery rate)"
LEARNED_SCORE_DOC = ("member probability from the {attack} attack's {variant} attacker "
                     "(attackers/{attack}_{variant}.json): "
                     "out-of-fold for the images it was fitted on (the labelled images, a seeded sample of 20,000 "
                     "beyond that), from the attacker fitted on them (or applied from another audit with --attackers) "
                     "for the others")

#: the map step's columns for the validity check (always written)
BASELINE_COLUMNS = (Column("baseline_features", pa.list_(pa.float32()),
                           "model-free image statistics for the validity check (see attacks/baseline.py)"),)


def parse_type(text: str) -> pa.DataType:
    m = re.fullmatch(r"list<(\w+)>", text)
    return pa.list_(_SCALARS[m.group(1)]) if m else _SCALARS[text]


def type_name(t: pa.DataType) -> str:
    return f"list<{_NAMES[t.value_type]}>" if pa.types.is_list(t) else _NAMES[t]


@cache
def published(name: str) -> dict[str, Any]:
    """The JSON document ``schemas/<name>.json``."""
    return json.loads(resources.files("clipaudit").joinpath("schemas", f"{name}.json").read_text())


def _core(name: str, names: tuple[str, ...]) -> list[Column]:
    by_name = {f["name"]: f for f in published(name)["fields"]}
    return [Column(n, parse_type(by_name[n]["type"]), by_name[n]["doc"], by_name[n]["nullable"]) for n in names]


def columns(name: str, enabled: tuple[str, ...] = ()) -> list[Column]:
    """The columns of an output table: every built-in attack's (null when off), and those of
    the other ``enabled`` attacks (plugins)."""
    if name not in _CORE:
        return _core(name, tuple(f["name"] for f in published(name)["fields"]))
    head, tail = _CORE[name]
    builtin = builtin_names()
    attacks = [a for a in registered() if a.name in builtin or a.name in enabled]
    middle: list[Column] = []
    if name == "samples":
        middle = [c for a in attacks for c in a.columns] + list(BASELINE_COLUMNS)
    elif name == "identities":
        all_scores = [s for a in attacks for s in a.scores]
        middle = [c for a in attacks for c in a.identity_columns]
        middle += [Column(f"{s.name}_score", pa.float64(), s.identity_doc) for s in all_scores if s.level == "image"]
        middle += [Column(f"{s.name}_pvalue", pa.float64(), IDENTITY_PVALUE_DOC) for s in all_scores]
        middle += [Column(f"{s.name}_flag", pa.bool_(), IDENTITY_FLAG_DOC.format(score=s.name)) for s in all_scores]
        middle += [Column(f"{s.name}_qvalue", pa.float64(), QVALUE_DOC.format(score=s.name, units="identities"))
                   for s in all_scores]
        middle += [Column(f"{s.name}_discovery", pa.bool_(), DISCOVERY_DOC.format(score=s.name)) for s in all_scores]
    elif name == "sample_scores":
        for s in (s for a in attacks for s in a.image_scores()):
            middle += _image_calibration_columns(s.name)
        for a in attacks:
            for v in a.learned if a.features else ():
                n = f"{a.name}_{v.name}"
                middle += [Column(f"{n}_score", pa.float64(), LEARNED_SCORE_DOC.format(attack=a.name, variant=v.name)),
                           *_image_calibration_columns(n)]
    return _core(name, head) + middle + _core(name, tail)


def _image_calibration_columns(score: str) -> list[Column]:
    return [Column(f"{score}_pvalue", pa.float64(), IMAGE_PVALUE_DOC.format(score=score)),
            Column(f"{score}_flag", pa.bool_(), IMAGE_FLAG_DOC.format(score=score)),
            Column(f"{score}_qvalue", pa.float64(), QVALUE_DOC.format(score=score, units="images")),
            Column(f"{score}_discovery", pa.bool_(), DISCOVERY_DOC.format(score=score))]


def schema_document(name: str) -> dict[str, Any]:
    """The table's schema as a JSON document in the format of ``schemas/*.json``."""
    doc = published(name)
    fields = [{"name": c.name, "type": type_name(c.type), "nullable": c.nullable, "doc": c.doc} for c in columns(name)]
    return {"name": doc["name"], "version": doc["version"], "doc": doc["doc"], "fields": fields}


def load_schema(name: str, enabled: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """The Arrow schema of an output table (see :func:`columns`), with its name and version in
    the metadata."""
    return _load_schema(name, tuple(enabled), registry_version())


@cache
def _load_schema(name: str, enabled: tuple[str, ...], _version: int) -> pa.Schema:
    meta = {SCHEMA_META_NAME: name.encode(), SCHEMA_META_VERSION: str(published(name)["version"]).encode()}
    return pa.schema([c.field() for c in columns(name, enabled)], metadata=meta)


#: the published tables, in the order docs/outputs.md documents them
TABLES = ("samples", "embeddings", "identities", "sample_scores", "roc", "downloads")

#: the Markdown page that holds the generated tables, relative to the repository root
DOCS_PAGE = "docs/outputs.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(name: str) -> str:
    """``schemas/<name>.json`` as a Markdown table: column, type, meaning (the tables of docs/outputs.md)."""
    doc = published(name)
    lines = [f"`{name}` (schema version {doc['version']}): {_cell(doc['doc'])}", "",
             "| column | type | meaning |", "|---|---|---|"]
    for f in doc["fields"]:
        kind = f"`{f['type']}`" + ("" if f["nullable"] else ", never null")
        lines.append(f"| `{f['name']}` | {kind} | {_cell(f['doc'])} |")
    return "\n".join(lines)


def schema_block(name: str) -> str:
    """The generated block of docs/outputs.md for table ``name``, between its begin and end comments."""
    command = "python -m clipaudit.contract.schemas"
    return (f"<!-- schema:{name} (generated from schemas/{name}.json: {command}) -->\n"
            f"{markdown_table(name)}\n\n<!-- /schema:{name} -->")


def with_schema_tables(text: str) -> str:
    """``text`` (docs/outputs.md) with each ``<!-- schema:NAME … -->`` block replaced by the table of NAME."""
    for name in TABLES:
        m = re.search(rf"<!-- schema:{name}\b[^>]*-->.*?<!-- /schema:{name} -->", text, flags=re.S)
        if m is None:
            raise ValueError(f"no <!-- schema:{name} --> … <!-- /schema:{name} --> block to fill")
        text = text[: m.start()] + schema_block(name) + text[m.end():]
    return text


def regenerate_json(folder: Path) -> list[str]:
    """Rewrite ``folder/<table>.json`` for each table with attack columns where the registry's
    built-in attacks no longer match it: the attacks' columns as registered, the core columns as
    published, and the version one above the file's (readers and resumes see the change). Returns
    the tables rewritten."""
    out = []
    for name in _CORE:
        path = folder / f"{name}.json"
        current = json.loads(path.read_text())
        doc = schema_document(name)
        if doc["fields"] != current["fields"]:
            doc["version"] = int(current["version"]) + 1
            path.write_text(json.dumps(doc, indent=2) + "\n")
            out.append(name)
    return out


def _package_schemas() -> Path:
    return Path(str(resources.files("clipaudit").joinpath("schemas")))


if __name__ == "__main__":  # python -m clipaudit.contract.schemas [docs/outputs.md]
    import sys

    if len(sys.argv) > 2:
        sys.exit(f"usage: python -m clipaudit.contract.schemas [{DOCS_PAGE}]")
    changed = regenerate_json(_package_schemas())
    published.cache_clear()
    print("rewrote " + (", ".join(f"schemas/{n}.json" for n in changed) if changed else "no schema (all match)"))
    page = Path(sys.argv[1] if len(sys.argv) == 2 else DOCS_PAGE)
    page.write_text(with_schema_tables(page.read_text()))
    print(f"regenerated the tables of {page}")
