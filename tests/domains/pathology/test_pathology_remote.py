"""Slides by URL (fsspec + tiffslide) and list files of slides: the same pixels as the local reference reader,
retries through a dropped connection, a URL that never reads skipped and reported."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from conftest import write_generic, write_ome, write_svs
from range_server import serve

import foundation_domains.pathology.remote as remote
from foundation.batch import EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.errors import DataError
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology.feature_names import output_names
from foundation_domains.pathology.slide import Slide, SlideCache, find_mpp
from foundation_domains.pathology.source import PathologyOptions, SlideSampleSource, list_slides

pytest.importorskip("tiffslide")
pytest.importorskip("aiohttp")

REGIONS = [  # (level-0 location, level, size): inside, on tissue, across the right/bottom edges, outside
    ((0, 0), 0, (300, 200)),
    ((600, 520), 0, (256, 256)),
    ((1900, 1400), 0, (300, 300)),
    ((700, 600), 1, (200, 150)),
    ((1800, 1300), 1, (300, 300)),
    ((4000, 4000), 0, (64, 64)),
]


@pytest.fixture(autouse=True)
def _no_retry_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(tries=3, delay_s=0.0))


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    write_svs(root / "a.svs")
    write_generic(root / "g.tif")
    write_ome(root / "o.ome.tif")
    with serve(root) as server:
        yield root, server


@pytest.mark.parametrize("name", ["a.svs", "g.tif", "o.ome.tif"])
def test_pixels_by_url_equal_the_local_reference_reader(served, name: str) -> None:
    root, server = served
    with Slide(root / name) as local, Slide(server.url_of(name)) as by_url:
        assert by_url.backend == "tiffslide" and local.backend in ("openslide", "tifffile")
        assert by_url.mpp == pytest.approx(local.mpp)
        assert by_url.dimensions == local.dimensions
        for location, level, size in REGIONS:
            if level >= by_url.level_count:
                continue
            assert by_url.level_dimensions[level] == local.level_dimensions[level]
            np.testing.assert_array_equal(
                by_url.read_region(location, level, size), local.read_region(location, level, size)
            )


def test_ome_resolution_by_url_is_the_local_one_when_the_tiff_tags_disagree(served) -> None:
    """tiffslide gives an OME-TIFF the mpp of its TIFF resolution tags: by URL 1.0 um/px, locally (OME's
    PhysicalSizeX) 0.25, so tiles by URL covered 16 times the tissue."""
    root, server = served
    image = np.full((512, 512, 3), 200, np.uint8)
    meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm"}
    with tifffile.TiffWriter(root / "t.ome.tif", ome=True) as tif:
        tif.write(image, tile=(256, 256), metadata=meta, resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with Slide(root / "t.ome.tif") as local, Slide(server.url_of("t.ome.tif")) as by_url:
        assert (by_url.mpp, by_url.mpp_source) == (local.mpp, local.mpp_source) == (0.25, "OME PhysicalSizeX")


def test_url_pixels_equal_tifffile_on_the_whole_level(served) -> None:
    root, server = served
    with Slide(server.url_of("g.tif")) as by_url:
        w, h = by_url.dimensions
        np.testing.assert_array_equal(
            by_url.read_region((0, 0), 0, (w, h)), tifffile.imread(root / "g.tif", key=0)
        )


def test_a_dropped_connection_is_retried(served, monkeypatch: pytest.MonkeyPatch) -> None:
    root, server = served
    monkeypatch.setattr(remote, "BLOCK_SIZE", 4096)  # reads after opening go to the network
    with Slide(server.url_of("g.tif")) as by_url, Slide(root / "g.tif") as local:
        server.drop("g.tif", after_bytes=500, times=2)  # the next two reads are cut; the third goes through
        before = server.gets("g.tif")
        region = by_url.read_region((512, 512), 0, (512, 512))
        assert server.gets("g.tif") - before >= 3
        np.testing.assert_array_equal(region, local.read_region((512, 512), 0, (512, 512)))


def test_a_transfer_that_hangs_times_out_and_is_retried(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's only limit was 300 s a request: a server gone silent held a reader 20 minutes a region."""
    _, server = served
    monkeypatch.setattr(remote, "BLOCK_SIZE", 4096)
    monkeypatch.setattr(remote, "READ_TIMEOUT_S", 0.3)
    with Slide(server.url_of("g.tif")) as by_url:
        server.drop("g.tif", after_bytes=10, stall_s=20.0)
        started = time.monotonic()
        with pytest.raises(DataError, match=r"g\.tif: reading level 0 at \(512, 512\) failed after 3 tries"):
            by_url.read_region((512, 512), 0, (512, 512))
        assert time.monotonic() - started < 10  # a few 0.3 s timeouts a try, not the 20 s stall


def test_the_timeouts_keep_the_user_s_fsspec_client_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "https", {"client_kwargs": {"headers": {"Authorization": "t"}}})
    fs, _ = remote.url_to_fs("https://example.org/a.svs")
    assert fs.client_kwargs["headers"] == {"Authorization": "t"}
    assert fs.client_kwargs["timeout"].sock_read == remote.READ_TIMEOUT_S


def test_a_url_that_never_reads_is_one_error_naming_it(served) -> None:
    _, server = served
    server.drop("g.tif", after_bytes=100)
    url = server.url_of("g.tif")
    with pytest.raises(DataError, match=rf"{url}: open failed after 3 tries \(ClientPayloadError"):
        Slide(url)
    with pytest.raises(DataError, match="not found"):
        Slide(server.url_of("missing.svs"))
    with pytest.raises(DataError, match=r"x\.mrxs: slides by URL are read with tiffslide.*local disk"):
        Slide(server.url_of("x.mrxs"))


def test_a_refused_connection_or_a_5xx_is_retried_and_a_403_is_not(served) -> None:
    """fsspec's HTTP file system says FileNotFoundError for any failed look-up: a 503 or a refused connection
    was 'not found', never retried, and an expired signature's 403 was 'not found' too."""
    root, server = served
    server.fail("g.tif", 503, times=2)  # the first look-up (HEAD, then GET) is refused by a busy server
    with Slide(server.url_of("g.tif")) as by_url, Slide(root / "g.tif") as local:
        np.testing.assert_array_equal(
            by_url.read_region((0, 0), 0, (64, 64)), local.read_region((0, 0), 0, (64, 64))
        )
    server.fail("a.svs", 503)
    with pytest.raises(DataError, match=r"a\.svs: open failed after 3 tries \(ClientResponseError: 503"):
        Slide(server.url_of("a.svs"))
    server.fail("o.ome.tif", 403)
    before = len(server.state.requests)
    with pytest.raises(DataError, match=r"o\.ome\.tif: access denied \(HTTP 403\)"):
        Slide(server.url_of("o.ome.tif"))
    assert len(server.state.requests) - before == 2  # one look-up (HEAD, then GET), not retried
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"open failed after 3 tries \(ClientConnectorError"):
        Slide(f"http://127.0.0.1:{port}/g.tif")


def test_list_file_of_paths_and_urls_streams_and_skips_the_broken_url(served, caplog) -> None:
    root, server = served
    listing = root.parent / "slides.txt"
    listing.write_text(f"# archive\nserved/g.tif\n{server.url_of('a.svs')}\n{server.url_of('gone.svs')}\n")
    slides = list_slides(listing)
    assert len(slides) == 3 and slides[0] == root / "g.tif" and slides[1] == server.url_of("a.svs")
    options = PathologyOptions(mpp=1.0, tile_size=64, samples_per_slide=1)
    source = SlideSampleSource(slides, options, seed=0, root=listing)
    seen = set()
    for i in range(24):
        sample = source.sample(i, torch.Generator().manual_seed(i))
        assert sample["image"].shape == (64, 64, 3)
        seen.add(sample["path"])
    assert seen == {str(root / "g.tif"), server.url_of("a.svs")}
    assert source.broken == {server.url_of("gone.svs")}
    assert "gone.svs: not found" in caplog.text


def test_s3_slide_equals_the_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    path = write_generic(tmp_path / "g.tif")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="slides")
        s3.upload_file(str(path), "slides", "cases/g.tif")
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        with Slide("s3://slides/cases/g.tif") as by_s3, Slide(path) as local:
            assert by_s3.mpp == pytest.approx(local.mpp)
            for location, level, size in REGIONS:
                np.testing.assert_array_equal(
                    by_s3.read_region(location, level, size), local.read_region(location, level, size)
                )
    finally:
        server.stop()


def test_s3_without_credentials_names_the_variables_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("s3fs")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing is sent: signing fails first
    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(tries=3, delay_s=5.0))
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    start = time.perf_counter()
    with pytest.raises(
        DataError, match=r"s3://slides/g.tif: no AWS credentials found: set AWS_ACCESS_KEY_ID"
    ):
        Slide("s3://slides/g.tif")
    assert time.perf_counter() - start < 5.0  # not retried: asking again would not find them


def test_output_names_of_urls_and_list_entries(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    slides = ["https://h/x/a.svs?sig=1", "https://h/y/a.svs", "s3://b/c.ome.tif", tmp_path / "d.tif"]
    names = output_names(slides, listing)
    assert names[2:] == ["c.ome.h5", "d.h5"]
    assert names[0] != names[1] and all(n.startswith("a__") and n.endswith(".h5") for n in names[:2])
    # a repeated stem's name depends on the entry, not on where the archive is mounted: a list and its slides
    # moved together (another machine, another mount point) keep their feature files' names
    moved = tmp_path / "elsewhere"
    for folder in (tmp_path, moved):
        (folder / "x").mkdir(parents=True, exist_ok=True)
        (folder / "y").mkdir(exist_ok=True)
        (folder / "l.txt").write_text("x/s.svs\ny/s.svs\n")
    here, there = (
        output_names(list_slides(folder / "l.txt"), folder / "l.txt") for folder in (tmp_path, moved)
    )
    assert here == there and here[0] != here[1]


ARGS = dict(arch="vit_tiny", in_chans=3, spatial_dims=2, img_size=64, patch_size=16, reg_tokens=0)


def test_embed_by_url_equals_embed_of_the_local_file(served, tmp_path: Path, capsys) -> None:
    root, server = served
    backbone = export_backbone(build_vit(**ARGS), ARGS, tmp_path / "bb", mean=(0.5,) * 3, std=(0.5,) * 3)
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(root / "g.tif", local / "g.tif")
    listing = tmp_path / "remote.csv"
    listing.write_text(
        f"slide,label\n{server.url_of('g.tif')},1\n{server.url_of('broken.svs')},0\n{server.url_of('o.ome.tif')},1\n"
    )
    (root / "broken.svs").write_bytes(b"II*\x00 not really a slide" * 10)
    server.drop("o.ome.tif", after_bytes=300)  # every transfer of it is cut

    def embed(data: Path, out: Path) -> int:
        argv = ["embed", "--domain", "pathology", "--data", str(data), "--backbone", str(backbone)]
        argv += ["--out", str(out), "--num-workers", "0", "--quiet", "--batch-size", "16"]
        return main([*argv, "data.options.mpp=1.0"])

    assert embed(local, tmp_path / "ref") == 0
    assert embed(listing, tmp_path / "feats") == EXIT_SOME_SKIPPED
    summary = json.loads((tmp_path / "feats" / "summary.json").read_text())
    assert [s["slide"] for s in summary["written"]] == [server.url_of("g.tif")]
    skipped = {s["slide"]: s["reason"] for s in summary["skipped"]}
    assert skipped.keys() == {server.url_of("broken.svs"), server.url_of("o.ome.tif")}
    assert skipped[server.url_of("broken.svs")].startswith(
        f"{server.url_of('broken.svs')}: open failed: not a slide tiffslide reads"
    )
    assert skipped[server.url_of("o.ome.tif")].startswith(f"{server.url_of('o.ome.tif')}: ")
    assert "failed after 3 tries (ClientPayloadError" in skipped[server.url_of("o.ome.tif")]
    with h5py.File(tmp_path / "ref" / "g.h5") as ref, h5py.File(tmp_path / "feats" / "g.h5") as got:
        np.testing.assert_array_equal(got["coords"][:], ref["coords"][:])
        np.testing.assert_allclose(got["features"][:], ref["features"][:], rtol=1e-5, atol=1e-5)
        assert got.attrs["slide"] == server.url_of("g.tif")
        assert got.attrs["slide_bytes"] == (root / "g.tif").stat().st_size


def test_a_re_signed_url_is_the_same_slide_on_a_rerun(served, tmp_path: Path, capsys) -> None:
    """A signed URL's query changes each time it is made: the rerun embedded every slide again (identity and
    the hash of a repeated stem took the signature), and the signature was written into the feature file."""
    _, server = served
    backbone = export_backbone(build_vit(**ARGS), ARGS, tmp_path / "bb", mean=(0.5,) * 3, std=(0.5,) * 3)
    (served[0] / "x").mkdir()
    shutil.copy(served[0] / "g.tif", served[0] / "x" / "g.tif")
    listing = tmp_path / "signed.txt"
    argv = ["embed", "--domain", "pathology", "--data", str(listing), "--backbone", str(backbone)]
    argv += ["--out", str(tmp_path / "feats"), "--num-workers", "0", "--quiet", "data.options.mpp=1.0"]
    outputs = []
    for signature in ("sig=aaa&expires=1", "sig=bbb&expires=2"):
        listing.write_text(f"{server.url_of('g.tif')}?{signature}\n{server.url_of('x/g.tif')}?{signature}\n")
        assert main(argv) == 0
        outputs.append(sorted(p.name for p in (tmp_path / "feats").glob("*.h5")))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["processed"], result["complete_before"]) == (0, 2)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    with h5py.File(tmp_path / "feats" / outputs[0][0]) as f:
        assert "sig=" not in f.attrs["slide"]


def test_slide_cache_opens_urls_and_closing_a_slide_closes_its_file(served) -> None:
    _, server = served
    cache = SlideCache(max_open=1)
    assert cache.get(server.url_of("g.tif")).backend == "tiffslide"
    cache.discard(server.url_of("g.tif"))
    reader = remote.RemoteSlideReader(server.url_of("g.tif"))
    handle = reader._slide.ts_tifffile.filehandle._fh  # tiffslide left it open: a 1 MiB cache until collected
    reader.close()
    assert handle.closed


def test_embed_and_pretrain_take_a_url_as_data(served, tmp_path: Path, tiny_recipe: Path, capsys) -> None:
    root, server = served
    url = server.url_of("g.tif")
    backbone = export_backbone(build_vit(**ARGS), ARGS, tmp_path / "bb", mean=(0.5,) * 3, std=(0.5,) * 3)
    argv = ["embed", "--domain", "pathology", "--data", url, "--backbone", str(backbone)]
    argv += ["--out", str(tmp_path / "feats"), "--num-workers", "0", "--quiet", "data.options.mpp=1.0"]
    assert main(argv) == 0
    assert main(argv) == 0  # complete: the same URL and size
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["processed"], result["complete_before"]) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["g.h5", "summary.json"]
    run = ["pretrain", "--domain", "pathology", "--data", url, "--config", str(tiny_recipe)]
    run += ["--out", str(tmp_path / "run"), "--quiet", "train.steps=1", "data.num_workers=2"]
    run += ["data.options.mpp=1.0", "data.options.tile_size=32"]
    assert main(run) == 0  # two forked reader workers open the URL themselves


def test_tiffslide_resolution_joins_the_chain() -> None:
    assert find_mpp({"tiffslide.mpp-x": "0.2527"}) == (0.2527, "tiffslide.mpp-x")
    # a screen DPI default (72 per inch = 352.8 um/px) is no microscope's: the chain goes on
    mpp, source = find_mpp({"tiffslide.mpp-x": "352.77", "tiffslide.objective-power": "20"})
    assert mpp == pytest.approx(0.5) and source.startswith("objective power 20")
    assert find_mpp({"openslide.mpp-x": "0.25", "tiffslide.mpp-x": "0.5"}) == (0.25, "openslide.mpp-x")
