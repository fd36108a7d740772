"""``clipaudit demo``: build the canary lab, audit the trained model and an untrained
control through the same ``run`` path as a real job (local Ray), and compare."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from clipaudit.report.text import metrics_table, print_report
from clipaudit.app.runner import RunReport, reduce_mapped, reduce_options, run_job
from clipaudit.spec import JobSpec
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


def _lab(root: Path, cfg: LabConfig, control_ready: Callable[[], None] = lambda: None) -> tuple[Path, Path]:
    """Build the lab once (job specs of the trained and the untrained model); reuse it after
    unless it was built with another configuration. ``control_ready``: called as soon as the
    untrained control can be audited (before the training)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _LAB_DONE
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if marker.is_file():
        if json.loads(marker.read_text()).get("config") == wanted:
            print(f"[lab] reusing the canary lab in {root}")
            control_ready()
            return root / "job.yaml", root / "job-untrained.yaml"
        print(f"[lab] {root} holds a lab of another configuration: rebuilding it")
        shutil.rmtree(root)
        root.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = build_lab(root, cfg, log=lambda msg: print(f"[lab] {msg}", flush=True),
                      on_control=lambda _: control_ready())
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "config": wanted}))
    return Path(paths.job), Path(paths.job_untrained)


def _reduce(report: RunReport, spec: JobSpec, after: Future | None = None) -> RunReport:
    """The reduce step of a ``--map-only`` run, as ``clipaudit reduce`` runs it (once ``after`` is done)."""
    if after is not None:
        wait([after])
    layout = report.layout
    if not report.summary.get("shards_done"):  # nothing was mapped: nothing to reduce (the report says why)
        return dataclasses.replace(report, map_only=False)
    with layout.lock():
        metrics = reduce_mapped(layout, reduce_options(spec)).metrics
    return dataclasses.replace(report, summary=layout.read_json(layout.summary) or report.summary, metrics=metrics,
                               map_only=False)


def run_demo(output: Path, progress: bool = True, cfg: LabConfig | None = None) -> int:
    """Run the whole synthetic audit; returns a process exit code.

    Pipelined as a cluster job would be (``run --map-only``, then ``reduce``), so that both of
    this machine's cores work: the untrained control is mapped by the Ray actors while the lab
    trains the other model (its training runs on one thread); each model's reduce step runs on a
    thread while the next is mapped. The reduce steps run one after the other (the numerical
    thread bound is per process)."""
    t0 = time.perf_counter()
    output = output.resolve()
    control_ready = threading.Event()
    reduced: dict[str, Future[RunReport]] = {}
    started_ray = False
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lab") as builder, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="reduce") as reducer:
            lab = builder.submit(_lab, output / "lab", cfg or LAB_PRESETS["default"], control_ready.set)
            while not control_ready.wait(0.2):
                if lab.done():
                    lab.result()  # the lab failed before its control was ready: raise its error
                    break
            started_ray = ensure_ray(None)
            jobs = {"untrained": output / "lab" / "job-untrained.yaml"}
            for label in ("untrained", "trained"):
                if label == "trained":
                    jobs["trained"] = lab.result()[0]  # once the lab has trained it
                spec = load_job(jobs[label]).model_copy(update={"output": output / label})
                print(f"\n== mapping the {label} model ({jobs[label].name}) ==", flush=True)
                mapped = run_job(spec, progress=progress, spec_text=jobs[label].read_text(), map_only=True)
                # after the lab (one Python thread doing the reduce beside another training would share the GIL)
                reduced[label] = reducer.submit(_reduce, mapped, spec, after=lab)
            reports = {label: reduced[label].result() for label in ("trained", "untrained")}
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    for label in reports:
        print(f"\n== the {label} model's audit ==")
        print_report(reports[label])
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
