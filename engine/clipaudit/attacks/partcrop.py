"""PartCrop (after Zhu et al.): query many small part crops of an image; a trained
encoder's responses to parts of its training images are more consistent with the whole.

Map side: k crops per image, cut from the original image (``data.source_max_side``), as in
the paper, at a configurable area range and resized to the model's input — from its centred
square where the model centre-crops (OpenCLIP's ``shortest`` resize; with ``longest`` or
``squash`` the whole image), the region its input and so its patch tokens cover: a crop from
the margins of a non-square photo would be compared with tokens that never saw it, and the
feature would then depend on the aspect ratio (itself a shift channel). Three blocks of
``partcrop_features``, in this order:

1. the cosine of each crop's embedding to the full image's embedding, as a quantile summary
   (11 quantiles, mean, std); ``partcrop_score`` is the mean cosine;
2. where the vision tower exposes patch tokens (OpenCLIP ViTs): each crop's cosine to its
   best-matching patch token of the image (projected into the joint space), summarised the
   same way (13 values);
3. also only with patch tokens, the paper's response: each crop's similarities to the
   image's patch tokens as a softmax over the patches, its KL divergence from a uniform and
   from a Gaussian prior over the patch sequence, each sorted in descending order over the
   crops (2k values).

Where this differs from the paper's code, and why: the paper's features are a DINO ViT's
unnormalised tokens, whose magnitudes set the softmax's sharpness; CLIP's joint space is
unit-normalised, so the similarities are scaled by the model's own ``logit_scale`` (its
learned softmax temperature, 100 when it has none). The paper draws its Gaussian prior from
fresh random noise on every call (sorted normal samples through the normal density); here
the same bell is built from the normal quantiles at the patch positions, its expectation, so
a sample's response does not depend on when it was computed.

Learned attackers (reduce step, cross-fitted): logistic and MLP on blocks 1–2, and the
paper's attacker — an MLP on block 3. Higher = more member-like.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clipaudit.attacks.augment import part_crops
from clipaudit.attacks.base import MapBatch, SAMPLE_FIELD, SampleSpec, StatelessAttack
from clipaudit.contract.registry import Attack, Column, Learned, Score, register
from clipaudit.attacks.views import embed_views, quantile_summary, rows, scale_range

SUMMARY = 13  # quantile_summary's width: 11 quantiles, mean, std


class PartCropParams(BaseModel):
    """PartCrop: responses to k small part crops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crops: int = Field(128, ge=2, le=4096)
    scale: tuple[float, float] = (0.08, 0.2)
    sample: SampleSpec | None = SAMPLE_FIELD
    _check = field_validator("scale")(classmethod(lambda cls, v: scale_range(v)))


def gaussian_prior(patches: int) -> np.ndarray:
    """A bell over the patch sequence: the normal density at the normal quantiles of the
    patch positions, normalised to sum to 1 (the expectation of the paper's random prior)."""
    n = NormalDist()
    bell = np.array([n.pdf(n.inv_cdf((i + 0.5) / patches)) for i in range(patches)])
    return bell / bell.sum()


def kl_responses(crops: torch.Tensor, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """crops B×k×D and patch tokens B×P×D (unit vectors) → B×2k: KL(uniform ‖ response) and
    KL(Gaussian ‖ response) per crop, where response = softmax over patches of the scaled
    cosines; each half sorted in descending order."""
    logp = torch.log_softmax(scale * torch.einsum("bkd,bpd->bkp", crops, tokens), dim=-1)
    patches = tokens.shape[1]
    out = []
    for prior in (torch.full((patches,), 1.0 / patches, dtype=torch.float64),
                  torch.from_numpy(gaussian_prior(patches))):
        prior = prior.to(logp.device, logp.dtype)
        kl = (prior * (prior.log() - logp)).sum(-1)  # B×k
        out.append(kl.sort(dim=1, descending=True).values)
    return torch.cat(out, 1)


def logit_scale(model: torch.nn.Module) -> float:
    """The model's softmax temperature in the joint space (CLIP's learned ``logit_scale``)."""
    s = getattr(model, "logit_scale", None)
    return float(s.detach().exp()) if isinstance(s, torch.Tensor) else 100.0


class PartCropAttack(StatelessAttack):
    name = "partcrop"
    needs_patch_tokens = True  # taken from the main forward pass (MapBatch.tokens), not a second one

    def __init__(self, crops: int = 128, scale: tuple[float, float] = (0.08, 0.2)) -> None:
        self.crops = crops
        self.scale = scale

    def compute(self, batch: MapBatch) -> dict[str, list]:
        k, size = self.crops, batch.images.shape[-1]
        # the model's input shows the centred square (shortest side + centre crop); a padded or
        # squashed input shows the whole image, and so do its tokens
        centred = batch.model.resize_mode == "shortest"
        emb = embed_views(batch, k, "partcrop", from_source=True,
                          make=lambda im, rngs, sizes: part_crops(im, rngs, k, self.scale, sizes, size,
                                                                  centre_square=centred))
        cos = (emb * batch.emb[:, None, :]).sum(-1)  # B×k
        features = quantile_summary(cos)
        if batch.model.has_patch_tokens:
            tokens = batch.tokens  # B×P×D, from the main pass; a batch made without them gets its own
            if tokens is None:
                _, tokens = batch.model.encode_unit_tokens(batch.images, batch.chunk)
            best_patch = torch.einsum("bkd,bpd->bkp", emb, tokens).amax(-1)  # B×k
            paper = kl_responses(emb, tokens, logit_scale(batch.model.model))
            features = torch.cat([features, quantile_summary(best_patch), paper], 1)
        return {"partcrop_score": cos.mean(1).tolist(), "partcrop_features": rows(features)}


def summaries(X: np.ndarray) -> np.ndarray:
    """Blocks 1–2 of ``partcrop_features`` (block 1 alone without patch tokens)."""
    return X[:, : 2 * SUMMARY]


def paper_responses(X: np.ndarray) -> np.ndarray:
    """Block 3 of ``partcrop_features``; all-nan (the attacker is skipped) without patch tokens."""
    if X.shape[1] <= 2 * SUMMARY:
        return np.full((len(X), 1), np.nan)
    return X[:, 2 * SUMMARY:]


PARTCROP = register(Attack(
    name="partcrop",
    image_passes=lambda p: p.crops,  # the crops (the patch tokens come from the main pass)
    position=2,
    title="PartCrop (part-crop responses)",
    params=PartCropParams,
    build=lambda p, job: PartCropAttack(p.crops, p.scale),
    columns=(
        Column("partcrop_score", pa.float32(), "PartCrop: mean cosine of part-crop embeddings to the full image"),
        Column("partcrop_features", pa.list_(pa.float32()),
               "13 values: 11 quantiles, mean and std of the crop-to-image cosines; where the ViT exposes patch "
               "tokens, 13 more (the same summary of each crop's cosine to its best-matching patch token) and 2k "
               "more (the paper's response: per crop, KL divergence of the softmax over patch tokens from a uniform "
               "and from a Gaussian prior, each sorted descending)"),
    ),
    scores=(Score("partcrop", "image", "mean PartCrop score over the identity's images"),),
    features="partcrop_features",
    source_views=True,
    learned=(Learned("learned", "learned", "logistic regression on the cosine summaries, cross-fitted, 5 folds by "
                                           "identity", summaries),
             Learned("learned_mlp", "mlp", "MLP (one hidden layer of 32) on the cosine summaries, cross-fitted, "
                                           "5 folds by identity", summaries, model="mlp"),
             Learned("learned_paper", "paper", "the paper's attacker: MLP (one hidden layer of 32) on the sorted KL "
                                               "responses over patch tokens, cross-fitted, 5 folds by identity",
                     paper_responses, model="mlp")),
    # 2: patch-token responses appended; 3: crops cut from the original image, the paper's KL responses appended
    features_version=4,  # 4: crops from the original's centred square (the patch tokens' view)
))
