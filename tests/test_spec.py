from pathlib import Path

import pytest

from clipaudit.app.jobs import load_job
from clipaudit.spec import SpecError, load_spec
from clipaudit.app.resolve import map_fingerprint, map_hash
from clipaudit.data.shards import expand_shards


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "names.txt").write_text("Ann Lee\n")
    (tmp_path / "labels.csv").write_text("identity,member\nAnn Lee,true\n")
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04")  # the first bytes of a torch.save archive
    return tmp_path


GOOD = """
model:
  name: cfg.json
  pretrained: w.pt
  precision: fp16
data:
  shards: data/{00000..00002}.tar
  identity_field: identity
names: names.txt
labels: labels.csv
attacks:
  idia: {tau: 2, top_k: 5, templates: default}
  caption: {}
output: out/a
"""


def _load(tmp: Path, text: str):
    """The job file read and its inputs checked, as `clipaudit run` does."""
    p = tmp / "job.yaml"
    p.write_text(text)
    return load_job(p)


def test_contract_spec_resolves_paths_against_yaml_folder(files):
    spec = _load(files, GOOD)
    assert spec.model.name == str(files / "cfg.json")
    assert spec.model.pretrained == str(files / "w.pt")
    assert expand_shards(spec.data.shards) == [str(files / "data" / f"{i:05d}.tar") for i in range(3)]
    assert spec.output == files / "out" / "a"
    assert spec.attacks.idia.tau == 2 and spec.attacks.caption is not None


def test_default_attacks_are_idia_and_caption(files):
    spec = _load(files, GOOD.replace("attacks:\n  idia: {tau: 2, top_k: 5, templates: default}\n  caption: {}\n", ""))
    assert spec.attacks.idia is not None and spec.attacks.caption is not None


def test_zoo_names_are_not_treated_as_paths(files):
    spec = _load(files, GOOD.replace("name: cfg.json", "name: ViT-B-32")
                            .replace("pretrained: w.pt", "pretrained: laion400m_e32"))
    assert spec.model.name == "ViT-B-32" and spec.model.pretrained == "laion400m_e32"


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("precision: fp16", "precision: fp64", "model.precision"),
        ("output: out/a", "output: out/a\nbogus: 1", "bogus: unknown key"),
        ("  identity_field: identity", "  identity_field: identity\n  colour: red", "data.colour: unknown key"),
        ("tau: 2", "tau: two", "attacks.idia.tau"),
        ("tau: 2", "tau: 0", "attacks.idia.tau"),
        ("names: names.txt", "names: missing.txt", "names: file not found"),
        ("labels: labels.csv", "labels: nope.csv", "labels: file not found"),
        ("pretrained: w.pt", "pretrained: gone.pt", "model.pretrained: file not found"),
        ("{00000..00002}", "{00000..00004}", "data.shards: file not found"),
        ("data/{00000..00002}.tar", "data/*.zip", "data.shards: no file matches"),
        ("templates: default", "templates: ['a photo of someone']", "exactly one '{}'"),
        ("  caption: {}\n", "  frobnicate: {}\n", "attacks.frobnicate: unknown key"),
        ("output: out/a", "", "output: required key is missing"),
        ("data/{00000..00002}.tar", "nosuchproto://bucket/{00000..00002}.tar", "data.shards: reading nosuchproto://"),
        ("output: out/a", "output: out/a\ncalibration: {controls: nope.csv}", "calibration.controls: file not found"),
        ("output: out/a", "output: out/a\ncalibration: {target_fpr: 1.5}", "calibration.target_fpr"),
    ],
)
def test_bad_specs_name_the_key(files, old, new, needle):
    assert old in GOOD
    with pytest.raises(SpecError) as e:
        _load(files, GOOD.replace(old, new))
    assert needle in str(e.value)


def test_not_yaml_and_not_mapping(files):
    with pytest.raises(SpecError, match="not valid YAML"):
        _load(files, "model: [unclosed")
    with pytest.raises(SpecError, match="mapping"):
        _load(files, "- a\n- b\n")


def test_map_hash_ignores_reduce_only_settings(files):
    a = _load(files, GOOD)
    b = _load(files, GOOD.replace("tau: 2", "tau: 3"))
    c = _load(files, GOOD.replace("top_k: 5", "top_k: 6"))
    (files / "controls.csv").write_text("identity\nBo Lin\n")
    d = _load(files, GOOD + "calibration: {controls: controls.csv, target_fpr: 0.05}\n")
    assert d.calibration.controls == files / "controls.csv"
    assert map_hash(a) == map_hash(b) == map_hash(d)
    assert map_hash(a) != map_hash(c)


def test_reference_model_paths_resolve_and_are_checked(files):
    text = GOOD.replace("  caption: {}", "  caption: {reference_model: {name: cfg.json, pretrained: w.pt}}")
    spec = _load(files, text)
    assert spec.attacks.caption.reference_model.name == str(files / "cfg.json")
    with pytest.raises(SpecError, match="attacks.caption.reference_model.pretrained: file not found"):
        _load(files, text.replace("pretrained: w.pt}", "pretrained: nope.pt}"))


def test_map_hash_covers_the_output_format(files, monkeypatch):
    import clipaudit.spec as spec_module

    a = _load(files, GOOD)
    assert map_fingerprint(a)["output_format"]["samples_schema"] >= 3
    before = map_hash(a)
    monkeypatch.setattr(spec_module, "MAP_FEATURES_VERSION", spec_module.MAP_FEATURES_VERSION + 1)
    assert map_hash(a) != before  # outputs of an older format are not resumed


def test_shard_timeout_is_a_compute_setting_outside_the_map_hash(files):
    a = _load(files, GOOD)
    b = _load(files, GOOD + "compute: {shard_timeout_s: 2.5}\n")
    assert a.compute.shard_timeout_s == 3600 and b.compute.shard_timeout_s == 2.5
    assert map_hash(a) == map_hash(b)  # compute settings never change results: resuming is allowed
    with pytest.raises(SpecError, match="compute.shard_timeout_s"):
        _load(files, GOOD + "compute: {shard_timeout_s: 0}\n")


@pytest.mark.parametrize("old,new,needle", [
    ("output: out/a", "output: out/a\nseed: -1", "seed"),
    ("output: out/a", "output: out/a\ncompute: {device: gpu}", "compute.device"),
    ("labels: labels.csv", "labels: bad.csv", "labels: none of the 1 image rows names an audited shard"),
])
def test_values_that_would_fail_late_are_refused_up_front(files, old, new, needle):
    (files / "bad.csv").write_text("shard,key,member\n/elsewhere/00000.tar,k,true\n")
    with pytest.raises(SpecError) as e:
        _load(files, GOOD.replace(old, new))
    assert needle in str(e.value)


def test_reading_a_spec_touches_no_input_and_the_job_check_names_each(files):
    """The spec only describes the job: a missing file is found by the job's input check (which
    `clipaudit run` and `--dry-run` do), not when the YAML is read."""
    from clipaudit.app.jobs import check_inputs

    text = GOOD.replace("names: names.txt", "names: missing.txt").replace("pretrained: w.pt", "pretrained: gone.pt")
    (files / "job.yaml").write_text(text)
    spec = load_spec(files / "job.yaml")
    assert spec.names == files / "missing.txt"
    with pytest.raises(SpecError, match="model.pretrained: file not found"):
        check_inputs(spec, need_backends=False)
