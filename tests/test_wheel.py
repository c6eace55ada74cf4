"""The package as a wheel (not the editable checkout): it carries the recipes, and ``foundation pretrain`` run from
outside the checkout trains on the domain's tiny recipe rather than the built-in defaults."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from foundation.config import RECIPES, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_recipes_and_pretrains_outside_the_checkout(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("foundation-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "installed")
        names = set(archive.namelist())
    shipped = {str(p.relative_to(ROOT)) for p in RECIPES.glob("*/*.yaml")}
    assert shipped and shipped <= names

    # -S: no site processing, so the editable install's path hooks are not loaded; the wheel comes first and the
    # third-party packages come from site-packages
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "installed"), *site.getsitepackages()])
    env["FOUNDATION_CACHE"] = str(tmp_path / "cache")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = "import foundation, foundation_domains; print(foundation.__file__); print(foundation_domains.__file__)"
    where = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd=outside, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(tmp_path / "installed")) for line in where.stdout.split()), where.stdout

    argv = [sys.executable, "-S", "-m", "foundation", "pretrain", "--domain", "images", "--out", "run"]
    run = subprocess.run(
        [*argv, "train.steps=2", "train.log_every=1"], env=env, cwd=outside, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recipe: images/tiny" in run.stderr
    saved = yaml.safe_load((outside / "run" / "config.yaml").read_text())
    tiny = load_config(RECIPES / "images" / "tiny.yaml")
    assert (saved["model"]["arch"], saved["train"]["batch_size"]) == (tiny.model.arch, tiny.train.batch_size)
    assert (outside / "run" / "export" / "model.safetensors").is_file()
