"""Image–caption cosine (after M^4I's metric-based attack and CLIP cosine attacks).

``caption_score`` is the cosine between the image and its own caption (``{key}.txt``)
under the audited model; null when the sample has no caption. Higher = more member-like.
With a reference model (M^4I's feature-based idea as difficulty calibration),
``caption_ref_score`` is the same cosine under the reference CLIP and
``caption_calibrated_score`` = target − reference.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from clipaudit.model.loading import LoadedModel, load_model
from clipaudit.spec import ModelSpec
from clipaudit.attacks.base import MapBatch, SAMPLE_FIELD, SampleSpec, StatelessAttack
from clipaudit.contract.registry import Attack, Column, Score, register


class CaptionParams(BaseModel):
    """Image–caption cosine (after M^4I's metric-based attack).

    With ``reference_model``, the same cosine under a reference CLIP is subtracted
    (difficulty calibration): a caption that any CLIP matches well is not evidence.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference_model: ModelSpec | None = None
    sample: SampleSpec | None = SAMPLE_FIELD


class CaptionAttack(StatelessAttack):
    """Binds the model (and loads the reference model); no per-job state."""

    name = "caption"

    def __init__(self, reference: ModelSpec | None = None, device: str = "auto", seed: int = 0) -> None:
        self._model: LoadedModel | None = None
        self._reference_spec = reference
        self._reference: LoadedModel | None = None
        self._device, self._seed = device, seed

    def bind(self, state: list[np.ndarray] | None, model: LoadedModel, index_backend: str) -> None:
        self._model = model
        r = self._reference_spec
        if r is not None and self._reference is None:
            self._reference = load_model(r.name, r.pretrained, r.precision, self._device, seed=self._seed)

    @staticmethod
    def _cosines(model: LoadedModel, image_emb: torch.Tensor, captions: list[str]) -> list[float]:
        text = model.encode_texts(captions)
        return (image_emb.to(text.device) * text).sum(-1).cpu().tolist()

    def compute(self, batch: MapBatch) -> dict[str, list]:
        assert self._model is not None, "bind() first"
        samples = batch.samples
        idx = [i for i, s in enumerate(samples) if s.caption]
        captions = [samples[i].caption for i in idx]
        n = len(samples)
        out: dict[str, list] = {k: [None] * n
                                for k in ("caption_score", "caption_ref_score", "caption_calibrated_score")}
        if not idx:
            return out
        target = self._cosines(self._model, batch.emb[idx], captions)  # type: ignore[arg-type]
        ref = None
        if self._reference is not None:
            px = batch.images[idx]
            ref_px = torch.nn.functional.interpolate(px, size=self._reference.image_size, mode="bicubic",
                                                     align_corners=False).clamp(0, 1) \
                if self._reference.image_size != px.shape[-1] else px
            ref_emb = self._reference.encode_unit(ref_px, batch.chunk)
            ref = self._cosines(self._reference, ref_emb, captions)  # type: ignore[arg-type]
        for j, i in enumerate(idx):
            out["caption_score"][i] = target[j]
            if ref is not None:
                out["caption_ref_score"][i] = ref[j]
                out["caption_calibrated_score"][i] = target[j] - ref[j]
        return out


CAPTION = register(Attack(
    name="caption",
    image_passes=lambda p: 0 if p.reference_model is None else 1,  # the reference model's embedding
    position=4,
    title="image-caption cosine (after M^4I)",
    params=CaptionParams,
    build=lambda p, job: CaptionAttack(p.reference_model, job.compute.device, job.seed),
    default=True,
    independent_signal=True,
    columns=(
        Column("caption_score", pa.float32(), "cosine between the image and its own caption; null without caption"),
        Column("caption_ref_score", pa.float32(),
               "image-caption cosine under attacks.caption.reference_model (null without one)"),
        Column("caption_calibrated_score", pa.float32(), "caption_score - caption_ref_score (difficulty-calibrated)"),
    ),
    scores=(Score("caption", "image", "mean image-caption cosine over the identity's images"),
            Score("caption_calibrated", "image",
                  "mean difficulty-calibrated caption score (target minus reference model cosine)")),
))
