"""Every third-party package the code imports is declared in pyproject.toml (core or an extra), so a fresh
install has it rather than getting it by chance through another package's dependencies."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"foundation", "domains"}


def _imported_modules() -> dict[str, set[str]]:
    """Top-level names of absolute imports in our packages -> the files importing them."""
    found: dict[str, set[str]] = {}
    for package in sorted(OURS):
        for file in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(ROOT)))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def test_every_third_party_import_is_declared() -> None:
    declared = _declared()
    providers = packages_distributions()
    missing = {}
    for module, files in _imported_modules().items():
        if module in sys.stdlib_module_names or module in OURS or module == "__future__":
            continue
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (sorted(dists) or ["<not installed>"], sorted(files)[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
