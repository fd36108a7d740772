"""The versions the test command installs: constraints.txt pins every declared dependency inside
its declared range, and the moto it installs authorises S3 reads as AWS does (the least-privilege
tests on the local S3 server depend on it; moto 5.2.6 does not)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _declared(extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    """The base dependencies and those of ``extras``, following clipaudit[...] self-references."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "clipaudit":
                todo += sorted(r.extras)
            else:
                out.append(r)
    return [r for r in out if r.marker is None or r.marker.evaluate()]


def test_constraints_pin_every_declared_dependency_within_its_range():
    pins = _pins()
    problems = []
    for req in _declared():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: not pinned in constraints.txt")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} is outside the declared range {req.specifier}")
    assert problems == [], "constraints.txt is stale (refresh it with .ci/newest --write): " + "; ".join(problems)


def test_the_installed_moto_authorises_s3_reads_as_aws_does():
    p = subprocess.run([sys.executable, str(ROOT / ".ci" / "moto_iam_probe.py")], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "as AWS does" in p.stdout
