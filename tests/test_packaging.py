"""The installed package names: the repo folder ``domains/`` installs as ``foundation_domains`` (a top-level
``domains`` in site-packages would collide with other projects'), so the package list in pyproject.toml is
written out, not discovered; a folder missing from it would silently be left out of the wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"foundation": "foundation", "domains": "foundation_domains"}


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folders(folder: str) -> set[str]:
    base = ROOT / folder
    found = {INSTALLED_AS[folder]}
    for path in base.rglob("*"):
        if path.is_dir() and "__pycache__" not in path.parts and any(path.iterdir()):
            found.add(".".join([INSTALLED_AS[folder], *path.relative_to(base).parts]))
    return found


def test_every_folder_of_ours_is_a_listed_package() -> None:
    listed = set(_setuptools()["packages"])
    on_disk = _folders("foundation") | _folders("domains")
    assert not on_disk - listed, (
        f"folders missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
    )
    assert not listed - on_disk, f"listed packages with no folder: {sorted(listed - on_disk)}"


def test_no_top_level_package_takes_a_common_name() -> None:
    tops = {name.split(".")[0] for name in _setuptools()["packages"]}
    assert tops == {"foundation", "foundation_domains"}
    assert _setuptools()["package-dir"] == {"foundation_domains": "domains"}


def test_entry_points_name_the_installed_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    targets = [target for group in groups.values() for target in group.values()]
    assert targets and all(t.split(".")[0] in ("foundation", "foundation_domains") for t in targets)
