"""JPEG decode and resize on the model's device (``compute.decode: gpu``): batched nvJPEG
through ``torchvision.io.decode_jpeg(list, device="cuda")``, then the model's own eval
preprocessing (:class:`~.decode.Preprocess`: resize with antialiasing, centre crop or pad)
as tensor operations.

Only what the device path decodes like Pillow goes there (:func:`~.decode.device_eligible`): baseline
JPEGs in RGB/YCbCr or grayscale, without an EXIF rotation, within ``max_pixels``, that the
preprocessing shrinks (or keeps) — torch's bicubic *up*sampling uses another kernel than
Pillow's (measured: up to 9 levels apart), so images smaller than the model input go to
Pillow. CMYK,
progressive, rotated and non-JPEG images, and any file the device decoder rejects, take the
Pillow path (:func:`~.decode.decode_image`) per sample, so error codes stay the same.

Pixels differ slightly from the Pillow path (a float resize rounded once; on a GPU also
nvJPEG's own IDCT and chroma upsampling): tests/data/test_device_decode.py bounds the
difference — on a CPU decoder at most 2 levels, mean below 0.25 (measured: 1 and 0.18).
"""

from __future__ import annotations


import torch

from clipaudit.data.decode import Preprocess



def resize_on_device(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 3×H×W → uint8 3×S×S following ``pre`` (sizes and offsets as :meth:`Preprocess.apply`)."""
    return _resize_same_size(img.unsqueeze(0), pre)[0]


def _resize_same_size(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 N×3×H×W (one size) → uint8 N×3×S×S: one interpolation for the whole batch."""
    h, w = x.shape[-2:]
    nw, nh = pre.resized_size(w, h)
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(x.float(), size=(nh, nw), mode=pre.interpolation, antialias=True,
                                            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    s = pre.size
    if pre.resize_mode == "longest":
        fill = (pre.fill,) * 3 if isinstance(pre.fill, int) else tuple(pre.fill)
        canvas = torch.tensor(fill, dtype=torch.uint8, device=x.device).view(1, 3, 1, 1).expand(len(x), 3, s, s).clone()
        top, left = (s - nh) // 2, (s - nw) // 2
        canvas[:, :, top : top + nh, left : left + nw] = x
        return canvas
    left, top = round((nw - s) / 2), round((nh - s) / 2)
    return x[:, :, top : top + s, left : left + s]


def shrink_on_device(img: torch.Tensor, side: int, interpolation: str) -> torch.Tensor:
    """uint8 3×H×W with its longest side at most ``side`` (as :func:`~.decode.shrink_to`)."""
    return _shrink_same_size(img.unsqueeze(0), side, interpolation)[0]


def _shrink_same_size(x: torch.Tensor, side: int, interpolation: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    longest = max(w, h)
    if longest <= side:
        return x
    size = (max(1, round(h * side / longest)), max(1, round(w * side / longest)))
    x = torch.nn.functional.interpolate(x.float(), size=size, mode=interpolation, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _by_size(images: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Positions of the images of each H×W (web images come in a few common sizes)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(i)
    return groups


#: pixels resized in one call at most: a group of large same-sized photos (128 phone pictures of
#: 12 Mpx) goes in chunks, its float copy bounded to ≈ 3 × 4 bytes × this (0.8 GB)
RESIZE_PIXELS = 64 << 20


def _batched(images: list[torch.Tensor], op) -> list[torch.Tensor]:
    """``op`` (N×3×H×W → N×3×h×w) applied to each group of same-sized images at once (in chunks
    of at most :data:`RESIZE_PIXELS` pixels), in order."""
    out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
    for (h, w), idx in _by_size(images).items():
        step = max(1, RESIZE_PIXELS // (h * w))
        for lo in range(0, len(idx), step):
            chunk = idx[lo : lo + step]
            done = op(torch.stack([images[i] for i in chunk]))
            for j, i in enumerate(chunk):
                out[i] = done[j]
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors copied to (pinned) host memory, waiting once for all of them rather than
    once per tensor; CPU tensors as they are."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def decode_on_device(datas: list[bytes], pre: Preprocess, device: torch.device, source_side: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Decode a batch of eligible JPEGs on ``device`` and preprocess them: per file, the
    uint8 S×S×3 model input (on ``device``) and, with ``source_side``, the bounded original
    as uint8 h×w×3 on the CPU; None where the device decoder failed (the caller decodes that
    one with Pillow). Images of one size are resized in one call, and the originals reach the
    host with one wait, not one per image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batch: decode one by one to find it
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    ok = [i for i, d in enumerate(decoded) if d is not None]
    images = [decoded[i] for i in ok]
    inputs = _batched(images, lambda x: _resize_same_size(x, pre))
    sources: list[torch.Tensor | None] = [None] * len(images)
    if source_side is not None:
        shrunk = _batched(images, lambda x: _shrink_same_size(x, source_side, pre.interpolation))
        sources = _to_host([t.permute(1, 2, 0) for t in shrunk])  # type: ignore[assignment]
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(datas)
    for i, pixels, source in zip(ok, inputs, sources):
        out[i] = (pixels.permute(1, 2, 0), source)
    return out
