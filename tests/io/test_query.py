import json

import pytest

from clipaudit.cli import main
from clipaudit.io.query import QueryError, run_query


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A small output folder written by the real writers (via the idia test helper)."""
    from attacks.test_idia import img, write_samples
    from clipaudit.reduce import ReduceOptions, reduce_outputs

    root = tmp_path_factory.mktemp("q")
    layout = write_samples(root, [img("Ann", "Ann", "Ann"), img("Ann", "Ann", "Bob"), img("Bob", "Ann", "Ann")])
    reduce_outputs(layout, ReduceOptions(attacks=("idia",)))
    return root


def test_views_answer_sql(out):
    cols, rows = run_query(out, "SELECT identity, idia_score FROM identities ORDER BY identity")
    assert cols == ["identity", "idia_score"] and rows == [("Ann", 1), ("Bob", 0)]  # template 1 ties Ann:Bob 1:1
    _, rows = run_query(out, "SELECT count(*) FROM samples WHERE status = 'ok'")
    assert rows == [(3,)]


@pytest.mark.parametrize("sql", ["DROP VIEW samples", "COPY samples TO 'x.csv'", "CREATE TABLE t AS SELECT 1",
                                 "SELECT 1; DELETE FROM samples"])
def test_only_read_queries(out, sql):
    with pytest.raises(QueryError, match="only read queries|cannot"):
        run_query(out, sql)


def test_cli_formats(out, capsys):
    assert main(["query", str(out), "SELECT identity, idia_score FROM identities ORDER BY 1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"identity": "Ann", "idia_score": 1}, {"identity": "Bob", "idia_score": 0}]
    assert main(["query", str(out), "SELECT identity FROM identities ORDER BY 1", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "identity\nAnn\nBob\n"
    assert main(["query", str(out), "SELECT identity, idia_top1_rate FROM identities ORDER BY 1"]) == 0
    table = capsys.readouterr().out
    assert "identity" in table.splitlines()[0] and "(2 rows)" in table


def test_cli_query_errors_are_clean(out, tmp_path, capsys):
    assert main(["query", str(out), "SELECT nope FROM samples"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert main(["query", str(tmp_path), "SELECT 1"]) == 2
    assert "no audit outputs" in capsys.readouterr().err
