"""``clipaudit bench --under-load OUT``: the reduce step of an existing audit, alone and with
busy-loop processes on the cores, measured side by side in one run.

Each measurement runs ``clipaudit reduce`` on a fresh copy of the audit folder in a new
process (imports and start-up included, as a user would time it). The busy processes are
pure-Python loops, one per requested process, started before and stopped after each loaded
run. The reduce step bounds its numerical threads (:mod:`clipaudit.core.threads`); without
that bound OpenBLAS workers spin-wait for cores the busy loops hold, and the loaded run takes
many times longer. Reported: the median seconds of each condition and their ratio.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

#: what a busy process runs: one core's worth of pure-Python work until it is stopped
BUSY_LOOP = "while True: pass"


def _timed_reduce(audit: Path, work: Path) -> float:
    """Seconds of ``clipaudit reduce`` on a fresh copy of ``audit``."""
    copy = work / "audit"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(audit, copy)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipaudit.cli", "reduce", str(copy)], capture_output=True,
                          text=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"clipaudit reduce {audit} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return took


def run_load_bench(audit: Path, busy: int = 2, repeat: int = 3,
                   log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Median seconds of the reduce step alone and beside ``busy`` busy-loop processes."""
    from .bench import machine

    if not (audit / "samples").is_dir():
        raise FileNotFoundError(f"{audit}: not an audit folder (no samples/); run `clipaudit demo` or a job first")
    alone, loaded = [], []
    with tempfile.TemporaryDirectory(prefix="clipaudit-bench-load-") as tmp:
        work = Path(tmp)
        for i in range(repeat):  # alternate, so a drift of the machine touches both conditions alike
            alone.append(_timed_reduce(audit, work))
            log(f"run {i + 1}/{repeat}: alone {alone[-1]:.1f} s")
            procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
            try:
                loaded.append(_timed_reduce(audit, work))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            log(f"run {i + 1}/{repeat}: beside {busy} busy processes {loaded[-1]:.1f} s")
    a, b = statistics.median(alone), statistics.median(loaded)
    return {"benchmark": "reduce under load", "audit": str(audit), "busy_processes": busy, "repeat": repeat,
            "alone_s": round(a, 2), "loaded_s": round(b, 2), "ratio": round(b / a, 2),
            "alone_runs_s": [round(x, 2) for x in alone], "loaded_runs_s": [round(x, 2) for x in loaded],
            "machine": machine("cpu")}
