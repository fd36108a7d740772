"""``clipaudit bench``: throughput of the map step beside baselines measured in the same run.

Three measurements on the same synthetic shards, machine and model:

* ``model_only`` — the image tower's forward pass on images already decoded, resized and on
  the device, in batches of ``batch_size``: the ceiling the pipeline can reach;
* ``decode_only`` — the map step's own tar streaming + JPEG decode + resize on its decode
  threads (:meth:`ShardMapper.decoded_batches`), no model;
* ``map`` — the real map step (:class:`clipaudit.map.mapper.ShardMapper`, in-process) with the
  chosen attacks: reading, decoding, the model, the attacks, Parquet parts and markers.

Reported as images/s and as ratios to ``model_only``; the machine is named in the result.
Start-up (model load, name-pool encoding) is timed apart and left out of the rates; each
measurement gets one untimed warm-up pass first.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from clipaudit.app.resolve import map_hash
from clipaudit.contract.registry import available
from clipaudit.map.mapper import ShardMapper
from clipaudit.model.loading import load_model, resolve_device
from clipaudit.io.outputs import OutputLayout
from clipaudit.spec import parse_spec

def attack_set(choice: str) -> dict[str, dict[str, Any]]:
    """``all``, ``default`` or registered attack names joined by ``+`` → the spec's ``attacks``
    (default parameters)."""
    names = [a.name for a in available()]
    if choice == "all":
        return {n: {} for n in names}
    if choice == "default":
        return {a.name: {} for a in available() if a.default}
    chosen = [c for c in choice.split("+") if c]
    unknown = [c for c in chosen if c not in names]
    if unknown or not chosen:
        raise ValueError(f"--attacks {choice!r}: use all, default, or names joined by + from: {', '.join(names)}")
    return {n: {} for n in chosen}


def machine(device: str) -> dict[str, Any]:
    """What ran the benchmark: CPU model and cores, GPU name, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def synthetic_name(i: int) -> str:
    """Synthetic identity ``i``'s name: the shards' identities and the pools' names agree."""
    return f"Person {i:05d}"


def write_synthetic_names(path: Path, n: int) -> None:
    """A name pool of the first ``n`` synthetic names, one per line, written as it goes."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(synthetic_name(i) + "\n")


def write_synthetic_shards(folder: Path, n_images: int, per_shard: int, size: int, n_names: int) -> list[Path]:
    """img2dataset-style tars of smooth random JPEGs (``size`` px) with identities and captions."""
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], 0
    while i < n_images:
        path = folder / f"{len(paths):05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(min(per_shard, n_images - i)):
                coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                name = synthetic_name(i % n_names)
                for ext, data in (("jpg", buf.getvalue()),
                                  ("json", json.dumps({"key": f"{i:09d}", "identity": name}).encode()),
                                  ("txt", f"{name} at an event".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        paths.append(path)
    return paths


def _time(fn, repeat: int = 1) -> float:
    """Median wall time of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_bench(model: str = "ViT-B-32", pretrained: str | None = None, precision: str | None = None,
              device: str = "auto", n_images: int = 512, batch_size: int = 64, decode_threads: int = 2,
              attacks: str = "default", image_px: int = 256, n_names: int = 100,
              workdir: Path | None = None, repeat: int = 1, log=lambda msg: None) -> dict[str, Any]:
    """Run the three measurements; returns the result record (also printed by the CLI).

    The name pool is encoded once per job (names × 21 templates through the text tower):
    timed apart as start-up. On a CPU keep ``n_names`` small; on a GPU use a realistic pool.
    Each rate is the median over ``repeat`` passes (the three stages interleaved per pass).
    """
    import torch


    dev = str(resolve_device(device))
    tmp = tempfile.TemporaryDirectory(prefix="clipaudit-bench-") if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    try:
        batch_size = min(batch_size, n_images)
        shards = write_synthetic_shards(root / "shards", n_images, max(batch_size * 2, 64), image_px, n_names)
        warm_shard = write_synthetic_shards(root / "warm-up", batch_size, batch_size, image_px, n_names)[0]
        write_synthetic_names(root / "names.txt", n_names)
        spec = parse_spec({
            "model": {"name": model, "pretrained": pretrained, "precision": precision},
            "data": {"shards": [str(p) for p in shards]},
            "names": str(root / "names.txt"),
            "attacks": attack_set(attacks),
            "compute": {"executor": "local", "device": dev, "batch_size": batch_size,
                        "decode_threads": decode_threads},
            "store_embeddings": True,
            "output": str(root / "out"),
        }, root)
        t0 = time.perf_counter()
        loaded = load_model(model, pretrained, precision, dev, spec.seed)
        load_s = time.perf_counter() - t0

        # model only: decoded, resized, on the device
        px = torch.from_numpy(np.random.default_rng(1).integers(
            0, 255, (batch_size, loaded.image_size, loaded.image_size, 3), dtype=np.uint8))
        unit = loaded.to_unit(px)
        n_batches = max(1, n_images // batch_size)

        def forward() -> None:
            for _ in range(n_batches):
                loaded.encode_unit(unit, batch_size)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()

        log(f"model loaded in {load_s:.1f} s; {n_batches} batches of {batch_size} per pass")
        forward()  # warm-up (kernels, allocator)

        # the real map step
        log(f"map step set-up ({n_names} names × templates)")
        layout = OutputLayout(root / "out")
        mapper = ShardMapper(spec, layout, map_hash(spec))
        t0 = time.perf_counter()
        mapper.setup_here()
        setup_s = time.perf_counter() - t0
        mapper.map_shard(str(warm_shard))  # warm-up (imports, page cache), like the model-only pass

        def decode() -> None:  # the map step's own reading + decode threads, without the model
            for shard in shards:
                for _ in mapper.decoded_batches(str(shard)):
                    pass

        rows = 0

        def map_all() -> None:
            nonlocal rows
            rows = sum(mapper.map_shard(str(s)).rows for s in shards)

        model_t, decode_t, map_t = [], [], []
        for i in range(repeat):  # interleaved, so slow phases of a shared machine hit all three
            log(f"pass {i + 1}/{repeat}: model only, decode only, map step")
            model_t.append(_time(forward))
            decode_t.append(_time(decode))
            map_t.append(_time(map_all))
        mapper.close()
        model_rate = n_batches * batch_size / float(np.median(model_t))
        decode_rate = n_images / float(np.median(decode_t))
        map_rate = n_images / float(np.median(map_t))
        assert rows == n_images, (rows, n_images)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "device": dev + (f" ({machine(dev).get('gpu')})" if dev.startswith("cuda") else ""),
        "model_only_images_per_s": round(model_rate, 2), "e2e_images_per_s": round(map_rate, 2),
        "e2e_vs_model_ratio": round(map_rate / model_rate, 3),
        "machine": machine(dev),
        "model": model, "pretrained": pretrained, "precision": str(loaded.dtype).removeprefix("torch."),
        "image_size": loaded.image_size, "images": n_images, "batch_size": batch_size,
        "decode_threads": decode_threads, "source_px": image_px, "attacks": attacks, "names": n_names,
        "model_load_s": round(load_s, 2), "map_setup_s": round(setup_s, 2),
        "repeat": repeat,
        "images_per_s": {"model_only": round(model_rate, 2), "decode_only": round(decode_rate, 2),
                         "map": round(map_rate, 2)},
        "ratio_to_model_only": {"decode_only": round(decode_rate / model_rate, 3),
                                "map": round(map_rate / model_rate, 3)},
    }


def format_bench(r: dict[str, Any]) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores)"
    rates, ratios = r["images_per_s"], r["ratio_to_model_only"]
    lines = [
        f"machine: {where}, device {m['device']}, torch {m['torch']}",
        f"model: {r['model']} ({r['precision']}, {r['image_size']} px), batch {r['batch_size']}, "
        f"{r['images']} images of {r['source_px']} px, attacks: {r['attacks']}, {r['names']} names",
        f"{'stage':14s} {'images/s':>10s} {'× model-only':>13s}   (medians of {r['repeat']} passes)",
        f"{'model only':14s} {rates['model_only']:10.1f} {1.0:13.3f}",
        f"{'decode only':14s} {rates['decode_only']:10.1f} {ratios['decode_only']:13.3f}",
        f"{'map step':14s} {rates['map']:10.1f} {ratios['map']:13.3f}",
        f"start-up (not in the rates): model load {r['model_load_s']} s, name pool + attacks {r['map_setup_s']} s",
    ]
    return "\n".join(lines)
