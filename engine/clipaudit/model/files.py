"""What identifies a model's weights: content hashes of the local files the map step reads."""

from __future__ import annotations

from pathlib import Path

from clipaudit.core.hashing import sha256_file
from clipaudit.data.urls import is_url
from clipaudit.spec import JobSpec, ModelSpec, looks_like_path


def content_fingerprint(model: ModelSpec) -> dict[str, str | None]:
    """sha256 of the model-config JSON and of the checkpoint where they are local files, so a
    file overwritten between two runs changes the resume hash (a zoo tag or an hf-hub: id
    stands for published weights and is hashed by name)."""
    return {f"{key}_sha256": sha256_file(v) if v and looks_like_path(v) and not is_url(v) and Path(v).is_file()
            else None for key, v in (("name", model.name), ("pretrained", model.pretrained))}


def model_files(spec: JobSpec) -> dict[str, dict[str, str | None]]:
    """Content hashes of every local model file the map step reads (see :meth:`JobSpec.model_specs`)."""
    return {key: content_fingerprint(m) for key, m in spec.model_specs().items()}
