"""The package as a wheel (not the editable checkout), installed by pip in a clean virtual environment: it carries
the recipes, installs no top-level ``domains``, and ``foundation pretrain`` run from outside the checkout trains
on the domain's tiny recipe rather than the built-in defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from foundation.config import RECIPES, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_recipes_and_pretrains_outside_the_checkout(tmp_path: Path) -> None:
    # built from a copy of what the package is made of: setuptools packs whatever a checkout's build/lib holds,
    # stale modules of an earlier layout included
    source = tmp_path / "source"
    for part in ("foundation", "domains"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, source / part)
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
            str(source),
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

    # a clean virtual environment: the wheel installed by pip (console script included), the third-party
    # packages seen through --system-site-packages (no network here); our editable checkout's path hook sits
    # behind the venv's own site-packages, and the test checks that the wheel's modules are the ones imported
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, foundation = venv / "bin" / "python", venv / "bin" / "foundation"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FOUNDATION_CACHE"] = str(tmp_path / "cache")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = "import foundation, foundation_domains; print(foundation.__file__); print(foundation_domains.__file__)"
    where = subprocess.run([str(python), "-c", code], env=env, cwd=outside, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert all(line.startswith(site_packages) for line in where.stdout.split()), where.stdout
    no_domains = subprocess.run(
        [str(python), "-c", "import domains"], env=env, cwd=outside, capture_output=True
    )
    assert no_domains.returncode != 0  # no top-level `domains` of ours to collide with anyone's

    argv = [str(foundation), "pretrain", "--domain", "images", "--out", "run"]
    run = subprocess.run(
        [*argv, "train.steps=2", "train.log_every=1"], env=env, cwd=outside, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recipe: images/tiny" in run.stderr
    saved = yaml.safe_load((outside / "run" / "config.yaml").read_text())
    tiny = load_config(RECIPES / "images" / "tiny.yaml")
    assert (saved["model"]["arch"], saved["train"]["batch_size"]) == (tiny.model.arch, tiny.train.batch_size)
    assert (outside / "run" / "export" / "model.safetensors").is_file()
