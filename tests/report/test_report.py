"""``foundation report RUN``: one self-contained page with every section, the same plots as PNGs, safe writes."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation.outputs import write_marker

SECTIONS = ("losses", "schedules", "throughput", "knn", "collapse", "validation", "crops", "pca", "pictures",
            "metrics", "config", "environment")  # fmt: skip
PLOTTED = ("losses", "schedules", "throughput", "knn", "collapse", "crops", "pca")


class Page(HTMLParser):
    """Sections (by id), their images, and anything that would need the network or run code."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[dict[str, str]]] = {}
        self.current: str | None = None
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.current = a["id"]
            self.sections[self.current] = []
        if tag == "img":
            self.sections[self.current].append(a)  # type: ignore[index]
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])


@pytest.fixture
def run(tmp_path: Path, image_folder: Path, tiny_recipe_text: str) -> Path:
    """A run folder as `pretrain` leaves it: marker, resolved config, metrics.jsonl, export."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"domain: images\n{tiny_recipe_text}".replace("data:\n", f"data:\n  path: {image_folder}\n")
    )
    lines = []
    for step in range(0, 40, 5):
        record = {"step": step, "loss": 8 - step / 10, "dino": 5 - step / 20, "ibot": 2.5, "koleo": -0.5,
                  "lr": 1e-3 * step / 40, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.02, "img_s": 40.0,
                  "grad_norm": 10.0, "teacher_entropy": 3.0, "teacher_batch_entropy": 4.5, "ln_k": 4.85,
                  "teacher_max_prob": 0.3, "cls_rank": 12.0, "collapsed": 0.0}  # fmt: skip
        if step % 10 == 0:
            record["knn_top1"] = 0.3 + step / 100
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "loss": 1.')  # a line cut by a kill
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", in_chans=3, img_size=32, patch_size=8, reg_tokens=0)
    export_backbone(
        build_vit(**args), args, run / "export", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    write_marker(run, "run", files=[], command="pretrain", domain="images", task=None, ssl_method="dinov2")
    (run / "images").mkdir()
    for step in (5, 15, 25):  # online monitoring's pictures: NAME_stepN.png
        Image.new("RGB", (8, 8), (step, 0, 0)).save(run / "images" / f"crops_step{step:08d}.png")
    return run


def test_page_has_every_section_and_image(run: Path, single_thread: None, capsys) -> None:
    assert main(["report", "--quiet", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    text = (run / "report.html").read_text()
    page = Page()
    page.feed(text)
    assert tuple(page.sections) == SECTIONS
    assert page.scripts == 0 and page.external == []
    for section in PLOTTED:
        images = page.sections[section]
        assert images, section
        for img in images:
            assert img["src"].startswith("data:image/png;base64,")
            png = base64.b64decode(img["src"].split(",", 1)[1])
            with Image.open(io.BytesIO(png)) as im:
                assert im.format == "PNG" and im.width > 200
            assert (run / "report" / img["data-name"]).read_bytes() == png  # the same plot as a PNG
    assert page.sections["validation"] == [] and "validation" in summary["empty_sections"]
    shown = [img["data-name"] for img in page.sections["pictures"]]  # first and latest of the series
    assert shown == ["crops_step00000005.png", "crops_step00000025.png"]
    assert (
        "knn_top1 0.6" in text and "path: " in text and "&quot;torch&quot;" in text
    )  # kNN, config, environment
    assert sorted(p.name for p in (run / "report").glob("*.png")) == sorted(f"{s}.png" for s in PLOTTED)


@pytest.fixture
def task_run(tmp_path: Path) -> Path:
    """A fine-tuning run folder: training loss and validation metrics every 10 steps."""
    run = tmp_path / "task"
    run.mkdir()
    (run / "config.yaml").write_text("domain: remote_sensing\n")
    records = [{"step": s, "loss": 3 - s / 50, "lr": 1e-3, "img_s": 20.0} for s in range(0, 50, 5)]
    records += [{"step": s, "val/mae": 9 - s / 10, "val/r2": s / 60} for s in range(9, 50, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_marker(run, "run", files=[], command="finetune", domain="remote_sensing", task="canopy-height")
    return run


def test_task_run_validation_section(task_run: Path, single_thread: None, capsys) -> None:
    assert main(["report", "--quiet", str(task_run)]) == 0
    page = Page()
    page.feed((task_run / "report.html").read_text())
    assert tuple(page.sections) == SECTIONS
    assert [img["data-name"] for img in page.sections["validation"]] == ["validation.png"]
    assert page.sections["crops"] == [] and page.sections["collapse"] == []
    assert "val/r2" in (task_run / "report.html").read_text()


def test_existing_page_needs_overwrite_and_foreign_page_is_kept(
    task_run: Path, single_thread: None, capsys
) -> None:
    run = task_run
    assert main(["report", "--quiet", str(run)]) == 0
    first = (run / "report.html").read_bytes()
    assert main(["report", "--quiet", str(run)]) == 1
    assert f"{run / 'report.html'} exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "report.html").read_bytes() == first
    assert main(["report", "--quiet", str(run), "--overwrite"]) == 0
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".old-*"))
    (run / "report.html").write_text("<html>my notes</html>")
    assert main(["report", "--quiet", str(run), "--overwrite"]) == 1
    assert "is not a report of ours" in capsys.readouterr().err
    assert (run / "report.html").read_text() == "<html>my notes</html>"


def test_run_without_metrics(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("domain: images\n")
    assert main(["report", "--quiet", str(run)]) == 1
    assert f"{run / 'metrics.jsonl'}: no metrics file" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 0, "note": "started"}\n')
    assert main(["report", "--quiet", str(run)]) == 1
    assert "no metric in it yet" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]  # nothing partial
