"""``clipaudit demo``: build the canary lab, audit the trained model and an untrained
control through the same ``run`` path as a real job (local Ray), and compare."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from clipaudit.report.text import metrics_table, print_report
from clipaudit.app.runner import RunReport, run_job
from clipaudit.app.jobs import load_job
from clipaudit.lab.build import LabConfig, build_lab
from clipaudit.executors.ray import ensure_ray
from clipaudit.bench.map_step import machine

_LAB_DONE = "_LAB_DONE.json"

#: Lab presets of ``clipaudit demo --lab``. All put the members' training photos among the
#: candidates, so image-level attacks are scored too.
LAB_PRESETS: dict[str, LabConfig] = {
    # 20 members, 6 training photos each, 300 steps: identity-level memorisation
    "default": LabConfig(include_train_images=True),
    # 1 training photo per member, trained with crop/flip augmentation: the image encoder
    # memorises single photos, so the part-crop attack gets signal (its crops sized like the
    # training crops)
    "overfit": LabConfig(include_train_images=True, train_images=1, steps=800, train_augment=(0.3, 1.0),
                         partcrop_scale=(0.3, 0.6)),
    # non-members shot with another camera style: the validity check must raise its warning
    "shifted": LabConfig(include_train_images=True, nonmember_style="shifted"),
    # non-members' captions from another source (dated archive captions), same camera: only a
    # baseline that reads the captions can see the shift
    "caption-shift": LabConfig(include_train_images=True, nonmember_captions="shifted"),
}


def _lab(root: Path, cfg: LabConfig) -> tuple[Path, Path]:
    """Build the lab once (job specs of the trained and the untrained model); reuse it after
    unless it was built with another configuration."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _LAB_DONE
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if marker.is_file():
        if json.loads(marker.read_text()).get("config") == wanted:
            print(f"[lab] reusing the canary lab in {root}")
            return root / "job.yaml", root / "job-untrained.yaml"
        print(f"[lab] {root} holds a lab of another configuration: rebuilding it")
        shutil.rmtree(root)
        root.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = build_lab(root, cfg, log=lambda msg: print(f"[lab] {msg}", flush=True))
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "config": wanted}))
    return Path(paths.job), Path(paths.job_untrained)


def run_demo(output: Path, progress: bool = True, cfg: LabConfig | None = None) -> int:
    """Run the whole synthetic audit; returns a process exit code."""
    t0 = time.perf_counter()
    output = output.resolve()
    job_trained, job_untrained = _lab(output / "lab", cfg or LAB_PRESETS["default"])
    started_ray = ensure_ray(None)
    reports: dict[str, RunReport] = {}
    try:
        for label, job in (("trained", job_trained), ("untrained", job_untrained)):
            spec = load_job(job)
            spec = spec.model_copy(update={"output": output / label})
            print(f"\n== auditing the {label} model ({job.name}) ==", flush=True)
            reports[label] = run_job(spec, progress=progress, spec_text=Path(job).read_text())
            print_report(reports[label])
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    elapsed = time.perf_counter() - t0
    images = sum(r.summary["rows"] for r in reports.values())
    map_s = sum(r.map.seconds for r in reports.values())
    for label, title in (("trained", "model trained on the members"), ("untrained", "untrained control")):
        print(f"\n== {title}: all attacks (95 % bootstrap intervals) ==")
        print("\n".join(metrics_table(reports[label].metrics)))
    print("\nidentity level: member vs non-member identities (IDIA at the same number k of photos each; "
          "image-side scores averaged over their photos); image level: the members' training photos vs every "
          "held-out photo (of members and non-members).")

    m = machine("cpu")
    print(f"machine: {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}; "
          f"lab seed {(cfg or LAB_PRESETS['default']).seed}")
    print(f"\ndemo wall time {elapsed:.1f} s; map step {images} images in {map_s:.1f} s "
          f"({images / max(map_s, 1e-9):.1f} img/s incl. Ray start-up and model loading)")
    print("\nTry:")
    print(f'  clipaudit query {output / "trained"} "SELECT identity, n_images, idia_score, idia_member, label_member '
          f'FROM identities ORDER BY idia_score DESC LIMIT 10"')
    ok = all(r.ok for r in reports.values())
    return 0 if ok else 1
