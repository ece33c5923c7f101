"""The runtime packages never import the development tooling in ``gateway_tap.dev``.

Checked on the source (every ``import``, also those inside functions), so a lazy import is caught too.
Only the CLI may reach ``gateway_tap.dev``, and only inside the commands that need it (``up``, ``mock-llm``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [ROOT / "gateway_tap", ROOT / "collectors", ROOT / "schemas"]
DEV = ROOT / "gateway_tap" / "dev"
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


def is_dev(module: str) -> bool:
    return module == "gateway_tap.dev" or module.startswith("gateway_tap.dev.")


def test_runtime_modules_do_not_import_the_dev_package() -> None:
    offenders = []
    for package in RUNTIME:
        for path in package.rglob("*.py"):
            if path.is_relative_to(DEV) or path == CLI:
                continue
            for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
                if is_dev(module):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == []


def test_the_cli_imports_the_dev_package_only_inside_commands() -> None:
    tree = ast.parse(CLI.read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    top_level = [module for stmt in tree.body if not isinstance(stmt, functions)
                 for _, module in imported_modules(stmt)]
    assert not [m for m in top_level if is_dev(m)]
    assert any(is_dev(m) for _, m in imported_modules(tree)), "up / mock-llm import gateway_tap.dev lazily"


def test_the_check_catches_a_lazy_import() -> None:
    tree = ast.parse("def f():\n    from gateway_tap.dev.servers import free_port\n")
    assert [m for _, m in imported_modules(tree) if is_dev(m)] == ["gateway_tap.dev.servers",
                                                                   "gateway_tap.dev.servers.free_port"]
