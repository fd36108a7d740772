"""Properties of the package as a whole."""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "engine"

#: Modules whose import alone is refused: all they do is start processes or terminals.
FORBIDDEN_MODULES = ("subprocess", "pty", "asyncio.subprocess")
#: Names (module.attribute, after resolving import aliases) that start a process or a shell.
FORBIDDEN_NAMES = ("os.system", "os.popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.posix_spawnp",
                   "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell")
#: ... and every name starting with one of these (os.execv, os.execlpe, os.spawnvp, pty.spawn ...).
FORBIDDEN_PREFIXES = ("os.exec", "os.spawn", "subprocess.", "pty.", "asyncio.subprocess.")


def _forbidden(name: str) -> bool:
    return (name in FORBIDDEN_NAMES or name.startswith(FORBIDDEN_PREFIXES)
            or any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES))


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``o.path.x`` → ``os.path.x`` when ``import os as o``; None unless a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def process_starts(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in ``source`` that could start a process or a shell: imports of process
    modules or functions, references to process-starting functions (called or not, also via
    an alias or ``getattr(os, "system")``), and ``shell=`` keywords."""
    tree = ast.parse(source, filename=filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):  # first pass: what each imported name stands for
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    offenders = []
    name = Path(filename).name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            offenders += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if _forbidden(node.module):
                offenders.append(f"{name}:{node.lineno} imports from {node.module}")
            else:
                offenders += [f"{name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                              if _forbidden(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node, aliases)
            if dotted and _forbidden(dotted) and not _forbidden(_dotted(node.value, aliases) or ""):
                offenders.append(f"{name}:{node.lineno} uses {dotted}")  # once, at its shortest forbidden prefix
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str):
            owner = _dotted(node.args[0], aliases)
            if owner and _forbidden(f"{owner}.{node.args[1].value}"):
                offenders.append(f"{name}:{node.lineno} uses getattr({owner}, {node.args[1].value!r})")
        elif isinstance(node, ast.keyword) and node.arg == "shell":
            offenders.append(f"{name}:{node.lineno} passes shell=")
    return offenders


def test_the_engine_builds_no_shell_commands():
    """No module starts a process or a shell, so no user string can become a command."""
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 20
    offenders = [o for path in files for o in process_starts(path.read_text(), str(path))]
    assert offenders == []


@pytest.mark.parametrize("snippet", [
    "import os\nos.system('ls')",
    "import os\nos.popen('ls')",
    "import os\nos.execv('/bin/ls', ['ls'])",
    "import os\nos.execlpe('ls', 'ls', {})",
    "import os\nos.spawnvp(os.P_WAIT, 'ls', ['ls'])",
    "import os\nos.spawnl(os.P_NOWAIT, '/bin/ls', 'ls')",
    "import os\nos.posix_spawn('/bin/ls', ['ls'], {})",
    "import os\nos.posix_spawnp('ls', ['ls'], {})",
    "import os\nos.fork()",
    "import os\nos.forkpty()",
    "import os as o\no.system('ls')",
    "from os import execv",
    "from os import system as run_it",
    "import os\nstart = getattr(os, 'system')",
    "import os\nhandler = os.execvp",
    "import subprocess",
    "import subprocess as sp",
    "from subprocess import run",
    "import pty",
    "from pty import spawn",
    "import asyncio\nasyncio.create_subprocess_exec('ls')",
    "import asyncio\nasyncio.create_subprocess_shell('ls')",
    "from asyncio import create_subprocess_exec",
    "from asyncio import subprocess",
    "import asyncio.subprocess",
    "call(['ls'], shell=True)",
])
def test_the_process_check_catches_every_kind_of_process_start(snippet):
    assert process_starts(snippet), snippet


def test_the_process_check_passes_ordinary_code():
    assert process_starts("import os\nimport asyncio\nos.getpid()\nos.path.join('a', 'b')\nos.environ.get('X')\n"
                          "asyncio.run(main())\nfrom os import replace\nexecutor.submit(f)\nspawn = 1\n") == []
