"""Tests for the canary lab (clipaudit.lab): names, rendering, shards, and the trained model."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from clipaudit.lab.build import LabConfig, LabPaths, _cast, _write_shards, build_lab
from clipaudit.lab.identities import make_identities, make_names, render, render_many
from clipaudit.lab.train import (
    TRAIN_TEMPLATES,
    create_tiny_model,
    image_batch,
    register_model_config,
    tiny_model_config,
    torch_threads,
    train_tiny_clip,
    write_model_config,
)

SMALL = LabConfig(n_identities=16, steps=150, n_distractor_names=200, n_negative_names=200)


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabPaths:
    return build_lab(tmp_path_factory.mktemp("lab"), SMALL, log=lambda _: None)


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _candidates(paths: LabPaths) -> tuple[list[np.ndarray], list[str]]:
    """Decoded images and identity names of every candidate sample."""
    images, names = [], []
    for shard in paths.shards:
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in files}):
            images.append(np.asarray(Image.open(io.BytesIO(files[f"{key}.jpg"])).convert("RGB")))
            names.append(json.loads(files[f"{key}.json"])["identity"])
    return images, names


def _labels(paths: LabPaths) -> dict[str, bool]:
    with paths.labels.open() as f:
        return {row["identity"]: row["member"] == "true" for row in csv.DictReader(f)}


# --- names and rendering -------------------------------------------------------------------


def test_names_are_unique_realistic_and_deterministic() -> None:
    people = make_identities(60, seed=3)
    names = [p.name for p in people]
    assert len(set(names)) == 60
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in names)
    assert names == [p.name for p in make_identities(60, seed=3)]
    assert people == make_identities(60, seed=3)
    assert names != [p.name for p in make_identities(60, seed=4)]
    extra = make_names(500, seed=3, exclude=set(names))
    assert len(set(extra)) == 500 and not set(extra) & set(names)
    assert extra == make_names(500, seed=3, exclude=set(names))


def test_render_is_deterministic_uint8() -> None:
    person = make_identities(1, seed=0)[0]
    a = render(person, np.random.default_rng(7), size=48)
    b = render(person, np.random.default_rng(7), size=48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(person, np.random.default_rng(8), size=48))
    assert render(person, np.random.default_rng(7), size=64).shape == (64, 64, 3)


def test_render_varies_less_within_identity_than_across() -> None:
    people = make_identities(10, seed=1)
    rng = np.random.default_rng(0)
    photos = np.stack([np.stack(render_many(p, rng, 6)) for p in people]).astype(np.float32)
    flat = photos.reshape(10, 6, -1)
    within = np.mean([np.linalg.norm(f[:, None] - f[None], axis=-1).sum() / 30 for f in flat])
    centroids = flat.mean(axis=1)
    across = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1).sum() / 90
    assert within < 0.7 * across
    assert within > 0  # photos do vary


def test_shifted_style_looks_different() -> None:
    person = make_identities(1, seed=2)[0]
    default = np.stack(render_many(person, np.random.default_rng(0), 8)).astype(np.float32)
    shifted = np.stack(render_many(person, np.random.default_rng(0), 8, style="shifted")).astype(np.float32)
    saturation = lambda x: (x.max(-1) - x.min(-1)).mean()  # noqa: E731
    assert saturation(shifted) < 0.7 * saturation(default)
    with pytest.raises(ValueError):
        render(person, np.random.default_rng(0), style="sepia")  # type: ignore[arg-type]


# --- training --------------------------------------------------------------------------------


def test_preprocessing_matches_open_clip(tmp_path: Path) -> None:
    name = write_model_config(tmp_path / "tiny-clip.json", tiny_model_config())
    model = create_tiny_model(name, seed=0)
    pp = open_clip.image_transform(48, is_train=False, mean=model.visual.image_mean, std=model.visual.image_std)
    images = render_many(make_identities(1, seed=0)[0], np.random.default_rng(0), 3)
    reference = torch.stack([pp(Image.fromarray(img)) for img in images])
    torch.testing.assert_close(image_batch(model, images), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        image_batch(model, [np.zeros((32, 32, 3), np.uint8)])


def test_training_is_deterministic_and_restores_torch_state(tmp_path: Path) -> None:
    name = write_model_config(tmp_path / "tiny-clip.json", tiny_model_config())
    people = make_identities(3, seed=0)
    images = {p.name: render_many(p, np.random.default_rng(i), 2) for i, p in enumerate(people)}
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    weights = []
    for _ in range(2):
        model = create_tiny_model(name, seed=5)
        train_tiny_clip(model, images, TRAIN_TEMPLATES, steps=3, seed=1, negative_names=["Otto Novak"])
        weights.append(model.state_dict())
        assert not model.training
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["logit_scale"], create_tiny_model(name, seed=5).state_dict()["logit_scale"])
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads


def test_training_augmentation_is_per_image_and_seeded(tmp_path: Path) -> None:
    from clipaudit.lab.train import _BatchSampler

    name = write_model_config(tmp_path / "tiny-clip.json", tiny_model_config())
    model = create_tiny_model(name, seed=5)
    people = make_identities(4, seed=0)
    images = {p.name: render_many(p, np.random.default_rng(i), 1) for i, p in enumerate(people)}
    plain = _BatchSampler(model, images, TRAIN_TEMPLATES, [], None, seed=3)
    augmented = [_BatchSampler(model, images, TRAIN_TEMPLATES, [], None, seed=3, augment=(0.3, 1.0)) for _ in range(2)]
    a, b = augmented[0]()[0], augmented[1]()[0]
    assert torch.equal(a, b)  # seeded
    clean = torch.stack([plain.pixels[n][0] for n in plain.names])
    assert a.shape == clean.shape
    # every image got its own crop: none is left as it was
    assert all(not torch.allclose(x, y)
               for x, y in zip(a, clean[[plain.names.index(n) for n in _names_of(augmented[0], 3)]]))
    weights = []
    for _ in range(2):
        m = create_tiny_model(name, seed=5)
        train_tiny_clip(m, images, TRAIN_TEMPLATES, steps=2, seed=1, augment=(0.3, 1.0))
        weights.append(m.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _names_of(sampler, seed: int) -> list[str]:
    """The identity order of a fresh sampler's first batch (same seed)."""
    order = np.random.default_rng([seed, 0x7A]).permutation(len(sampler.names))
    return [sampler.names[i] for i in order]


# --- the built lab ---------------------------------------------------------------------------


@pytest.mark.slow
def test_shards_follow_img2dataset_layout(lab: LabPaths) -> None:
    n_people = SMALL.n_identities + SMALL.n_not_in_pool
    assert [p.name for p in lab.shards] == [f"{i:05d}.tar" for i in range(SMALL.shards)]
    total, keys = 0, set()
    for shard_no, shard in enumerate(lab.shards):
        members = _tar_members(shard)
        assert all(m.mtime == 0 and m.isfile() for m in members)
        names = [m.name for m in members]
        assert len(names) % 3 == 0
        for i in range(0, len(names), 3):
            stems = {n.split(".")[0] for n in names[i : i + 3]}
            exts = sorted(n.split(".", 1)[1] for n in names[i : i + 3])
            assert len(stems) == 1 and exts == ["jpg", "json", "txt"]
            key = stems.pop()
            assert re.fullmatch(r"\d{9}", key) and key.startswith(f"{shard_no:05d}")
            keys.add(key)
        total += len(names) // 3
    assert total == len(keys) == n_people * SMALL.candidate_images
    images, names = _candidates(lab)
    assert {img.shape for img in images} == {(48, 48, 3)}
    assert sorted(set(names)) == sorted(_labels(lab))


@pytest.mark.slow
def test_shards_are_byte_identical_across_builds(lab: LabPaths, tmp_path: Path) -> None:
    again, _ = _write_shards(_cast(SMALL), SMALL, tmp_path)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in lab.shards]


@pytest.mark.slow
def test_labels_names_and_jobs_are_consistent(lab: LabPaths) -> None:
    labels = _labels(lab)
    assert sorted(n for n, m in labels.items() if m) == sorted(lab.members)
    assert sorted(n for n, m in labels.items() if not m) == sorted(lab.nonmembers)
    assert len(lab.members) == SMALL.n_identities // 2
    assert len(lab.nonmembers) == SMALL.n_identities // 2 + SMALL.n_not_in_pool
    pool = lab.names.read_text().splitlines()
    assert len(pool) == len(set(pool)) == SMALL.n_identities + SMALL.n_distractor_names
    assert set(lab.not_in_pool) and not set(lab.not_in_pool) & set(pool)
    assert set(labels) - set(lab.not_in_pool) <= set(pool)
    for job, weights, out in ((lab.job, "trained", "out/trained"), (lab.job_untrained, "untrained", "out/untrained")):
        spec = yaml.safe_load(job.read_text())
        assert spec == {
            "model": {"name": "model/tiny-clip.json", "pretrained": f"model/{weights}.pt", "precision": "fp32"},
            "data": {"shards": "data/cands/{00000..00003}.tar", "identity_field": "identity"},
            "names": "data/names.txt",
            "labels": "data/labels.csv",
            "attacks": {"idia": {"tau": 1, "top_k": 10, "templates": "default", "k": [1, 3, 5],
                                 "missing_names": "exclude"},
                        "encodermi": {"views": 8},
                        "partcrop": {"crops": 32, "scale": [0.08, 0.2]}, "mim": {"mask_ratios": [0.25, 0.5, 0.75]},
                        "caption": {}},
            "output": out,
        }
        assert (job.parent / spec["model"]["pretrained"]).is_file()


def _top1_accuracy(lab: LabPaths, weights: Path) -> tuple[float, float]:
    """Zero-shot top-1 accuracy on the held-out candidates, through plain open_clip APIs."""
    name = register_model_config(lab.model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(name)
    pool = lab.names.read_text().splitlines()
    images, truth = _candidates(lab)
    with torch.no_grad(), torch_threads(1):
        txt = model.encode_text(tokenizer([f"a photo of {n}." for n in pool]))
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(x)) for x in images]))
        top1 = (img / img.norm(dim=-1, keepdim=True) @ (txt / txt.norm(dim=-1, keepdim=True)).T).argmax(-1)
    hits = np.array([pool[i] == t for i, t in zip(top1.tolist(), truth)])
    is_member = np.array([t in set(lab.members) for t in truth])
    return float(hits[is_member].mean()), float(hits[~is_member].mean())


@pytest.mark.slow
def test_checkpoints_load_with_weights_only(lab: LabPaths) -> None:
    trained = torch.load(lab.trained, weights_only=True)
    untrained = torch.load(lab.untrained, weights_only=True)
    assert trained.keys() == untrained.keys()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)


@pytest.mark.slow
def test_trained_model_recognises_members_on_held_out_photos(lab: LabPaths) -> None:
    member_acc, nonmember_acc = _top1_accuracy(lab, lab.trained)
    assert member_acc >= 0.8
    assert nonmember_acc <= 0.1


@pytest.mark.slow
def test_untrained_control_is_near_chance(lab: LabPaths) -> None:
    member_acc, nonmember_acc = _top1_accuracy(lab, lab.untrained)
    assert member_acc <= 0.1 and nonmember_acc <= 0.1
