"""The shared check "rows equal, every column" (tests/helpers.py) can fail."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import assert_same_rows

ROWS = {"shard": ["a", "a", "b"], "position": [0, 1, 0], "status": ["ok", "error", "ok"],
        "score": [0.5, None, 0.25], "features": [[0.1, 0.2], None, [0.3, float("nan")]]}
SCHEMA = pa.schema([("shard", pa.string()), ("position", pa.int32()), ("status", pa.string()),
                    ("score", pa.float32()), ("features", pa.list_(pa.float32()))])


def _write(root, rows, name="part.parquet"):
    (root / "samples").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=SCHEMA), root / "samples" / name)
    return root


def _changed(column, row, value):
    rows = {k: list(v) for k, v in ROWS.items()}
    rows[column][row] = value
    return rows


def test_equal_rows_pass_in_any_order_and_report_their_float_differences(tmp_path):
    expected = _write(tmp_path / "e", ROWS)
    reordered = {k: v[::-1] for k, v in ROWS.items()}
    assert assert_same_rows(_write(tmp_path / "a", reordered), expected, 0.0) == {"score": 0.0, "features": 0.0}
    nudged = _write(tmp_path / "n", _changed("score", 0, 0.5 + 1e-5))
    assert assert_same_rows(nudged, expected, 1e-4)["score"] == pytest.approx(1e-5, rel=1e-2)


@pytest.mark.parametrize("column,row,value", [
    ("status", 1, "ok"),  # a non-float column
    ("score", 0, 0.5 + 1e-3),  # a float beyond the tolerance
    ("score", 1, 0.0),  # null vs value
    ("features", 0, [0.1, 0.2 + 1e-3]),  # a feature beyond the tolerance
    ("features", 0, [0.1]),  # another length
    ("features", 2, [0.3, 0.4]),  # NaN vs value
    ("position", 2, 1),  # another row
])
def test_any_difference_beyond_the_tolerance_fails(tmp_path, column, row, value):
    expected = _write(tmp_path / "e", ROWS)
    with pytest.raises(AssertionError):
        assert_same_rows(_write(tmp_path / "a", _changed(column, row, value)), expected, 1e-4)


def test_missing_and_duplicated_rows_fail(tmp_path):
    expected = _write(tmp_path / "e", ROWS)
    with pytest.raises(AssertionError):
        assert_same_rows(_write(tmp_path / "short", {k: v[:2] for k, v in ROWS.items()}), expected, 0.0)
    doubled = _write(_write(tmp_path / "dup", ROWS), {k: v[:1] for k, v in ROWS.items()}, "again.parquet")
    with pytest.raises(AssertionError):
        assert_same_rows(doubled, _write(tmp_path / "e2", {k: v + v[:1] for k, v in ROWS.items()}), 0.0)
