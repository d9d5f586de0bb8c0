"""The package's layers: imports flow one way (cli -> serving -> station -> engine; cli -> evaluation, fleet -> engine), with no cycles."""

import ast
from pathlib import Path

import patchcore

PACKAGE = Path(patchcore.__file__).parent
#: Which top-level parts each part may import (besides itself and patchcore.errors).
ALLOWED = {
    "engine": set(),
    "evaluation": {"engine"},
    "station": {"engine"},
    "serving": {"engine", "station"},
    "fleet": {"engine"},
    "cli": {"engine", "evaluation", "serving", "fleet", "station"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """patchcore modules imported anywhere in the file (also inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for name in candidates:
            if name.startswith("patchcore") and (PACKAGE.parent / (name.replace(".", "/") + ".py")).is_file() or \
                    (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file():
                found.add(name)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_imports_flow_one_way():
    wrong = []
    for module, imported in _graph().items():
        part = _part(module)
        if part is None:
            continue
        for target in imported:
            other = _part(target)
            if other is not None and other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering: " + "; ".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    # Package __init__ files re-export their modules; an edge into a package means its __init__.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in graph.get(node, ()):
            if target.startswith(node + "."):
                continue  # a package importing its own modules (re-exports) is no cycle
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target):] + [target] if target in stack else [node, target])
                return True
            if state.get(target) is None and visit(target, stack + [target]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_engine_imports_nothing_of_the_web_stack_or_the_command_line():
    heavy = {"fastapi", "uvicorn", "starlette", "argparse", "matplotlib"}
    for path in (PACKAGE / "engine").rglob("*.py"):
        modules = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not modules & heavy, f"{path.name} imports {modules & heavy}"


def test_only_the_fleet_imports_ray():
    for path in PACKAGE.rglob("*.py"):
        if "fleet" in path.parts:
            continue
        modules = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert "ray" not in modules, f"{path} imports ray"
