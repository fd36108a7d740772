"""Map progress as `ray job logs` shows it (steady lines off a terminal), a bar on a terminal, and
`clipaudit run --quiet`."""

import io
import logging
import re
import time

import pytest
from helpers import write_tiny_job

from clipaudit.executors.base import Progress

LINE = re.compile(r"map progress: shards (\d+)/(\d+) \((\d+)%\), images (\d+), ([\d.]+) images/s, ETA (\S+), "
                  r"errors so far: (\d+) rows, (\d+) shards failed \(elapsed (\S+)\)")


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_off_a_terminal_has_shards_rate_eta_and_errors():
    stream, clock = io.StringIO(), _Clock()
    p = Progress(4, True, interval_s=3600, stream=stream, clock=clock)
    assert LINE.fullmatch(p.line()).group(6) == "unknown"  # no shard done: no ETA yet
    p.add_images(100)
    p.shard_done(error_rows=3)
    p.shard_done(failed=True)
    clock.t += 10
    assert LINE.fullmatch(p.line()).groups() == ("2", "4", "50", "100", "10.0", "10s", "3", "1", "10s")
    clock.t += 110
    p.add_images(60)
    p.shard_done()
    p.shard_done()
    p.close()  # a last line at the end, whatever the interval
    lines = stream.getvalue().splitlines()
    assert (len(lines) == 1
            and LINE.fullmatch(lines[0]).groups() == ("4", "4", "100", "160", "1.3", "0s", "3", "1", "2m00s"))


def test_progress_lines_come_at_a_steady_interval_without_updates():
    """A shard that takes long (the Ray executor hears of it only when it ends) still gets lines."""
    stream = io.StringIO()
    p = Progress(2, True, interval_s=0.05, stream=stream)
    time.sleep(0.5)
    p.close()
    lines = stream.getvalue().splitlines()
    assert 4 <= len(lines) <= 12 and all(LINE.fullmatch(x) for x in lines), lines
    assert all(LINE.fullmatch(x).group(1) == "0" for x in lines)


def test_a_terminal_gets_the_bar_and_no_lines():
    stream = _Terminal()
    p = Progress(2, True, interval_s=0.01, stream=stream)
    p.add_images(5)
    time.sleep(0.1)
    p.shard_done()
    p.close()
    text = stream.getvalue()
    assert "map progress:" not in text and "map:" in text and "5 images" in text


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    p = Progress(2, False, interval_s=0.01, stream=stream)
    p.add_images(5)
    time.sleep(0.05)
    p.shard_done()
    p.close()
    assert stream.getvalue() == ""


@pytest.fixture
def clipaudit_log_level():
    logger = logging.getLogger("clipaudit")
    level = logger.level
    yield
    logger.setLevel(level)


def test_run_progress_lines_and_quiet(tmp_path, tiny_model, capsys, caplog, clipaudit_log_level):
    from clipaudit.cli import main

    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=2, per_shard=8,
                         compute="executor: local, progress_interval_s: 3600", attacks="{idia: {top_k: 3}}")
    assert main(["run", str(job)]) == 0
    out, err = capsys.readouterr()
    lines = [LINE.fullmatch(x) for x in err.splitlines() if x.startswith("map progress:")]
    assert len(lines) == 1 and lines[0].groups()[:4] == ("2", "2", "100", "16")  # stderr is no terminal here
    assert "query: clipaudit query" in out and any(r.levelno == logging.INFO for r in caplog.records)

    caplog.clear()
    assert main(["run", str(job), "--quiet", "--force"]) == 0
    out, err = capsys.readouterr()
    assert "map progress" not in err and "query:" not in out
    assert out.startswith("shards: 2/2 done") and "output:" in out  # the summary stays
    assert not [r for r in caplog.records if r.name.startswith("clipaudit") and r.levelno < logging.WARNING]
