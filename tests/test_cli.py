import subprocess
import sys

import pytest


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
    from helpers import write_minimal_job

    job = write_minimal_job(tmp_path)
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

    from importlib import metadata

    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as e:
            main([flag])
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == f"clipaudit {metadata.version('clipaudit')}"


def test_every_option_with_a_default_says_it_in_its_help():
    import argparse

    from clipaudit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {a.option_strings[0]} (default {a.default!r})" for name, p in sub.choices.items()
              for a in p._actions
              if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.nargs != 0
              and "default" not in (a.help or "")]
    assert silent == []


def test_every_argument_explains_itself():
    import argparse

    from clipaudit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    assert all(sub.choices) and {"run", "reduce", "demo", "report", "bench", "query"} <= set(sub.choices)


def test_one_wording_for_a_folder_without_an_audit(tmp_path, capsys):
    from clipaudit.cli import main

    for argv in (["reduce", str(tmp_path)], ["report", str(tmp_path)], ["query", str(tmp_path), "SELECT 1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a clipaudit output folder" in err[0] and "clipaudit run" in err[0], err


def test_a_calibration_note_shared_by_several_scores_is_printed_once():
    from clipaudit.report.text import calibration_lines

    note = "22 controls cannot support a false-positive rate of 0.01: at least 99 are needed; nothing is flagged"
    entry = {"n_controls": 22, "threshold": None, "flagged": 0, "n_scored": 20, "note": note}
    cal = {"target_fpr": 0.01, "controls": {"identities": 22, "images": 0, "sources": ["labels"]},
           "identity": {"idia": entry, "caption": entry}}
    lines = calibration_lines(cal)
    assert sum(note in line for line in lines) == 1
    assert any("identity idia, identity caption" in line for line in lines)


@pytest.mark.parametrize("command", [["run", "JOB", "--dry-run"], ["query", "OUT", "SELECT * FROM range(100000)"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, small_audit, command):
    """`clipaudit … | head -3`: a closed pipe is no error and prints no traceback. The pipe is
    closed before the command writes anything, so every write meets it."""
    from helpers import write_minimal_job

    job = write_minimal_job(tmp_path)
    argv = [str(job) if a == "JOB" else str(small_audit) if a == "OUT" else a for a in command]
    p = subprocess.Popen([sys.executable, "-m", "clipaudit.cli", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_metric_without_a_value_or_a_note_prints_a_dash():
    from clipaudit.report.text import metrics_rows

    m = {"level": "identity", "auc": None, "tpr_at_1pct_fpr": None,
         "tpr_at_1pct_fpr_note": "needs >= 100 non-member identities at this level, has 5 (among 90 images)",
         "tpr_at_0_1pct_fpr": None}
    row = next(r for r in metrics_rows({"idia": m}) if r[0].startswith("idia"))
    assert row[2] == "-" and row[4] == "n/a (needs ≥ 100 non-member identities, has 5)" and row[5] == "-"


def test_the_headline_k_and_the_identities_below_it_are_named_in_the_table():
    from clipaudit.report.text import metrics_rows

    m = {"level": "identity", "auc": 0.9, "k": 5, "tpr_at_1pct_fpr": None, "tpr_at_0_1pct_fpr": None}
    assert next(r for r in metrics_rows({"idia": m}))[0] == "idia (k=5)"
    assert next(r for r in metrics_rows({"idia": {**m, "n_short": 3}}))[0] == "idia (k=5, 3 short)"


def test_the_within_identity_level_gets_its_own_rows_after_the_image_level():
    from clipaudit.report.text import metrics_rows

    cell = {"auc": 0.7, "auc_ci": [0.6, 0.8], "tpr_at_1pct_fpr": None, "tpr_at_0_1pct_fpr": None}
    m = {"level": "image", **cell, "learned": {"level": "image", **cell},
         "within_identity": {"level": "image_within_identity", **cell, "auc": 0.55,
                             "learned": {"level": "image_within_identity", **cell}}}
    rows = [r for r in metrics_rows({"encodermi": m}) if "encodermi" in r[0]]
    assert [(r[0].strip(), r[1]) for r in rows] == [("encodermi", "image"), ("encodermi (learned)", "image"),
                                                    ("encodermi", "within-id"), ("encodermi (learned)", "within-id")]
    assert rows[2][2].startswith("0.550")


def test_without_a_warning_the_table_says_shift_not_detected_and_which_attacks_beat_the_baseline():
    from clipaudit.report.text import metrics_table

    base = {"level": "image", "auc": 0.48, "auc_ci": [0.40, 0.57], "warning": False}
    m = {"caption": {"level": "image", "auc": 0.84, "auc_ci": [0.8, 0.9], "tpr_at_1pct_fpr": None,
                     "tpr_at_0_1pct_fpr": None,
                     "vs_baseline": {"auc_difference": 0.36, "auc_difference_ci": [0.25, 0.47]}},
         "mim": {"level": "image", "auc": 0.52, "auc_ci": [0.4, 0.6], "tpr_at_1pct_fpr": None,
                 "tpr_at_0_1pct_fpr": None, "vs_baseline": {"auc_difference": 0.04, "auc_difference_ci": [-0.1, 0.2]}},
         "baseline": {"by_level": {"image": base}}}
    text = "\n".join(metrics_table(m))
    assert "shift not detected (image level): blind baseline AUC 0.480 [0.40, 0.57]" in text
    assert ("beyond the blind baseline (image level, AUC difference, paired): caption +0.360 [+0.25, +0.47] "
            "(1 of 2)") in text
    m["baseline"]["by_level"]["image"] = {**base, "auc_ci": [0.6, 0.7], "auc": 0.65, "warning": True}
    text = "\n".join(metrics_table(m))
    assert "WARNING (image level)" in text and "shift not detected" not in text
