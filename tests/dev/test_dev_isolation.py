"""The runtime packages never import the development tooling (``gateway_tap.dev``) or the examples
(``gateway_tap.examples``).

Checked on the source (every ``import``, also those inside functions), so a lazy import is caught too.
Only the CLI may reach them, and only inside the commands that need them (``up``, ``mock-llm``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [ROOT / "gateway_tap", ROOT / "collectors", ROOT / "schemas"]
NOT_RUNTIME = ("gateway_tap.dev", "gateway_tap.examples")
EXCLUDED = [ROOT / "gateway_tap" / "dev", ROOT / "gateway_tap" / "examples"]
CLI = ROOT / "gateway_tap" / "cli.py"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def outside_the_runtime(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in NOT_RUNTIME)


def test_runtime_modules_import_neither_the_dev_package_nor_the_examples() -> None:
    offenders = []
    for package in RUNTIME:
        for path in package.rglob("*.py"):
            if any(path.is_relative_to(folder) for folder in EXCLUDED) or path == CLI:
                continue
            for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
                if outside_the_runtime(module):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == []


def test_the_cli_imports_them_only_inside_commands() -> None:
    tree = ast.parse(CLI.read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    top_level = [module for stmt in tree.body if not isinstance(stmt, functions)
                 for _, module in imported_modules(stmt)]
    assert not [m for m in top_level if outside_the_runtime(m)]
    lazy = {m for _, m in imported_modules(tree) if outside_the_runtime(m)}
    assert {"gateway_tap.dev.up", "gateway_tap.dev.mock_llm", "gateway_tap.examples"} <= lazy


def test_the_check_catches_a_lazy_import() -> None:
    tree = ast.parse("def f():\n    from gateway_tap.dev.servers import free_port\n    import gateway_tap.examples\n")
    assert [m for _, m in imported_modules(tree) if outside_the_runtime(m)] == ["gateway_tap.dev.servers",
                                                                   "gateway_tap.dev.servers.free_port",
                                                                   "gateway_tap.examples"]
