"""Imports point one way: flows -> stages -> storage -> schemas; only flows imports prefect."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "schemas": {"storage", "stages", "flows", "prefect", "torch"},
    "storage": {"stages", "flows", "prefect"},
    "stages": {"flows", "prefect"},
}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    offenders = {str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
                 for path in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_stage_modules_do_not_import_each_other():
    """Shared code lives in stages' subpackages, storage or the registry, never in another stage's module."""
    from stages.registry import STAGE_MODULES

    for name in STAGE_MODULES:
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"stages.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "stages" for a in node.names}
        assert not {f"stages.{other}" for other in STAGE_MODULES if other != name} & imported, name
