"""The code style the project keeps: ruff, configured in pyproject.toml, finds nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_the_engine_and_the_tests():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "engine", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
