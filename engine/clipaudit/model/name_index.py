"""Top-k name search: which names does the model rank highest for an image, per template?

The name state comes as parts (float16 R × n × D arrays in name order, memory-mapped; see
:mod:`clipaudit.map.state`); every backend holds it once, at float16, and is filled part by part.
Four backends behind one interface:
- ``faiss``: exact, one ``IndexScalarQuantizer`` (fp16 codes) per template (faiss-cpu; the CPU
  path below :data:`APPROX_ABOVE` names);
- ``faiss-ivf``: approximate, an inverted-file index with fp16 codes per template over one shared
  coarse quantizer, its size and the number of lists probed chosen from the pool size
  (:func:`ivf_params`); the CPU path from :data:`APPROX_ABOVE` names, where exact search costs
  names × templates dot products per image;
- ``torch``: exact, blocked matrix product + running ``topk`` on the model's device (the GPU
  path, where a dense product over templates × names is faster than any index);
- ``faiss-gpu``: exact, ``GpuIndexFlatIP`` with float16 storage on the model's GPU (the ``[gpu]``
  extra, faiss-gpu); chosen only explicitly, since it has not been measured against ``torch`` yet.
fp16 codes are the state's own values, so the exact backends return the same scores and ranks
(up to float ties) as a float32 index of the same state.
"""

from __future__ import annotations

import mmap
import warnings
from typing import Any, Protocol

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


#: the name state: its parts in name order, each float16 R × n × D (memory-mapped .npy files)
Parts = list[np.ndarray]


def as_parts(state: Parts | np.ndarray) -> Parts:
    """The state as a list of parts (one R × N × D array is one part)."""
    return [state] if isinstance(state, np.ndarray) else list(state)


def _shape(parts: Parts) -> tuple[int, int, int]:
    """(rankings, names, width) of the state made of ``parts``."""
    return parts[0].shape[0], sum(p.shape[1] for p in parts), parts[0].shape[2]


def _add_parts(indexes: list, parts: Parts) -> None:
    """Add the state to one index per ranking, part by part in name order, each part widened to
    float32 one ranking at a time; a memory-mapped part's pages are then dropped from this
    process (they stay in the page cache), so building never holds the state twice."""
    for p in parts:
        for t, idx in enumerate(indexes):
            idx.add(np.ascontiguousarray(p[t], dtype=np.float32))
        release_pages(p)


def release_pages(part: np.ndarray) -> None:
    """Tell the kernel this process no longer needs a memory-mapped part's pages (no-op otherwise)."""
    m = getattr(part, "_mmap", None)
    if m is not None and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


class FaissNameIndex(_PerTemplateFaiss):
    """Exact inner product over each template's name embeddings with FAISS, stored as float16
    (``IndexScalarQuantizer``, fp16: the state's own values, so the scores equal a float32 flat
    index's, at half its memory)."""

    def __init__(self, parts: Parts | np.ndarray) -> None:
        import faiss

        parts = as_parts(parts)
        self.n_templates, self.n_names, dim = _shape(parts)
        self._indexes = [faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                         for _ in range(self.n_templates)]
        _add_parts(self._indexes, parts)


class FaissGpuNameIndex(_PerTemplateFaiss):
    """Exact inner product per template on a GPU with faiss-gpu (``GpuIndexFlatIP``, stored as float16)."""

    def __init__(self, parts: Parts | np.ndarray, device: torch.device) -> None:
        import faiss

        parts = as_parts(parts)
        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("compute.index: faiss-gpu needs FAISS built for GPUs: pip install -e \".[gpu]\" "
                               "(the faiss-gpu package; this faiss is CPU-only)")
        if device.type != "cuda" or faiss.get_num_gpus() == 0:
            raise RuntimeError(f"compute.index: faiss-gpu needs a CUDA device (the model is on {device}, "
                               f"FAISS sees {faiss.get_num_gpus()} GPU(s))")
        self.n_templates, self.n_names, dim = _shape(parts)
        self._resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = device.index or 0
        config.useFloat16 = True  # the state's own precision: half the device memory of float32
        self._indexes = [faiss.GpuIndexFlatIP(self._resources, dim, config) for _ in range(self.n_templates)]
        _add_parts(self._indexes, parts)


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

    def __init__(self, parts: Parts | np.ndarray, nlist: int | None = None, nprobe: int | None = None,
                 seed: int = 0) -> None:
        import faiss

        parts = as_parts(parts)
        self.n_templates, self.n_names, dim = _shape(parts)
        auto_list, auto_probe = ivf_params(self.n_names)
        self.nlist = min(nlist or auto_list, self.n_names)
        self.nprobe = min(nprobe or auto_probe, self.nlist)
        # the same sample as over the pooled T·N rows (template-major), gathered part by part
        pick = np.sort(np.random.default_rng(seed).choice(self.n_templates * self.n_names, self.nlist, replace=False))
        t_of, n_of = np.divmod(pick, self.n_names)
        ends = np.cumsum([p.shape[1] for p in parts])
        part_of = np.searchsorted(ends, n_of, side="right")
        starts = ends - [p.shape[1] for p in parts]
        centroids = np.stack([np.asarray(parts[j][t, n - starts[j]], dtype=np.float32)
                              for t, n, j in zip(t_of, n_of, part_of)])
        self._quantizer = faiss.IndexFlatIP(dim)
        self._quantizer.add(centroids)
        self._indexes = []
        for t in range(self.n_templates):
            # float16 codes of the vectors themselves (not residuals): the state's own values
            idx = faiss.IndexIVFScalarQuantizer(self._quantizer, dim, self.nlist, faiss.ScalarQuantizer.QT_fp16,
                                                faiss.METRIC_INNER_PRODUCT, False)
            idx.train(centroids)  # the quantizer is given; fp16 codes learn nothing
            idx.nprobe = self.nprobe
            self._fill(idx, parts, t)
            self._indexes.append(idx)

    def _fill(self, idx: Any, parts: Parts, t: int) -> None:
        """Put ranking ``t`` of the state in ``idx``'s lists, each list written once at its final
        size (FAISS's own ``add`` grows the lists by doubling: up to twice the state in memory).
        An fp16 code is the vector's own float16 bytes, so the codes are the state's rows; within
        a list the names keep their order, as ``add`` would leave them."""
        import faiss

        assign = np.empty(self.n_names, dtype=np.int64)
        at = 0
        for p in parts:
            _, a = self._quantizer.search(np.ascontiguousarray(p[t], dtype=np.float32), 1)
            assign[at : at + p.shape[1]] = a[:, 0]
            at += p.shape[1]
        codes = np.concatenate([np.asarray(p[t], dtype=np.float16) for p in parts])  # one ranking, as fp16 codes
        for p in parts:
            release_pages(p)
        order = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[order], np.arange(self.nlist + 1))
        lists = idx.invlists
        for lst in range(self.nlist):
            lo, hi = bounds[lst], bounds[lst + 1]
            if hi > lo:
                ids = np.ascontiguousarray(order[lo:hi])
                rows = np.ascontiguousarray(codes[ids]).view(np.uint8)
                lists.add_entries(lst, int(hi - lo), faiss.swig_ptr(ids), faiss.swig_ptr(rows))
        idx.ntotal = self.n_names


class TorchNameIndex:
    """Exact top-k by blocked matrix products on a torch device. On a GPU the state is copied
    part by part into one float16 device tensor; on a CPU the memory-mapped parts are used as
    they are and each block is widened to float32 for its product (CPUs without fp16 arithmetic
    are ~5× slower at float16 products than at widening first: measured on this project's VM)."""

    def __init__(self, parts: Parts | np.ndarray, device: torch.device, block_names: int = 65_536) -> None:
        parts = as_parts(parts)
        self.n_templates, self.n_names, dim = _shape(parts)
        self._device = device
        if device.type == "cuda":
            emb = torch.empty((self.n_templates, self.n_names, dim), dtype=torch.float16, device=device)
            at = 0
            for p in parts:
                emb[:, at : at + p.shape[1]] = torch.from_numpy(np.ascontiguousarray(p)).to(device)
                at += p.shape[1]
                release_pages(p)
            self._blocks = [(0, emb)]
        else:
            self._blocks = []
            at = 0
            with warnings.catch_warnings():  # read-only memory maps: the blocks are only ever read
                warnings.simplefilter("ignore", UserWarning)
                for p in parts:
                    self._blocks.append((at, torch.from_numpy(p)))
                    at += p.shape[1]
        self._block = block_names

    @torch.inference_mode()
    def search(self, image_emb: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n_names)
        on_gpu = self._device.type == "cuda"
        q = image_emb.to(self._device, torch.float16 if on_gpu else torch.float32)
        best_s, best_i = None, None
        for offset, emb in self._blocks:
            for start in range(0, emb.shape[1], self._block):
                block = emb[:, start : start + self._block]  # T×n×D
                if not on_gpu:
                    block = block.float()
                s = torch.einsum("bd,tnd->tbn", q, block).float()
                bs, bi = s.topk(min(k, s.shape[-1]), dim=-1)
                bi = bi + (offset + start)
                if best_s is None:
                    best_s, best_i = bs, bi
                else:
                    cat_s, cat_i = torch.cat([best_s, bs], -1), torch.cat([best_i, bi], -1)
                    best_s, pos = cat_s.topk(min(k, cat_s.shape[-1]), dim=-1)
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


def build_name_index(state: Parts | np.ndarray, backend: str, device: torch.device) -> NameIndex:
    """The index of ``backend`` (``auto``: see :func:`resolve_backend`) over the name state: its
    parts (float16 R × n × D each, in name order), or one R × N × D array."""
    parts = as_parts(state)
    if not parts:
        raise ValueError("the name state has no parts")
    backend = resolve_backend(backend, device.type, _shape(parts)[1])
    if backend == "faiss":
        return FaissNameIndex(parts)
    if backend == "faiss-ivf":
        return IVFNameIndex(parts)
    if backend == "faiss-gpu":
        return FaissGpuNameIndex(parts, device)
    if backend == "torch":
        return TorchNameIndex(parts, device)
    raise ValueError(f"unknown index backend {backend!r}")
