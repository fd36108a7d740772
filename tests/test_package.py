"""Properties of the package as a whole."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
FORBIDDEN_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "run"), ("subprocess", "Popen"),
                   ("subprocess", "call"), ("subprocess", "check_call"), ("subprocess", "check_output")}


def test_the_engine_builds_no_shell_commands():
    """No module starts a process or a shell, so no user string can become a command."""
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] == "subprocess" for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports subprocess")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS:
                offenders.append(f"{path.name}:{node.lineno} calls {node.func.value.id}.{node.func.attr}")
            if isinstance(node, ast.keyword) and node.arg == "shell":
                offenders.append(f"{path.name}:{node.lineno} passes shell=")
    assert len(list(ENGINE.rglob("*.py"))) > 20
    assert offenders == []
