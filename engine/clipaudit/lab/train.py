"""Train a tiny OpenCLIP model in-process on the lab's member identities.

Each contrastive batch holds one image and one caption per identity, so no two captions in
a batch are equal. Text-only captions of names that never appear with an image are added
as extra columns of the image→text loss, so the model learns to score *unseen* names low
rather than favouring whatever name it was trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from clipaudit.attacks.augment import crop_resize, random_resized_boxes
from clipaudit.model.loading import quiet_random_init

Tokenizer = Callable[[list[str]], torch.Tensor]

#: Caption templates used for training (the IDIA audit uses its own, larger set).
TRAIN_TEMPLATES: list[str] = [
    "a photo of {}.",
    "{} smiling at the camera.",
    "a picture showing {}.",
    "portrait of {}.",
    "{} in a snapshot.",
    "an image of {} outdoors.",
    "this is {}.",
    "a close-up of {}.",
]

LR = 2e-3
WEIGHT_DECAY = 0.05
NEGATIVES_PER_IMAGE = 2  # text-only negative captions per image in a batch


def tiny_model_config(
    image_size: int = 48,
    embed_dim: int = 64,
    vision_layers: int = 3,
    vision_width: int = 64,
    patch_size: int = 8,
    head_width: int = 32,
    context_length: int = 20,
    text_width: int = 64,
    text_heads: int = 4,
    text_layers: int = 3,
) -> dict:
    """An OpenCLIP model config (the JSON format of ``open_clip/model_configs``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision_layers,
            "width": vision_width,
            "patch_size": patch_size,
            "head_width": head_width,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }


def write_model_config(path: Path, config: dict) -> str:
    """Write ``config`` as JSON, register it with open_clip and return the model name (stem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return register_model_config(path)


def register_model_config(path: Path) -> str:
    """Make open_clip aware of a model-config JSON; returns its model name."""
    open_clip.add_model_config(Path(path))
    return Path(path).stem


def create_tiny_model(model_name: str, seed: int) -> torch.nn.Module:
    """A freshly initialised model of a registered config; the init depends only on ``seed``."""
    with torch.random.fork_rng(devices=[]), quiet_random_init():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None)
    return model.eval()


def image_batch(model: torch.nn.Module, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 N×H×W×3 at the model's size → normalised float N×3×H×W (open_clip eval preprocessing)."""
    x = torch.from_numpy(np.ascontiguousarray(images if isinstance(images, np.ndarray) else np.stack(images)))
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if x.ndim != 4 or x.shape[-1] != 3 or tuple(x.shape[1:3]) != tuple(size):
        raise ValueError(f"expected N×{size[0]}×{size[1]}×3 uint8 images, got {tuple(x.shape)}")
    mean = torch.tensor(model.visual.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_at(step: int, steps: int) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6, fused=True)


def _contrastive_loss(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP loss; ``tokens`` rows beyond the image count are text-only negatives."""
    n = pixels.shape[0]
    img = F.normalize(model.encode_image(pixels), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    scale = model.logit_scale.exp()
    labels = torch.arange(n, device=pixels.device)
    loss_i2t = F.cross_entropy(scale * img @ txt.T, labels)
    loss_t2i = F.cross_entropy(scale * txt[:n] @ img.T, labels)
    return 0.5 * (loss_i2t + loss_t2i)


class _BatchSampler:
    """Draws (images, captions) batches: one image and one caption per chosen identity."""

    def __init__(
        self,
        model: torch.nn.Module,
        images_by_identity: dict[str, list[np.ndarray]],
        templates: Sequence[str],
        negative_names: Sequence[str],
        batch_size: int | None,
        seed: int,
        augment: tuple[float, float] | None = None,
    ) -> None:
        self.names = list(images_by_identity)
        self.augment = augment
        self.pixels = {n: image_batch(model, imgs) for n, imgs in images_by_identity.items()}
        self.templates = list(templates)
        self.negatives = list(negative_names)
        self.batch_size = min(batch_size or len(self.names), len(self.names))
        self.rng = np.random.default_rng([seed, 0x7A])

    def _caption(self, name: str) -> str:
        return self.templates[int(self.rng.integers(len(self.templates)))].format(name)

    def _augmented(self, pixels: torch.Tensor) -> torch.Tensor:
        """One random resized crop (area fraction in ``augment``) and a coin-flip mirror per image."""
        size = pixels.shape[-1]
        boxes = [random_resized_boxes(self.rng, 1, size, self.augment) for _ in range(len(pixels))]
        out = crop_resize(pixels, boxes, size)
        flip = torch.from_numpy(self.rng.random(len(pixels)) < 0.5).view(-1, 1, 1, 1)
        return torch.where(flip, out.flip(-1), out)

    def __call__(self) -> tuple[torch.Tensor, list[str]]:
        chosen = self.rng.permutation(len(self.names))[: self.batch_size]
        names = [self.names[i] for i in chosen]
        pixels = torch.stack([self.pixels[n][int(self.rng.integers(len(self.pixels[n])))] for n in names])
        if self.augment is not None:
            pixels = self._augmented(pixels)
        captions = [self._caption(n) for n in names]
        if self.negatives:
            k = min(len(self.negatives), NEGATIVES_PER_IMAGE * self.batch_size)
            captions += [self._caption(self.negatives[i])
                         for i in self.rng.choice(len(self.negatives), k, replace=False)]
        return pixels, captions


def train_tiny_clip(
    model: torch.nn.Module,
    images_by_identity: dict[str, list[np.ndarray]],
    templates: Sequence[str],
    steps: int = 300,
    seed: int = 0,
    negative_names: Sequence[str] = (),
    batch_size: int | None = None,
    tokenizer: Tokenizer | None = None,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = 1,
    augment: tuple[float, float] | None = None,
) -> None:
    """Train ``model`` in place with AdamW (warm-up + cosine), deterministically.

    ``images_by_identity`` maps each name to uint8 images at the model's size. Each step
    draws ``batch_size`` identities (default: all), one image and one caption each, plus up
    to ``NEGATIVES_PER_IMAGE`` text-only captions of ``negative_names`` per image. ``tokenizer``
    defaults to open_clip's CLIP tokenizer at the model's context length (what
    ``open_clip.get_tokenizer`` returns for a plain model config). ``num_threads`` is torch's
    intra-op thread count while training: the default 1 gives the same weights on any machine
    and stays fast on a shared CPU (a tiny model gains little from more threads, and busy
    cores can slow a multi-threaded step by orders of magnitude); None keeps torch's setting.
    ``augment`` (area range, e.g. (0.5, 1.0)) trains on a random resized crop + mirror of each
    image, as contrastive training pipelines do; None shows the photos as they are.
    """
    if len(images_by_identity) < 2:
        raise ValueError("need at least two identities for a contrastive batch")
    tokenizer = tokenizer or open_clip.SimpleTokenizer(context_length=model.context_length)
    sampler = _BatchSampler(model, images_by_identity, templates, negative_names, batch_size, seed, augment)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch_threads(num_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            _train_loop(model, sampler, tokenizer, steps, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        model.eval()


def _train_loop(
    model: torch.nn.Module, sampler: _BatchSampler, tokenizer: Tokenizer, steps: int, log: Callable[[str], None] | None
) -> None:
    model.train()
    device = next(model.parameters()).device
    opt = _optimizer(model)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps)
        pixels, captions = sampler()
        loss = _contrastive_loss(model, pixels.to(device), tokenizer(captions).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}  loss {loss.item():.3f}")


@torch.no_grad()
def zero_shot_top1(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    images: np.ndarray | Sequence[np.ndarray],
    names: Sequence[str],
    template: str = "a photo of {}.",
) -> np.ndarray:
    """Index into ``names`` of each image's top-1 zero-shot name."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [template.format(n) for n in names]
    txt = torch.cat([model.encode_text(tokenizer(prompts[i : i + 512]).to(device))
                     for i in range(0, len(prompts), 512)])
    img = model.encode_image(image_batch(model, images).to(device))
    sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return sims.argmax(dim=-1).cpu().numpy()
