"""The shape every attack has on the map side.

An attack's map-side implementation contributes per-sample columns (those its registry
entry declares, see :mod:`.registry`) computed from a batch of image embeddings
(``compute``). Expensive per-job state (e.g. the name pool's text embeddings) is computed in
slices (``state_slice``), kept by :mod:`clipaudit.map.state`, and handed to every worker's
``bind`` as memory-mapped parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from clipaudit.data.samples import Sample
from clipaudit.model.loading import LoadedModel


@dataclass
class MapBatch:
    """What an attack sees of a batch of ok samples (same order everywhere)."""

    samples: list[Sample]
    images: torch.Tensor  # float B×3×S×S in [0, 1], on the model's device
    emb: torch.Tensor  # L2-normalised image embeddings, float32 B×D
    model: LoadedModel
    seed: int  # the job seed; per-sample randomness derives from it and the key
    chunk: int  # forward-pass chunk size (images per model call)
    #: uint8 h×w×3 originals (longest side bounded by ``data.source_max_side``), present when
    #: an enabled attack declares ``source_views``; None = use ``images``
    sources: list[np.ndarray] | None = None
    #: the main pass's patch tokens projected into the joint space, L2-normalised float32 B×P×D:
    #: present when an enabled attack sets ``needs_patch_tokens`` and the tower exposes them
    tokens: torch.Tensor | None = None


class SampleSpec(BaseModel):
    """``attacks.<name>.sample`` of an image-side attack: score only part of the images. In each
    shard the first ``per_identity`` ok images of each identity (in shard order, so a recomputed
    shard selects the same rows) are scored; the images of labelled and control identities, and
    labelled or control images, are always all scored. Rows outside the sample keep every other
    column and a null score. An identity spread over k shards gets up to k × ``per_identity``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_identity: int = Field(ge=1, description="images scored per identity and shard")


#: the field image-side attacks add to their parameters (default: every image scored)
SAMPLE_FIELD = Field(None, description="score only a sample of the images (see attacks.base.SampleSpec)")


class MapAttack(Protocol):
    name: str
    #: items the per-job state is sliced over (e.g. the names of the pool); 0: no state
    state_items: int

    def state_params(self) -> dict[str, Any]:
        """What the state depends on besides the model (its key; e.g. the pool's hash, the templates)."""
        ...

    def state_slice(self, model: LoadedModel, start: int, stop: int) -> np.ndarray:
        """The state of items ``[start, stop)``: float16, R × (stop − start) × D."""
        ...

    def bind(self, state: list[np.ndarray] | None, model: LoadedModel, index_backend: str) -> None:
        """Prepare a worker with the model and the state's parts (in item order; None: no state)."""
        ...

    def compute(self, batch: MapBatch) -> dict[str, list]:
        """Column values for a batch of ok samples (same order as ``batch.samples``)."""
        ...


class StatelessAttack:
    """Base for attacks without per-job state: ``bind`` does nothing."""

    state_items = 0

    def state_params(self) -> dict[str, Any]:
        return {}

    def state_slice(self, model: LoadedModel, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no per-job state")

    def bind(self, state: list[np.ndarray] | None, model: LoadedModel, index_backend: str) -> None:
        pass
