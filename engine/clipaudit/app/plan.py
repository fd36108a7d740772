"""What ``clipaudit run --dry-run`` reports: the work a job would do, and the inputs it cannot
check from this machine.

A dry run reads local files (spec, names, labels, checkpoints, tar headers) but never contacts
object storage or a model hub: a URL or a hub weight is listed as *unchecked* with the reason,
while a definite problem (a missing local file, an unknown model) stays a :class:`SpecError`.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipaudit.data.urls import backend_package, check_backend, is_url, protocol
from clipaudit.data.tar_reader import IMAGE_EXTS, split_member_name
from clipaudit.data.names import NamePoolError, load_name_pool
from clipaudit.model.loading import hf_offline, hub_weights
from clipaudit.data.labels import LabelsError, missing_from_pool, missing_names_message, read_controls, read_labels
from clipaudit.spec import JobSpec, ModelSpec, SpecError
from clipaudit.app.resolve import numerics
from clipaudit.contract.registry import available
from clipaudit.executors.ray import named_cluster
from clipaudit.data.shards import expand_shards

#: local shards whose tar headers a dry run reads; beyond this an evenly spaced sample is extrapolated
COUNT_AT_MOST = 200


@dataclass(frozen=True)
class Unchecked:
    """An input a dry run cannot check from here: the spec key, what it names, and why."""

    key: str
    value: str
    reason: str


@dataclass
class Plan:
    """The work of one job as a dry run sees it; ``None`` where it cannot be known from here."""

    shards: int
    done: int
    images: int | None
    images_text: str  # the figure as printed, with how it was obtained
    actors: int | None
    actors_note: str
    gpus: float | None
    gpus_note: str
    estimate: str
    unchecked: list[Unchecked] = field(default_factory=list)
    numerics: str = ""  # device, precision, index, decode as the run resolves them here ("" on a cluster)
    passes: str = ""  # vision-tower forward passes per image, by attack
    sizing: str = ""  # with a deadline: the actors and GPUs that map the images within it at the benched rate


def forward_passes(spec: JobSpec) -> str:
    """The vision tower's forward passes per image: the embedding, then each enabled attack's own
    (on its sampled images only, where it samples)."""
    parts, total = ["1 (the embedding)"], 1
    for attack in available(spec.plugins):
        if attack.name not in spec.attacks.enabled() or attack.image_passes is None:
            continue
        params = getattr(spec.attacks, attack.name)
        n = attack.image_passes(params)
        if not n:
            continue
        sample = getattr(params, "sample", None)
        if sample is not None:
            parts.append(f"{attack.name} {n} on a sample (up to {sample.per_identity} image(s) per identity and shard)")
        else:
            parts.append(f"{attack.name} {n}")
            total += n
    return " + ".join(parts) + f"; {total} per image scored by every attack"


def _remote_reason(url: str) -> str:
    reason = "on object storage, not contacted by a dry run"
    try:
        check_backend(url)
    except ImportError:
        reason += f"; {backend_package(url)} is not installed here (every worker node needs it)"
    return reason


def _model_inputs(key: str, m: ModelSpec) -> list[Unchecked]:
    """Weights a dry run cannot check; raises :class:`SpecError` for a zoo model or tag that
    OpenCLIP does not know (a definite error, found without network). Hub weights already in
    the local Hugging Face cache count as checked; the others are listed with what a run does."""
    out: list[Unchecked] = []
    for sub, value in (("name", m.name), ("pretrained", m.pretrained)):
        if value and is_url(value):
            out.append(Unchecked(f"{key}.{sub}", value, _remote_reason(value)))
    name, tag = m.name, m.pretrained
    hub_model = (tag or "").startswith("hf-hub:") or name.startswith("hf-hub:")
    if not hub_model and not (name.endswith(".json") or is_url(name) or os.path.sep in name):
        import open_clip

        if name not in open_clip.list_models():
            raise SpecError(f"{key}.name: unknown model {name!r}: not an OpenCLIP model name, hf-hub: id or "
                            "model-config JSON (see open_clip.list_models())")
        if tag and not (is_url(tag) or Path(tag).is_file()) and not open_clip.get_pretrained_cfg(name, tag):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise SpecError(f"{key}.pretrained: {tag!r} is not an OpenCLIP tag of {name} "
                            f"(known: {', '.join(tags) or 'none'}) nor a local checkpoint")
    weights = hub_weights(name, tag)
    if weights is not None and weights.cached is None:
        kind = "Hugging Face Hub" if hub_model else "OpenCLIP zoo"
        then = ("HF_HUB_OFFLINE is set, so a run on this machine stops at once (download them once with network, or "
                "use a local checkpoint)" if hf_offline() else
                "downloaded when the job runs (by each worker on a cluster)")
        value = tag if (tag or "").startswith("hf-hub:") else name if not tag else f"{name} {tag}"
        out.append(Unchecked(f"{key}.{'pretrained' if tag else 'name'}", value,
                             f"{kind} weights, not in the local Hugging Face cache ({weights.describe()}): {then}"))
    return out


def unchecked_inputs(spec: JobSpec) -> list[Unchecked]:
    """Every input of ``spec`` a dry run cannot check from here, in spec order."""
    out = []
    for key, m in spec.model_specs().items():
        out += _model_inputs(key, m)
    remote = [s for s in expand_shards(spec.data.shards) if is_url(s)]
    for proto in sorted({protocol(s) for s in remote}):
        of = [s for s in remote if protocol(s) == proto]
        value = of[0] if len(of) == 1 else f"{len(of)} shards, {of[0]} … {of[-1]}"
        out.append(Unchecked("data.shards", value, _remote_reason(of[0])))
    for key, value in (("names", spec.names), ("labels", spec.labels),
                       ("calibration.controls", spec.calibration.controls)):
        if isinstance(value, str):
            out.append(Unchecked(key, value, _remote_reason(value)))
    return out


def _images_in_tar(path: str) -> int | None:
    """Image members of a local tar, from its headers only; None when it is not a readable tar."""
    if os.path.getsize(path) == 0:
        return 0  # what img2dataset writes when every download of a shard failed
    try:
        with tarfile.open(path, mode="r:") as tar:
            return sum(1 for m in tar if m.isfile() and split_member_name(m.name)[1] in IMAGE_EXTS)
    except (tarfile.TarError, OSError):
        return None


def count_images(shards: list[str]) -> tuple[int | None, str]:
    """Images in the shards (tar headers, no decoding), and the figure as printed with how it
    was obtained; None when shards on object storage make it unknown."""
    remote = sum(is_url(s) for s in shards)
    if remote:
        return None, f"unknown ({remote} of {len(shards)} shards on object storage, not read by a dry run)"
    step = max(1, -(-len(shards) // COUNT_AT_MOST))
    sample = shards[::step]
    counts = [_images_in_tar(s) for s in sample]
    unreadable = sum(c is None for c in counts)
    total = sum(c for c in counts if c is not None)
    text = f"{total:,} (from tar headers"
    if len(sample) < len(shards):
        total = round(total * len(shards) / len(sample))
        text = f"≈ {total:,} (extrapolated from the tar headers of {len(sample)} of {len(shards)} shards"
    if unreadable:
        text += f"; {unreadable} not readable as tar, counted as 0"
    return total, text + ")"


def device_here(spec: JobSpec) -> str | None:
    """``cuda`` or ``cpu``: where the map step runs when it runs on this machine (the local
    executor, or a local Ray); None on a Ray cluster, whose GPUs are known when it runs. A
    ``compute.device: cuda`` on a machine without a GPU is a :class:`SpecError` (it never falls
    back to the CPU)."""
    import torch

    c = spec.compute
    if c.executor == "ray" and named_cluster(c.ray_address):
        return None
    has_gpu = torch.cuda.is_available()
    if c.device.startswith("cuda") and not has_gpu:
        raise SpecError(f"compute.device: {c.device}, but this machine has no GPU that torch can use "
                        "(torch.cuda.is_available() is False); it never falls back to the CPU: use device: auto "
                        "or cpu, or run on a GPU machine")
    if c.device != "auto":
        return torch.device(c.device).type
    return "cuda" if has_gpu else "cpu"


def check_name_coverage(spec: JobSpec, read_urls: bool = True) -> None:
    """A labelled or control identity whose name the pool lacks stops the job (SpecError naming
    them) for every enabled attack whose ``missing_names`` is ``error``. ``read_urls=False`` (a dry
    run): files on object storage are not read, and the check is left to the run."""
    strict = [name for name in spec.attacks.enabled()
              if getattr(getattr(spec.attacks, name), "missing_names", None) == "error"]
    if not strict or (spec.labels is None and spec.calibration.controls is None):
        return
    files = (spec.names, spec.labels, spec.calibration.controls)
    if not read_urls and any(isinstance(f, str) and is_url(f) for f in files):
        return
    so = spec.data.storage_options
    try:
        named = set(read_labels(spec.labels, so).identities) if spec.labels is not None else set()
        if spec.calibration.controls is not None:
            named |= read_controls(spec.calibration.controls, so).identities
        pool = set(load_name_pool(spec.names, so))
    except (LabelsError, NamePoolError) as e:
        raise SpecError(str(e)) from None
    missing = missing_from_pool(named, pool)
    if missing:
        raise SpecError(f"attacks.{strict[0]}.missing_names: error: "
                        + missing_names_message(strict[0], missing, spec.names))


def _actors(spec: JobSpec, todo: int) -> tuple[int | None, str, float | None, str]:
    c = spec.compute
    here = device_here(spec)
    why_cpu = "this machine has no GPU" if c.device == "auto" else "compute.device: cpu"
    if c.executor == "local":
        if here == "cpu":
            return 1, "local executor: one process, no Ray", 0.0, f"{why_cpu}: the model runs on the CPU"
        return 1, "local executor: one process, no Ray", 1.0, f"device {c.device if c.device != 'auto' else 'cuda'}"
    uses_gpu = c.gpus_per_worker > 0 and here != "cpu" and c.device != "cpu"
    where = "a local Ray on this machine" if here is not None else "the Ray cluster"
    if c.workers:
        n = min(c.workers, max(todo, 1))
        gpus = n * c.gpus_per_worker if uses_gpu else 0.0
        return n, f"compute.workers = {c.workers}, at most one per shard left, on {where}", gpus, \
            f"{c.gpus_per_worker:g} per actor" if uses_gpu else f"{why_cpu}: CPU actors"
    if not uses_gpu:
        n = min(2, max(todo, 1)) if not c.resources_per_worker else None
        note = (f"{where}: CPU actors of {c.cpus_per_worker:g} CPU each" if n is not None else
                f"{where}: CPU actors, as many as resources_per_worker allows")
        return n, note, 0.0, f"{why_cpu}: CPU actors"
    if here == "cuda":
        import torch

        n = max(1, int(torch.cuda.device_count() // c.gpus_per_worker))
        n = min(n, max(todo, 1))
        return n, f"{where}: one per {c.gpus_per_worker:g} GPU(s)", n * c.gpus_per_worker, \
            f"{c.gpus_per_worker:g} per actor"
    return (None, f"Ray: one per {c.gpus_per_worker:g} GPU(s) of the cluster, known when it runs "
                  "(compute.workers unset)",
            None, f"every GPU of the cluster, {c.gpus_per_worker:g} per actor")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _estimate(spec: JobSpec, bench: dict[str, Any] | None, images: int | None, actors: int | None) -> str:
    if bench is None:
        return "none (no bench figure: pass --bench FILE written by `clipaudit bench --json-out FILE` on a worker)"
    try:
        rate = float(bench["e2e_images_per_s"])
        model = bench["model"]
    except (KeyError, TypeError, ValueError):
        raise SpecError("--bench: not a `clipaudit bench` record (needs model and e2e_images_per_s)") from None
    if model != spec.model.name:
        return f"none (the bench figure is for {model}, this job runs {spec.model.name})"
    if images is None:
        return "none (the number of images is unknown)"
    where = f"{bench.get('device', '?')}, {bench.get('precision', '?')}, " \
            f"attacks {bench.get('attacks', '?')}"
    per_actor = images / rate
    if actors is None:
        return f"{_duration(per_actor)} on one actor at {rate:g} images/s ({where}); divide by the actors"
    return f"{_duration(per_actor / actors)} on {actors} actor(s) at {rate:g} images/s each ({where}), " \
           "start-up excluded"


def sized_for(spec: JobSpec, bench: dict[str, Any] | None, images: int | None, hours: float) -> str:
    """The actors (and GPUs) that map ``images`` within ``hours`` at the benched per-actor rate:
    the cost model behind ``compute.workers`` and a RayJob's GPU group and deadline."""
    if bench is None or images is None or bench.get("model") != spec.model.name:
        return "none (needs --bench with a record of this model, and the number of images)"
    rate = float(bench["e2e_images_per_s"])
    if rate <= 0:
        raise SpecError(f"--bench: e2e_images_per_s must be positive, got {rate:g}")
    actors = max(1, math.ceil(images / rate / (hours * 3600)))
    gpus = actors * spec.compute.gpus_per_worker
    return (f"{actors} actor(s), {gpus:g} GPU(s) map {images:,} images within {hours:g} h at {rate:g} images/s "
            f"each: compute.workers: {actors}; a RayJob's GPU group maxReplicas × GPUs per pod ≥ {gpus:g}; its "
            f"activeDeadlineSeconds above {hours * 3600:.0f} plus start-up and the reduce step")


def _left(images: int | None, shards: int, done: int) -> int | None:
    """The images of the shards not done yet (shards taken as equal in size)."""
    return None if images is None or not shards else round(images * (shards - done) / shards)


def make_plan(spec: JobSpec, done: int, bench: dict[str, Any] | None = None, deadline_h: float | None = None) -> Plan:
    """The plan of ``spec``, ``done`` of whose shards are already finished; ``deadline_h``: size
    the map step to end within that many hours (see :func:`sized_for`)."""
    unchecked = unchecked_inputs(spec)
    check_name_coverage(spec, read_urls=False)
    shards = expand_shards(spec.data.shards)
    images, note = count_images(shards)
    actors, actors_note, gpus, gpus_note = _actors(spec, len(shards) - done)
    here = device_here(spec)
    resolved = ""
    if here is not None:  # the name index depends on the pool's size, which a dry run does not read from storage
        remote_pool = isinstance(spec.names, str) and is_url(spec.names)
        resolved = ", ".join(f"{k} {v}" for k, v in numerics(spec, here, read_pool=not remote_pool).items())
    return Plan(len(shards), done, images, note, actors, actors_note, gpus, gpus_note,
                _estimate(spec, bench, images, actors), unchecked, resolved, forward_passes(spec),
                "" if deadline_h is None else sized_for(spec, bench, _left(images, len(shards), done), deadline_h))


def format_plan(plan: Plan) -> list[str]:
    """The plan as the dry run prints it, one line per item."""
    lines = [
        f"images: {plan.images_text}",
        f"actors: {plan.actors_note}" if plan.actors is None else f"actors: {plan.actors} ({plan.actors_note})",
        f"GPUs: {plan.gpus_note}" if plan.gpus is None else f"GPUs: {plan.gpus:g} ({plan.gpus_note})",
        f"numerics: {plan.numerics}" if plan.numerics else "numerics: decided by the cluster's GPUs when it runs",
        f"forward passes per image: {plan.passes}",
        f"estimated time: {plan.estimate}",
    ]
    if plan.sizing:
        lines.append(f"sized for the deadline: {plan.sizing}")
    if plan.unchecked:
        lines.append(f"unchecked ({len(plan.unchecked)}): inputs a dry run cannot check from here")
        lines += [f"  {u.key}: {u.value} — {u.reason}" for u in plan.unchecked]
    else:
        lines.append("unchecked: none")
    return lines


def read_bench(path: str | Path) -> dict[str, Any]:
    """A ``clipaudit bench --json-out`` record."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"--bench: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"--bench: {path} is not JSON: {e}") from None
