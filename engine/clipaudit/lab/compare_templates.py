"""IDIA per template vs IDIA on the templates' mean embedding (``template_average``), on one
canary lab: ``python -m clipaudit.lab.compare_templates --seed S [--steps N] [--output DIR]``.

Builds the default lab for seed ``S``, audits its trained model twice with IDIA alone — once
voting over the 21 templates (``tau: 1``), once ranking names against each name's averaged
template embedding — and prints one JSON line per variant: AUC and, per k images per
identity, TPR and FPR at ``tau = 1`` (means over the draws), from each run's ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any
from clipaudit.lab.build import LabConfig, build_lab
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

VARIANTS = {"per_template": "{tau: 1}", "template_average": "{tau: 1, template_average: true}"}


def compare(root: Path, seed: int, steps: int | None = None) -> list[dict[str, Any]]:
    """Build the lab under ``root`` (``steps``: training steps, default the lab's; fewer give
    a weaker model, where the two variants can differ) and return one record per variant."""
    cfg = LabConfig(seed=seed) if steps is None else LabConfig(seed=seed, steps=steps)
    lab = build_lab(root / "lab", cfg, log=lambda *a: None)
    out = []
    for variant, params in VARIANTS.items():
        job = lab.root / f"job-{variant}.yaml"
        job.write_text(
            f"model: {{name: {lab.model_config}, pretrained: {lab.trained}, precision: fp32}}\n"
            f"data: {{shards: [{', '.join(str(s) for s in lab.shards)}], identity_field: identity}}\n"
            f"names: {lab.names}\nlabels: {lab.labels}\n"
            f"attacks: {{idia: {params}}}\n"
            f"compute: {{executor: local, batch_size: 32, decode_threads: 1}}\n"
            f"output: {root / variant}\n")
        run_job(load_job(job), progress=False)
        idia = json.loads((root / variant / "metrics.json").read_text())["idia"]
        out.append({"seed": seed, "steps": cfg.steps, "variant": variant, "auc": idia.get("auc"),
                    "sweep": [{k: e[k] for k in ("k", "tpr", "fpr", "auc")} for e in idia.get("sweep", [])]})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the lab's seed (default 0)")
    p.add_argument("--steps", type=int, help="training steps of the lab model (default: the lab's 300)")
    p.add_argument("--output", help="keep the lab and both audits here (default: a temp folder)")
    args = p.parse_args(argv)
    if args.output:
        records = compare(Path(args.output), args.seed, args.steps)
    else:
        with tempfile.TemporaryDirectory(prefix="clipaudit-templates-") as d:
            records = compare(Path(d), args.seed, args.steps)
    for r in records:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
