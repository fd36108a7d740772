"""Top-k name search: which names does the model rank highest for an image, per template?

Two exact inner-product backends behind one interface:
- ``faiss``: one ``IndexFlatIP`` per template (faiss-cpu by default; the CPU path);
- ``torch``: blocked matrix product + ``topk`` on the model's device (the GPU path, where
  a dense product over templates × names is faster than any index).
Both return the same ranks (up to float ties) for the same embeddings.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class NameIndex(Protocol):
    n_templates: int
    n_names: int

    def search(self, image_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """B×D embeddings → (scores T×B×k float32, name ids T×B×k int64)."""
        ...


class FaissNameIndex:
    """Exact inner product over each template's name embeddings with FAISS."""

    def __init__(self, text_emb: np.ndarray) -> None:
        import faiss

        self.n_templates, self.n_names, dim = text_emb.shape
        self._indexes = []
        for t in range(self.n_templates):
            idx = faiss.IndexFlatIP(dim)
            idx.add(np.ascontiguousarray(text_emb[t], dtype=np.float32))
            self._indexes.append(idx)

    def search(self, image_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(image_emb.detach().float().cpu().numpy())
        k = min(k, self.n_names)
        scores = np.empty((self.n_templates, len(q), k), dtype=np.float32)
        ids = np.empty((self.n_templates, len(q), k), dtype=np.int64)
        for t, idx in enumerate(self._indexes):
            scores[t], ids[t] = idx.search(q, k)
        return scores, ids


class TorchNameIndex:
    """Exact top-k by blocked matrix products on a torch device (GPU-friendly)."""

    def __init__(self, text_emb: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32,
                 block_names: int = 262_144) -> None:
        self.n_templates, self.n_names, _ = text_emb.shape
        self._emb = torch.as_tensor(text_emb).to(device=device, dtype=dtype)
        self._block = block_names

    @torch.inference_mode()
    def search(self, image_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n_names)
        q = image_emb.to(self._emb.device, self._emb.dtype)
        best_s, best_i = None, None
        for start in range(0, self.n_names, self._block):
            block = self._emb[:, start : start + self._block]  # T×n×D
            s = torch.einsum("bd,tnd->tbn", q, block).float()
            bs, bi = s.topk(min(k, s.shape[-1]), dim=-1)
            bi = bi + start
            if best_s is None:
                best_s, best_i = bs, bi
            else:
                cat_s, cat_i = torch.cat([best_s, bs], -1), torch.cat([best_i, bi], -1)
                best_s, pos = cat_s.topk(k, dim=-1)
                best_i = cat_i.gather(-1, pos)
        assert best_s is not None and best_i is not None
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def build_name_index(text_emb: np.ndarray, backend: str, device: torch.device) -> NameIndex:
    """``auto`` picks torch on CUDA and FAISS on CPU."""
    if backend == "auto":
        backend = "torch" if device.type == "cuda" else "faiss"
    if backend == "faiss":
        return FaissNameIndex(text_emb)
    if backend == "torch":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return TorchNameIndex(text_emb, device, dtype)
    raise ValueError(f"unknown index backend {backend!r}")
