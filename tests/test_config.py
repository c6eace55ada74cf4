"""Typed config loading: defaults, recipes, dotlist overrides, strict validation, save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from foundation.config import RECIPES, Config, load_config, save_config
from foundation.errors import ConfigError

SHIPPED = sorted(RECIPES.glob("**/*.yaml"))


def test_defaults_load() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg._name == "default"
    assert cfg.seed == 0
    assert cfg.domain == "images"
    assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 14
    assert cfg.ssl.method == "dinov2"
    assert cfg.train.checkpoint_every >= 1
    assert cfg.data.crops.n_global == 2


def test_top_level_defaults_keyword() -> None:
    assert load_config(domain="pathology").domain == "pathology"


def test_recipe_plus_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "seed": 7,
                "model": {"arch": "vit_tiny", "patch_size": 16, "img_size": 64},
                "data": {"crops": {"global_size": 64, "local_size": 32, "n_local": 2}},
                "train": {"steps": 10, "batch_size": 8, "checkpoint_every": 5},
            }
        )
    )
    cfg = load_config(recipe, ["train.steps=50", "train.batch_size=32"])
    assert cfg._name == "small"
    assert cfg.seed == 7
    assert cfg.train.steps == 50 and cfg.train.batch_size == 32
    assert cfg.train.checkpoint_every == 5
    assert cfg.model.arch == "vit_tiny"
    assert cfg.data.crops.n_local == 2
    # values untouched by the recipe keep their defaults
    assert cfg.optim.layer_decay == 0.9


def test_override_types_are_parsed() -> None:
    cfg = load_config(
        overrides=["seed=3", "optim.lr=0.01", "train.compile=true", "model.pretrained=null", "data.path=/x"]
    )
    assert cfg.seed == 3
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.train.compile is True
    assert cfg.model.pretrained is None
    assert cfg.data.path == "/x"


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.stepz=3", "train.stepz"), ("stepz=1", "stepz"), ("data.crops.n_lokal=2", "data.crops.n_lokal")],
)
def test_unknown_key_refused_with_full_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_unknown_key_in_recipe_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="'optim.lrr'"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.steps=abc", "train.steps"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("model.patch_size=x", "model.patch_size"),
    ],
)
def test_wrong_type_refused_naming_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("ssl.mask_ratio=1.5", r"ssl\.mask_ratio=1\.5"),
        ("ssl.mask_ratio=0", r"ssl\.mask_ratio=0"),
        ("model.arch=vit_huge", r"model\.arch='vit_huge' is not one of"),
        ("ssl.centering=foo", r"ssl\.centering='foo' is not one of"),
        ("ssl.method=simclr", r"ssl\.method='simclr'"),
        ("optim.lr_scaling=cubic", r"optim\.lr_scaling='cubic'"),
        ("train.precision=fp8", r"train\.precision='fp8'"),
        ("train.steps=0", r"train\.steps=0 must be >= 1"),
        ("data.crops.n_global=3", r"data\.crops\.n_global=3"),
        ("optim.layer_decay=0", r"optim\.layer_decay=0"),
    ],
)
def test_out_of_range_refused(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_interpolation_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path=.*interpolation is not allowed"):
        load_config(overrides=["data.path=${oc.env:HOME}"])
    recipe = tmp_path / "interp.yaml"
    recipe.write_text("train:\n  steps: 10\n  log_every: ${train.steps}\n")
    with pytest.raises(ConfigError, match=r"train\.log_every=.*interpolation is not allowed"):
        load_config(recipe)


def test_crop_size_not_divisible_by_patch_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.crops\.global_size=100 is not divisible by model\.patch_size=14"
    ):
        load_config(overrides=["data.crops.global_size=100"])
    with pytest.raises(
        ConfigError, match=r"data\.crops\.local_size=30 is not divisible by model\.patch_size=16"
    ):
        load_config(
            overrides=[
                "model.patch_size=16",
                "model.img_size=224",
                "data.crops.global_size=224",
                "data.crops.local_size=30",
            ]
        )


def test_img_size_not_divisible_rejected() -> None:
    with pytest.raises(ConfigError, match=r"model\.img_size=100 is not divisible by model\.patch_size=14"):
        load_config(overrides=["model.img_size=100"])


def test_missing_recipe_and_bad_override_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe .*images/tiny"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.steps"])
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(not_mapping)


def test_recipes_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # outside a checkout: the shipped recipes come from the package
    by_file = load_config(RECIPES / "images" / "small_dinov2.yaml")
    for name in ("images/small_dinov2", "images/small_dinov2.yaml", "configs/images/small_dinov2.yaml"):
        assert load_config(name) == by_file
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "small_dinov2.yaml").write_text("train: {steps: 7}\n")
    assert load_config("images/small_dinov2.yaml").train.steps == 7  # a file of the user's wins over the name
    with pytest.raises(ConfigError, match="'images/nope' is neither a file nor a shipped recipe"):
        load_config("images/nope")


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        RECIPES / "images" / "tiny.yaml",
        ["train.steps=50", "seed=11", "domain=remote_sensing", "data.options={bands: [1, 2]}"],
    )
    # the reloaded config is named after its file, so save under the recipe's name
    out = tmp_path / f"{cfg._name}.yaml"
    save_config(cfg, out)
    assert not list(tmp_path.glob("*.tmp"))
    again = load_config(out)
    assert again == cfg
    assert again.data.options == {"bands": [1, 2]}  # as written; the typed value is not saved
    assert again.data.typed_options.bands == (1, 2)
    assert "typed_options" not in out.read_text()
    # under another file name only the recipe name differs
    other = tmp_path / "saved.yaml"
    save_config(cfg, other)
    reloaded = load_config(other)
    assert reloaded._name == "saved"
    assert dataclasses.replace(reloaded, _name=cfg._name) == cfg


@pytest.mark.parametrize("recipe", SHIPPED, ids=[str(p.relative_to(RECIPES)) for p in SHIPPED])
def test_every_recipe_loads(recipe: Path) -> None:
    pretraining = "task" not in yaml.safe_load(recipe.read_text())  # fine-tuning recipes have no SSL crops
    cfg = load_config(recipe, pretraining=pretraining)
    assert cfg._name == recipe.stem
    if pretraining:
        assert cfg.data.crops.global_size % cfg.model.patch_size == 0


def test_recipes_were_found() -> None:
    assert SHIPPED, "no recipes under foundation/recipes/"


def test_reject_unknown_keys_names_every_key_and_what_is_allowed() -> None:
    from foundation.config import CropsConfig, reject_unknown_keys

    reject_unknown_keys({"global_size": 1}, CropsConfig, "data.crops", "the crops")  # known: fine
    with pytest.raises(
        ConfigError, match=r"^data.crops.sise is not an option of the crops; allowed: \['global_scale'"
    ):
        reject_unknown_keys({"sise": 1}, CropsConfig, "data.crops", "the crops")
    with pytest.raises(ConfigError, match=r"^x.a, x.b are not options of y; allowed: \['c'\]$"):
        reject_unknown_keys({"b": 1, "a": 2, "c": 3}, {"c": 0}, "x", "y")
