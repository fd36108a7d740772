"""Model checkpoint files, sniffed from their first bytes before anything loads them."""

from __future__ import annotations

from pathlib import Path


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a file cannot be a checkpoint clipaudit loads, from its first bytes (None: it may be).

    Accepted: safetensors (an 8-byte header length, then a JSON header), and PyTorch's formats
    for ``torch.load`` — a zip archive (``torch.save`` since 1.6) or a pickle stream.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if str(path).endswith(".safetensors"):
        ok = len(head) == 9 and head[8:9] == b"{"
    else:
        ok = head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    if ok:
        return None
    kind = "an empty file" if not head else f"a file starting with {head[:8]!r}"
    return (f"{path} is not a loadable checkpoint ({kind}): expected a PyTorch state_dict saved with torch.save "
            "(.pt/.pth/.bin) or a .safetensors file")
