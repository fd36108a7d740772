"""``clipaudit bench --quick``: every speed figure of the map step on a small OpenCLIP model,
each beside its baseline measured in the same run, in about three minutes on a 2-core CPU.

The model is a randomly initialised OpenCLIP ViT shaped like ViT-B-32's image tower (width
768, patch 32) with 6 layers at 96 px (speed does not depend on the weights). Figures (keys of the JSON record):

* ``model_only_images_per_s`` — the image tower alone on decoded, resized batches;
* ``e2e_images_per_s`` — the real map step (:class:`ShardMapper`) from tar shards of JPEGs on
  disk to Parquet parts, IDIA on, a pool of ``names`` names; ``e2e_vs_model_ratio`` = e2e ÷
  model-only;
* ``naive_images_per_s`` — a loop written for the comparison: per image, Pillow decode,
  OpenCLIP's own preprocessing transform, a batch-1 forward pass and a top-k over the same
  name embeddings; ``speedup_vs_naive`` = e2e ÷ naive;
* ``augment_speedup_vs_pil`` — batched augmented views on the device (crop, flip, jitter,
  grayscale, per-image parameters) against torchvision's transforms applied per image to
  Pillow images, same number of views;
* ``names_per_s`` — name-index queries (one per image and template) per second on the
  approximate index at ``index_names`` synthetic vectors (speed only), ``recall_at_10`` of
  that index against exact search on text embeddings of ``index_names`` generated names
  through the text tower of a tiny CLIP trained on the canary lab, lab photos as queries;
* ``peak_rss_mb_1x`` / ``peak_rss_mb_10x`` — peak RSS of a process that maps 1 and 10 shards;
* ``actors_1_vs_2_efficiency`` — two map processes side by side (one thread each) against
  one: throughput with 2 ÷ (2 × throughput with 1).
"""

from __future__ import annotations

import io
import json
import queue
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
from clipaudit.app.resolve import map_hash
from clipaudit.spec import parse_spec
from clipaudit.attacks.augment import augmented_views, sample_rng
from clipaudit.lab.build import LabConfig, build_lab
from clipaudit.lab.identities import make_identities, make_names, render
from clipaudit.model.name_index import FaissNameIndex, IVFNameIndex
from clipaudit.model.loading import load_model
from clipaudit.io.outputs import OutputLayout
from clipaudit.map.mapper import ShardMapper
from clipaudit.map.state import ensure_here
from clipaudit.bench.map_step import machine, write_synthetic_names, write_synthetic_shards

# ViT-B-32's width and patch size (the default audit model's), fewer layers and 96 px so that the
# quick run fits in ~3 minutes on 2 cores.
QUICK_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 96, "layers": 6, "width": 768, "patch_size": 32, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 3},
}
MODEL_NAME = "clipaudit-bench-vit-b32-96"


def _write_model(root: Path) -> Path:
    import open_clip

    path = root / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(QUICK_CONFIG))
    open_clip.add_model_config(str(path))
    return path


def _spec(root: Path, model: Path, shards: list[Path], batch_size: int, out: str, threads: int = 2):
    return parse_spec({
        "model": {"name": str(model)},
        "data": {"shards": [str(p) for p in shards]},
        "names": str(root / "names.txt"),
        "attacks": {"idia": {}},
        "compute": {"executor": "local", "device": "cpu", "batch_size": batch_size, "decode_threads": threads},
        "output": str(root / out),
    }, root)


def _rate(n: int, fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def _naive_loop(loaded, jpegs: list[bytes], text: Any, k: int = 10) -> None:
    """Per image: Pillow decode, OpenCLIP's preprocess transform, batch-1 forward, top-k."""
    import open_clip
    import torch
    from PIL import Image

    preprocess = open_clip.image_transform(loaded.image_size, is_train=False, mean=loaded.mean, std=loaded.std)
    with torch.inference_mode():
        for data in jpegs:
            x = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            emb = torch.nn.functional.normalize(loaded.model.encode_image(x).float(), dim=-1)
            torch.einsum("bd,tnd->tbn", emb, text).topk(k, dim=-1)


def _augment_speedup(loaded, jpegs: list[bytes], views: int) -> float:
    """Device-batched views (the map step's) vs torchvision's transforms per Pillow image."""
    import torch
    from PIL import Image
    from torchvision import transforms as T


    size = loaded.image_size
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in jpegs]
    per_image = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                           T.ToTensor()])
    pil_rate = _rate(len(images) * views, lambda: torch.stack([per_image(im) for im in images for _ in range(views)]))
    px = torch.from_numpy(np.stack([np.asarray(im.resize((size, size))) for im in images]))
    unit = loaded.to_unit(px)
    rngs = [sample_rng(0, str(i), i, "bench") for i in range(len(images))]
    ours = _rate(len(images) * views, lambda: augmented_views(unit, rngs, views))
    return ours / pil_rate


def _index_figures(root: Path, index_names: int, templates: int = 3) -> tuple[float, float, float]:
    """(queries per second on the approximate index at ``index_names`` synthetic vectors, the
    same for exact search, recall@10 vs exact on ``index_names`` real name embeddings).

    Recall needs a text tower that tells names apart: a random-init tower maps every name to
    nearly the same vector, where the top 10 are ties. So a tiny CLIP is trained on the
    canary lab (~15 s) and its text tower embeds generated names; lab photos are the queries.
    """
    import torch


    rng = np.random.default_rng(0)

    def synthetic_rates() -> tuple[float, float]:
        # local, so the synthetic vectors and their index are freed when it returns
        dim = 256
        synth = rng.normal(size=(templates, index_names, dim)).astype(np.float32)
        synth /= np.linalg.norm(synth, axis=-1, keepdims=True)
        ivf = IVFNameIndex(synth)
        qs = torch.from_numpy(rng.normal(size=(256, dim)).astype(np.float32))
        qs = torch.nn.functional.normalize(qs, dim=-1)
        names_per_s = _rate(len(qs) * templates, lambda: ivf.search(qs, 10))
        exact_per_s = _rate(len(qs) * templates, lambda: FaissNameIndex(synth).search(qs, 10))
        return names_per_s, exact_per_s

    names_per_s, exact_per_s = synthetic_rates()
    lab = build_lab(root / "lab", LabConfig(n_identities=24, steps=200, shards=1, n_distractor_names=50),
                    log=lambda *a: None)
    loaded = load_model(str(lab.model_config), str(lab.trained), "fp32", "cpu")
    names = make_names(index_names, seed=3)
    text = loaded.encode_texts([f"a photo of {n}" for n in names]).numpy()[None]
    photos = np.stack([render(i, rng, loaded.image_size) for i in make_identities(100, seed=5) for _ in range(2)])
    queries = loaded.encode_images(torch.from_numpy(photos))
    _, exact = FaissNameIndex(text).search(queries, 10)
    _, approx = IVFNameIndex(text).search(queries, 10)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx[0], exact[0])]))
    return names_per_s, exact_per_s, recall


def _child_map(job: dict, threads: int, results) -> None:
    """In a fresh (spawned) process: map the given shards with ``threads`` torch threads; put
    the rows, seconds and peak RSS on ``results``."""
    import open_clip
    import torch

    torch.set_num_threads(threads)

    open_clip.add_model_config(job["model"])
    root = Path(job["root"])
    spec = _spec(root, Path(job["model"]), [Path(s) for s in job["shards"]], job["batch_size"], job["out"],
                 threads=job["decode_threads"])
    mapper = ShardMapper(spec, OutputLayout(root / job["out"]), map_hash(spec))
    mapper.setup_here()
    while time.time() < job["start_at"]:  # side-by-side processes start mapping together
        time.sleep(0.01)
    t0 = time.perf_counter()
    rows = sum(mapper.map_shard(s).rows for s in job["shards"])
    seconds = time.perf_counter() - t0
    mapper.close()
    results.put({"rows": rows, "seconds": seconds, "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ``ru_maxrss`` survives ``exec`` on Linux, so a
    spawned child would report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children(jobs: list[dict], threads: int) -> list[dict]:
    """Run :func:`_child_map` for each job in its own spawned process, side by side."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak RSS is the map step's alone
    results = ctx.Queue()
    start = time.time() + 8.0  # after every child has imported torch and loaded the model
    procs = [ctx.Process(target=_child_map, args=({**j, "start_at": start}, threads, results)) for j in jobs]
    for p in procs:
        p.start()
    out: list[dict] = []
    while len(out) < len(procs):
        try:
            out.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"bench child process failed (exit {dead[0]})") from None
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"bench child process failed (exit {p.exitcode})")
    return out


def run_quick(n_images: int = 768, batch_size: int = 64, names: int = 1000, index_names: int = 100_000,
              views: int = 8, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """All quick figures (see the module docstring) on this machine's CPU."""
    import torch


    with tempfile.TemporaryDirectory(prefix="clipaudit-bench-quick-") as tmp:
        root = Path(tmp)
        model_path = _write_model(root)
        per_shard = max(16, n_images // 6)  # 6 shards: the 1-vs-2-process figure splits them in halves
        shards = write_synthetic_shards(root / "shards", n_images, per_shard, 128, names)
        write_synthetic_names(root / "names.txt", names)
        loaded = load_model(str(model_path), None, "fp32", "cpu", seed=0)
        px = torch.from_numpy(np.random.default_rng(1).integers(
            0, 255, (batch_size, loaded.image_size, loaded.image_size, 3), dtype=np.uint8))
        unit = loaded.to_unit(px)
        loaded.encode_unit(unit, batch_size)  # warm-up
        n_batches = n_images // batch_size
        log(f"model only: {n_batches} batches of {batch_size}")
        model_rate = _rate(n_batches * batch_size,
                           lambda: [loaded.encode_unit(unit, batch_size) for _ in range(n_batches)])

        log(f"map step: {len(shards)} shards, IDIA on, {names} names")
        spec = _spec(root, model_path, shards, batch_size, "out")
        mapper = ShardMapper(spec, OutputLayout(root / "out"), map_hash(spec))
        states = ensure_here(spec, mapper.layout, mapper.attacks, mapper.load())
        mapper.setup(states)
        mapper.map_shard(str(shards[0]))  # warm-up
        e2e_rate = _rate(n_images, lambda: [mapper.map_shard(str(s)) for s in shards])
        # the name pool's T×N×D text embeddings, for the naive loop's top-k over the same names
        text = torch.from_numpy(np.concatenate(states["idia"], axis=1)).float()
        mapper.close()

        import tarfile
        jpegs = []
        with tarfile.open(shards[0]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    jpegs.append(tar.extractfile(m).read())  # type: ignore[union-attr]
        naive_n = min(len(jpegs), 128)
        log(f"naive loop: {naive_n} images one by one, twice (after a warm-up)")
        _naive_loop(loaded, jpegs[:8], text)  # warm-up, as every other stage gets
        naive_rate = _rate(2 * naive_n, lambda: [_naive_loop(loaded, jpegs[:naive_n], text) for _ in range(2)])

        log(f"augmented views: {views} per image, device batch vs per-image Pillow")
        augment = _augment_speedup(loaded, jpegs[:64], views)

        log(f"name index: approximate at {index_names} names (recall on the lab model's text tower)")
        names_per_s, exact_per_s, recall = _index_figures(root, index_names)

        log("memory (1 vs 10 shards) and 1 vs 2 map processes")
        small = write_synthetic_shards(root / "small", 10 * 32, 32, 128, names)
        base = {"model": str(model_path), "root": str(root), "batch_size": 32, "decode_threads": 1}
        one, ten = _children([{**base, "shards": [str(small[0])], "out": "rss1"}], 2)[0], \
            _children([{**base, "shards": [str(s) for s in small], "out": "rss10"}], 2)[0]
        solo = _children([{**base, "shards": [str(s) for s in shards[: len(shards) // 2]], "out": "a1"}], 1)[0]
        pair = _children([{**base, "shards": [str(s) for s in shards[: len(shards) // 2]], "out": "a2"},
                          {**base, "shards": [str(s) for s in shards[len(shards) // 2:]], "out": "b2"}], 1)
        solo_rate = solo["rows"] / solo["seconds"]
        pair_rate = sum(r["rows"] for r in pair) / max(r["seconds"] for r in pair)

    m = machine("cpu")
    vision = QUICK_CONFIG["vision_cfg"]
    return {
        "device": f"cpu: {m['cpu']} ({m['cpu_cores']} cores)", "torch": m["torch"],
        "model": f"{MODEL_NAME} (OpenCLIP ViT, patch {vision['patch_size']}, {vision['image_size']} px, "
                 f"width {vision['width']}, {vision['layers']} layers, random init)",
        "batch_size": batch_size, "images": n_images, "names": names,
        "model_only_images_per_s": round(model_rate, 1), "e2e_images_per_s": round(e2e_rate, 1),
        "e2e_vs_model_ratio": round(e2e_rate / model_rate, 3),
        "naive_images_per_s": round(naive_rate, 1), "speedup_vs_naive": round(e2e_rate / naive_rate, 2),
        "augment_views": views, "augment_speedup_vs_pil": round(augment, 2),
        "index": "faiss-ivf", "index_names": index_names, "names_per_s": round(names_per_s, 1),
        "names_per_s_exact": round(exact_per_s, 1),
        "recall_at_10": round(recall, 4),
        "peak_rss_mb_1x": round(one["peak_rss_mb"], 1), "peak_rss_mb_10x": round(ten["peak_rss_mb"], 1),
        "actors_1_vs_2_efficiency": round(pair_rate / (2 * solo_rate), 3),
    }
