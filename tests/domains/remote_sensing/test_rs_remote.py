"""Scenes by URL (GDAL /vsicurl/ and /vsis3/) and list files of scenes: the same pixels as a local read,
dropped connections retried, a URL that never reads skipped and reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from canopy_testdata import write_checkpoint
from range_server import serve
from rasterio.windows import Window
from rs_testdata import random_bands, write_raster

import foundation_domains.remote_sensing.raster as raster
import foundation_domains.remote_sensing.sampling as sampling
from foundation.batch import EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation_domains.remote_sensing.raster import (
    UnreadableRasterError,
    find_rasters,
    list_rasters,
    open_dataset,
    open_raster,
    read_pixels,
    scan_rasters,
)
from foundation_domains.remote_sensing.sampling import RasterSampleSource

WINDOWS = [Window(0, 0, 64, 64), Window(130, 200, 100, 90), Window(300, 500, 200, 100)]


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    options = {**raster.REMOTE_GDAL_OPTIONS, "GDAL_HTTP_RETRY_DELAY": "0.01", "GDAL_HTTP_TIMEOUT": "10"}
    monkeypatch.setattr(raster, "REMOTE_GDAL_OPTIONS", options)


def _scene(path: Path, seed: int = 0, nodata: int | None = None) -> Path:
    data = random_bands(4, 600, 500, "uint16", seed)
    if nodata is not None:
        data[:, :40, :] = nodata
    return write_raster(
        path, data, nodata=nodata, tiled=True, blockxsize=128, blockysize=128, compress="deflate"
    )


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "served"
    for i, name in enumerate(["a.tif", "b.tif", "c.tif", "d.tif"]):
        _scene(root / name, seed=i, nodata=0 if name == "a.tif" else None)
    with serve(root) as server:
        yield root, server


def _same_pixels(url: str, local: Path, windows=WINDOWS) -> None:
    with open_raster(url) as remote_ds, rasterio.open(local) as local_ds:
        assert (remote_ds.width, remote_ds.height, remote_ds.count) == (local_ds.width, local_ds.height, 4)
        for win in windows:
            got, want = read_pixels(remote_ds, [4, 3, 2], win), read_pixels(local_ds, [4, 3, 2], win)
            np.testing.assert_array_equal(got.values, want.values)
            np.testing.assert_array_equal(got.valid, want.valid)


def test_windows_by_url_equal_the_local_read(served) -> None:
    root, server = served
    _same_pixels(server.url_of("a.tif"), root / "a.tif")
    assert not any(path.endswith("/") for _, path in server.state.requests)  # no folder listing


def test_a_dropped_transfer_is_retried(served) -> None:
    root, server = served
    with open_raster(server.url_of("b.tif")):
        pass
    server.drop("b.tif", after_bytes=300, times=2)
    _same_pixels(server.url_of("b.tif"), root / "b.tif", [Window(200, 300, 150, 150)])
    assert server.state.drops["b.tif"].times == 0  # both cuts happened, and the read still came out right


def test_list_file_of_paths_and_urls(served, tmp_path: Path) -> None:
    root, server = served
    listing = tmp_path / "scenes.csv"
    listing.write_text(f"url,note\nserved/a.tif,local\n{server.url_of('b.tif')},remote\n")
    assert list_rasters(listing) == [root / "a.tif", server.url_of("b.tif")]
    infos = scan_rasters(listing)
    assert [i.path for i in infos] == [str(root / "a.tif"), server.url_of("b.tif")]
    source = RasterSampleSource(infos, [10000.0] * 2, [0.0] * 4, window=96)
    paths = {source.sample(i, torch.Generator().manual_seed(i))["path"] for i in range(16)}
    assert paths == {str(root / "a.tif"), server.url_of("b.tif")}


def test_a_url_that_never_reads_is_skipped_and_reported(served, tmp_path: Path, caplog) -> None:
    root, server = served
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{server.url_of('c.tif')}\n{server.url_of('d.tif')}\n{server.url_of('gone.tif')}\n")
    infos, skipped = find_rasters(listing)
    assert [i.path for i in infos] == [server.url_of("c.tif"), server.url_of("d.tif")]
    assert skipped[0]["file"] == server.url_of("gone.tif") and "not a readable raster" in skipped[0]["reason"]
    # d.tif opened fine, then every transfer of it is cut: its windows are skipped, named once, c.tif serves
    server.drop("d.tif", after_bytes=200)
    source = RasterSampleSource(infos, [10000.0] * 2, [0.0] * 4, window=96)
    with caplog.at_level(logging.WARNING):
        paths = {source.sample(i, torch.Generator().manual_seed(i))["path"] for i in range(12)}
    assert paths == {server.url_of("c.tif")}
    assert source.broken == {server.url_of("d.tif")}
    assert caplog.text.count(f"skipping unreadable windows of {server.url_of('d.tif')}") == 1


def test_a_url_that_no_longer_opens_is_opened_once_not_once_a_try(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open that failed (after open_dataset's own tries) was tried again by each read try: 3 x 3 opens."""
    _, server = served
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{server.url_of('c.tif')}\n{server.url_of('d.tif')}\n")
    infos, _ = find_rasters(listing)
    source = RasterSampleSource(infos, [10000.0] * 2, [0.0] * 4, window=96)
    opens: list[str] = []

    def open_dataset(path):
        opens.append(str(path))
        if str(path).endswith("d.tif"):  # gone since the scan
            raise UnreadableRasterError(
                f"{path}: not a readable raster after 3 tries (HTTP response code: 404)"
            )
        return raster.open_dataset(path)

    monkeypatch.setattr(sampling, "open_dataset", open_dataset)
    paths = {source.sample(i, torch.Generator().manual_seed(i))["path"] for i in range(8)}
    assert paths == {server.url_of("c.tif")} and source.broken == {server.url_of("d.tif")}
    assert opens.count(server.url_of("d.tif")) == 1


def test_stats_command_on_a_list_with_a_dead_url(served, tmp_path: Path, capsys) -> None:
    root, server = served
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# scenes\n{server.url_of('a.tif')}\nserved/b.tif\n{server.url_of('gone.tif')}\n")
    out = tmp_path / "stats.json"
    code = main(["stats", str(listing), "--window", "128", "--out", str(out), "--quiet"])
    assert code == EXIT_SOME_SKIPPED
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == 2 and summary["skipped"][0]["file"] == server.url_of("gone.tif")
    assert out.is_file()


def test_s3_scene_equals_the_local_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    path = _scene(tmp_path / "s.tif", seed=5)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_S3_ENDPOINT": f"{host}:{port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        s3.create_bucket(Bucket="scenes")
        s3.upload_file(str(path), "scenes", "tiles/s.tif")
        _same_pixels("s3://scenes/tiles/s.tif", path)
        # S3 says 'The specified key does not exist.' (GDAL's 'HTTP response code: 404' only when asked
        # again): a missing key was tried twice, 'after 2 tries'
        with pytest.raises(
            UnreadableRasterError, match=r"missing\.tif: not a readable raster \(The specified key"
        ):
            open_dataset("s3://scenes/tiles/missing.tif")
    finally:
        server.stop()


def _maps(text: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return {r["scene"]: r for r in lines}


def test_canopy_height_of_a_url_equals_the_map_of_the_local_file(served, tmp_path: Path, capsys) -> None:
    root, server = served
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    write_raster(
        root / "m.tif", random_bands(4, 60, 75, "uint16", seed=3), nodata=0
    )  # small: a fast model run
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{server.url_of('m.tif')}?token=x\n{server.url_of('gone.tif')}\n")
    common = ["--checkpoint", str(checkpoint), "--quiet", "--batch-size", "4"]
    assert main(["canopy-height", str(root / "m.tif"), "--out", str(tmp_path / "local"), *common]) == 0
    assert (
        main(["canopy-height", str(listing), "--out", str(tmp_path / "remote"), *common]) == EXIT_SOME_SKIPPED
    )
    results = _maps(capsys.readouterr().out)
    assert results[f"{server.url_of('m.tif')}?token=x"]["status"] == "done"
    assert results[server.url_of("gone.tif")]["status"] == "skipped"
    assert server.url_of("gone.tif") in results[server.url_of("gone.tif")]["reason"]
    with (
        rasterio.open(tmp_path / "local/m_chm.tif") as want,
        rasterio.open(tmp_path / "remote/m_chm.tif") as got,
    ):
        np.testing.assert_array_equal(got.read(1), want.read(1))
        assert got.transform == want.transform and got.crs == want.crs
    assert (
        main(["canopy-height", str(listing), "--out", str(tmp_path / "remote"), *common]) == EXIT_SOME_SKIPPED
    )
    assert _maps(capsys.readouterr().out)[f"{server.url_of('m.tif')}?token=x"]["status"] == "exists"
    # signed again (another token): the same scene, already mapped (it was "another input", an error); the
    # map's tags do not keep the token
    listing.write_text(f"{server.url_of('m.tif')}?token=y\n")
    assert main(["canopy-height", str(listing), "--out", str(tmp_path / "remote"), *common]) == 0
    assert _maps(capsys.readouterr().out)[f"{server.url_of('m.tif')}?token=y"]["status"] == "exists"
    with rasterio.open(tmp_path / "remote/m_chm.tif") as got:
        assert "token" not in got.tags()["source_path"]


def test_only_gdal_s_final_answers_stop_the_retries() -> None:
    """'404' or '403' anywhere in the message stopped them: a refused connection to port 40433 was final."""
    assert not raster._is_final("CURL error: Failed to connect to 127.0.0.1 port 40433: Could not connect")
    assert not raster._is_final("HTTP response code: 503") and not raster._is_final("HTTP response code: 429")
    assert raster._is_final("HTTP response code: 404") and raster._is_final("HTTP response code: 403")


def test_s3_without_credentials_is_one_error_naming_the_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_S3_ENDPOINT", "127.0.0.1:9")  # nothing is sent: GDAL finds no credentials first
    with pytest.raises(raster.UnreadableRasterError) as caught:
        raster.open_dataset("s3://bucket/scene.tif")
    message = str(caught.value)
    assert message.startswith("s3://bucket/scene.tif: no credentials for the bucket")
    assert "AWS_SECRET_ACCESS_KEY" in message and "tries" not in message  # named, and not retried
