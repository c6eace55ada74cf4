"""The domain registry: built-ins via entry points, third-party plug-ins, the decorator, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import foundation.domain as domain_mod
from foundation.domain import Domain, get_domain, list_domains, register_domain, resolve_data_path
from foundation.errors import RegistryError


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty registry that re-reads entry points; the real one is restored afterwards."""
    registry: dict = {}
    monkeypatch.setattr(domain_mod, "_REGISTRY", registry)
    monkeypatch.setattr(domain_mod, "_entry_points_loaded", False)
    return registry


def test_images_domain_listed_and_instantiable() -> None:
    assert "images" in list_domains()
    dom = get_domain("images")
    assert dom.name == "images"
    assert dom.channels == 3 and dom.spatial_dims == 2
    assert len(dom.mean) == 3 and len(dom.std) == 3
    assert isinstance(dom, Domain)


def test_unknown_domain_lists_available() -> None:
    with pytest.raises(RegistryError, match=r"unknown domain 'nope'; available: .*images") as info:
        get_domain("nope")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown domain")  # not quoted like a plain KeyError


def test_third_party_domain_through_real_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: dict
) -> None:
    (tmp_path / "tinydomain.py").write_text(
        textwrap.dedent(
            """
            class TinyDomain:
                name = "tiny"
                channels = 2
                spatial_dims = 2
                mean = (0.5, 0.5)
                std = (0.25, 0.25)
            """
        )
    )
    dist = tmp_path / "tinydomain-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinydomain\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[foundation.domains]\ntiny = tinydomain:TinyDomain\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tinydomain", raising=False)
    try:
        names = list_domains()
        assert "tiny" in names
        assert "images" in names  # the built-in still comes through its own entry point
        dom = get_domain("tiny")
        assert type(dom).__name__ == "TinyDomain"
        assert dom.channels == 2 and tuple(dom.mean) == (0.5, 0.5)
        assert "tiny" in fresh_registry
    finally:
        sys.modules.pop("tinydomain", None)


def test_broken_entry_point_does_not_break_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: dict, caplog: pytest.LogCaptureFixture
) -> None:
    dist = tmp_path / "brokendomain-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokendomain\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[foundation.domains]\nbroken = no_such_module_xyz:Domain\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING", logger="foundation.domain"):
        names = list_domains()
    assert "broken" not in names and "images" in names
    assert "broken" in caplog.text


def test_register_domain_decorator(fresh_registry: dict) -> None:
    @register_domain("deco")
    class DecoDomain:
        name = "deco"
        channels = 1
        spatial_dims = 3
        mean = (0.0,)
        std = (1.0,)

    assert DecoDomain.__name__ == "DecoDomain"  # the decorator returns the class unchanged
    assert "deco" in list_domains()
    dom = get_domain("deco")
    assert isinstance(dom, DecoDomain) and dom.spatial_dims == 3


def test_register_domain_zero_arg_factory_and_incomplete_domain(fresh_registry: dict) -> None:
    class Partial:
        name = "partial"
        channels = 1

    register_domain("partial")(Partial)
    with pytest.raises(
        RegistryError, match=r"domain 'partial' does not provide \['spatial_dims', 'mean', 'std'\]"
    ):
        get_domain("partial")


def test_resolve_data_path_uses_sample_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path))

    class Fake:
        name = "fake"

        def make_sample(self, root: Path) -> Path:
            return Path(root) / "data"

    assert resolve_data_path(Fake(), "/given") == "/given"
    assert resolve_data_path(Fake(), None) == str(tmp_path / "samples" / "fake" / "data")


def test_domain_commands_are_listed_without_importing_torch() -> None:
    """``foundation --help`` builds every parser from the ``foundation.commands`` entry points: light modules
    that import no domain, torch, rasterio or MONAI."""
    code = (
        "import sys\n"
        "from foundation.cli import build_parser\n"
        "help_text = build_parser().format_help()\n"
        "heavy = sorted(m for m in ('torch', 'rasterio', 'monai', 'openslide') if m in sys.modules)\n"
        "print(heavy)\n"
        "print(help_text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]"
    for command in ("pathology-qc", "canopy-height", "stats", "segment", "export-bundle", "pretrain"):
        assert command in out


def test_third_party_commands_through_real_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tinycommands.py").write_text(
        textwrap.dedent(
            """
            def add_commands(subparsers):
                p = subparsers.add_parser("tiny-hello", help="say hello")
                p.set_defaults(func=lambda args: print("hello") or 0, quiet=False)
            """
        )
    )
    dist = tmp_path / "tinycommands-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinycommands\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[foundation.commands]\ntiny = tinycommands:add_commands\nbroken = no_such_module_xyz:add_commands\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tinycommands", raising=False)
    from foundation.cli import main

    try:
        with caplog.at_level("WARNING", logger="foundation"):
            assert main(["tiny-hello"]) == 0
        assert "broken" in caplog.text  # named and skipped; the other commands still work
    finally:
        sys.modules.pop("tinycommands", None)
