"""The package's structure is a test: the layers declared in pyproject.toml ([tool.importlinter])
hold, and no two modules import each other, directly or through others — counting every static
import, function-local and TYPE_CHECKING ones too."""

import graphlib
import os
import subprocess
import sys
from pathlib import Path

import grimp

import clipaudit

ROOT = Path(__file__).resolve().parents[1]
ENGINE = Path(clipaudit.__file__).resolve().parents[1]  # the source tree under test


def test_the_declared_layers_hold():
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()", "--no-cache"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def test_no_import_cycle_between_any_two_modules():
    g = grimp.build_graph("clipaudit", cache_dir=None)
    imports = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
    assert len(imports) > 50 and sum(map(len, imports.values())) > 200  # the graph was really read
    cycle = _cycle(imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a graph with a loop through three modules is caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert set(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})) == {"a", "b", "c"}


def _local_imports(source: str) -> list[str]:
    """The clipaudit modules ``source`` imports inside a function."""
    import ast

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(node):
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("clipaudit"):
                    out.append(n.module)
                elif isinstance(n, ast.Import):
                    out += [a.name for a in n.names if a.name.startswith("clipaudit")]
    return out


def test_only_the_command_line_imports_clipaudit_modules_inside_functions():
    """Imports say at the top of a module which layers it uses; only cli.py defers them, so that
    `clipaudit --help` starts at once (third-party packages may still load lazily anywhere)."""
    assert _local_imports("def f():\n    from clipaudit.core import threads\n    import clipaudit.spec\n") == [
        "clipaudit.core", "clipaudit.spec"]
    found = {str(p.relative_to(ENGINE)): _local_imports(p.read_text()) for p in (ENGINE / "clipaudit").rglob("*.py")}
    assert {path: mods for path, mods in found.items() if mods and path != "clipaudit/cli.py"} == {}
