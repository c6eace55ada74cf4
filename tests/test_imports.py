"""What the code imports: every third-party package is declared in pyproject.toml (core or an extra), so a fresh
install has it rather than getting it by chance through another package's dependencies; the core never imports a
domain and a domain never imports another (function-level imports included); no module imports itself back
through others."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"foundation", "domains"}  # folders; domains/ installs as foundation_domains
IMPORT_NAMES = {"foundation": "foundation", "domains": "foundation_domains"}


def _imports_of(file: Path) -> list[str]:
    """Dotted names of the absolute imports in one file, at any depth (function-level ones too)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _imported_modules() -> dict[str, set[str]]:
    """Top-level names of absolute imports in our packages -> the files importing them."""
    found: dict[str, set[str]] = {}
    for package in sorted(OURS):
        for file in (ROOT / package).rglob("*.py"):
            for name in _imports_of(file):
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
        if module in sys.stdlib_module_names or module in IMPORT_NAMES.values() or module == "__future__":
            continue
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (sorted(dists) or ["<not installed>"], sorted(files)[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_core_imports_no_domain_and_no_domain_another() -> None:
    crossing = []
    for file in (ROOT / "foundation").rglob("*.py"):
        crossing += [
            (str(file.relative_to(ROOT)), n)
            for n in _imports_of(file)
            if n.split(".")[0] in ("domains", "foundation_domains")
        ]
    for domain in sorted(p for p in (ROOT / "domains").iterdir() if (p / "__init__.py").exists()):
        for file in domain.rglob("*.py"):
            for name in _imports_of(file):
                parts = name.split(".")
                if (
                    parts[0] in ("domains", "foundation_domains")
                    and len(parts) > 1
                    and parts[1] != domain.name
                ):
                    crossing.append((str(file.relative_to(ROOT)), name))
    assert not crossing, f"imports across the core/domain seam: {crossing}"


def _module_files() -> dict[str, Path]:
    """Dotted module name (as imported) -> file, for every module of ours."""
    modules = {}
    for package in sorted(OURS):
        for file in (ROOT / package).rglob("*.py"):
            parts = [IMPORT_NAMES[package], *file.relative_to(ROOT / package).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def _edges(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (relative and function-level imports too, not those
    under ``if TYPE_CHECKING:``)."""

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    tree = ast.parse(file.read_text(), str(file))
    typing_only = {  # imports under `if TYPE_CHECKING:` never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {ours(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found |= {ours(f"{base}.{alias.name}") or ours(base) for alias in node.names}
    return found - {None, name}


def test_no_import_cycles() -> None:
    """No module of ours imports, directly or through others, one that imports it back (function-level imports
    count: they are how a circle hides). A package's ``__init__`` re-exporting its modules is not an edge back."""
    modules = _module_files()
    graph = {name: _edges(name, file, modules) for name, file in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
