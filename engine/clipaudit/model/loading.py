"""Load the CLIP model under audit: OpenCLIP zoo name + tag, ``hf-hub:`` ids, or a local
model-config JSON plus a checkpoint — with precision and device handling.

Local checkpoints are read with ``torch.load(weights_only=True)`` or safetensors only, so a
checkpoint can never run code. OpenCLIP training checkpoints (``{"state_dict": …}`` with
``module.`` prefixes) are accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from clipaudit.core.errors import ClipauditError
from clipaudit.data.decode import Preprocess
from clipaudit.core.hashing import sha256_file
from clipaudit.data.checkpoints import checkpoint_problem

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT_EXTS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class ModelLoadError(ClipauditError, RuntimeError):
    """The model or its weights cannot be loaded; the message says why."""


@dataclass
class LoadedModel:
    """A ready-to-run CLIP: model in eval mode on ``device``, plus what feeding it needs.

    ``resize_mode``, ``interpolation`` and ``fill`` are the model's OpenCLIP eval preprocessing
    (see :attr:`preprocess`)."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    device: torch.device
    dtype: torch.dtype
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    checkpoint_sha256: str | None
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: int | tuple[int, int, int] = 0

    @property
    def preprocess(self) -> Preprocess:
        """How the decode step turns an image into this model's ``image_size``² uint8 input."""
        return Preprocess(self.image_size, self.resize_mode, self.interpolation, self.fill)

    def to_unit(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×3 → float N×3×H×W in [0, 1] on ``device``."""
        return pixels_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float N×3×S×S in [0, 1] → the model's input: ``(x - mean) / std``, float32 on ``device``."""
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x.to(self.device) - mean) / std

    @torch.inference_mode()
    def encode_unit(self, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Float N×3×S×S in [0, 1] (S = ``image_size``) → L2-normalised float32 embeddings."""
        out = []
        for i in range(0, len(x), chunk):
            xi = self.normalize(x[i : i + chunk]).to(self.dtype)
            out.append(torch.nn.functional.normalize(self.model.encode_image(xi).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @property
    def has_patch_tokens(self) -> bool:
        """True for OpenCLIP ViT towers whose patch tokens can be projected into the joint space."""
        v = getattr(self.model, "visual", None)
        return (all(hasattr(v, a) for a in ("_embeds", "transformer", "_pool"))
                and getattr(v, "attn_pool", None) is None and isinstance(getattr(v, "proj", None), torch.Tensor))

    @torch.inference_mode()
    def encode_unit_tokens(self, x: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`encode_unit`, plus the patch tokens projected into the joint space:
        (N×D, N×P×D), both L2-normalised float32. Only where :attr:`has_patch_tokens`."""
        if not self.has_patch_tokens:
            raise ValueError(f"{self.name}: the vision tower does not expose patch tokens")
        v = self.model.visual
        pooled_out, token_out = [], []
        for i in range(0, len(x), chunk):
            xi = self.normalize(x[i : i + chunk]).to(self.dtype)
            pooled, tokens = v._pool(v.transformer(v._embeds(xi)))
            if getattr(v, "final_ln_after_pool", False):  # e.g. CLIPA: ln_post was applied to the pool only
                tokens = v.ln_post(tokens)
            pooled_out.append(torch.nn.functional.normalize((pooled @ v.proj).float(), dim=-1))
            token_out.append(torch.nn.functional.normalize((tokens @ v.proj).float(), dim=-1))
        return torch.cat(pooled_out), torch.cat(token_out)

    def encode_images(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×3 (already at ``image_size``) → L2-normalised float32 embeddings."""
        return self.encode_unit(self.to_unit(pixels_uint8))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        """Strings → L2-normalised float32 embeddings (on ``device``)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            emb = self.model.encode_text(tokens).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1))
        if not out:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[-1]
        return int(self.encode_texts(["x"]).shape[-1])


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        log.warning("fp16 is not supported on CPU; running in fp32 instead")
        return torch.float32
    return _DTYPES[precision]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``; a pickle
    that holds anything but tensors is refused (it could run code), never loaded otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ModelLoadError(problem)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot read safetensors checkpoint {path}: {e}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — includes the refusal of pickled code
            # torch's own message suggests weights_only=False: the one thing never to do here
            refused = "Weights only load failed" in str(e) or "Unsupported global" in str(e)
            raise ModelLoadError(
                f"refused checkpoint {path}: it holds pickled objects other than tensors, which could run code "
                "when loaded; clipaudit loads only plain tensors (torch.load weights_only=True). Re-save the "
                "state_dict (or convert it to .safetensors) from a trusted environment" if refused else
                f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"checkpoint {path} is not a state_dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _register_config(name: str) -> str:
    """A path to a model-config JSON is registered with OpenCLIP under its file stem."""
    import open_clip

    if name.endswith(".json") or os.path.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"model config not found: {path}")
        open_clip.add_model_config(str(path))
        return path.stem
    return name


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init():
    """Silence OpenCLIP's "No pretrained weights loaded" (we load local checkpoints ourselves)."""
    f = _DropRandomInitNotice()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def _create(name: str, pretrained: str | None) -> torch.nn.Module:
    import open_clip

    is_hub = name.startswith("hf-hub:")
    if not is_hub and name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model {name!r}: not an OpenCLIP model name, hf-hub: id or model-config JSON "
            f"(see open_clip.list_models(); e.g. ViT-B-32)"
        )
    try:
        if is_hub:
            return open_clip.create_model(name)
        tag = pretrained if pretrained and not _is_local_checkpoint(pretrained) else None
        quiet = quiet_random_init() if tag is None and pretrained else contextlib.nullcontext()
        with quiet:
            return open_clip.create_model(name, pretrained=tag)
    except RuntimeError as e:
        raise ModelLoadError(f"cannot create model {name!r} (pretrained={pretrained!r}): {e}") from None
    except Exception as e:  # noqa: BLE001 — network/hub failures surface as many types
        hint = (" (no network? set HF_HUB_OFFLINE=0 or pass a local checkpoint)" if os.environ.get("HF_HUB_OFFLINE")
                else "")
        raise ModelLoadError(
            f"cannot load weights for {name!r} pretrained={pretrained!r}: {type(e).__name__}: {e}{hint}"
        ) from None


@dataclass(frozen=True)
class HubWeights:
    """Weights that come from the Hugging Face Hub: the repository, the files OpenCLIP tries
    (in its order), and the local cache's copy if there is one."""

    repo: str
    files: tuple[str, ...]
    cached: str | None

    def describe(self) -> str:
        return f"{self.repo} ({' or '.join(self.files)})"


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads from the Hugging Face Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_weights(name: str, pretrained: str | None) -> HubWeights | None:
    """Where the weights of ``name``/``pretrained`` come from when that is the Hugging Face Hub
    (an ``hf-hub:`` model, or an OpenCLIP tag hosted there), with the local cache's copy; None
    for local files, URLs and random initialisation. Reads no network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME

    try:  # the .safetensors names OpenCLIP tries first (a private helper: without it, the one file)
        from open_clip.pretrained import _get_safe_alternatives
    except ImportError:
        def _get_safe_alternatives(filename: str) -> list[str]:
            return []

    for value in (pretrained, name):  # load_model: an hf-hub: pretrained replaces the name
        if value and value.startswith("hf-hub:"):
            repo, filename = value[len("hf-hub:"):].rstrip("/"), HF_WEIGHTS_NAME
            break
    else:
        if not pretrained or _is_local_checkpoint(pretrained) or "://" in pretrained:
            return None
        cfg = open_clip.get_pretrained_cfg(name, pretrained) if name in open_clip.list_models() else {}
        if not cfg or "file" in cfg or not cfg.get("hf_hub"):
            return None
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
    files = (*_get_safe_alternatives(filename), filename)
    cached = None
    for f in files:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            cached = hit
            break
    return HubWeights(repo, files, cached)


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (one request), or None."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as e:
        return f"{endpoint} cannot be reached ({getattr(e, 'reason', e)})"
    return None


def check_hub_weights(name: str, pretrained: str | None) -> HubWeights | None:
    """Fail at once, in one line, when the weights must be downloaded and cannot be: not in
    the local cache while ``HF_HUB_OFFLINE`` is set or the hub does not answer (instead of the
    hub client's minute of retries). Returns what :func:`hub_weights` found."""
    w = hub_weights(name, pretrained)
    if w is None or w.cached is not None:
        return w
    what = f"the weights of {name} {pretrained or ''}".rstrip()
    fix = ("download them once on a machine with network (they land in the Hugging Face cache, "
           "HF_HOME), or point model.pretrained at a local checkpoint")
    if hf_offline():
        raise ModelLoadError(f"{what} are not in the local Hugging Face cache ({w.describe()}) and HF_HUB_OFFLINE is "
                             f"set, so they cannot be downloaded: {fix}")
    reason = _hub_unreachable()
    if reason is not None:
        raise ModelLoadError(f"{what} are not in the local Hugging Face cache ({w.describe()}) and {reason}: {fix}")
    return w


def _is_local_checkpoint(pretrained: str) -> bool:
    return pretrained.endswith(_CHECKPOINT_EXTS) or Path(pretrained).is_file()


def load_model(
    name: str, pretrained: str | None = None, precision: str | None = None, device: str = "auto", seed: int = 0
) -> LoadedModel:
    """The one factory: name + weights + precision + device → :class:`LoadedModel`."""
    import open_clip

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model_name = _register_config(name)
    if pretrained and pretrained.startswith("hf-hub:"):
        model_name, pretrained = pretrained, None
    torch.manual_seed(seed)  # random init (pretrained: null) is reproducible
    model = _create(model_name, pretrained)
    sha = None
    if pretrained and _is_local_checkpoint(pretrained):
        sd = read_state_dict(pretrained)
        missing, unexpected = _load_into(model, sd)
        if missing or unexpected:
            raise ModelLoadError(
                f"checkpoint {pretrained} does not match model {model_name!r}: "
                f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        sha = sha256_file(pretrained)
    model = model.to(device=dev, dtype=dtype).eval()
    pre, mean, std = _preprocessing(model, model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    return LoadedModel(model, tokenizer, model_name, dev, dtype, pre.size, mean, std, sha,  # type: ignore[arg-type]
                       pre.resize_mode, pre.interpolation, pre.fill)


def _preprocessing(model: torch.nn.Module, name: str) -> tuple[Preprocess, tuple[float, ...], tuple[float, ...]]:
    """The eval preprocessing OpenCLIP attached to ``model`` (from its pretrained tag or hub
    config; defaults otherwise, as ``open_clip.image_transform``'s): resize, mean, std."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model) or {})
    size = getattr(model.visual, "image_size", cfg.get("size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation == "random":  # a training-time setting; OpenCLIP's eval transform uses bicubic
        interpolation = "bicubic"
    fill = cfg.get("fill_color") or 0
    fill = int(fill) if isinstance(fill, (int, float)) else tuple(int(v) for v in fill)
    try:
        return Preprocess(size, cfg.get("resize_mode") or "shortest", interpolation, fill), mean, std
    except ValueError as e:
        raise ModelLoadError(f"{name}: unsupported preprocessing: {e}") from None


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    bad_shapes = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        k = bad_shapes[0]
        raise ModelLoadError(
            f"checkpoint tensor {k!r} has shape {tuple(sd[k].shape)}, model expects {tuple(own[k].shape)} "
            f"({len(bad_shapes)} mismatched)"
        )
    result = model.load_state_dict(sd, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
