"""Pick the executor a job asks for; the executors themselves never import each other."""

from __future__ import annotations

from clipaudit.spec import JobSpec
from clipaudit.executors.base import Executor


def make_executor(spec: JobSpec) -> Executor:
    """``compute.executor``: ``local`` (in-process, no Ray) or ``ray`` (actor pool)."""
    if spec.compute.executor == "local":
        from clipaudit.executors.local import LocalExecutor

        return LocalExecutor()
    from clipaudit.executors.ray import RayExecutor

    return RayExecutor()
