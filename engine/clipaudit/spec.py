"""The job spec: a typed, validated, hashable description of one audit.

A spec is YAML (see ``jobs/`` and docs/job-spec.md). Relative paths are resolved against
the folder of the YAML file; unknown keys are errors. ``load_spec`` turns every problem
into one :class:`SpecError` whose message names the offending key or file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, create_model,
                      field_validator, model_validator)

from clipaudit.core.errors import ClipauditError
from clipaudit.data.urls import is_url
from clipaudit.contract.registry import available, registry_version, get, RegistryError, load_plugin
from clipaudit.contract.schemas import published
from clipaudit.data.storage import check_options_shape, redact_options

Precision = Literal["fp32", "fp16", "bf16"]


#: DuckDB's memory limit in the reduce step unless ``compute.reduce_memory`` says otherwise
REDUCE_MEMORY = "2GB"
#: what ``compute.reduce_memory`` accepts: a size DuckDB reads
MEMORY_SIZE = r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$"


class SpecError(ClipauditError, ValueError):
    """A job spec that cannot be run; the message says which key or file is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which CLIP model to audit and how to run it.

    Read from a job file, relative paths resolve against the file's folder (``parse_spec``
    passes that folder as validation context); that they exist is checked by
    :func:`clipaudit.app.jobs.check_inputs`.
    """

    name: str = Field(description="OpenCLIP name, hf-hub:org/repo, or path to a model-config JSON")
    pretrained: str | None = Field(None, description="OpenCLIP tag, hf-hub:org/repo, checkpoint path, or null")
    precision: Precision | None = Field(None, description="default: fp16 on GPU, fp32 on CPU")

    @field_validator("name", "pretrained", mode="before")
    @classmethod
    def _resolve(cls, v: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base_dir")
        if base is not None and isinstance(v, str) and (looks_like_path(v) or (Path(base) / v).exists()):
            return _resolve(v, Path(base))
        return v


class DataSpec(_Strict):
    """Where the candidate WebDataset shards are."""

    shards: str | list[str]
    identity_field: str = "identity"
    max_image_pixels: int = Field(89_478_485, gt=0, description="larger images become error rows")
    source_max_side: int = Field(448, ge=16, le=4096, description=(
        "attacks that cut views from the original image get it shrunk to at most this longest side "
        "(bounds memory and time; the papers' crops come from the original, not the model's centre crop)"))
    storage_options: dict[str, Any] = Field(default_factory=dict, description=(
        "passed to fsspec for every URL the job reads or writes (shards, names, labels, controls, an output on "
        "object storage), e.g. {endpoint_url: ..., key: '${AWS_ACCESS_KEY_ID}', secret: '${AWS_SECRET_ACCESS_KEY}'} "
        "for s3://, or one such mapping per protocol ({s3: {...}, gs: {...}}); "
        "${VAR} is read from the environment (the driver's, for Ray actors); not in the resume hash; "
        "secret-like values are written out as ***"))

    @field_validator("storage_options")
    @classmethod
    def _plain_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        def check(d: dict, where: str) -> None:
            for k, x in d.items():
                if isinstance(x, dict):
                    check(x, f"{where}.{k}")
                elif not (x is None or isinstance(x, (str, int, float, bool, list))):
                    raise ValueError(f"{where}.{k}: expected a string, number, boolean, list or mapping")
        check(v, "storage_options")

        check_options_shape(v)
        return v


class AttacksSpec(_Strict):
    """Which attacks to run: one optional field per registered attack (absent = off).

    The concrete model is built from the registry by :func:`attacks_model`.
    """

    def enabled(self) -> list[str]:
        """Names of the attacks that are on, in registry order."""
        return [name for name, params in self if params is not None]


_ATTACKS_MODELS: dict[tuple, type[AttacksSpec]] = {}


def attacks_model(plugins: tuple[str, ...] = ()) -> type[AttacksSpec]:
    """The ``attacks:`` model: one field per built-in attack and per attack of ``plugins``."""
    key = (registry_version(), tuple(plugins))
    if key not in _ATTACKS_MODELS:
        fields: dict[str, Any] = {a.name: (a.params | None, None) for a in available(plugins)}
        _ATTACKS_MODELS[key] = create_model("AttacksSpec", __base__=AttacksSpec, **fields)
    return _ATTACKS_MODELS[key]


def default_attacks() -> AttacksSpec:
    """The attacks a spec without an ``attacks`` key runs."""
    return attacks_model()(**{a.name: a.params() for a in available() if a.default})


class ComputeSpec(_Strict):
    """How to run: executor, workers, batching, retries. Not part of the result hash."""

    executor: Literal["ray", "local"] = "ray"
    workers: int | None = Field(None, ge=1, description="map actors; default: one per GPU, else 2")
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(128, ge=1)
    decode_threads: int = Field(2, ge=1)
    shards_in_flight: int | None = Field(
        None, ge=1, le=8,
        description="shards a map worker holds at once: with 2, while one computes the next is fetched (a URL copied "
                    "whole to the scratch folder) and the last one's parts are uploaded; the compute itself runs one "
                    "shard at a time. Default: 2 on a GPU, 1 on a CPU (whose cores the fetches and uploads would take "
                    "from the compute)")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEGs are decoded and resized: cpu (Pillow on decode threads), gpu (nvJPEG on "
                            "the model's device, Pillow for what it cannot read as Pillow would); auto: gpu on CUDA")
    max_retries: int = Field(3, ge=0, description="attempts per shard after the first")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray custom resources per map actor, e.g. {accelerator_slot: 1}")
    actor_start_timeout_s: float = Field(
        600.0, gt=0, description="give up on shards still waiting when no map actor could start this long")
    shard_timeout_s: float = Field(
        3600.0, gt=0, description="Ray executor: a shard still running this long is abandoned, its actor killed and "
                                  "replaced, and the shard retried (an attempt); the local executor cannot cancel")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS or a local Ray")
    state_dir: str | None = Field(
        None, description="folder or URL (s3://, gs://, …) where per-job attack state (the name pool's text "
                          "embeddings) is kept by a key of model, weights, precision, device type and pool: a later "
                          "job with the same key, on any machine, reuses it; default: _state/ in the output (share "
                          "one between jobs, e.g. a nightly audit, to build it once)")
    gpu_wait_s: float = Field(
        900.0, ge=0, description="on a Ray cluster: how long to wait for the map step's GPUs, which are asked "
                                 "of the autoscaler (workers × gpus_per_worker) when the job starts")
    progress_interval_s: float = Field(
        10.0, gt=0, description="seconds between two `map progress:` lines when stderr is not a terminal "
                                "(e.g. `ray job logs`); a terminal gets a progress bar")
    reduce_memory: str = Field(
        REDUCE_MEMORY, pattern=MEMORY_SIZE,
        description="DuckDB's memory limit in the reduce step (e.g. 2GB); larger sorts and aggregations spill to "
                    "OUT/_tmp, so the reduce step's memory does not grow with the audit")
    index: Literal["auto", "faiss", "faiss-ivf", "torch", "faiss-gpu"] = Field(
        "auto", description="name top-k backend: torch (exact, GPU), faiss (exact, CPU), faiss-ivf (approximate, CPU), "
                            "faiss-gpu (exact, GPU; the [gpu] extra); "
                            "auto: torch on CUDA, else faiss below 50,000 names and faiss-ivf from there")

    @field_validator("reduce_memory", mode="before")
    @classmethod
    def _memory_size(cls, v: Any) -> Any:
        if isinstance(v, str) and not re.fullmatch(MEMORY_SIZE, v):
            raise ValueError(f"{v!r} is not a size such as 512MB or 4GB")
        return v

    @property
    def in_flight(self) -> int:
        """``shards_in_flight``, or its default for this device: 2 on a GPU, 1 on a CPU."""
        return self.shards_in_flight or (2 if self.device.startswith("cuda") else 1)


#: Bump when the map step's core per-sample values change meaning without a schema change,
#: so older outputs are not resumed into newer ones (each attack has its own features_version).
MAP_FEATURES_VERSION = 4  # 3: the decode step follows the model's OpenCLIP preprocessing (#10); 4: dhash column


def map_output_format(enabled: list[str]) -> dict[str, Any]:
    """Versions of what the map step writes: resuming across a change is refused."""
    versions: dict[str, Any] = {"features": MAP_FEATURES_VERSION}
    for table in ("samples", "embeddings"):
        versions[f"{table}_schema"] = int(published(table)["version"])
    versions["attack_features"] = {name: get(name).features_version for name in enabled}
    return versions


class CalibrationSpec(_Strict):
    """Thresholds and p-values from known non-members; reduce step only (not in the map hash)."""

    controls: Path | str | None = Field(
        None, description="CSV of known non-members: identity rows and/or shard,key rows (a member column, "
                          "if present, must say false); a local file or a URL (a URL stays a str)")

    @field_validator("controls", mode="before")
    @classmethod
    def _controls_path_or_url(cls, v: Any) -> Any:
        return Path(v) if isinstance(v, str) and not is_url(v) else v
    target_fpr: float = Field(0.01, gt=0, lt=1, description="flag a score when its control p-value <= this")
    fdr: float = Field(0.1, gt=0, lt=1, description="false-discovery rate of the discoveries: a candidate is a "
                                                    "discovery of a score when its Benjamini-Hochberg q-value <= this")


class JobSpec(_Strict):
    """One audit: model × candidate shards × name pool → outputs."""

    model: ModelSpec
    data: DataSpec
    names: Path | str = Field(description="candidate name pool, one per line: a local file, or a URL (s3://, gs://, "
                                          "https://) read through fsspec; a URL stays a str")
    labels: Path | str | None = Field(None, description="identity,member and/or shard,key,member CSV: a local "
                                                         "file or a URL (a URL stays a str)")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    plugins: list[str] = Field(
        default_factory=list, description="attack plugins imported before `attacks` is read: .py files (relative to "
                                          "the job file) or module names; each registers its attack(s)")
    attacks: SerializeAsAny[AttacksSpec] = Field(default_factory=default_attacks)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    seed: int = Field(0, ge=0, lt=2**63, description="per-sample randomness and the reduce step's draws derive from it")
    store_embeddings: bool = Field(True, description="write image embeddings (biometric data) under embeddings/")
    output: Path | str = Field(description="output folder: a local path, or a URL on object storage (s3://, gs://, "
                                           "…; read and written on the store, see docs/running.md); a URL stays a str")

    @field_validator("names", "labels", "output", mode="before")
    @classmethod
    def _names_path_or_url(cls, v: Any) -> Any:
        return Path(v) if isinstance(v, str) and not is_url(v) else v

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, v: list[str]) -> list[str]:
        for ref in v:  # fields validate in order: the attacks below see the plugins' registrations
            try:
                load_plugin(ref)
            except RegistryError as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # noqa: BLE001 — any failure of a plugin is a spec error naming it
                raise ValueError(f"{ref}: {type(e).__name__}: {e}") from None
        return v

    @field_validator("attacks", mode="wrap")
    @classmethod
    def _attacks(cls, v: Any, handler: Any, info: ValidationInfo) -> AttacksSpec:
        model = attacks_model(tuple(info.data.get("plugins") or ()))
        if isinstance(v, model):
            return v
        if isinstance(v, AttacksSpec):
            v = v.model_dump()
        return model.model_validate(v, context=info.context)

    @model_validator(mode="after")
    def _some_attack(self) -> JobSpec:
        if not self.attacks.enabled():
            names = ", ".join(type(self.attacks).model_fields)
            raise ValueError(f"attacks: enable at least one attack ({names})")
        return self

    # -- derived --------------------------------------------------------------
    def output_is_remote(self) -> bool:
        return isinstance(self.output, str)

    def model_specs(self) -> dict[str, ModelSpec]:
        """Every model the map step loads, by spec key: the audited model and those inside
        attack parameters (e.g. a reference model)."""
        out = {"model": self.model}
        for name in self.attacks.enabled():
            for key, value in getattr(self.attacks, name):
                if isinstance(value, ModelSpec):
                    out[f"attacks.{name}.{key}"] = value
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole spec as JSON (what workers rebuild it from; may hold literal secrets)."""
        return json.loads(self.model_dump_json())

    def public_json(self) -> dict[str, Any]:
        """The spec as written into files (``_job.json``, ``manifest.json``): secret-like
        storage options redacted (see :func:`clipaudit.data.storage.redact_options`)."""
        out = self.to_json()
        out["data"]["storage_options"] = redact_options(self.data.storage_options)
        return out


def looks_like_path(value: str) -> bool:
    return (value.endswith((".json", ".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
            or "/" in value and not value.startswith("hf-hub:"))


def _resolve(value: str, base: Path) -> str:
    if is_url(value):
        return value  # s3://, gs://, https://, hf:// … are resolved by fsspec
    p = Path(value.removeprefix("file://")).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(raw: Any, base_dir: Path, source: str = "<dict>") -> JobSpec:
    """Validate a parsed YAML mapping; resolve relative paths against ``base_dir``. Whether the
    files and objects it names exist and can be read is :func:`clipaudit.app.jobs.check_inputs`'."""
    if not isinstance(raw, dict):
        raise SpecError(f"invalid job spec {source}: the top level must be a mapping of keys")
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, YAML dates → str
    for key in ("names", "labels", "output"):
        if isinstance(raw.get(key), str):
            raw[key] = _resolve(raw[key], base_dir)
    if isinstance(raw.get("plugins"), list):
        raw["plugins"] = [_resolve(p, base_dir) if isinstance(p, str) and p.endswith(".py") else p
                          for p in raw["plugins"]]
    calib = raw.get("calibration")
    if isinstance(calib, dict) and isinstance(calib.get("controls"), str):
        calib["controls"] = _resolve(calib["controls"], base_dir)
    data = raw.get("data")
    if isinstance(data, dict):
        shards = data.get("shards")
        if isinstance(shards, str):
            data["shards"] = _resolve(shards, base_dir)
        elif isinstance(shards, list):
            data["shards"] = [_resolve(s, base_dir) if isinstance(s, str) else s for s in shards]
    if isinstance(raw.get("attacks"), dict):  # in a job file, `name: {}` and a bare `name:` both enable an attack
        raw["attacks"] = {k: {} if v is None else v for k, v in raw["attacks"].items()}
    try:
        spec = JobSpec.model_validate(raw, context={"base_dir": str(base_dir)})
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from None
    return spec


def spec_from_json(data: dict[str, Any], source: str) -> JobSpec:
    """A spec saved by an earlier run (``_job.json``), validated again (its plugins imported)."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read, validate and resolve a job spec YAML file (its inputs are not checked here: see
    :func:`clipaudit.app.jobs.load_job`)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"job spec {path} is not valid YAML: {e}") from None
    return parse_spec(raw, path.resolve().parent, source=str(path))
