"""Ground truth and known non-members: the labels file and the controls file.

Both are CSVs with identity rows (``identity[,member]``) and/or image rows
(``shard,key[,member]``), read by one parser and matched to samples by one rule
(:func:`shard_file_name` + key for images, the normalised name for identities).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..data.samples import normalize_name

_TRUE = {"true", "1", "yes", "y", "t", "member"}
_FALSE = {"false", "0", "no", "n", "f", "nonmember", "non-member"}


class LabelsError(ValueError):
    """A labels or controls file cannot be read; the message names the file and line."""


def shard_file_name(shard: str) -> str:
    """The last path component of a shard path or URL (how labels and controls name shards)."""
    return re.split(r"[/\\]", shard)[-1]


#: the same rule in DuckDB SQL, for joins over a ``shard`` column
SHARD_FILE_NAME_SQL = "regexp_extract({col}, '[^/\\\\]+$')"

ImageKey = tuple[str, str]  # (shard file name, key)


@dataclass
class Labels:
    identities: dict[str, bool] = field(default_factory=dict)
    images: dict[ImageKey, bool] = field(default_factory=dict)


@dataclass
class Controls:
    """Known non-members: identities, and images as (shard file name, key)."""

    identities: set[str] = field(default_factory=set)
    images: set[ImageKey] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identities or self.images)

    def is_control(self, identity: str | None, shard: str, key: str | None) -> bool:
        return identity in self.identities or (shard_file_name(shard), key) in self.images


def _rows(path: Path, what: str, member_required: bool) -> Iterator[tuple[int, str | None, ImageKey | None, str | None]]:
    """(line, identity, image key, raw member value) per non-empty row of a labels/controls CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        has_units = {"identity"} <= cols or {"shard", "key"} <= cols
        if not has_units or (member_required and "member" not in cols):
            need = "identity,member and/or shard,key,member" if member_required else "identity and/or shard,key"
            raise LabelsError(f"{what}: {path} needs a header with {need}")
        for line_no, row in enumerate(reader, start=2):
            shard, key = (row.get("shard") or "").strip(), (row.get("key") or "").strip()
            ident = normalize_name(row.get("identity") or "")
            if shard and key:
                yield line_no, None, (shard_file_name(shard), key), row.get("member")
            elif ident:
                yield line_no, ident, None, row.get("member")


def _member(value: str | None, what: str, path: Path, line_no: int) -> bool:
    v = (value or "").strip().lower()
    if v not in _TRUE | _FALSE:
        raise LabelsError(f"{what}: {path} line {line_no}: member must be true/false, got {value!r}")
    return v in _TRUE


def read_labels(path: Path) -> Labels:
    """Identity rows (``identity,member``) and/or image rows (``shard,key,member``).

    Image rows match samples by the shard's file name and the key.
    """
    out = Labels()
    for line_no, ident, image, member in _rows(path, "labels", member_required=True):
        m = _member(member, "labels", path, line_no)
        if image is not None:
            out.images[image] = m
        else:
            out.identities[ident] = m  # type: ignore[index]
    return out


def read_controls(path: Path) -> Controls:
    """A CSV with ``identity`` and/or ``shard,key`` columns; a ``member`` column must say false."""
    out = Controls(sources=[str(path)])
    for line_no, ident, image, member in _rows(path, "calibration.controls", member_required=False):
        if member is not None and member.strip() and _member(member, "calibration.controls", path, line_no):
            raise LabelsError(f"calibration.controls: {path} line {line_no}: a control must be a non-member "
                              f"(member={member!r})")
        if image is not None:
            out.images.add(image)
        else:
            out.identities.add(ident)  # type: ignore[arg-type]
    return out


def control_set(path: Path | None, labels: Labels | None) -> Controls:
    """The controls file's rows plus the labelled non-members."""
    out = read_controls(path) if path is not None else Controls()
    if labels is not None:
        clash = sorted(n for n in out.identities if labels.identities.get(n))
        clash += sorted(f"{s}:{k}" for s, k in out.images if labels.images.get((s, k)))
        if clash:
            raise LabelsError(f"calibration.controls: {len(clash)} control(s) are labelled members in the labels "
                              f"file, e.g. {clash[0]!r}")
        out.identities |= {n for n, m in labels.identities.items() if not m}
        out.images |= {k for k, m in labels.images.items() if not m}
        out.sources.append("labels (non-members)")
    return out
