"""Pick the executor a job asks for; the executors themselves never import each other."""

from __future__ import annotations

from clipaudit.spec import JobSpec
from clipaudit.executors.base import Executor
from clipaudit.executors.ray import RayExecutor
from clipaudit.executors.local import LocalExecutor


def make_executor(spec: JobSpec) -> Executor:
    """``compute.executor``: ``local`` (in-process, no Ray) or ``ray`` (actor pool)."""
    if spec.compute.executor == "local":
        return LocalExecutor()

    return RayExecutor()
