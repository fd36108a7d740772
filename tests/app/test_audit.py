"""Opening an output for reading: a local folder and an output URL the same way."""

import json

import fsspec
import pytest

from clipaudit.app.audit import NAMES, Audit


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_output_opens_the_same_way_on_disk_and_on_a_store(where, tmp_path):
    if where == "local":
        output, fs, root = tmp_path / "out", fsspec.filesystem("file"), str(tmp_path / "out")
    else:
        output = f"memory://clipaudit-test/{tmp_path.name}-audit"
        fs, root = fsspec.filesystem("memory"), output.removeprefix("memory:/")
    audit = Audit.open(output)
    assert audit.remote == (where == "memory") and audit.read_json(NAMES.metrics) is None
    with pytest.raises(FileNotFoundError, match=r"is not a clipaudit output folder \(no _job.json\)"):
        audit.saved_spec()
    fs.makedirs(f"{root}/_markers", exist_ok=True)
    fs.pipe_file(f"{root}/{NAMES.metrics.as_posix()}", json.dumps({"idia": {"auc": 0.5}}).encode())
    assert audit.read_json(NAMES.metrics) == {"idia": {"auc": 0.5}} and audit.exists(NAMES.metrics)
    assert audit.tables() == {}  # no samples part yet
    if where == "memory":
        fs.rm(root, recursive=True)
