"""The job spec: a typed, validated, hashable description of one audit.

A spec is YAML (see ``jobs/`` and shared/DESIGN.md). Relative paths are resolved against
the folder of the YAML file; unknown keys are errors. ``load_spec`` turns every problem
into one :class:`SpecError` whose message names the offending key or file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.shards import ShardPatternError, check_backend, expand_shards, is_url, protocol

Precision = Literal["fp32", "fp16", "bf16"]


class SpecError(ValueError):
    """A job spec that cannot be run; the message says which key or file is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which CLIP model to audit and how to run it."""

    name: str = Field(description="OpenCLIP name, hf-hub:org/repo, or path to a model-config JSON")
    pretrained: str | None = Field(None, description="OpenCLIP tag, hf-hub:org/repo, checkpoint path, or null")
    precision: Precision | None = Field(None, description="default: fp16 on GPU, fp32 on CPU")


class DataSpec(_Strict):
    """Where the candidate WebDataset shards are."""

    shards: str | list[str]
    identity_field: str = "identity"
    max_image_pixels: int = Field(89_478_485, gt=0, description="larger images become error rows")


class IdiaSpec(_Strict):
    """Identity inference: zero-shot name ranking over prompt templates."""

    tau: int = Field(1, ge=1, description="member if the true name wins at least tau templates")
    top_k: int = Field(10, ge=1, le=1000, description="ranks beyond top_k are stored as null")
    templates: Literal["default"] | list[str] = "default"

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("templates must not be empty")
            bad = [t for t in v if t.count("{}") != 1]
            if bad:
                raise ValueError(f"each template needs exactly one '{{}}' for the name; bad: {bad[:3]}")
            if len(set(v)) != len(v):
                raise ValueError("templates contain duplicates")
        return v


class CaptionSpec(_Strict):
    """Image–caption cosine (after M^4I's metric-based attack).

    With ``reference_model``, the same cosine under a reference CLIP is subtracted
    (difficulty calibration): a caption that any CLIP matches well is not evidence.
    """

    reference_model: ModelSpec | None = None


def _scale_range(v: tuple[float, float]) -> tuple[float, float]:
    lo, hi = v
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(v)}")
    return v


class EncoderMISpec(_Strict):
    """EncoderMI: pairwise similarity of n augmented views."""

    views: int = Field(10, ge=2, le=256)
    scale: tuple[float, float] = (0.2, 1.0)
    _check = field_validator("scale")(classmethod(lambda cls, v: _scale_range(v)))


class PartCropSpec(_Strict):
    """PartCrop: responses to k small part crops."""

    crops: int = Field(128, ge=2, le=4096)
    scale: tuple[float, float] = (0.08, 0.2)
    _check = field_validator("scale")(classmethod(lambda cls, v: _scale_range(v)))


class MimSpec(_Strict):
    """Masked-view consistency at several patch-mask ratios."""

    mask_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1)

    @field_validator("mask_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not all(0 < r < 1 for r in v):
            raise ValueError(f"mask ratios must lie strictly between 0 and 1, got {v}")
        return v


class AttacksSpec(_Strict):
    """Which attacks to run; absent keys are off. Default: idia and caption."""

    idia: IdiaSpec | None = None
    encodermi: EncoderMISpec | None = None
    partcrop: PartCropSpec | None = None
    mim: MimSpec | None = None
    caption: CaptionSpec | None = None

    def enabled(self) -> list[str]:
        return [k for k in ("idia", "encodermi", "partcrop", "mim", "caption") if getattr(self, k) is not None]


class ComputeSpec(_Strict):
    """How to run: executor, workers, batching, retries. Not part of the result hash."""

    executor: Literal["ray", "local"] = "ray"
    workers: int | None = Field(None, ge=1, description="map actors; default: one per GPU, else 2")
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(128, ge=1)
    decode_threads: int = Field(2, ge=1)
    max_retries: int = Field(3, ge=0, description="attempts per shard after the first")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra Ray custom resources per map actor, e.g. {accelerator_slot: 1}")
    actor_start_timeout_s: float = Field(
        600.0, gt=0, description="give up on shards still waiting when no map actor could start this long")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS or a local Ray")
    index: Literal["auto", "faiss", "torch"] = Field("auto", description="name top-k backend")


#: Bump when the map step's per-sample values change meaning without a schema change
#: (e.g. a feature vector gains entries), so older outputs are not resumed into newer ones.
MAP_FEATURES_VERSION = 2  # 2: PartCrop patch-token responses appended to partcrop_features


def map_output_format() -> dict[str, int]:
    """Versions of what the map step writes: resuming across a change is refused."""
    from importlib import resources

    versions = {"features": MAP_FEATURES_VERSION}
    for table in ("samples", "embeddings"):
        doc = json.loads(resources.files("clipaudit.schemas").joinpath(f"{table}.json").read_text())
        versions[f"{table}_schema"] = int(doc["version"])
    return versions


class CalibrationSpec(_Strict):
    """Thresholds and p-values from known non-members; reduce step only (not in the map hash)."""

    controls: Path | None = Field(
        None, description="CSV of known non-members: identity rows and/or shard,key rows (a member column, "
                          "if present, must say false)")
    target_fpr: float = Field(0.01, gt=0, lt=1, description="flag a score when its control p-value <= this")


class JobSpec(_Strict):
    """One audit: model × candidate shards × name pool → outputs."""

    model: ModelSpec
    data: DataSpec
    names: Path
    labels: Path | None = None
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    attacks: AttacksSpec = Field(default_factory=lambda: AttacksSpec(idia=IdiaSpec(), caption=CaptionSpec()))
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    seed: int = 0
    store_embeddings: bool = Field(True, description="write image embeddings (biometric data) under embeddings/")
    output: Path

    @model_validator(mode="after")
    def _some_attack(self) -> "JobSpec":
        if not self.attacks.enabled():
            raise ValueError("attacks: enable at least one attack (idia, encodermi, partcrop, mim, caption)")
        return self

    # -- derived --------------------------------------------------------------
    def shard_list(self) -> list[str]:
        return expand_shards(self.data.shards)

    def map_fingerprint(self) -> dict[str, Any]:
        """Everything that changes per-sample outputs (not tau, labels, compute)."""
        idia = self.attacks.idia
        return {
            "model": self.model.model_dump(),
            "data": self.data.model_dump(),
            "names_sha256": sha256_file(self.names),
            "idia": None if idia is None else {"top_k": idia.top_k, "templates": idia.templates},
            "caption": None if self.attacks.caption is None else self.attacks.caption.model_dump(),
            **{k: None if getattr(self.attacks, k) is None else getattr(self.attacks, k).model_dump()
               for k in ("encodermi", "partcrop", "mim")},
            "seed": self.seed,
            "store_embeddings": self.store_embeddings,
            "output_format": map_output_format(),
        }

    def map_hash(self) -> str:
        blob = json.dumps(self.map_fingerprint(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _looks_like_path(value: str) -> bool:
    return value.endswith((".json", ".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or "/" in value and not value.startswith("hf-hub:")


def _resolve(value: str, base: Path) -> str:
    if is_url(value):
        return value  # s3://, gs://, https://, hf:// … are resolved by fsspec
    p = Path(value.removeprefix("file://")).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _resolve_model_paths(model: dict, base_dir: Path) -> None:
    for key in ("name", "pretrained"):
        v = model.get(key)
        if isinstance(v, str) and (_looks_like_path(v) or (base_dir / v).exists()):
            model[key] = _resolve(v, base_dir)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(raw: Any, base_dir: Path, source: str = "<dict>") -> JobSpec:
    """Validate a parsed YAML mapping; resolve relative paths against ``base_dir``."""
    if not isinstance(raw, dict):
        raise SpecError(f"invalid job spec {source}: the top level must be a mapping of keys")
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, YAML dates → str
    for key in ("names", "labels", "output"):
        if isinstance(raw.get(key), str):
            raw[key] = _resolve(raw[key], base_dir)
    if isinstance(raw.get("model"), dict):
        _resolve_model_paths(raw["model"], base_dir)
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
    attacks = raw.get("attacks")
    if isinstance(attacks, dict):  # `caption: {}` and bare `caption:` both enable it
        for k, v in list(attacks.items()):
            if v is None:
                attacks[k] = {}
        ref = attacks.get("caption", {}).get("reference_model") if isinstance(attacks.get("caption"), dict) else None
        if isinstance(ref, dict):
            _resolve_model_paths(ref, base_dir)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, source)) from None
    _check_files(spec)
    return spec


def _check_files(spec: JobSpec) -> None:
    if not spec.names.is_file():
        raise SpecError(f"names: file not found: {spec.names}")
    if spec.labels is not None and not spec.labels.is_file():
        raise SpecError(f"labels: file not found: {spec.labels}")
    if spec.calibration.controls is not None and not spec.calibration.controls.is_file():
        raise SpecError(f"calibration.controls: file not found: {spec.calibration.controls}")
    models = [("model", spec.model)]
    if spec.attacks.caption is not None and spec.attacks.caption.reference_model is not None:
        models.append(("attacks.caption.reference_model", spec.attacks.caption.reference_model))
    for where, m in models:
        for key in ("name", "pretrained"):
            v = getattr(m, key)
            if v and _looks_like_path(v) and not Path(v).exists():
                raise SpecError(f"{where}.{key}: file not found: {v}")
    try:
        shards = spec.shard_list()
    except ShardPatternError as e:
        raise SpecError(f"data.shards: {e}") from None
    for proto in sorted({protocol(s) for s in shards if is_url(s)}):
        try:
            check_backend(f"{proto}://")
        except ImportError as e:
            raise SpecError(f"data.shards: {e}") from None
    missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SpecError(f"data.shards: file not found: {missing[0]}{more}")


def load_spec(path: str | Path) -> JobSpec:
    """Read, validate and resolve a job spec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"job spec {path} is not valid YAML: {e}") from None
    return parse_spec(raw, path.resolve().parent, source=str(path))
