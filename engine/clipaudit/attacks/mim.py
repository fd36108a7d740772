"""Masked-view consistency (after the MIM membership attack of Li et al.).

A CLIP has no pixel decoder, so "reconstruction" becomes embedding consistency: the cosine
between the full image's embedding and that of a patch-masked copy (masked patches set to
the dataset mean), at several mask ratios. ``mim_features`` holds one cosine per ratio,
``mim_score`` their mean. Higher = more member-like.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clipaudit.model.loading import LoadedModel
from clipaudit.attacks.augment import patch_masks
from clipaudit.attacks.base import MapBatch, SAMPLE_FIELD, SampleSpec, StatelessAttack
from clipaudit.contract.registry import LOGISTIC, Attack, Column, Score, register
from clipaudit.attacks.views import embed_views, rows


class MimParams(BaseModel):
    """Masked-view consistency at several patch-mask ratios."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1)
    sample: SampleSpec | None = SAMPLE_FIELD

    @field_validator("mask_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not all(0 < r < 1 for r in v):
            raise ValueError(f"mask ratios must lie strictly between 0 and 1, got {v}")
        return v


def _patch_grid(model: LoadedModel) -> int:
    patch = getattr(getattr(model.model, "visual", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return max(1, model.image_size // int(patch)) if patch else 8


class MimAttack(StatelessAttack):
    name = "mim"

    def __init__(self, mask_ratios: list[float] | tuple[float, ...] = (0.25, 0.5, 0.75)) -> None:
        self.ratios = list(mask_ratios)

    def _views(self, images: torch.Tensor, rngs, model: LoadedModel) -> torch.Tensor:
        r, size = len(self.ratios), images.shape[-1]
        keep = patch_masks(rngs, self.ratios, _patch_grid(model), size, images.device)  # (B·R)×1×S×S
        mean = torch.tensor(model.mean, device=images.device).view(1, 3, 1, 1)
        rep = images.repeat_interleave(r, dim=0)
        return rep * keep + mean * (1 - keep)

    def compute(self, batch: MapBatch) -> dict[str, list]:
        emb = embed_views(batch, len(self.ratios), "mim", lambda im, rngs: self._views(im, rngs, batch.model))
        cos = (emb * batch.emb[:, None, :]).sum(-1)  # B×R
        return {"mim_score": cos.mean(1).tolist(), "mim_features": rows(cos)}


MIM = register(Attack(
    name="mim",
    image_passes=lambda p: len(p.mask_ratios),
    position=3,
    title="masked-view consistency (after MIM)",
    params=MimParams,
    build=lambda p, job: MimAttack(p.mask_ratios),
    columns=(
        Column("mim_score", pa.float32(), "masked-view: mean cosine of patch-masked copies to the full image"),
        Column("mim_features", pa.list_(pa.float32()), "masked-view: one cosine per mask ratio"),
    ),
    scores=(Score("mim", "image", "mean masked-view score over the identity's images"),),
    features="mim_features",
    learned=(LOGISTIC,),
))
