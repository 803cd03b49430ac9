"""The package's structure, read from its source: dependencies run one way (no import cycle), no
hf_slr import hides inside a function (outside the CLI), algorithms/ is pure tensor math, no
module grows into a hub."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_slr"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The hf_slr modules an import statement in ``module`` loads (submodules named explicitly)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "hf_slr"]
    if node.level:
        base = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target.split(".")[0] != "hf_slr":
        return []
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    if node.module is None:  # `from . import x`: loads x (the package itself is already loading)
        return submodules
    return ([target] if target in MODULES else []) + submodules


def _imports(module: str, *, in_functions: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found = set()

    def visit(node, inside_function):
        for child in ast.iter_child_nodes(node):
            nested = inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside_function == in_functions:
                found.update(_resolve(module, child))
            visit(child, nested)

    visit(tree, False)
    return found


def test_no_import_cycle_inside_hf_slr():
    graph = {module: _imports(module, in_functions=False) - {module} for module in MODULES}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)


def test_no_hidden_hf_slr_imports_outside_the_cli():
    hidden = {m: sorted(_imports(m, in_functions=True)) for m in MODULES if m != "hf_slr.cli"}
    assert {m: found for m, found in hidden.items() if found} == {}


def test_algorithms_import_torch_and_the_standard_library_only():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for module, path in MODULES.items():
        if not module.startswith("hf_slr.algorithms"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{module} imports {roots}"


def test_only_the_integration_module_walks_a_model():
    walkers = {m for m, path in MODULES.items() if ".named_modules()" in path.read_text()}
    assert walkers <= {"hf_slr.integration", "hf_slr.peft"}, walkers  # peft: its own LoRA layers only


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_a_hub(module):
    assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES
