"""Top-k name search: which names does the model rank highest for an image, per template?

Three backends behind one interface:
- ``faiss``: exact, one ``IndexFlatIP`` per template (faiss-cpu; the CPU path below
  :data:`APPROX_ABOVE` names);
- ``faiss-ivf``: approximate, an inverted-file index per template over one shared coarse
  quantizer, its size and the number of lists probed chosen from the pool size
  (:func:`ivf_params`); the CPU path from :data:`APPROX_ABOVE` names, where exact search
  costs names × templates dot products per image;
- ``torch``: exact, blocked matrix product + running ``topk`` on the model's device (the GPU
  path, where a dense product over templates × names is faster than any index);
- ``faiss-gpu``: exact, the ``faiss`` indexes moved to the model's GPU (the ``[gpu]`` extra,
  faiss-gpu); chosen only explicitly, since it has not been measured against ``torch`` yet.
The exact backends return the same ranks (up to float ties) for the same embeddings.
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


class _PerTemplateFaiss:
    """One FAISS index per template (``self._indexes``), searched with the same queries."""

    n_templates: int
    n_names: int
    _indexes: list

    def search(self, image_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(image_emb.detach().float().cpu().numpy())
        k = min(k, self.n_names)
        scores = np.empty((self.n_templates, len(q), k), dtype=np.float32)
        ids = np.empty((self.n_templates, len(q), k), dtype=np.int64)
        for t, idx in enumerate(self._indexes):
            scores[t], ids[t] = idx.search(q, k)
        return scores, ids


class FaissNameIndex(_PerTemplateFaiss):
    """Exact inner product over each template's name embeddings with FAISS."""

    def __init__(self, text_emb: np.ndarray) -> None:
        import faiss

        self.n_templates, self.n_names, dim = text_emb.shape
        self._indexes = []
        for t in range(self.n_templates):
            idx = faiss.IndexFlatIP(dim)
            idx.add(np.ascontiguousarray(text_emb[t], dtype=np.float32))
            self._indexes.append(idx)


class FaissGpuNameIndex(_PerTemplateFaiss):
    """Exact inner product per template on a GPU with faiss-gpu (``GpuIndexFlatIP``)."""

    def __init__(self, text_emb: np.ndarray, device: torch.device) -> None:
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("compute.index: faiss-gpu needs FAISS built for GPUs: pip install -e \".[gpu]\" "
                               "(the faiss-gpu package; this faiss is CPU-only)")
        if device.type != "cuda" or faiss.get_num_gpus() == 0:
            raise RuntimeError(f"compute.index: faiss-gpu needs a CUDA device (the model is on {device}, "
                               f"FAISS sees {faiss.get_num_gpus()} GPU(s))")
        self.n_templates, self.n_names, dim = text_emb.shape
        self._resources = faiss.StandardGpuResources()
        self._indexes = []
        for t in range(self.n_templates):
            cpu = faiss.IndexFlatIP(dim)
            cpu.add(np.ascontiguousarray(text_emb[t], dtype=np.float32))
            self._indexes.append(faiss.index_cpu_to_gpu(self._resources, device.index or 0, cpu))


#: pool size from which ``auto`` picks the approximate index on a CPU
APPROX_ABOVE = 50_000


def ivf_params(n_names: int) -> tuple[int, int]:
    """(lists, lists probed) for a pool of ``n_names``: about 2·√n lists, a quarter of them
    probed (at least 16). Measured on the lab model's text embeddings of generated names with
    lab photos as queries, recall@10 against exact search: an eighth probed gave 0.989 at
    20,000 names (1.000 at 100,000), a quarter 0.993 — tests/map/test_index.py checks ≥ 0.99."""
    nlist = max(16, min(65_536, round(2 * n_names ** 0.5)))
    return nlist, min(nlist, max(16, nlist // 4))


class IVFNameIndex(_PerTemplateFaiss):
    """Approximate inner product: one ``IndexIVFFlat`` per template sharing one quantizer.

    The quantizer's centroids are a seeded sample of the name embeddings (pooled over the
    templates), not k-means: every worker that builds the index from the same embeddings
    gets the same lists (FAISS's k-means may differ with the thread count), so the ranks do
    not depend on which actor mapped a shard.
    """

    def __init__(self, text_emb: np.ndarray, nlist: int | None = None, nprobe: int | None = None,
                 seed: int = 0) -> None:
        import faiss

        self.n_templates, self.n_names, dim = text_emb.shape
        auto_list, auto_probe = ivf_params(self.n_names)
        self.nlist = min(nlist or auto_list, self.n_names)
        self.nprobe = min(nprobe or auto_probe, self.nlist)
        pooled = text_emb.reshape(-1, dim)
        pick = np.random.default_rng(seed).choice(len(pooled), self.nlist, replace=False)
        self._quantizer = faiss.IndexFlatIP(dim)
        self._quantizer.add(np.ascontiguousarray(pooled[np.sort(pick)], dtype=np.float32))
        self._indexes = []
        for t in range(self.n_templates):
            idx = faiss.IndexIVFFlat(self._quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            idx.add(np.ascontiguousarray(text_emb[t], dtype=np.float32))
            idx.nprobe = self.nprobe
            self._indexes.append(idx)


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


def resolve_backend(backend: str, device_type: str, n_names: int) -> str:
    """``auto`` → torch on CUDA; on a CPU exact FAISS below :data:`APPROX_ABOVE` names, else IVF."""
    if backend != "auto":
        return backend
    if device_type == "cuda":
        return "torch"
    return "faiss-ivf" if n_names >= APPROX_ABOVE else "faiss"


def build_name_index(text_emb: np.ndarray, backend: str, device: torch.device) -> NameIndex:
    """The index of ``backend`` (``auto``: see :func:`resolve_backend`) over T×N×D embeddings."""
    backend = resolve_backend(backend, device.type, text_emb.shape[1])
    if backend == "faiss":
        return FaissNameIndex(text_emb)
    if backend == "faiss-ivf":
        return IVFNameIndex(text_emb)
    if backend == "faiss-gpu":
        return FaissGpuNameIndex(text_emb, device)
    if backend == "torch":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return TorchNameIndex(text_emb, device, dtype)
    raise ValueError(f"unknown index backend {backend!r}")
