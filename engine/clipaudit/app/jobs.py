"""A job ready to run: its spec (:mod:`clipaudit.spec`, which only describes the job) and the
checks that touch files and storage — every local input exists, a local checkpoint looks like
one, URL inputs can be reached and read, the labels and controls parse against the shards."""

from __future__ import annotations

from pathlib import Path

from clipaudit.data.checkpoints import checkpoint_problem
from clipaudit.data.labels import LabelsError, ShardMatcher, read_controls, read_labels
from clipaudit.data.shards import ShardPatternError, expand_shards
from clipaudit.data.storage import StorageError, resolve_options, stat_urls
from clipaudit.data.urls import check_backend, is_url, protocol
from clipaudit.spec import JobSpec, SpecError, load_spec, looks_like_path


def load_job(path: str | Path, *, need_backends: bool = True) -> JobSpec:
    """Read a job file (:func:`clipaudit.spec.load_spec`) and check its inputs
    (:func:`check_inputs`). ``need_backends=False`` (a dry run on the machine that submits the
    job): storage is not contacted and a missing fsspec backend is not an error here; the
    workers still need it."""
    spec = load_spec(path)
    check_inputs(spec, need_backends)
    return spec


def _check_model_files(spec: JobSpec) -> None:
    """Every local model file a model spec names exists; a local checkpoint looks like one."""
    for key, model in spec.model_specs().items():
        for field, value in (("name", model.name), ("pretrained", model.pretrained)):
            if not value or not looks_like_path(value) or is_url(value):
                continue
            if not Path(value).exists():
                raise SpecError(f"{key}.{field}: file not found: {value}")
            if field == "pretrained" and Path(value).is_file() and not value.endswith(".json"):
                problem = checkpoint_problem(value)
                if problem is not None:
                    raise SpecError(f"{key}.{field}: {problem}")


def _check_backend(key: str, url: str) -> None:
    try:
        check_backend(url)
    except ImportError as e:
        raise SpecError(f"{key}: {e}") from None


def check_inputs(spec: JobSpec, need_backends: bool = True) -> None:
    """Every local input exists (model files too, and a local checkpoint looks like one); with
    ``need_backends`` every URL input's backend is installed, its storage options resolve, and
    the object exists and may be read (shards are listed, not read: their sizes and ETags are
    kept for the manifest). A dry run (``need_backends`` false) contacts no storage: URL inputs
    are checked by the run."""
    _check_model_files(spec)
    inputs = {"names": spec.names, "labels": spec.labels, "calibration.controls": spec.calibration.controls}
    for key, value in inputs.items():
        if isinstance(value, Path) and not value.is_file():
            raise SpecError(f"{key}: file not found: {value}")
    try:
        shards = expand_shards(spec.data.shards)
    except ShardPatternError as e:
        raise SpecError(f"data.shards: {e}") from None
    missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SpecError(f"data.shards: file not found: {missing[0]}{more}")
    urls = {key: value for key, value in inputs.items() if isinstance(value, str)}
    remote_shards = [s for s in shards if is_url(s)]
    if not need_backends:
        remote_shards, urls = [], {}
    for key, url in urls.items():
        _check_backend(key, url)
    for proto in sorted({protocol(s) for s in remote_shards}):
        _check_backend("data.shards", f"{proto}://")
    if urls or remote_shards:
        try:
            resolve_options(spec.data.storage_options)
            stat_urls(remote_shards, spec.data.storage_options)
            for key, url in urls.items():
                stat_urls([url], spec.data.storage_options, what=key)
        except StorageError as e:
            raise SpecError(str(e)) from None

    matcher = ShardMatcher(shards)
    opts = spec.data.storage_options
    try:  # read now, so --dry-run finds a bad row or an ambiguous shard before any mapping
        if spec.labels is not None and (need_backends or isinstance(spec.labels, Path)):
            read_labels(spec.labels, opts).matched(matcher)
        if spec.calibration.controls is not None and (need_backends or isinstance(spec.calibration.controls, Path)):
            read_controls(spec.calibration.controls, opts).matched(matcher)
    except LabelsError as e:
        raise SpecError(str(e)) from None
