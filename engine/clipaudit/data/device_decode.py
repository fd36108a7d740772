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
    _, h, w = img.shape
    nw, nh = pre.resized_size(w, h)
    x = img.unsqueeze(0).float()
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=pre.interpolation, antialias=True,
                                            align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)[0]
    s = pre.size
    if pre.resize_mode == "longest":
        fill = (pre.fill,) * 3 if isinstance(pre.fill, int) else tuple(pre.fill)
        canvas = torch.tensor(fill, dtype=torch.uint8, device=x.device).view(3, 1, 1).expand(3, s, s).clone()
        top, left = (s - nh) // 2, (s - nw) // 2
        canvas[:, top : top + nh, left : left + nw] = x
        return canvas
    left, top = round((nw - s) / 2), round((nh - s) / 2)
    return x[:, top : top + s, left : left + s]


def shrink_on_device(img: torch.Tensor, side: int, interpolation: str) -> torch.Tensor:
    """uint8 3×H×W with its longest side at most ``side`` (as :func:`~.decode.shrink_to`)."""
    _, h, w = img.shape
    longest = max(w, h)
    if longest <= side:
        return img
    size = (max(1, round(h * side / longest)), max(1, round(w * side / longest)))
    x = torch.nn.functional.interpolate(img.unsqueeze(0).float(), size=size, mode=interpolation, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_on_device(datas: list[bytes], pre: Preprocess, device: torch.device, source_side: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Decode a batch of eligible JPEGs on ``device`` and preprocess them: per file, the
    uint8 S×S×3 model input (on ``device``) and, with ``source_side``, the bounded original
    as uint8 h×w×3 on the CPU; None where the device decoder failed (the caller decodes that
    one with Pillow)."""
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
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
    for d in decoded:
        if d is None:
            out.append(None)
            continue
        source = None if source_side is None else shrink_on_device(d, source_side, pre.interpolation)
        out.append((resize_on_device(d, pre).permute(1, 2, 0),
                    None if source is None else source.permute(1, 2, 0).cpu()))
    return out
