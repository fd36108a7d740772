"""``clipaudit report OUT --html``: one self-contained page built from a small audit made here."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from html import escape
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import image_bytes, sample_files, write_tar

ODD_NAME = "Eve <b>Bold</b> & Co"
MEMBERS = ["Ann Lee", "Bob Stone", "Cy Doe", "Dee Ray", ODD_NAME]
NONMEMBERS = ["Fay Moss", "Gus Park", "Hal Innes", "Ida Quinn", "Jo West"]


@pytest.fixture(scope="module")
def audit(tmp_path_factory, tiny_model) -> Path:
    """A finished local audit on the tiny model: 10 labelled identities (one with markup in its
    name), 3 photos each, one undecodable sample; IDIA with a sweep over k, EncoderMI, caption."""
    from clipaudit.cli import main

    root = tmp_path_factory.mktemp("html-audit")
    files, n = [], 0
    for who in MEMBERS + NONMEMBERS:
        for _i in range(3):
            files += sample_files(f"{n:09d}", who, image_bytes(seed=n, size=(48, 40)), caption=f"a photo of {who}")
            n += 1
    files += sample_files(f"{n:09d}", "Ann Lee", b"not an image")
    write_tar(root / "00000.tar", files)
    (root / "names.txt").write_text("\n".join(MEMBERS + NONMEMBERS + ["Kim Noor", "Lou Vance"]) + "\n")
    # identity rows, and image rows: a member's first photo is a member, every non-member's photo is not
    (root / "labels.csv").write_text("identity,shard,key,member\n" + "".join(
        f'"{who}",,,{who in MEMBERS}\n' for who in MEMBERS + NONMEMBERS) + "".join(
        f",00000.tar,{j * 3 + i:09d},{who in MEMBERS}\n" for j, who in enumerate(MEMBERS + NONMEMBERS)
        for i in range(3) if who in NONMEMBERS or i == 0))
    (root / "job.yaml").write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: 00000.tar}}
names: names.txt
labels: labels.csv
attacks: {{idia: {{top_k: 3, k: [1, 2], draws: 3}}, encodermi: {{views: 4}}, caption: {{}}}}
compute: {{executor: local, batch_size: 8, decode_threads: 1}}
output: out
""")
    from threadpoolctl import threadpool_limits

    from clipaudit.reduce import evaluation

    # one refit of the learned attackers and the blind baseline, single-threaded: what the page
    # shows does not depend on the number of refits, and a small CPU is not oversubscribed
    with pytest.MonkeyPatch.context() as mp, threadpool_limits(1):
        mp.setattr(evaluation, "REFITS", 1)
        assert main(["run", str(root / "job.yaml"), "--no-progress"]) == 0
    return root / "out"


@pytest.fixture
def page(audit, capsys) -> str:
    """report.html of the audit, written through the CLI."""
    from clipaudit.cli import main

    assert main(["report", str(audit), "--html"]) == 0
    assert f"html report: {audit / 'report.html'}" in capsys.readouterr().out
    return (audit / "report.html").read_text(encoding="utf-8")


def _images(html: str) -> dict[str, bytes]:
    """alt text → PNG bytes of every <img> in the page."""
    out = {}
    for alt, src in re.findall(r'<img alt="([^"]*)" src="([^"]*)"', html):
        assert src.startswith("data:image/png;base64,"), src[:40]
        out[alt] = base64.b64decode(src.split(",", 1)[1])
    return out


def test_page_is_self_contained_with_one_labelled_roc_per_attack_and_the_sweep(audit, page):
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)  # loads nothing
    assert page.count("<img") == len(_images(page))  # every image is an embedded PNG
    images = _images(page)
    for png in images.values():
        assert png.startswith(b"\x89PNG")

    roc = pq.read_table(audit / "roc.parquet").to_pylist()
    attacks = {r["attack"] for r in roc} - {"baseline"}
    assert attacks == {"idia", "encodermi", "caption"}
    assert {r["variant"] for r in roc if r["attack"] == "encodermi"} > {"threshold"}  # learned variants too
    rocs = {alt for alt in images if alt.startswith("ROC of ")}
    assert len(rocs) == len(attacks) and {a.split()[2] for a in rocs} == attacks
    metrics = json.loads((audit / "metrics.json").read_text())
    for attack in attacks:  # each curve is labelled with its variant and AUC, the chance line too
        caption = re.search(rf"<figcaption>ROC of {attack}, (.*?)</figcaption>", page).group(1)
        assert f"{attack}, AUC {metrics[attack]['auc']:.3f}" in caption and "chance" in caption
        for variant in {r["variant"] for r in roc if r["attack"] == attack} - {"threshold"}:
            label = {"learned": "learned", "learned_mlp": "mlp", "learned_set": "set"}[variant]
            assert f"{attack} ({label}), AUC {metrics[attack][variant]['auc']:.3f}" in caption
        alt = next(a for a in rocs if a.split()[2] == attack)
        assert (audit / "report" / f"roc-{attack}.png").read_bytes() == images[alt]  # the PNGs beside the page

    assert metrics["idia"]["sweep"] and "sweep of idia over k" in images
    assert (audit / "report" / "sweep-idia.png").is_file()
    for attack in attacks:  # members, non-members and controls per attack
        assert f"score histograms of {attack}" in images
        caption = re.search(rf"<figcaption>Score histograms.*?{attack}: (.*?)</figcaption>", page).group(1)
        assert "members n=" in caption and "non-members n=" in caption and "controls n=" in caption

    errors = json.loads((audit / "_SUMMARY.json").read_text())["errors"]
    assert errors and all(f"<td>{escape(e)}</td><td>{n}</td>" in page for e, n in errors.items())


def test_shift_warning_and_its_rule_appear_only_when_raised(audit, page, tmp_path):
    from clipaudit.report.html import build_html

    metrics = json.loads((audit / "metrics.json").read_text())
    assert metrics["distribution_shift_warning"] is False
    rule = escape(metrics["shift_rule"])
    assert rule not in page and "Distribution shift" not in page and "WARNING" not in page

    raised = tmp_path / "raised"
    shutil.copytree(audit, raised)
    metrics["distribution_shift_warning"] = True
    metrics["baseline"]["by_level"]["identity"]["warning"] = True
    (raised / "metrics.json").write_text(json.dumps(metrics))
    html, _ = build_html(raised)
    assert "Distribution shift" in html and f"Rule: {rule}" in html
    assert "WARNING (identity level): the blind baseline" in html and "WARNING (image level)" not in html


def test_without_a_sweep_there_is_no_sweep_plot(audit, tmp_path):
    from clipaudit.report.html import build_html

    bare = tmp_path / "bare"
    shutil.copytree(audit, bare)
    metrics = json.loads((bare / "metrics.json").read_text())
    del metrics["idia"]["sweep"]
    (bare / "metrics.json").write_text(json.dumps(metrics))
    html, plots = build_html(bare)
    assert not any(p.stem.startswith("sweep") for p in plots) and "sweep of" not in html
    assert any(p.stem == "roc-idia" for p in plots)


def _histogram_captions(html: str) -> list[str]:
    return re.findall(r"<figcaption>(Score histograms.*?)</figcaption>", html)


def test_image_labels_are_read_from_a_labels_url_too(audit, tmp_path):
    """The histograms split by image labels alike whether the job's labels file is local or on
    object storage (here fsspec's in-memory store), and fall back to identity labels when it is gone."""
    import fsspec

    from clipaudit.report.html import build_html

    local_html, _ = build_html(audit)
    captions = _histogram_captions(local_html)
    assert captions and all("image labels of the job" in c for c in captions
                            if "per image" in c)
    moved = tmp_path / "moved"
    shutil.copytree(audit, moved)
    url = f"memory://report-labels/{tmp_path.name}/labels.csv"
    fsspec.filesystem("memory").pipe_file(url, (audit.parent / "labels.csv").read_bytes())
    state = json.loads((moved / "_job.json").read_text())
    state["spec"]["labels"] = url
    (moved / "_job.json").write_text(json.dumps(state))
    html, _ = build_html(moved)
    assert _histogram_captions(html) == captions
    fsspec.filesystem("memory").rm_file(url)
    html, _ = build_html(moved)
    assert any("each labelled as its identity" in c for c in _histogram_captions(html))


def test_provenance_shows_the_manifest_values(audit, page):
    manifest = json.loads((audit / "manifest.json").read_text())
    model = manifest["model"]
    for value in (model["name"], model["pretrained"], model["checkpoint_sha256"], manifest["map_hash"]):
        assert f">{escape(str(value))}</td>" in page
    assert len(model["checkpoint_sha256"]) == 64
    for package, version in manifest["versions"].items():
        assert f"<td>{escape(package)}</td><td>{escape(version)}</td>" in page


def test_identity_names_are_escaped(audit, page):
    names = pq.read_table(audit / "identities.parquet", columns=["identity"]).column("identity").to_pylist()
    assert ODD_NAME in names
    assert "<b>Bold" not in page and escape(ODD_NAME) in page
    assert "Top identities" in page


def test_photos_only_with_thumbnails_and_they_are_the_identitys_own(audit, page, capsys):
    import io

    import numpy as np
    from PIL import Image

    from clipaudit.cli import main

    assert "data:image/jpeg" not in page and 'class="thumb"' not in page  # personal data: off by default
    assert main(["report", str(audit), "--thumbnails"]) == 2
    assert "--thumbnails goes with --html" in capsys.readouterr().err
    assert main(["report", str(audit), "--html", "--thumbnails"]) == 0
    html = (audit / "report.html").read_text(encoding="utf-8")
    thumbs = re.findall(r'<img class="thumb" alt="photo of ([^"]*)" src="data:image/jpeg;base64,([^"]*)"', html)
    by_who: dict[str, list[bytes]] = {}
    for who, data in thumbs:
        by_who.setdefault(who, []).append(base64.b64decode(data))
    assert len(by_who["Ann Lee"]) == 3  # 3 ok photos (her 4th sample is not an image)
    assert all(len(v) == 3 for v in by_who.values()) and len(by_who) == len(MEMBERS + NONMEMBERS)

    def pixels(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)

    first = pixels(by_who["Ann Lee"][0])
    assert first.shape == (40, 48, 3)  # 48×40 photos are already below the 64-px thumbnail side
    own = np.abs(first - pixels(image_bytes(seed=0, size=(48, 40)))).mean()
    other = np.abs(first - pixels(image_bytes(seed=3, size=(48, 40)))).mean()
    assert own < 0.5 * other, (own, other)
    assert main(["report", str(audit), "--html"]) == 0  # the page without photos again for the other tests


def test_without_matplotlib_a_clear_error_names_the_extra(audit, monkeypatch, capsys):
    from clipaudit.cli import main

    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    (audit / "report.html").unlink(missing_ok=True)
    assert main(["report", str(audit), "--html"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "pip install 'clipaudit[report]'" in err[0]
    assert not (audit / "report.html").exists()


def test_the_sweep_plot_shows_both_series_where_they_coincide():
    """An untrained model: TPR = FPR = 0 at every k. Both series must be visible in the plot, not
    the FPR drawn over the TPR (then the red of the TPR shows only in the legend)."""
    import io

    import numpy as np
    from PIL import Image

    from clipaudit.report.html import sweep_plots

    entries = [{"k": k, "draws": 20, "tpr": 0.0, "tpr_std": 0.0, "fpr": 0.0, "fpr_std": 0.0} for k in (1, 3, 5, 10)]
    [plot] = sweep_plots({"idia": {"sweep": entries}})
    pixels = np.asarray(Image.open(io.BytesIO(plot.png)).convert("RGB")).astype(int)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels - np.array(rgb)).sum(axis=2) < 60).sum())

    tpr, fpr = count((0xD6, 0x27, 0x28)), count((0x1F, 0x77, 0xB4))
    assert fpr > 0 and tpr > 0.4 * fpr, (tpr, fpr)
