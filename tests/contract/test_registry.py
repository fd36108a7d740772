"""The attack registry: the published schemas come from it, nothing outside the attacks
names an attack, declarations are checked, and plugins are loaded per job."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from clipaudit.contract.registry import Attack, Column, RegistryError, Score, available, builtin_names, register
from clipaudit.contract.schemas import published, schema_document
from clipaudit.app.resolve import map_fingerprint, map_hash

ENGINE = Path(__file__).resolve().parents[2] / "engine" / "clipaudit"


@pytest.mark.parametrize("table", ["samples", "identities", "sample_scores"])
def test_builtin_attacks_produce_exactly_the_published_schema(table):
    """A change to an attack's columns must come with regenerated, versioned schemas/*.json
    (``python -m clipaudit.contract.schemas`` writes them and bumps the version)."""
    built, json_doc = schema_document(table), published(table)
    hint = "run python -m clipaudit.contract.schemas"
    assert [f["name"] for f in built["fields"]] == [f["name"] for f in json_doc["fields"]], hint
    assert built == json_doc, hint


def test_no_engine_module_outside_the_attacks_names_an_attack():
    """Only attacks/ (and the canary lab and the benchmarks, which build their own jobs) may name an
    attack — comments included. The CLI's example query, ``--tau``, the reduce step's defaults and
    its choice of pseudo-label source come from the registry."""
    # "caption" is also the name of a column every sample has (its text)
    names = sorted(builtin_names() - {"caption"})
    assert {"idia", "encodermi", "partcrop", "mim"} <= set(names)
    offenders = []
    for path in ENGINE.rglob("*.py"):
        rel = path.relative_to(ENGINE)
        if rel.parts[0] in ("attacks", "lab", "bench"):
            continue
        text = path.read_text().lower()
        offenders += [f"{rel}: {n}" for n in names if re.search(rf"\b{n}\b", text)]
    assert offenders == []


def _attack(name: str, columns=(), scores=()) -> Attack:
    from pydantic import BaseModel

    return Attack(name=name, title=name, params=BaseModel, build=lambda p, job: None, columns=tuple(columns),
                  scores=tuple(scores))


@pytest.mark.parametrize("attack,match", [
    (_attack("Bad-Name"), "lower-case"),
    (_attack("idia"), "already registered"),
    (_attack("zz_one", [Column("other_score", pa.float32(), "x")]), "must start with 'zz_one_'"),
    (_attack("zz_two", scores=[Score("elsewhere", "image")]), "score 'elsewhere'"),
])
def test_bad_declarations_are_refused(attack, match):
    before = available()
    with pytest.raises(RegistryError, match=match):
        register(attack)
    assert available() == before  # nothing half-registered


def test_a_plugin_that_registers_nothing_or_fails_is_a_spec_error(tmp_path):
    from clipaudit.spec import SpecError, parse_spec

    (tmp_path / "names.txt").write_text("Ann Lee\n")
    (tmp_path / "s.tar").write_bytes(b"")
    (tmp_path / "empty_plugin.py").write_text("X = 1\n")
    (tmp_path / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    base = {"model": {"name": "ViT-B-32"}, "data": {"shards": "s.tar"}, "names": "names.txt", "output": "out"}
    with pytest.raises(SpecError, match="plugins: plugin .*empty_plugin.py registered no attack"):
        parse_spec({**base, "plugins": ["empty_plugin.py"]}, tmp_path)
    with pytest.raises(SpecError, match="plugins: .*broken_plugin.py: ModuleNotFoundError"):
        parse_spec({**base, "plugins": ["broken_plugin.py"]}, tmp_path)
    with pytest.raises(SpecError, match="plugins: file not found: .*gone.py"):
        parse_spec({**base, "plugins": ["gone.py"]}, tmp_path)


def test_a_plugin_attack_is_only_known_to_jobs_that_list_the_plugin(tmp_path):
    from clipaudit.contract.schemas import load_schema
    from clipaudit.spec import SpecError, parse_spec

    plugin = Path(__file__).parents[1] / "attacks" / "brightness_plugin.py"
    (tmp_path / "names.txt").write_text("Ann Lee\n")
    (tmp_path / "s.tar").write_bytes(b"")
    base = {"model": {"name": "ViT-B-32"}, "data": {"shards": "s.tar"}, "names": "names.txt", "output": "out",
            "attacks": {"brightness": {"gamma": 2}}}
    spec = parse_spec({**base, "plugins": [str(plugin)]}, tmp_path)
    assert spec.attacks.enabled() == ["brightness"] and spec.attacks.brightness.gamma == 2
    assert "brightness_score" in load_schema("samples", spec.attacks.enabled()).names
    # the plugin stays imported in this process, but a job that does not list it cannot use it …
    with pytest.raises(SpecError, match="attacks.brightness: unknown key"):
        parse_spec(base, tmp_path)
    # … and the tables and the resume hash of a job without it do not change
    assert "brightness_score" not in load_schema("samples").names
    plain = parse_spec({**base, "attacks": {"idia": {}}}, tmp_path)
    assert "brightness" not in map_fingerprint(plain) and "brightness" in map_fingerprint(spec)
    # its map-side parameters enter the map hash, its reduce-only ones do not
    other = parse_spec({**base, "plugins": [str(plugin)], "attacks": {"brightness": {"gamma": 3}}}, tmp_path)
    label = parse_spec({**base, "plugins": [str(plugin)], "attacks": {"brightness": {"gamma": 2, "label": "x"}}},
                       tmp_path)
    assert map_hash(spec) != map_hash(other) and map_hash(spec) == map_hash(label)
