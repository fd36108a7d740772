"""Pick the executor a job asks for; the executors themselves never import each other."""

from __future__ import annotations

from ..spec import JobSpec
from .base import Executor


def make_executor(spec: JobSpec) -> Executor:
    """``compute.executor``: ``local`` (in-process, no Ray) or ``ray`` (actor pool)."""
    if spec.compute.executor == "local":
        from .local import LocalExecutor

        return LocalExecutor()
    from .ray import RayExecutor

    return RayExecutor()
