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


# Floors inside stages/: a subpackage imports only from the floors below it (and itself). runtime is the ground
# floor (devices, stop signals, progress); stage modules and the registry sit on top of every floor.
FLOORS = {"runtime": 0, "models": 1, "corpus": 1, "objectives": 2, "inference": 2, "training": 3, "evaluation": 3}
REGISTRY_FLOOR = {"registry": 0}  # stages/registry.py imports stage modules only lazily, by name


def _stages_subpackages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        names |= {m.split(".")[1] for m in modules if m.startswith("stages.") and m.count(".") >= 1}
    return names


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_stages_subpackages_import_only_downward(floor):
    """objectives never import training, models never import objectives, runtime imports no other floor."""
    offenders = {}
    for path in (ROOT / "stages" / floor).rglob("*.py"):
        upward = {name for name in _stages_subpackages(path)
                  if name != floor and {**FLOORS, **REGISTRY_FLOOR}.get(name, 99) >= FLOORS[floor]}
        if upward:
            offenders[str(path.relative_to(ROOT))] = sorted(upward)
    assert not offenders
