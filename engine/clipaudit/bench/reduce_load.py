"""``clipaudit bench --under-load OUT``: the reduce step of an existing audit, alone and with
busy-loop processes on the cores, measured side by side in one run.

Each measurement runs the reduce step as ``clipaudit reduce`` does on a fresh copy of the audit folder in a
newly spawned Python process, timed from its start to its end (imports and start-up
included, as a user would time it). The busy processes are spawned pure-Python loops, one
per requested process, started before and stopped after each loaded run. The reduce step
bounds its numerical threads (:mod:`clipaudit.core.threads`); without that bound OpenBLAS
workers spin-wait for cores the busy loops hold, and the loaded run takes many times longer.
Reported: the median seconds of each condition and their ratio.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from clipaudit.app.runner import reduce_options, saved_spec
from clipaudit.io.outputs import OutputLayout
from clipaudit.reduce.pipeline import reduce_outputs
from clipaudit.bench.map_step import machine


def _busy() -> None:
    """One core's worth of pure-Python work until the process is stopped."""
    while True:
        pass


def _reduce(folder: str) -> None:
    """In a spawned process: the reduce step of FOLDER as ``clipaudit reduce FOLDER`` runs it
    (the saved spec's settings, under the output lock), quietly."""
    import logging


    logging.disable(logging.INFO)
    layout = OutputLayout(Path(folder))
    with layout.lock():
        reduce_outputs(layout, reduce_options(saved_spec(layout)))


def _timed_reduce(audit: Path, work: Path) -> float:
    """Seconds of ``clipaudit reduce`` on a fresh copy of ``audit``, in a new process."""
    import multiprocessing as mp

    copy = work / "audit"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(audit, copy)
    proc = mp.get_context("spawn").Process(target=_reduce, args=(str(copy),))
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    took = time.perf_counter() - t0
    if proc.exitcode != 0:
        raise RuntimeError(f"clipaudit reduce of a copy of {audit} failed (exit {proc.exitcode})")
    return took


def run_load_bench(audit: Path, busy: int = 2, repeat: int = 3,
                   log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Median seconds of the reduce step alone and beside ``busy`` busy-loop processes."""
    import multiprocessing as mp
    import tempfile


    if not (audit / "samples").is_dir():
        raise FileNotFoundError(f"{audit}: not an audit folder (no samples/); run `clipaudit demo` or a job first")
    ctx = mp.get_context("spawn")
    alone, loaded = [], []
    with tempfile.TemporaryDirectory(prefix="clipaudit-bench-load-") as tmp:
        work = Path(tmp)
        for i in range(repeat):  # alternate, so a drift of the machine touches both conditions alike
            alone.append(_timed_reduce(audit, work))
            log(f"run {i + 1}/{repeat}: alone {alone[-1]:.1f} s")
            procs = [ctx.Process(target=_busy, daemon=True) for _ in range(busy)]
            for p in procs:
                p.start()
            try:
                loaded.append(_timed_reduce(audit, work))
            finally:
                for p in procs:
                    p.terminate()
                    p.join()
            log(f"run {i + 1}/{repeat}: beside {busy} busy processes {loaded[-1]:.1f} s")
    a, b = statistics.median(alone), statistics.median(loaded)
    return {"benchmark": "reduce under load", "audit": str(audit), "busy_processes": busy, "repeat": repeat,
            "alone_s": round(a, 2), "loaded_s": round(b, 2), "ratio": round(b / a, 2),
            "alone_runs_s": [round(x, 2) for x in alone], "loaded_runs_s": [round(x, 2) for x in loaded],
            "machine": machine("cpu")}
