import json

import duckdb
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
    assert "is not a clipaudit output folder" in capsys.readouterr().err


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_cli_query_can_neither_write_nor_read_outside(out, tmp_path, monkeypatch, capsys):
    """DuckDB itself refuses, so the statement-type check is not the only guard."""
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not evidence\n")
    inside = out / "samples" / "planted.parquet"
    before_out, before_here = _files(out), _files(tmp_path)
    for sql in ["COPY samples TO 'x.csv'", "EXPLAIN ANALYZE COPY (SELECT 42) TO 'x.csv'",
                f"EXPLAIN ANALYZE COPY (SELECT * FROM samples) TO '{inside}'", "ATTACH 'x.db'",
                "INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
                f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM read_csv('{secret}')",
                f"SELECT * FROM '{secret}'", f"SELECT * FROM read_text('{out}/../{secret.name}')"]:
        assert main(["query", str(out), sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (sql, err)
        assert "not evidence" not in err
    assert _files(out) == before_out and _files(tmp_path) == before_here


def test_cli_query_makes_no_network_request(out, capsys):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/x.csv"
        assert main(["query", str(out), f"SELECT * FROM read_csv('{url}')"]) == 2
        assert "only read the audit's own views" in capsys.readouterr().err
        with pytest.raises(socket.timeout):
            server.accept()[0].close()


def test_connection_is_locked_beneath_the_statement_check(out, tmp_path):
    from clipaudit.io.query import connect

    con = connect(out)
    for sql in [f"COPY (SELECT 42) TO '{tmp_path / 'x.csv'}'", f"ATTACH '{tmp_path / 'x.db'}'",
                "SET enable_external_access = true", "SET lock_configuration = false"]:
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (3,)
    assert not any(tmp_path.iterdir())


def test_errors_are_one_line(out, capsys):
    for sql in ["SELEC 1", "SELECT nope FROM samples"]:
        assert main(["query", str(out), sql]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "LINE 1:" in err, err


def test_float16_embeddings_read_as_float(tmp_path):
    """The sealed views give the types DuckDB's Parquet reader gives (FLOAT for float16)."""
    from attacks.test_idia import img, write_samples
    from clipaudit.io.outputs import PartWriter
    from clipaudit.io.schemas import load_schema

    layout = write_samples(tmp_path, [img("Ann", "Ann")])
    w = PartWriter(layout.embedding_part("s.tar"), load_schema("embeddings"))
    w.write({"shard": ["s.tar"], "key": ["0"], "position": [0], "embedding": [[0.5, -1.0]]})
    w.commit()
    cols, rows = run_query(tmp_path, "SELECT typeof(embedding), embedding FROM embeddings")
    assert rows == [("FLOAT[]", [0.5, -1.0])]
