"""An audit's output, opened for reading: a local folder, or an output URL read straight from its
store (nothing copied to local disk), with the job's saved spec — reading it imports the job's
attack plugins, so their columns and lines are known. The reports, ``clipaudit query`` and the
reduce step open an output through it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from clipaudit.io.outputs import RELATIVE as NAMES
from clipaudit.io.outputs import no_audit
from clipaudit.io.store import Store
from clipaudit.io.outputs import output_layout
from clipaudit.io.tables import table_files
from clipaudit.spec import JobSpec, spec_from_json

@dataclass(frozen=True)
class Audit:
    """One output folder or output URL (``where``, as given) on its fsspec file system."""

    where: str
    fs: Any = field(repr=False)
    root: str
    remote: bool

    @classmethod
    def open(cls, output: str | Path, storage_options: Mapping[str, Any] | None = None) -> Audit:
        """The output at ``output`` (a folder or a URL; a URL's ``storage_options`` may hold
        ``${VAR}`` references). Nothing is read yet."""
        return cls.of(output_layout(output, storage_options).store, str(output))

    @classmethod
    def of(cls, store: Store, where: str | None = None) -> Audit:
        """The output a store holds (a local folder or an output URL)."""
        return cls(where or store.where, store.fs, store.root, store.remote)

    def path(self, name: Path | str) -> str:
        """Where the output file ``name`` (relative, e.g. ``NAMES.metrics``) is on the file system."""
        return f"{self.root}/{Path(name).as_posix()}"

    def exists(self, name: Path | str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def read_json(self, name: Path | str) -> dict[str, Any] | None:
        """A JSON file of the output; None where it has none."""
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None

    def require_json(self, name: Path | str) -> dict[str, Any]:
        """A JSON file the caller cannot do without: its absence says this is no (finished) audit."""
        doc = self.read_json(name)
        if doc is None:
            raise FileNotFoundError(no_audit(self.where, Path(name).name))
        return doc

    def saved_spec(self) -> JobSpec:
        """The spec the output was produced with (``_job.json``); its plugins are imported."""
        return spec_from_json(self.require_json(NAMES.job_state)["spec"], self.path(NAMES.job_state))

    def tables(self) -> dict[str, list[str]]:
        """The output tables: view name → Parquet files (on a store, a part counts only beside its
        shard's marker; see :func:`clipaudit.io.tables.table_files`)."""
        return table_files(self.fs, self.root, self.where, vouched=self.remote)
