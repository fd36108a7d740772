import json
import re
from pathlib import Path

import duckdb
import pytest

from clipaudit.cli import main
from clipaudit.report.query import QueryError, run_query


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A small output folder written by the real writers (via the idia test helper)."""
    from attacks.test_idia import img, write_samples
    from clipaudit.reduce import reduce_outputs
    from clipaudit.reduce.options import ReduceOptions

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
    assert json.loads(capsys.readouterr().out) == [{"identity": "Ann", "idia_score": 1},
                                                   {"identity": "Bob", "idia_score": 0}]
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
    from clipaudit.report.query import connect

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
    from clipaudit.contract.schemas import load_schema

    layout = write_samples(tmp_path, [img("Ann", "Ann")])
    w = PartWriter(layout.embedding_part("s.tar"), load_schema("embeddings"))
    w.write({"shard": ["s.tar"], "key": ["0"], "position": [0], "embedding": [[0.5, -1.0]]})
    w.commit()
    cols, rows = run_query(tmp_path, "SELECT typeof(embedding), embedding FROM embeddings")
    assert rows == [("FLOAT[]", [0.5, -1.0])]


DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "outputs.md"


def _docs_queries() -> dict[str, str]:
    """The example queries of docs/outputs.md by their first-line title (``-- title: …``)."""
    text = DOCS_PAGE.read_text()
    block = text[text.index("<!-- example-queries -->"):text.index("<!-- /example-queries -->")]
    queries = re.findall(r"```sql\n(.*?)\n```", block, flags=re.S)
    return {q.splitlines()[0].removeprefix("-- ").split(":")[0]: q for q in queries}


def _cli_rows(out: Path, sql: str, capsys) -> list[dict]:
    assert main(["query", str(out), sql, "--format", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_docs_example_queries(small_audit, capsys):
    """Each example of docs/outputs.md runs through ``clipaudit query`` and agrees with the tables read directly."""
    import numpy as np
    import pyarrow.parquet as pq

    queries = _docs_queries()
    assert set(queries) == {"most at-risk identities", "images per identity", "errors per shard",
                            "attack agreement", "identities flagged by several attacks"}
    samples = pq.read_table(small_audit / "samples").to_pylist()
    ident = {r["identity"]: r for r in pq.read_table(small_audit / "identities.parquet").to_pylist()}
    flags = {i: sorted(c.removesuffix("_flag") for c, v in r.items() if c.endswith("_flag") and v)
             for i, r in ident.items()}

    # errors per shard: the shard with the two bad samples first, counts as the run's summary has them
    rows = _cli_rows(small_audit, queries["errors per shard"], capsys)
    summary = {s["shard"]: s for s in json.loads((small_audit / "_SUMMARY.json").read_text())["per_shard"]}
    assert [r["shard"] for r in rows] == sorted(summary, key=lambda s: (-sum(summary[s]["errors"].values()), s))
    for r in rows:
        assert r["rows"] == summary[r["shard"]]["rows"] and r["errors"] == sum(summary[r["shard"]]["errors"].values())
    assert rows[0]["shard"].endswith("00001.tar") and rows[0]["reasons"] == "decode_error, missing_image"
    assert rows[1]["errors"] == 0 and rows[1]["reasons"] is None

    # images per identity: what identities.parquet counts; 8 identities, 6 photos each, P0 and P1 one error each
    rows = _cli_rows(small_audit, queries["images per identity"], capsys)
    assert {r["identity"]: (r["images"], r["errors"]) for r in rows} == {
        i: (r["n_images"], r["n_errors"]) for i, r in ident.items()}
    assert [r["images"] for r in rows] == [6] * 8 and sum(r["errors"] for r in rows) == 2

    # identities flagged by several attacks: the flag columns counted in Python
    rows = _cli_rows(small_audit, queries["identities flagged by several attacks"], capsys)
    several = {i: f for i, f in flags.items() if len(f) >= 2}
    assert several, "the audit flags nobody twice: the query is not exercised"
    assert {r["identity"]: sorted(r["flagged_by"].split(", ")) for r in rows} == several
    assert all(r["attacks"] == len(several[r["identity"]]) for r in rows)

    # most at-risk identities: ordered by flags, then the smallest p-value; the twice-flagged lead
    rows = _cli_rows(small_audit, queries["most at-risk identities"], capsys)
    assert len(rows) == len(ident)
    for r in rows:
        pvalues = [v for c, v in ident[r["identity"]].items() if c.endswith("_pvalue") and v is not None]
        assert r["flags"] == len(flags[r["identity"]]) and r["min_pvalue"] == pytest.approx(min(pvalues))
    order = [(-r["flags"], r["min_pvalue"], -r["idia_score"]) for r in rows]
    assert order == sorted(order) and set(r["identity"] for r in rows[:len(several)]) == set(several)

    # attack agreement: every pair of the attacks that ran, Pearson as numpy computes it
    rows = _cli_rows(small_audit, queries["attack agreement"], capsys)
    assert [(r["attack_a"], r["attack_b"]) for r in rows] == [("caption", "idia"), ("caption", "mim"), ("idia", "mim")]
    names = sorted(ident)
    for r in rows:
        a, b = ([float(ident[i][f"{x}_score"]) for i in names] for x in (r["attack_a"], r["attack_b"]))
        assert r["identities"] == 8 and r["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
        assert r["both_flag"] == sum(r["attack_a"] in flags[i] and r["attack_b"] in flags[i] for i in names)
    assert len(samples) == 50


def test_more_than_one_statement_is_refused_not_half_answered(out, capsys):
    assert main(["query", str(out), "SELECT 1; SELECT 2"]) == 2
    err = capsys.readouterr().err
    assert "one statement per query, got 2" in err

