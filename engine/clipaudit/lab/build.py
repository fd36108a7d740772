"""Build the canary lab: a tiny CLIP trained on known members, plus audit inputs with ground truth.

Layout under ``out_dir``::

    model/tiny-clip.json  model/trained.pt  model/untrained.pt
    data/cands/00000.tar …  data/names.txt  data/labels.csv
    job.yaml  job-untrained.yaml

Candidate shards hold HELD-OUT photos (fresh renders, never trained on) of every identity,
in img2dataset's WebDataset layout. Everything is deterministic given ``LabConfig.seed``.

Run as ``python -m clipaudit.lab.build OUT_DIR``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from clipaudit.lab.identities import Identity, make_identities, make_names, render_many
from clipaudit.lab.train import (
    TRAIN_TEMPLATES, create_tiny_model, tiny_model_config, torch_threads, train_tiny_clip, write_model_config,
    zero_shot_top1
)

MODEL_NAME = "tiny-clip"
JPEG_QUALITY = 95
CAPTIONS: tuple[str, ...] = (
    "{} at a park",
    "{} on the red carpet",
    "{} during an interview",
    "{} arriving at the airport",
    "portrait of {}",
    "{} at a charity gala",
    "{} walking downtown",
    "{} speaking at a conference",
    "{} with friends at dinner",
    "photo of {} backstage",
)
#: captions of another source (``nonmember_captions="shifted"``): archive-style, with dates
SHIFTED_CAPTIONS: tuple[str, ...] = (
    "archive photo: {}, 1998",
    "{} (file image, 2003)",
    "scanned print of {}, circa 1987",
    "{} - press archive 1995",
    "library collection: {} in 2001",
)


@dataclass(frozen=True)
class LabConfig:
    """Sizes and seed of a lab build."""

    n_identities: int = 40  # half members, half non-members
    train_images: int = 6  # per member
    candidate_images: int = 6  # per identity, held out
    n_distractor_names: int = 400
    n_not_in_pool: int = 2  # extra non-members whose names are left out of names.txt
    n_negative_names: int = 400  # text-only negatives for training (in no other list)
    shards: int = 4
    image_size: int = 48
    steps: int = 300
    seed: int = 0
    include_train_images: bool = False  # also put members' training photos in the candidate set
    nonmember_style: str = "default"  # "shifted": non-members shot with another camera style
    nonmember_captions: str = "default"  # "shifted": non-members' captions from another source (dated archive)
    train_augment: tuple[float, float] | None = None  # crop-area range of training augmentation
    partcrop_scale: tuple[float, float] = (0.08, 0.2)  # crop-area range of the jobs' PartCrop attack


@dataclass
class LabPaths:
    """Where a built lab's files are, and its ground truth."""

    root: Path
    model_config: Path
    trained: Path
    untrained: Path
    shards: list[Path]
    names: Path
    labels: Path
    job: Path
    job_untrained: Path
    members: list[str] = field(default_factory=list)
    nonmembers: list[str] = field(default_factory=list)
    not_in_pool: list[str] = field(default_factory=list)


@dataclass
class _Cast:
    """Who is who in a lab."""

    members: list[Identity]
    nonmembers: list[Identity]
    not_in_pool: list[Identity]
    distractors: list[str]
    negatives: list[str]

    @property
    def everyone(self) -> list[Identity]:
        return self.members + self.nonmembers + self.not_in_pool


def _hard_negatives(people: list[Identity], cfg: LabConfig, exclude: set[str]) -> list[str]:
    """Training-only negative names: half random, half sharing a first or last name with an identity.

    The look-alike names teach the text tower that a *whole* name, not one part, picks a person.
    """
    rng = np.random.default_rng([cfg.seed, 0x4E6])
    random_names = make_names(cfg.n_negative_names - cfg.n_negative_names // 2, cfg.seed + 15485, exclude)
    taken, mixes = exclude | set(random_names), []
    for other in make_names(8 * cfg.n_negative_names, cfg.seed + 32452, exclude):
        if len(mixes) == cfg.n_negative_names // 2:
            break
        first, last = rng.choice(people).name.split(" ", 1)
        other_first, other_last = other.split(" ", 1)
        mix = f"{first} {other_last}" if rng.random() < 0.5 else f"{other_first} {last}"
        if mix not in taken:
            taken.add(mix)
            mixes.append(mix)
    return random_names + mixes


def _cast(cfg: LabConfig) -> _Cast:
    if cfg.n_identities < 4 or cfg.n_identities % 2:
        raise ValueError("n_identities must be an even number ≥ 4")
    people = make_identities(cfg.n_identities + cfg.n_not_in_pool, cfg.seed)
    order = np.random.default_rng([cfg.seed, 0xB1]).permutation(cfg.n_identities)
    half = cfg.n_identities // 2
    taken = {p.name for p in people}
    distractors = make_names(cfg.n_distractor_names, cfg.seed + 7919, taken)
    negatives = _hard_negatives(people, cfg, taken | set(distractors))
    return _Cast(
        members=[people[i] for i in sorted(order[:half])],
        nonmembers=[people[i] for i in sorted(order[half:])],
        not_in_pool=people[cfg.n_identities :],
        distractors=distractors,
        negatives=negatives,
    )


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _photos(person: Identity, cfg: LabConfig, stream: int, n: int, style: str = "default") -> list[bytes]:
    """``n`` JPEG photos of ``person`` from random stream ``stream`` (1 = train, 2 = held out)."""
    rng = np.random.default_rng([cfg.seed, stream, *person.name.encode()])
    return [_jpeg(img) for img in render_many(person, rng, n, cfg.image_size, style=style)]  # type: ignore[arg-type]


def _candidates(cast: _Cast, cfg: LabConfig) -> list[tuple[str, bytes, bool]]:
    """(name, jpeg, used in training) for every candidate photo."""
    out = []
    for p in cast.everyone:
        style = "default" if p in cast.members else cfg.nonmember_style
        out += [(p.name, j, False) for j in _photos(p, cfg, 2, cfg.candidate_images, style)]
    if cfg.include_train_images:
        out += [(p.name, j, True) for p in cast.members for j in _photos(p, cfg, 1, cfg.train_images)]
    return out


def _tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed ustar archive of ``files`` with fixed metadata (byte-for-byte reproducible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample_files(key: str, name: str, jpeg: bytes, caption: str, size: int) -> list[tuple[str, bytes]]:
    meta = {
        "key": key,
        "identity": name,
        "url": None,
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": size,
        "height": size,
        "original_width": size,
        "original_height": size,
    }
    return [
        (f"{key}.jpg", jpeg),
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.txt", caption.encode()),
    ]


def _write_shards(cast: _Cast, cfg: LabConfig, folder: Path) -> tuple[list[Path], list[tuple[str, str, bool]]]:
    """Candidate photos shuffled over ``cfg.shards`` img2dataset-style tars.

    Returns the shard paths and (shard file name, key, used in training) per photo.
    """
    rng = np.random.default_rng([cfg.seed, 3])
    samples = _candidates(cast, cfg)
    order = rng.permutation(len(samples))
    folder.mkdir(parents=True, exist_ok=True)
    paths, image_rows = [], []
    members = {p.name for p in cast.members}
    for shard, chunk in enumerate(np.array_split(order, cfg.shards)):
        files = []
        for i, idx in enumerate(chunk):
            name, jpeg, trained = samples[idx]
            family = SHIFTED_CAPTIONS if cfg.nonmember_captions == "shifted" and name not in members else CAPTIONS
            caption = family[int(rng.integers(len(family)))].format(name)
            key = f"{shard:05d}{i:04d}"
            files += _sample_files(key, name, jpeg, caption, cfg.image_size)
            image_rows.append((f"{shard:05d}.tar", key, trained))
        path = folder / f"{shard:05d}.tar"
        path.write_bytes(_tar_bytes(files))
        paths.append(path)
    return paths, image_rows


def _write_names_and_labels(cast: _Cast, cfg: LabConfig, names: Path, labels: Path,
                            image_rows: list[tuple[str, str, bool]] = ()) -> None:
    """The name pool, and labels: identity rows, plus image rows when training photos are candidates."""
    pool = [p.name for p in cast.members + cast.nonmembers] + cast.distractors
    pool = [pool[i] for i in np.random.default_rng([cfg.seed, 4]).permutation(len(pool))]
    names.write_text("".join(f"{n}\n" for n in pool), encoding="utf-8")
    member_names = {p.name for p in cast.members}
    people = sorted(p.name for p in cast.everyone)
    if not cfg.include_train_images:
        rows = [f"{n},{str(n in member_names).lower()}\n" for n in people]
        labels.write_text("identity,member\n" + "".join(rows), encoding="utf-8")
        return
    rows = [f"{n},,,{str(n in member_names).lower()}\n" for n in people]
    rows += [f",{shard},{key},{str(t).lower()}\n" for shard, key, t in sorted(image_rows)]
    labels.write_text("identity,shard,key,member\n" + "".join(rows), encoding="utf-8")


def _job_yaml(pretrained: str, output: str, shards: int, partcrop_scale: tuple[float, float] = (0.08, 0.2)) -> str:
    last = f"{shards - 1:05d}"
    shard_spec = "data/cands/00000.tar" if shards == 1 else f"data/cands/{{00000..{last}}}.tar"
    return (
        "model:\n"
        "  name: model/tiny-clip.json\n"
        f"  pretrained: {pretrained}\n"
        "  precision: fp32\n"
        "data:\n"
        f"  shards: {shard_spec}\n"
        "  identity_field: identity\n"
        "names: data/names.txt\n"
        "labels: data/labels.csv\n"
        "attacks:  # view/crop counts sized for a 2-core CPU\n"
        "  # some non-members' names are deliberately not in the pool: IDIA leaves them out, with a note\n"
        "  # the sweep stops at 5 images: the non-members have 6\n"
        "  idia: {tau: 1, top_k: 10, templates: default, k: [1, 3, 5], missing_names: exclude}\n"
        "  encodermi: {views: 8}\n"
        f"  partcrop: {{crops: 32, scale: [{partcrop_scale[0]}, {partcrop_scale[1]}]}}\n"
        "  mim: {mask_ratios: [0.25, 0.5, 0.75]}\n"
        "  caption: {}\n"
        f"output: {output}\n"
    )


def _control_model(cfg: LabConfig, config_path: Path) -> torch.nn.Module:
    """The seeded random init: the untrained control, and the start of the trained model."""
    return create_tiny_model(write_model_config(config_path, tiny_model_config(image_size=cfg.image_size)), cfg.seed)


def _trained_model(untrained: torch.nn.Module, cast: _Cast, cfg: LabConfig, log: Callable[[str], None]
                   ) -> torch.nn.Module:
    """A copy of the control trained on the members."""
    trained = copy.deepcopy(untrained)
    images = {p.name: [_decode(j) for j in _photos(p, cfg, 1, cfg.train_images)] for p in cast.members}
    train_tiny_clip(
        trained, images, TRAIN_TEMPLATES, steps=cfg.steps, seed=cfg.seed,
        negative_names=cast.negatives, tokenizer=open_clip.get_tokenizer(MODEL_NAME), log=log,
        augment=cfg.train_augment,
    )
    return trained


def _sanity_check(model: torch.nn.Module, cast: _Cast, cfg: LabConfig, names_path: Path) -> tuple[float, float]:
    """Zero-shot top-1 accuracy ("a photo of {}.") on held-out photos: (members, non-members)."""
    pool = names_path.read_text(encoding="utf-8").splitlines()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    accs = []
    for group in (cast.members, cast.nonmembers + cast.not_in_pool):
        images = [_decode(j) for p in group for j in _photos(p, cfg, 2, cfg.candidate_images)]
        truth = [p.name for p in group for _ in range(cfg.candidate_images)]
        top1 = zero_shot_top1(model, tokenizer, images, pool)
        accs.append(float(np.mean([pool[i] == t for i, t in zip(top1, truth)])))
    return accs[0], accs[1]


def build_lab(out_dir: Path, cfg: LabConfig = LabConfig(), log: Callable[[str], None] = print,
              on_control: Callable[[LabPaths], None] | None = None) -> LabPaths:
    """Build the whole lab under ``out_dir`` and return where everything is. ``on_control`` is
    called once the untrained control's weights, data and job spec are written, before the
    training (which runs on one thread: ``clipaudit demo`` audits the control meanwhile)."""
    root = Path(out_dir)
    paths = LabPaths(
        root=root, model_config=root / "model" / f"{MODEL_NAME}.json",
        trained=root / "model" / "trained.pt", untrained=root / "model" / "untrained.pt",
        shards=[], names=root / "data" / "names.txt", labels=root / "data" / "labels.csv",
        job=root / "job.yaml", job_untrained=root / "job-untrained.yaml",
    )
    t0 = time.perf_counter()

    def stamp(msg: str) -> None:
        log(f"[lab {time.perf_counter() - t0:5.1f}s] {msg}")

    cast = _cast(cfg)
    paths.members = [p.name for p in cast.members]
    paths.nonmembers = [p.name for p in cast.nonmembers + cast.not_in_pool]
    paths.not_in_pool = [p.name for p in cast.not_in_pool]
    stamp(f"cast: {len(cast.members)} members, {len(paths.nonmembers)} non-members "
          f"({len(cast.not_in_pool)} not in pool), {len(cast.distractors)} distractor names")
    paths.shards, image_rows = _write_shards(cast, cfg, root / "data" / "cands")
    stamp(f"wrote {len(paths.shards)} candidate shards ({len(image_rows)} photos, "
          f"{sum(t for _, _, t in image_rows)} of them training photos)")
    _write_names_and_labels(cast, cfg, paths.names, paths.labels, image_rows)
    stamp(f"wrote {paths.names.name} and {paths.labels.name}")
    untrained = _control_model(cfg, paths.model_config)
    torch.save(untrained.state_dict(), paths.untrained)
    paths.job_untrained.write_text(_job_yaml("model/untrained.pt", "out/untrained", cfg.shards, cfg.partcrop_scale))
    stamp(f"saved {paths.untrained.name}")
    if on_control is not None:
        on_control(paths)
    stamp(f"training {MODEL_NAME} for {cfg.steps} steps on {len(cast.members)} members")
    trained = _trained_model(untrained, cast, cfg, log)
    torch.save(trained.state_dict(), paths.trained)
    paths.job.write_text(_job_yaml("model/trained.pt", "out/trained", cfg.shards, cfg.partcrop_scale))
    stamp(f"saved {paths.trained.name}")
    for label, model in (("trained", trained), ("untrained", untrained)):
        with torch_threads(1):
            member_acc, nonmember_acc = _sanity_check(model, cast, cfg, paths.names)
        stamp(f"{label}: held-out top-1 accuracy members {member_acc:.2f}, non-members {nonmember_acc:.2f}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the clipaudit canary lab.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--identities", type=int, default=LabConfig.n_identities)
    parser.add_argument("--steps", type=int, default=LabConfig.steps)
    parser.add_argument("--seed", type=int, default=LabConfig.seed)
    args = parser.parse_args(argv)
    build_lab(args.out_dir, LabConfig(n_identities=args.identities, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
