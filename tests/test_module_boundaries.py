"""Modules talk only through each other's public contract (commands, queries, events), and the
kernel never imports a module: like Spring Modulith's `verify()`, checked on every import statement."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = frozenset({"commands", "queries", "events"})


def boundary_violations(root: Path) -> list[str]:
    """Every import statement under root/modules and root/app that crosses a boundary, as
    "path:line: imports X (reason)". Dynamic imports by name string (bootstrap's importlib) are
    not import statements and are not checked."""
    violations = []
    for top in ("modules", "app"):
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root)
            package = list(relative.parent.parts)  # the package this file's relative imports start from
            owner = relative.parts[1] if top == "modules" and len(relative.parts) > 2 else None
            for line, target in _imports(ast.parse(path.read_text(), str(path)), package):
                reason = _crossing(top, owner, target)
                if reason:
                    violations.append(f"{relative}:{line}: imports {target} ({reason})")
    return violations


def _imports(tree: ast.AST, package: list[str]):
    """(line, dotted name) for everything an import statement loads, relative imports resolved.
    `from a.b import c` yields `a.b.c`: c may be a submodule, and a name is judged by its module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level <= len(package) else []
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, module if alias.name == "*" else f"{module}.{alias.name}".lstrip(".")


def _crossing(top: str, owner: str | None, target: str) -> str | None:
    parts = target.split(".")
    if parts[0] != "modules":
        return None
    if top == "app":
        return "the kernel never imports modules"
    if len(parts) >= 2 and parts[1] == owner:
        return None
    if len(parts) >= 3 and parts[2] in PUBLIC:
        return None
    return "only another module's commands, queries and events are public"


def test_the_real_tree_respects_module_boundaries():
    assert boundary_violations(ROOT) == []


def test_a_private_import_added_to_a_copy_of_the_real_tree_is_reported(tmp_path):
    for top in ("modules", "app"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    handlers = tmp_path / "modules" / "orders" / "handlers.py"
    handlers.write_text(handlers.read_text() + "\nfrom modules.inventory.aggregate import Stock\n")

    violations = boundary_violations(tmp_path)

    assert [v.split(": ", 1)[1] for v in violations] == [
        "imports modules.inventory.aggregate.Stock (only another module's commands, queries and events are public)"
    ]


def _tiny_tree(tmp_path: Path) -> Path:
    """A minimal tree with the real bootstrap.py (importlib by name) and lawful cross-module imports."""
    for name in ("orders", "inventory"):
        (tmp_path / "modules" / name).mkdir(parents=True)
        (tmp_path / "modules" / name / "__init__.py").write_text('"""A module."""\n')
    (tmp_path / "modules" / "__init__.py").write_text("")
    (tmp_path / "modules" / "inventory" / "aggregate.py").write_text("class Stock: ...\n")
    (tmp_path / "modules" / "orders" / "handlers.py").write_text(
        "from modules.inventory.commands import ReserveStock\n"
        "import modules.inventory.events\n"
        "from modules.inventory import queries\n"
        "from modules.orders.aggregate import Order\n"
        "from . import read_model\n"
    )
    (tmp_path / "app").mkdir()
    shutil.copy(ROOT / "app" / "bootstrap.py", tmp_path / "app" / "bootstrap.py")
    return tmp_path


def test_a_tree_with_only_public_cross_module_imports_and_importlib_loading_passes(tmp_path):
    assert boundary_violations(_tiny_tree(tmp_path)) == []


@pytest.mark.parametrize(
    "path, source, imported",
    [
        ("modules/orders/handlers.py", "import modules.inventory.aggregate\n", "modules.inventory.aggregate"),
        (
            "modules/orders/handlers.py",
            "from modules.inventory.aggregate import Stock\n",
            "modules.inventory.aggregate.Stock",
        ),
        (
            "modules/orders/handlers.py",
            "from modules.inventory import handlers\n",
            "modules.inventory.handlers",
        ),
        ("modules/orders/handlers.py", "from modules import inventory\n", "modules.inventory"),
        (
            "modules/orders/handlers.py",
            "from ..inventory.aggregate import Stock\n",
            "modules.inventory.aggregate.Stock",
        ),
        (
            "modules/orders/handlers.py",
            "if True:\n    import modules.inventory.module as m\n",
            "modules.inventory.module",
        ),
        (
            "app/relay.py",
            "from modules.orders.events import OrderPlaced\n",
            "modules.orders.events.OrderPlaced",
        ),
        ("app/relay.py", "import modules\n", "modules"),
        ("app/relay.py", "def late():\n    import modules.orders.commands\n", "modules.orders.commands"),
    ],
)
def test_the_checker_reports_a_forbidden_import(tmp_path, path, source, imported):
    root = _tiny_tree(tmp_path)
    (root / path).write_text(source)

    violations = boundary_violations(root)

    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{path}:") and f"imports {imported} " in violations[0]
