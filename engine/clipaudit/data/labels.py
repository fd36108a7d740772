"""Ground truth and known non-members: the labels file and the controls file.

Both are CSVs with identity rows (``identity[,member]``) and/or image rows
(``shard,key[,member]``), read by one parser. Identities match by their normalised name.
Image rows match by shard and key, the shard named unambiguously (:class:`ShardMatcher`): as
a path (relative paths resolve against the CSV's folder) or URL of one of the audited
shards, or by a bare file name only where exactly one audited shard has it — two
img2dataset runs both write ``00000.tar``, and their images must never be confused.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from clipaudit.core.errors import ClipauditError
from clipaudit.data.samples import normalize_name
from clipaudit.data.urls import is_url
from clipaudit.data.storage import describe_error, open_url

_TRUE = {"true", "1", "yes", "y", "t", "member"}
_FALSE = {"false", "0", "no", "n", "f", "nonmember", "non-member"}


class LabelsError(ClipauditError, ValueError):
    """A labels or controls file cannot be read; the message names the file and line."""


def shard_file_name(shard: str) -> str:
    """The last path component of a shard path or URL."""
    return re.split(r"[/\\]", shard)[-1]


ImageKey = tuple[str, str]  # (shard, key): as written in the file, then the audited shard once matched


def _normalise(shard: str) -> str:
    return shard if is_url(shard) else os.path.normpath(shard.removeprefix("file://"))


class ShardMatcher:
    """Maps the shard named in a labels/controls row to one of the audited shards (as the
    ``shard`` column of ``samples/`` holds it)."""

    def __init__(self, shards: Iterable[str]) -> None:
        self.exact: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for s in shards:
            self.exact[_normalise(s)] = s
            self.by_name[shard_file_name(s)].append(s)

    def match(self, ref: str, what: str, base: Path | str | None = None) -> str | None:
        """The audited shard ``ref`` names, or None when it names none of them.

        A URL or an absolute path must be one of the audited shards. A relative path is tried
        against ``base`` (the CSV's folder: a path, or a URL for a CSV on object storage), then as
        the tail of an audited shard's path (so a path as the job spec lists it, relative to the
        job file, works too). A bare file name must be unambiguous among the audited shards."""
        ref = ref.removeprefix("file://")
        if is_url(ref) or os.path.isabs(ref):
            return self.exact.get(_normalise(ref))
        if not re.search(r"[/\\]", ref):
            return self._unique(self.by_name.get(ref, []), ref, what)
        joined = None if base is None else f"{base.rstrip('/')}/{ref}" if isinstance(base, str) else str(base / ref)
        if joined is not None and (hit := self.exact.get(_normalise(joined))) is not None:
            return hit
        tail = os.sep + os.path.normpath(ref).lstrip(os.sep)
        return self._unique([s for n, s in self.exact.items() if n.endswith(tail)], ref, what)

    @staticmethod
    def _unique(candidates: list[str], ref: str, what: str) -> str | None:
        if len(candidates) > 1:
            raise LabelsError(f"{what}: shard {ref!r} is ambiguous: {len(candidates)} audited shards match it "
                              f"(e.g. {candidates[0]} and {candidates[1]}); name it by its path")
        return candidates[0] if candidates else None


@dataclass
class Labels:
    identities: dict[str, bool] = field(default_factory=dict)
    images: dict[ImageKey, bool] = field(default_factory=dict)
    unmatched_images: int = 0  # image rows naming no audited shard (after :meth:`matched`)
    base: Path | str | None = field(default=None, compare=False)  # the CSV's folder (relative shard paths)

    def matched(self, matcher: ShardMatcher, what: str = "labels") -> Labels:
        """The same labels with image rows keyed by the audited shard they name; an error when
        image rows exist and none names an audited shard (metrics would silently fall back to
        the identity level)."""
        images: dict[ImageKey, bool] = {}
        unmatched = 0
        for (ref, key), member in self.images.items():
            shard = matcher.match(ref, what, self.base)
            if shard is None:
                unmatched += 1
            elif images.setdefault((shard, key), member) != member:
                raise LabelsError(f"{what}: image {key!r} of {shard} is labelled both member and non-member")
        if self.images and not images:
            ref = next(iter(self.images))[0]
            raise LabelsError(f"{what}: none of the {len(self.images)} image rows names an audited shard (e.g. "
                              f"{ref!r}); name shards by their path, as the job lists them, or by an unambiguous "
                              "file name")
        return Labels(dict(self.identities), images, unmatched)


@dataclass
class Controls:
    """Known non-members: identities, and images as (shard file name, key)."""

    identities: set[str] = field(default_factory=set)
    images: set[ImageKey] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identities or self.images)

    def is_control(self, identity: str | None, shard: str, key: str | None) -> bool:
        return identity in self.identities or (shard, key) in self.images

    def mask(self, rows) -> np.ndarray:
        """Per row of an Arrow table with ``identity``, ``shard`` and ``key``: is it a control?"""
        return np.array([self.is_control(i, s, k) for i, s, k in zip(
            rows.column("identity").to_pylist(), rows.column("shard").to_pylist(), rows.column("key").to_pylist())],
            dtype=bool)

    def matched(self, matcher: ShardMatcher) -> Controls:
        """The same controls with image rows keyed by the audited shard they name."""
        base = _folder(self.sources[0]) if self.sources else None
        images = {(s, k) for ref, k in self.images
                  if (s := matcher.match(ref, "calibration.controls", base)) is not None}
        return Controls(set(self.identities), images, list(self.sources))


def _folder(path: Path | str) -> Path | str:
    """The folder of a CSV: a resolved path, or the URL up to its last ``/``."""
    return str(path).rsplit("/", 1)[0] if is_url(str(path)) else Path(path).resolve().parent


def _rows(path: Path | str, what: str, member_required: bool, storage_options: Mapping[str, Any] | None = None
          ) -> Iterator[tuple[int, str | None, ImageKey | None, str | None]]:
    """(line, identity, image key as written, raw member value) per non-empty row of a
    labels/controls CSV (UTF-8, with or without a byte-order mark); a URL is read through
    fsspec with the job's storage options."""
    try:
        if is_url(str(path)):
            try:
                with open_url(str(path), "rb", storage_options) as f:
                    text = f.read().decode("utf-8-sig")
            except UnicodeDecodeError:
                raise
            except ImportError as e:
                raise LabelsError(f"{what}: {e}") from None
            except Exception as e:  # noqa: BLE001 — backends raise many types (botocore, aiohttp, …)
                raise LabelsError(f"{what}: {describe_error(str(path), e)}") from None
            yield from _parse(csv.DictReader(io.StringIO(text, newline="")), path, what, member_required)
            return
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from _parse(csv.DictReader(f), path, what, member_required)
    except UnicodeDecodeError as e:
        raise LabelsError(f"{what}: {path} is not UTF-8 text ({e}); save it as UTF-8") from None


def _parse(reader: csv.DictReader, path: Path, what: str, member_required: bool
           ) -> Iterator[tuple[int, str | None, ImageKey | None, str | None]]:
    cols = set(reader.fieldnames or [])
    has_units = {"identity"} <= cols or {"shard", "key"} <= cols
    if not has_units or (member_required and "member" not in cols):
        need = "identity,member and/or shard,key,member" if member_required else "identity and/or shard,key"
        raise LabelsError(f"{what}: {path} needs a header with {need}")
    for line_no, row in enumerate(reader, start=2):
        shard, key = (row.get("shard") or "").strip(), (row.get("key") or "").strip()
        ident = normalize_name(row.get("identity") or "")
        if shard and key:
            yield line_no, None, (shard, key), row.get("member")
        elif ident:
            yield line_no, ident, None, row.get("member")


def _member(value: str | None, what: str, path: Path, line_no: int) -> bool:
    v = (value or "").strip().lower()
    if v not in _TRUE | _FALSE:
        raise LabelsError(f"{what}: {path} line {line_no}: member must be true/false, got {value!r}")
    return v in _TRUE


def read_labels(path: Path | str, storage_options: Mapping[str, Any] | None = None) -> Labels:
    """Identity rows (``identity,member``) and/or image rows (``shard,key,member``).

    Image rows keep the shard as written; :meth:`Labels.matched` maps them to the audited
    shards. A unit labelled both member and non-member is an error.
    """
    out = Labels(base=_folder(path))
    for line_no, ident, image, member in _rows(path, "labels", True, storage_options):
        m = _member(member, "labels", path, line_no)
        unit, table = (image, out.images) if image is not None else (ident, out.identities)
        if table.setdefault(unit, m) != m:  # type: ignore[arg-type]
            raise LabelsError(f"labels: {path} line {line_no}: {unit!r} is labelled both member and non-member")
    return out


def read_controls(path: Path | str, storage_options: Mapping[str, Any] | None = None) -> Controls:
    """A CSV with ``identity`` and/or ``shard,key`` columns; a ``member`` column must say false."""
    out = Controls(sources=[str(path)])
    for line_no, ident, image, member in _rows(path, "calibration.controls", False, storage_options):
        if member is not None and member.strip() and _member(member, "calibration.controls", path, line_no):
            raise LabelsError(f"calibration.controls: {path} line {line_no}: a control must be a non-member "
                              f"(member={member!r})")
        if image is not None:
            out.images.add(image)
        else:
            out.identities.add(ident)  # type: ignore[arg-type]
    return out


def control_set(path: Path | str | None, labels: Labels | None, matcher: ShardMatcher | None = None,
                storage_options: Mapping[str, Any] | None = None) -> Controls:
    """The controls file's rows (image rows matched to the audited shards when ``matcher`` is
    given) plus the labelled non-members."""
    out = read_controls(path, storage_options) if path is not None else Controls()
    if matcher is not None:
        out = out.matched(matcher)
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


def missing_from_pool(identities: Iterable[str], pool: set[str]) -> list[str]:
    """The identities (after name normalisation) that the name pool lacks, sorted."""
    return sorted({normalize_name(i) for i in identities} - pool)


def missing_names_message(attack: str, missing: list[str], pool: str | Path) -> str:
    """Why a labelled or control identity missing from the pool stops an audit, and the way out."""
    shown = ", ".join(repr(m) for m in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return (f"{len(missing)} labelled or control identit{'y is' if len(missing) == 1 else 'ies are'} not in the name "
            f"pool {pool}: {shown}. {attack} can never rank a name the pool lacks, so such an identity would score 0 "
            f"(a false negative, or a free true negative). Add the names to the pool, or set "
            f"attacks.{attack}.missing_names: exclude to leave them out of {attack}'s figures")
