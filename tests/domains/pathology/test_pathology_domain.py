"""The pathology domain: options, slide listing, the tile stream (skipping broken slides), views, the embedded
sample, the QC command and ``foundation pretrain --domain pathology`` end to end."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TISSUE, tissue_image, write_levels, write_ome, write_svs
from PIL import Image

from foundation.batch import EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.config import load_config
from foundation.data.stream import collate_views
from foundation.domain import get_domain, sample_cache_dir
from foundation.errors import ConfigError, DataError
from foundation.train.engine import resolve_augment_on, ssl_setup
from foundation_domains.pathology import PathologyDomain
from foundation_domains.pathology.sample import SAMPLE_NAME
from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.source import list_slides

SMALL = [
    "model.patch_size=8",
    "model.img_size=32",
    "data.crops.global_size=32",
    "data.crops.local_size=16",
    "data.crops.n_local=2",
    "ssl.head_prototypes=128",
    "ssl.head_hidden_dim=64",
    "ssl.head_bottleneck_dim=32",
]


def cfg_with(*extra: str):
    return load_config(overrides=["domain=pathology", *SMALL, "data.options.mpp=1.0", *extra])


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    (root / "case1").mkdir(parents=True)
    write_svs(root / "case1" / "a.svs")
    write_ome(root / "b.ome.tif")
    (root / "notes.txt").write_text("not a slide")
    return root


def test_registered_through_entry_point() -> None:
    dom = get_domain("pathology")
    assert isinstance(dom, PathologyDomain)
    spec = dom.default_spec
    assert (spec.channels, spec.spatial_dims, len(spec.mean), len(spec.std)) == (3, 2, 3, 3)


def test_options_defaults_and_refusals() -> None:
    opts = cfg_with().data.typed_options
    assert (opts.mpp, opts.tile_size, opts.min_tissue) == (1.0, 32, 0.25)  # tile size = global crop
    assert cfg_with("data.options.tile_size=48").data.typed_options.tile_size == 48
    with pytest.raises(
        ConfigError, match=r"data.options.mmp is not an option of the pathology domain; allowed"
    ):
        cfg_with("data.options.mmp=0.5")
    with pytest.raises(ConfigError, match="data.options.mpp=-1"):
        cfg_with("data.options.mpp=-1")
    with pytest.raises(ConfigError, match="data.options.mpp='x'"):
        cfg_with("data.options.mpp=x")


def test_list_slides(slides: Path, tmp_path: Path) -> None:
    found = list_slides(slides)
    assert sorted(p.name for p in found) == ["a.svs", "b.ome.tif"]
    assert list_slides(found[0]) == (found[0],)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no slides"):
        list_slides(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        list_slides(tmp_path / "nope")


def test_stream_gives_tissue_tiles_deterministically(slides: Path) -> None:
    cfg = cfg_with()
    source = PathologyDomain().sample_source(str(slides), cfg).samples
    samples = [source.sample(i, torch.Generator().manual_seed(i)) for i in range(0, 200, 7)]
    assert {Path(s["path"]).name for s in samples} == {"a.svs", "b.ome.tif"}  # both readers used
    for s in samples:
        assert s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
        x, y = (int(v) for v in s["coords"])  # level-0 pixels, on the tissue rectangle
        assert TISSUE[0] - 128 <= x < TISSUE[2] and TISSUE[1] - 128 <= y < TISSUE[3]
        assert s["image"].astype(float).mean() < 215  # stained, not glass
    again = PathologyDomain().sample_source(str(slides), cfg).samples
    s35 = again.sample(35, torch.Generator().manual_seed(35))
    assert s35["path"] == samples[5]["path"] and (s35["coords"] == samples[5]["coords"]).all()
    np.testing.assert_array_equal(s35["image"], samples[5]["image"])
    # consecutive indices share a slide (handle and mask reuse); blocks differ
    assert len({source.slide_at(i) for i in range(8)}) == 1
    assert len(source.handles._slides) <= 8


def test_multi_magnification_draws_each_resolution(slides: Path) -> None:
    source = PathologyDomain().sample_source(str(slides), cfg_with("data.options.mpps=[1.0,2.0]")).samples
    samples = [source.sample(i, torch.Generator().manual_seed(i)) for i in range(0, 120, 3)]
    assert {s["mpp"] for s in samples} == {1.0, 2.0}
    for s in samples:
        tiling = source.tiling(Path(s["path"]), s["mpp"])
        assert s["image"].shape == (32, 32, 3)  # same pixels, twice the tissue at 2 um/px
        assert tiling.extent == round(32 * s["mpp"] / source.handles.get(Path(s["path"])).mpp)
    with pytest.raises(ConfigError, match="mpps"):
        cfg_with("data.options.mpps=[0.5,fast]")
    with pytest.raises(ConfigError, match="mpps"):
        cfg_with("data.options.mpps=[]")


def test_broken_and_empty_slides_are_skipped_with_a_warning(
    slides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (slides / "corrupt.svs").write_bytes(b"\x00garbage\xff" * 500)
    blank = np.full((512, 512, 3), 245, np.uint8)
    write_levels(
        slides / "blank.tif", [blank], first={"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    )
    whole = (slides / "case1" / "a.svs").read_bytes()
    (slides / "cut.svs").write_bytes(whole[: len(whole) // 3])  # a header, then regions that cannot be read
    source = PathologyDomain().sample_source(str(slides), cfg_with()).samples
    with caplog.at_level(logging.WARNING, logger="foundation_domains.pathology.source"):
        samples = [source.sample(i, torch.Generator().manual_seed(i)) for i in range(0, 400, 8)]
    assert {Path(s["path"]).name for s in samples} == {"a.svs", "b.ome.tif"}
    assert {p.name for p in source.broken} == {"corrupt.svs", "blank.tif", "cut.svs"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # each named once
    assert any("corrupt.svs" in w for w in warnings)
    assert any("cut.svs: cannot decode" in w for w in warnings)
    assert any("blank.tif" in w and "no 32 px tile" in w for w in warnings)


def test_all_broken_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.svs").write_bytes(b"nope" * 100)
    source = PathologyDomain().sample_source(str(tmp_path), cfg_with()).samples
    with pytest.raises(DataError, match="no slide under .* gave a tissue tile"):
        source.sample(0, torch.Generator())


def test_mpp_overrides_for_slides_without_resolution(tmp_path: Path) -> None:
    root = tmp_path / "nores"
    root.mkdir()
    write_levels(root / "n.tif", [tissue_image(1024, 768, box=(256, 256, 768, 512))])
    source = PathologyDomain().sample_source(str(root), cfg_with()).samples
    with pytest.raises(DataError, match="no slide under"):
        source.sample(0, torch.Generator())
    assert "n.tif" in str(next(iter(source.broken)))
    ok = PathologyDomain().sample_source(str(root), cfg_with("data.options.slide_mpp=0.5")).samples
    assert ok.sample(0, torch.Generator())["image"].shape == (32, 32, 3)
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nn.tif,0.5\n")
    via_csv = PathologyDomain().sample_source(str(root), cfg_with(f"data.options.mpp_csv={table}")).samples
    assert via_csv.mpp_override(root / "n.tif") == 0.5
    assert via_csv.sample(0, torch.Generator())["image"].shape == (32, 32, 3)
    table.write_text("name,mpp\nn.tif,0.5\n")
    with pytest.raises(DataError, match=re.escape(f"{table}: an mpp CSV needs the columns")):
        PathologyDomain().sample_source(str(root), cfg_with(f"data.options.mpp_csv={table}"))


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_views_augmented_in_workers(slides: Path, method: str) -> None:
    cfg = cfg_with(f"ssl.method={method}", "data.augment_on=workers")
    dom = PathologyDomain()
    g = torch.Generator().manual_seed(0)
    transform = dom.ssl_transform(cfg, dom.default_spec)
    assert transform.device_transform is None
    views = transform(dom.sample_source(str(slides), cfg).samples.sample(0, g), g)
    if method == "mae":
        assert views["image"].shape == (3, 32, 32)
    else:
        assert [v.shape for v in views["global_crops"]] == [(3, 32, 32)] * 2
        assert [v.shape for v in views["local_crops"]] == [(3, 16, 16)] * 2
    pipelines = transform.views
    names = repr(pipelines.pre if method == "dinov2" else pipelines.pipeline)
    assert "HEDJitter" in names
    if method == "dinov2":
        assert "Solarize" not in repr(pipelines.global2) and "D4" in repr(pipelines.global1)


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_views_augmented_on_device(slides: Path, method: str) -> None:
    """Workers ship the uint8 tile + crop parameters; the engine's device stage makes normalised crops with
    the stain jitter of their tile."""
    cfg = cfg_with(f"ssl.method={method}", "data.augment_on=device")
    dom = PathologyDomain()
    transform = dom.ssl_transform(cfg, dom.default_spec)
    source = dom.sample_source(str(slides), cfg).samples
    samples = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        samples.append(transform(source.sample(i, g), g))
    key = "image" if method == "mae" else "global_crops"
    assert samples[0]["tile"].dtype == torch.uint8 and samples[0]["tile"].shape == (32, 32, 3)
    assert "HEDJitterOnDevice" in repr(transform.views.tile_ops)
    batch = transform.device_transform(collate_views(samples))
    assert "tile" not in batch
    assert batch[key].dtype == torch.float32 and batch[key].shape == (
        (3 if method == "mae" else 6),
        3,
        32,
        32,
    )
    assert torch.isfinite(batch[key]).all()
    if method == "dinov2":
        assert batch["local_crops"].shape == (6, 3, 16, 16)
        assert transform.views.global2.solarize_p == 0 and transform.views.global_crop.rot90
        assert transform.views.global1.jitter == (0.2, 0.2, 0.1, 0.05)  # half-strength colour jitter


def test_auto_augments_where_training_runs(slides: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` follows the training device, not the machine: a CUDA machine told ``--device cpu`` augments in
    the workers (float ops on the CPU would be the slow path)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = cfg_with(f"data.path={slides}")
    assert resolve_augment_on(cfg, torch.device("cpu")).data.augment_on == "workers"
    assert resolve_augment_on(cfg, torch.device("cuda", 0)).data.augment_on == "device"
    assert ssl_setup(resolve_augment_on(cfg, torch.device("cpu"))).device_transform is None
    assert ssl_setup(resolve_augment_on(cfg, torch.device("cuda", 0))).device_transform is not None
    forced = cfg_with(f"data.path={slides}", "data.augment_on=device")
    assert resolve_augment_on(forced, torch.device("cpu")) is forced  # an explicit choice is kept


def test_augment_on_device_needs_a_domain_with_device_views(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.augment_on"):
        cfg_with("data.augment_on=gpu")
    cfg = load_config(overrides=["domain=images", "data.augment_on=device", *SMALL])
    with pytest.raises(ConfigError, match="augments in the data-loader workers only"):
        ssl_setup(cfg)


def test_eval_dataset_is_a_tile_folder(tmp_path: Path) -> None:
    for c, cls in enumerate(("tumour", "stroma")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(tissue_image(40, 40, box=(0, 0, 20 + c * 10, 40), seed=i)).save(
                tmp_path / cls / f"{i}.png"
            )
    ds = PathologyDomain().eval_dataset(str(tmp_path), cfg_with())
    assert list(ds.classes) == ["stroma", "tumour"] and len(ds) == 4
    assert ds[0]["image"].shape == (3, 32, 32)


def test_embedded_sample_is_a_realistic_pyramid() -> None:
    cache = sample_cache_dir("pathology")  # the session's temporary cache, shared with the pretrain test
    root = PathologyDomain().make_sample(cache)
    path = root / SAMPLE_NAME
    assert [p.name for p in root.iterdir()] == [SAMPLE_NAME]  # no temporary left behind
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.25)
        assert slide.dimensions == (4096, 3072) and slide.level_count == 3
        thumb = slide.thumbnail(256)
    glass = (thumb.min(axis=2) > 225).mean()
    assert 0.3 < glass < 0.9  # tissue pieces on white glass
    before = path.stat().st_mtime_ns
    assert PathologyDomain().make_sample(cache) == root and path.stat().st_mtime_ns == before


def test_qc_command(slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (slides / "corrupt.svs").write_bytes(b"junk" * 100)
    out = tmp_path / "qc"
    args = ["pathology-qc", str(slides), "--out", str(out), "--mpp", "1", "--tile-size", "64", "--quiet"]
    assert main(args) == EXIT_SOME_SKIPPED  # corrupt.svs: skipped and listed, the others done
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(Path(s["png"]).name for s in report["slides"]) == ["b.ome.tif.png", "case1__a.svs.png"]
    assert all(s["tiles"] > 0 for s in report["slides"])
    assert [Path(f["slide"]).name for f in report["failed"]] == ["corrupt.svs"]
    assert Image.open(out / "case1__a.svs.png").size[0] == 1024
    refused = main(["pathology-qc", str(slides), "--out", str(out), "--mpp", "-1"])
    assert refused == EXIT_NOTHING_DONE
    assert "--mpp=-1.0 is out of range" in capsys.readouterr().err


def _pretrain(out: Path, *extra: str) -> dict:
    args = ["pretrain", "--domain", "pathology", "--out", str(out), "--quiet", *extra]
    overrides = [
        *SMALL,
        "train.steps=2",
        "train.batch_size=4",
        "data.num_workers=0",
        "train.checkpoint_every=2",
    ]
    assert main(args + overrides) == 0
    return {"export": out / "export", "metrics": (out / "metrics.jsonl").read_text().splitlines()}


def test_pretrain_end_to_end_with_data(slides: Path, tmp_path: Path) -> None:
    run = _pretrain(tmp_path / "run", "--data", str(slides))
    assert (run["export"] / "model.safetensors").is_file()
    assert len(run["metrics"]) >= 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "domain: pathology" in saved and "mpp: 1.0" in saved  # the tiny recipe was used


def test_pretrain_end_to_end_on_embedded_sample(tmp_path: Path) -> None:
    run = _pretrain(tmp_path / "run")
    assert (run["export"] / "model.safetensors").is_file()
    loss = [json.loads(line) for line in run["metrics"] if "loss" in line]
    assert loss and all(np.isfinite(m["loss"]) for m in loss)


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_pretrain_with_augmentation_on_the_device(slides: Path, tmp_path: Path, method: str) -> None:
    """The GPU recipe's data path (workers cut uint8 crops, the engine finishes them), run on the CPU."""
    run = _pretrain(tmp_path / "run", "--data", str(slides), "data.augment_on=device", f"ssl.method={method}")
    assert (run["export"] / "model.safetensors").is_file()
    loss = [json.loads(line) for line in run["metrics"] if "loss" in line]
    assert loss and all(np.isfinite(m["loss"]) for m in loss)
