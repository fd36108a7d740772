"""PartCrop (after Zhu et al.): query many small part crops of an image; a trained
encoder's responses to parts of its training images are more consistent with the whole.

Map side: k crops per image (scale range configurable), the cosine of each crop's
embedding to the full image's embedding; stored as a quantile summary
(``partcrop_features``: 11 quantiles, mean, std) with ``partcrop_score`` = mean cosine.
Where the vision tower exposes patch tokens (OpenCLIP ViTs), each crop's response to the
image's patch tokens (its best-matching patch, projected into the joint space) is summarised
the same way and appended (13 more values). Higher = more member-like. A small attacker on
the features is fitted in the reduce step.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .augment import part_crops
from .base import MapBatch, StatelessAttack
from .registry import LOGISTIC, Attack, Column, Learned, Score, register
from .views import embed_views, quantile_summary, rows, scale_range


class PartCropParams(BaseModel):
    """PartCrop: responses to k small part crops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crops: int = Field(128, ge=2, le=4096)
    scale: tuple[float, float] = (0.08, 0.2)
    _check = field_validator("scale")(classmethod(lambda cls, v: scale_range(v)))


class PartCropAttack(StatelessAttack):
    name = "partcrop"

    def __init__(self, crops: int = 128, scale: tuple[float, float] = (0.08, 0.2)) -> None:
        self.crops = crops
        self.scale = scale

    def compute(self, batch: MapBatch) -> dict[str, list]:
        k = self.crops
        emb = embed_views(batch, k, "partcrop", lambda im, rngs: part_crops(im, rngs, k, self.scale))
        cos = (emb * batch.emb[:, None, :]).sum(-1)  # B×k
        features = quantile_summary(cos)
        if batch.model.has_patch_tokens:
            _, tokens = batch.model.encode_unit_tokens(batch.images, batch.chunk)  # B×P×D
            best_patch = torch.einsum("bkd,bpd->bkp", emb, tokens).amax(-1)  # B×k
            features = torch.cat([features, quantile_summary(best_patch)], 1)
        return {"partcrop_score": cos.mean(1).tolist(), "partcrop_features": rows(features)}


PARTCROP = register(Attack(
    name="partcrop",
    title="PartCrop (part-crop responses)",
    params=PartCropParams,
    build=lambda p, job: PartCropAttack(p.crops, p.scale),
    columns=(
        Column("partcrop_score", pa.float32(), "PartCrop: mean cosine of part-crop embeddings to the full image"),
        Column("partcrop_features", pa.list_(pa.float32()),
               "11 quantiles, mean and std of the crop-to-image cosines; where the ViT exposes patch tokens, 13 more: "
               "the same summary of each crop's cosine to its best-matching patch token of the image"),
    ),
    scores=(Score("partcrop", "image", "mean PartCrop score over the identity's images"),),
    features="partcrop_features",
    learned=(LOGISTIC, Learned("learned_mlp", "mlp", "MLP (one hidden layer of 32) on the response summaries, as "
                                                    "the paper's attacker, cross-fitted, 5 folds by identity",
                               model="mlp")),
    features_version=2,  # 2: patch-token responses appended to partcrop_features
))
