"""The domain registry: built-ins via entry points, third-party plug-ins, the decorator, errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import foundation.domain as domain_mod
from foundation.config import load_config
from foundation.data.spec import DataSpec
from foundation.domain import Domain, get_domain, list_domains, register_domain, resolve_data_path
from foundation.errors import ConfigError, RegistryError


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
    spec = dom.default_spec
    assert spec.channels == 3 and spec.spatial_dims == 2
    assert len(spec.mean) == 3 and len(spec.std) == 3
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
            from dataclasses import dataclass

            from foundation.data.spec import DataSpec

            @dataclass(frozen=True)
            class TinyOptions:
                gain: float = 1.0

            class TinyDomain:
                name = "tiny"
                options_type = TinyOptions
                default_spec = DataSpec(2, 2, (0.5, 0.5), (0.25, 0.25))
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
        assert dom.default_spec.channels == 2 and dom.default_spec.mean == (0.5, 0.5)
        assert "tiny" in fresh_registry
        # its options are typed when a config loads, refused by name when unknown or of the wrong type
        assert load_config(None, ["data.options.gain=2"], domain="tiny").data.typed_options.gain == 2
        with pytest.raises(ConfigError, match=r"data\.options\.gian is not an option of the tiny domain"):
            load_config(None, ["data.options.gian=2"], domain="tiny")
        with pytest.raises(ConfigError, match=r"data\.options\.gain='x' must be float"):
            load_config(None, ["data.options.gain=x"], domain="tiny")
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
        default_spec = DataSpec(1, 3, (0.0,), (1.0,))

    assert DecoDomain.__name__ == "DecoDomain"  # the decorator returns the class unchanged
    assert "deco" in list_domains()
    dom = get_domain("deco")
    assert isinstance(dom, DecoDomain) and dom.default_spec.spatial_dims == 3
    # a domain without options_type keeps data.options as an untyped dict
    assert load_config(None, ["data.options.x=1"], domain="deco").data.typed_options == {"x": 1}


def test_register_domain_zero_arg_factory_and_incomplete_domain(fresh_registry: dict) -> None:
    class Partial:
        name = "partial"
        channels = 1

    register_domain("partial")(Partial)
    with pytest.raises(RegistryError, match=r"domain 'partial' does not provide \['default_spec'\]"):
        get_domain("partial")


def test_data_spec_is_a_checked_value() -> None:
    spec = DataSpec(3, 2, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], ("red", "green", "blue"))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.is_rgb
    with pytest.raises(ConfigError, match="2 mean and 2 std values for 3 channels"):
        DataSpec(3, 2, (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.channels = 4  # type: ignore[misc]


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
