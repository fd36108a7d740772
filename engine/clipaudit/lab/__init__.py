"""The canary lab: synthetic identities, a tiny CLIP trained on a known half of them, and
audit inputs (WebDataset shards of held-out photos, a name pool, membership labels).

``from clipaudit.lab import build_lab, LabConfig`` — submodules load on first use, so
importing ``clipaudit.lab`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Identity": "identities",
    "make_identities": "identities",
    "make_names": "identities",
    "render": "identities",
    "render_many": "identities",
    "TRAIN_TEMPLATES": "train",
    "tiny_model_config": "train",
    "train_tiny_clip": "train",
    "zero_shot_top1": "train",
    "LabConfig": "build",
    "LabPaths": "build",
    "build_lab": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
