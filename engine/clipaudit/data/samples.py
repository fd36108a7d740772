"""Turn a raw tar sample into a model-ready :class:`Sample` or an error sample."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

import numpy as np

from clipaudit.data.decode import DecodeFailure, Preprocess, decode_image, device_eligible
from clipaudit.data.tar_reader import IMAGE_EXTS, RawSample

#: Every value the ``error`` column can take, with what it means.
ERROR_CODES = {
    "missing_image": "the sample has no .jpg/.jpeg/.png/.webp file",
    "missing_identity": "no .json, or the identity field is absent or empty",
    "bad_metadata": "the .json file is not valid UTF-8 JSON object",
    "decode_error": "the image bytes cannot be decoded (corrupt, truncated, zero bytes)",
    "too_many_pixels": "the image header declares more pixels than data.max_image_pixels",
    "duplicate_key": "the key already appeared earlier in the same shard",
    "truncated_tar": "the tar ends in the middle of this sample",
    "not_a_tar": "the shard file is not a readable tar archive",
    "empty_shard": "the shard file has zero bytes",
}

#: Every value the ``warning`` column can take (the sample is still scored).
WARNING_CODES = {
    "caption_not_utf8": "the .txt caption is not valid UTF-8; it was decoded with U+FFFD replacements",
}


def normalize_name(name: str) -> str:
    """Names match after Unicode NFC and whitespace folding (case is kept)."""
    return " ".join(unicodedata.normalize("NFC", name).split())


@dataclass
class Sample:
    """One input sample, ready for the model (``pixels``) or failed (``error``)."""

    shard: str
    key: str | None
    position: int
    identity: str | None = None
    caption: str | None = None
    pixels: np.ndarray | None = None
    source: np.ndarray | None = None  # the bounded original, for attacks that cut views from it
    jpeg: bytes | None = None  # a JPEG left for the device decoder (pixels come later)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    detail: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _read_identity(raw: RawSample, field: str) -> tuple[str | None, str | None, str | None]:
    """Return (identity, error, detail)."""
    blob = raw.files.get("json")
    if blob is None:
        return None, "missing_identity", "no .json file"
    try:
        meta = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, "bad_metadata", f"invalid .json: {e}"
    if not isinstance(meta, dict):
        return None, "bad_metadata", ".json is not an object"
    value = meta.get(field)
    if not isinstance(value, str) or not normalize_name(value):
        return None, "missing_identity", f"identity field {field!r} absent or empty"
    return normalize_name(value), None, None


def _read_caption(raw: RawSample) -> tuple[str | None, str | None]:
    """Return (caption, warning); a caption that is not UTF-8 is kept with replacement characters."""
    blob = raw.files.get("txt")
    if blob is None:
        return None, None
    try:
        text, warning = blob.decode("utf-8"), None
    except UnicodeDecodeError:
        text, warning = blob.decode("utf-8", errors="replace"), "caption_not_utf8"
    return text.strip() or None, warning


def prepare_sample(raw: RawSample, shard: str, identity_field: str, size: int | Preprocess, max_pixels: int,
                   source_side: int | None = None, defer_jpegs: bool = False) -> Sample:
    """Read metadata and decode the image (``size``: the model's :class:`Preprocess`; with
    ``source_side``, keep the bounded original too); every failure becomes an error sample.
    With ``defer_jpegs``, a JPEG the device decoder can read is left undecoded in
    ``Sample.jpeg`` (see :mod:`.device_decode`)."""
    s = Sample(shard=shard, key=raw.key, position=raw.position)
    if raw.files:
        s.identity, err, detail = _read_identity(raw, identity_field)
        s.caption, s.warning = _read_caption(raw)
    else:
        err = detail = None
    if raw.error:
        s.error, s.detail = raw.error, raw.detail
        return s
    if err:
        s.error, s.detail = err, detail
        return s
    image_ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
    if image_ext is None:
        s.error, s.detail = "missing_image", f"files present: {sorted(raw.files)}"
        return s
    if defer_jpegs:
        dims = device_eligible(raw.files[image_ext], max_pixels,
                               size if isinstance(size, Preprocess) else Preprocess(size))
        if dims is not None:
            s.jpeg, (s.width, s.height) = raw.files[image_ext], dims
            return s
    try:
        img = decode_image(raw.files[image_ext], size, max_pixels, source_side)
    except DecodeFailure as e:
        s.error, s.detail = e.code, e.detail
        return s
    s.pixels, s.width, s.height, s.source = img.pixels, img.width, img.height, img.source
    return s


def decode_with_pillow(s: Sample, size: int | Preprocess, max_pixels: int, source_side: int | None = None) -> None:
    """Decode a deferred JPEG (``s.jpeg``) the Pillow way, in place: pixels, or an error."""
    assert s.jpeg is not None
    data, s.jpeg = s.jpeg, None
    try:
        img = decode_image(data, size, max_pixels, source_side)
    except DecodeFailure as e:
        s.error, s.detail = e.code, e.detail
        s.width = s.height = None  # as an image that failed on the Pillow path from the start
        return
    s.pixels, s.width, s.height, s.source = img.pixels, img.width, img.height, img.source
