"""Shared fixtures: offline hub, one local Ray per session, tiny models, a small canary lab."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs >= 2026 asks a bucket's layout over gRPC first, which a local GCS emulator cannot answer
# (a 60 s timeout per call, not cached): the tests' gs:// uses gcsfs's plain JSON-API file system
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """A randomly initialised tiny OpenCLIP config + its state_dict checkpoint."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("tiny-model")
    cfg = root / "tiny-test-clip.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    ckpt = root / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return {"config": cfg, "checkpoint": ckpt, "name": "tiny-test-clip"}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def canary_lab(tmp_path_factory):
    """A small canary lab: trained + untrained tiny CLIP, shards, names, labels, job specs."""
    from clipaudit.lab.build import LabConfig, build_lab

    root = tmp_path_factory.mktemp("lab")
    return build_lab(root, LabConfig(n_identities=24, steps=200, shards=3, n_distractor_names=200), log=lambda *a: None)


def write_job(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture(scope="session")
def small_audit(tiny_model, tmp_path_factory) -> Path:
    """A finished audit of the tiny model (in-process executor): 2 shards of 24 captioned images of
    8 identities, shard 1 with a corrupt and a missing image; IDIA, masked-view and caption;
    identities P5, P6, P7 as calibration controls (target FPR 0.5, so p-values flag).
    Returns the output folder."""
    import tarfile

    from helpers import sample_files, write_tiny_job

    from clipaudit.app.runner import run_job
    from clipaudit.app.jobs import load_job

    root = tmp_path_factory.mktemp("small-audit")
    out = root / "out"
    job = write_tiny_job(root, tiny_model, out, shards=2, per_shard=24, compute="executor: local",
                         attacks="{idia: {top_k: 3}, mim: {mask_ratios: [0.25, 0.5]}, caption: {}}",
                         identities=8, captions=True)
    with tarfile.open(root / "shards" / "00001.tar", "a") as tf:  # two error rows in shard 1
        for name, data in sample_files("corrupt", "P0", b"\x00\x01 not an image") + sample_files("noimage", "P1"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (root / "controls.csv").write_text("identity\nP5\nP6\nP7\n")
    job.write_text(job.read_text() + "calibration: {controls: controls.csv, target_fpr: 0.5}\n")
    report = run_job(load_job(job), progress=False)
    assert report.ok and report.summary["rows"] == 50
    return out
