import subprocess
import sys


def test_bad_spec_exits_2_with_one_clear_message(tmp_path):
    (tmp_path / "names.txt").write_text("Ann\n")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: ViT-B-32, precision: fp99}\ndata: {shards: x.tar}\nnames: names.txt\noutput: o\n")
    p = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", str(job)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "model.precision" in p.stderr and "Traceback" not in p.stderr


def test_missing_spec_file_and_dry_run(tmp_path, capsys):
    from clipaudit.cli import main

    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "job spec not found" in capsys.readouterr().err
    (tmp_path / "names.txt").write_text("Ann\n")
    (tmp_path / "a.tar").write_bytes(b"")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: ViT-B-32}\ndata: {shards: a.tar}\nnames: names.txt\noutput: o\n")
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "shards: 1 (0 already done)" in out
    assert not (tmp_path / "o").exists()


def test_reduce_on_a_folder_that_is_not_an_output(tmp_path, capsys):
    from clipaudit.cli import main

    assert main(["reduce", str(tmp_path)]) == 2
    assert "not a clipaudit output folder" in capsys.readouterr().err


def test_version(capsys):
    import pytest

    from clipaudit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from importlib import metadata

    assert capsys.readouterr().out.strip() == f"clipaudit {metadata.version('clipaudit')}"


def test_every_argument_explains_itself():
    import argparse

    from clipaudit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    assert all(sub.choices) and {"run", "reduce", "demo", "report", "bench", "query"} <= set(sub.choices)
