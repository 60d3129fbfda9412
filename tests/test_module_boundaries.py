"""Modules talk only through each other's public contract (commands, queries, events), and the
kernel never imports a module: like Spring Modulith's `verify()`, checked on every import statement.

And no two modules wait on each other: the synchronous calls between modules (`send`/`ask` of
another module's command or query) form no cycle. A cycle would let one module's slowness or
outage hold up the other and come back to itself (each side's deadline and breaker blaming the
other), and the two could only be deployed and reasoned about together. Event subscriptions may
form cycles (orders reacts to payments' events and payments to orders'): a subscriber runs later,
from the outbox, and nobody waits for it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = frozenset({"commands", "queries", "events"})
CALLABLE = frozenset({"commands", "queries"})  # what send()/ask() carry


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


def sync_calls(root: Path) -> set[tuple[str, str]]:
    """(caller, callee) for every `send(X(...))`/`ask(X(...))` in root/modules/<caller>/ whose X is
    a class of another module's commands or queries: imported by name (`from
    modules.inventory.commands import ReserveStock`), or reached through its module (`commands.X`,
    `modules.inventory.commands.X`). The message may also be built first into a local name
    (`command = X(...)`; `send(command)`)."""
    edges = set()
    for path in sorted((root / "modules").rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) <= 2:
            continue
        owner, package = relative.parts[1], list(relative.parent.parts)
        tree = ast.parse(path.read_text(), str(path))
        names = _contract_names(tree, package)
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            built = {
                node.targets[0].id: module
                for node in ast.walk(scope)
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and (module := _callee(node.value, names, {})) is not None
            }
            for node in ast.walk(scope):
                if isinstance(node, ast.Call) and _called_name(node.func) in ("send", "ask") and node.args:
                    module = _callee(node.args[0], names, built)
                    if module is not None and module != owner:
                        edges.add((owner, module))
    return edges


def _callee(node: ast.expr, names: tuple[dict[str, str], dict[str, str]], built: dict[str, str]) -> str | None:
    """The module whose command/query `node` builds (or names, through `built`), if another's."""
    classes, contracts = names
    if isinstance(node, ast.Name):
        return built.get(node.id)
    if not isinstance(node, ast.Call):
        return None
    if isinstance(node.func, ast.Name):
        return classes.get(node.func.id)
    if isinstance(node.func, ast.Attribute):
        return contracts.get(ast.unparse(node.func.value))
    return None


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _contract_names(tree: ast.AST, package: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Names a file binds to another module's commands/queries: classes -> their module, and
    contract modules (as written in the source: `commands`, `c`, `modules.x.commands`) -> theirs."""
    classes: dict[str, str] = {}
    contracts: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if len(parts) == 3 and parts[0] == "modules" and parts[2] in CALLABLE:
                    contracts[alias.asname or alias.name] = parts[1]
        elif isinstance(node, ast.ImportFrom):
            for _, target in _imports(ast.Module(body=[node], type_ignores=[]), package):
                parts = target.split(".")
                if parts[0] != "modules" or len(parts) < 3 or parts[2] not in CALLABLE:
                    continue
                alias = next(a for a in node.names if a.name in (parts[-1], "*"))
                if len(parts) == 3:  # from modules.inventory import commands
                    contracts[alias.asname or alias.name] = parts[1]
                elif len(parts) == 4:  # from modules.inventory.commands import ReserveStock
                    classes[alias.asname or alias.name] = parts[1]
    return classes, contracts


def sync_call_cycles(root: Path) -> list[str]:
    """Every cycle of synchronous calls between modules, once each, from its smallest module:
    "inventory -> orders -> inventory"."""
    graph: dict[str, set[str]] = {}
    for caller, callee in sync_calls(root):
        graph.setdefault(caller, set()).add(callee)
    cycles = []

    def walk(start: str, path: list[str]) -> None:
        for following in sorted(graph.get(path[-1], ())):
            if following == start:
                cycles.append(" -> ".join([*path, start]))
            elif following > start and following not in path:
                walk(start, [*path, following])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


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


def test_the_real_tree_has_no_cycle_of_synchronous_calls_between_modules():
    assert ("orders", "inventory") in sync_calls(ROOT)  # place_order's ReserveStock: the checker sees calls
    assert sync_call_cycles(ROOT) == []


def test_a_synchronous_call_back_added_to_a_copy_of_the_real_tree_is_reported_as_a_cycle(tmp_path):
    for top in ("modules", "app"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    handlers = tmp_path / "modules" / "inventory" / "handlers.py"
    handlers.write_text(
        handlers.read_text()
        + "\nfrom modules.orders.queries import GetOrder\n\n\n"
        + "async def order_of(order_id, mediator):\n    return await mediator.ask(GetOrder(order_id=order_id))\n"
    )

    assert sync_call_cycles(tmp_path) == ["inventory -> orders -> inventory"]


@pytest.mark.parametrize(
    "source",
    [
        "from modules.orders.queries import GetOrder\nasync def f(m):\n    await m.ask(GetOrder(order_id=1))\n",
        "from modules.orders.queries import GetOrder as G\nasync def f(m):\n    await m.ask(G(order_id=1))\n",
        "from modules.orders import queries\nasync def f(m):\n    await m.ask(queries.GetOrder(order_id=1))\n",
        "import modules.orders.queries\nasync def f(m):\n    await m.ask(modules.orders.queries.GetOrder())\n",
        "import modules.orders.queries as q\nasync def f(m):\n    await m.ask(q.GetOrder())\n",
        "from ..orders.queries import GetOrder\nasync def f(m):\n    await m.ask(GetOrder())\n",
        "from modules.orders.queries import GetOrder\nasync def f(m):\n    q = GetOrder()\n    await m.ask(q)\n",
    ],
)
def test_the_checker_sees_a_call_back_however_the_message_class_is_reached(tmp_path, source):
    root = _tiny_tree(tmp_path)
    (root / "modules" / "orders" / "handlers.py").write_text(
        "from modules.inventory.commands import ReserveStock\nasync def f(m):\n    await m.send(ReserveStock())\n"
    )
    (root / "modules" / "inventory" / "handlers.py").write_text(source)

    assert sync_call_cycles(root) == ["inventory -> orders -> inventory"]


def test_subscribing_to_each_others_events_is_no_cycle(tmp_path):
    root = _tiny_tree(tmp_path)
    (root / "modules" / "orders" / "module.py").write_text("from modules.inventory.events import StockReserved\n")
    (root / "modules" / "inventory" / "module.py").write_text("from modules.orders.events import OrderPlaced\n")
    (root / "modules" / "orders" / "handlers.py").write_text(
        "from modules.inventory.commands import ReserveStock\nasync def f(m):\n    await m.send(ReserveStock())\n"
    )

    assert sync_calls(root) == {("orders", "inventory")}
    assert sync_call_cycles(root) == []
