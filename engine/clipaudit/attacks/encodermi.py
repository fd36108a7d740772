"""EncoderMI (after Liu et al.): an overfitted encoder maps augmented views of a training
image to more similar embeddings.

Map side: n views per image (random resized crop of the original image, as the paper's
augmentations, not of the model's centre crop; flip, colour jitter, grayscale — drawn per
image, applied on the device), the n(n−1)/2 pairwise cosines of their embeddings, sorted
(``encodermi_features``, the "vector"/"set" attack input) and their mean
(``encodermi_score``, the threshold attack). Higher = more member-like.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clipaudit.attacks.augment import augmented_views
from clipaudit.attacks.base import MapBatch, SAMPLE_FIELD, SampleSpec, StatelessAttack
from clipaudit.contract.registry import LOGISTIC, Attack, Column, Learned, Score, register
from clipaudit.attacks.views import embed_views, rows, scale_range


class EncoderMIParams(BaseModel):
    """EncoderMI: pairwise similarity of n augmented views."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    views: int = Field(10, ge=2, le=256)
    scale: tuple[float, float] = (0.2, 1.0)
    sample: SampleSpec | None = SAMPLE_FIELD
    _check = field_validator("scale")(classmethod(lambda cls, v: scale_range(v)))


class EncoderMIAttack(StatelessAttack):
    name = "encodermi"

    def __init__(self, views: int = 10, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.views = views
        self.scale = scale

    def compute(self, batch: MapBatch) -> dict[str, list]:
        n = self.views
        size = batch.images.shape[-1]
        emb = embed_views(batch, n, "encodermi", from_source=True,
                          make=lambda im, rngs, sizes: augmented_views(im, rngs, n, self.scale, sizes=sizes,
                                                                       out_size=size))
        sim = emb @ emb.transpose(1, 2)  # B×n×n
        iu = torch.triu_indices(n, n, offset=1, device=sim.device)
        pairs = sim[:, iu[0], iu[1]].sort(dim=1).values
        return {"encodermi_score": pairs.mean(1).tolist(), "encodermi_features": rows(pairs)}


def set_pooling(X: np.ndarray, quantiles: int = 11) -> np.ndarray:
    """Order-invariant summary of each row's similarities (EncoderMI's set attack): evenly
    spaced quantiles, mean and standard deviation — adaptive to the values' own range (CLIP
    view cosines crowd into 0.6–0.95, where fixed bins would leave two or three in use). Rows
    with nan stay nan."""
    bad = np.isnan(X).any(axis=1)
    Z = np.where(bad[:, None], 0.0, X)
    q = np.quantile(Z, np.linspace(0, 1, quantiles), axis=1).T
    out = np.column_stack([q, Z.mean(axis=1), Z.std(axis=1)])
    out[bad] = np.nan
    return out


ENCODERMI = register(Attack(
    name="encodermi",
    image_passes=lambda p: p.views,
    position=1,
    title="EncoderMI (augmented-view similarity)",
    params=EncoderMIParams,
    build=lambda p, job: EncoderMIAttack(p.views, p.scale),
    columns=(
        Column("encodermi_score", pa.float32(), "EncoderMI: mean pairwise cosine of n augmented views (null when off)"),
        Column("encodermi_features", pa.list_(pa.float32()), "EncoderMI: the n(n-1)/2 pairwise cosines, sorted"),
    ),
    scores=(Score("encodermi", "image", "mean EncoderMI score over the identity's images"),),
    features="encodermi_features",
    source_views=True,
    features_version=2,  # 2: views cut from the original image (data.source_max_side), not the centre crop
    learned=(LOGISTIC,
             Learned("learned_mlp", "mlp", "vector attack: MLP (one hidden layer of 32) on the sorted cosines, "
                                           "cross-fitted, 5 folds by identity", model="mlp"),
             Learned("learned_set", "set", "set attack: MLP on an order-invariant summary of the cosines (11 "
                                           "quantiles, mean, std), cross-fitted, 5 folds by identity",
                     set_pooling, model="mlp")),
))
