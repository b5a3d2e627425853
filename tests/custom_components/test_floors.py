"""The package's layering (issue 20, item 2): its modules stand in groups, one floor each, as MONAI's do; a module
imports only from its own group and the groups below it, and only at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import custom_components

PACKAGE = Path(custom_components.__file__).parent
FLOOR = {group: n for n, group in enumerate(custom_components._GROUPS)}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE and p.name != "__init__.py")
MAX_LINES = 400


def _group_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(group imported from, line, inside a function) for every import of the package's own modules in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level == 1:
                    found.append((_group_of(path), child.lineno, in_function))
                elif child.level == 2:
                    target = (child.module or "").split(".")[0] or child.names[0].name
                    found.append((target, child.lineno, in_function))
                elif (child.module or "").startswith("custom_components."):
                    found.append((child.module.split(".")[1], child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("custom_components."):
                        found.append((alias.name.split(".")[1], child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_higher_floor_or_inside_a_function(path):
    own = _group_of(path)
    for group, line, in_function in package_imports(path):
        assert group in FLOOR, f"{path.name}:{line} imports from {group!r}, which is not a group"
        assert FLOOR[group] <= FLOOR[own], (f"{own}/{path.name}:{line} imports from {group!r} (floor {FLOOR[group]}), "
                                            f"above its own group {own!r} (floor {FLOOR[own]})")
        assert not in_function, f"{own}/{path.name}:{line} imports a package module inside a function"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_floor_check_sees_an_upward_and_a_lazy_import(tmp_path):
    """The check itself: an import from a higher group and a function-level one are found."""
    fake = PACKAGE / "data" / "_probe_for_the_floor_test.py"
    assert not fake.exists()
    text = "from ..apps import inference\n\n\ndef f():\n    from .readers import screen_image\n"
    try:
        fake.write_text(text)
        found = package_imports(fake)
    finally:
        fake.unlink()
    assert found == [("apps", 1, False), ("data", 5, True)]


SCRIPTS = sorted((PACKAGE.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
