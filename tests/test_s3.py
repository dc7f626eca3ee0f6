"""S3-compatible storage end to end: inputs listed and decoded from a bucket,
Lance tables and summary written to a bucket, against a local S3 server."""

from __future__ import annotations

import json

import lance
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.store.lance_io import read_blob_bytes
from engine.curate.task import run
from engine.sample import read_frame_index
from udfs.uris import lance_storage_options, list_inputs
from udfs.media.video import decode_rgb_bytes


@pytest.fixture(scope="module")
def s3(local_s3, video_dir):
    client, opts = local_s3
    client.create_bucket(Bucket="raw")
    client.create_bucket(Bucket="curated")
    for name in ("short_15fps_3s.mp4", "odd_25fps_12s.mp4", "corrupt.mp4"):
        client.upload_file(str(video_dir / name), "raw", f"in/{name}")
    client.put_object(Bucket="raw", Key="in/readme.txt", Body=b"not listed: no video extension")
    return client, opts


def test_listing_a_bucket_prefix(s3):
    _, opts = s3
    assert list_inputs("s3://raw/in/", storage_options=opts) == [
        "s3://raw/in/corrupt.mp4", "s3://raw/in/odd_25fps_12s.mp4", "s3://raw/in/short_15fps_3s.mp4"]


def test_bucket_to_bucket_run(ray_session, s3):
    client, opts = s3
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "input=s3://raw/in/", "output=s3://curated/run", "transcode.preset=ultrafast",
            "motion.mode=disable", "export.parquet=true"])
    cfg.storage_options = opts
    summary = run(cfg)
    lance_opts = lance_storage_options(opts)
    clips = lance.dataset("s3://curated/run/clips.lance", storage_options=lance_opts)
    table = clips.to_table(columns=["source_uri", "start_frame", "end_frame", "error"], with_row_id=True)
    spans = sorted((r["source_uri"], r["start_frame"], r["end_frame"]) for r in table.to_pylist())
    assert spans == [("s3://raw/in/odd_25fps_12s.mp4", 0, 250), ("s3://raw/in/odd_25fps_12s.mp4", 250, 300),
                     ("s3://raw/in/short_15fps_3s.mp4", 0, 45)]
    for row, mp4 in zip(table.to_pylist(), read_blob_bytes(clips, "mp4", table.column("_rowid").to_pylist())):
        frames = decode_rgb_bytes(mp4)
        assert [read_frame_index(f) for f in frames] == list(range(row["start_frame"], row["end_frame"]))
    videos = lance.dataset("s3://curated/run/videos.lance", storage_options=lance_opts).to_table().to_pylist()
    assert {v["uri"]: v["error"] is not None for v in videos} == {
        "s3://raw/in/corrupt.mp4": True, "s3://raw/in/odd_25fps_12s.mp4": False,
        "s3://raw/in/short_15fps_3s.mp4": False}
    stored = json.loads(client.get_object(Bucket="curated", Key="run/summary.json")["Body"].read())
    assert stored["clips"] == summary["clips"] == 3 and stored["videos_failed"] == 1
    assert set(stored["config"]["storage_options"].values()) == {"<redacted>"}  # no credentials at rest
    assert client.head_object(Bucket="curated", Key="run/clips.parquet")["ContentLength"] > 0
    # A re-run over the same bucket prefix replaces the tables.
    cfg.overwrite = True
    assert run(cfg)["clips"] == 3
    assert lance.dataset("s3://curated/run/clips.lance", storage_options=lance_opts).count_rows() == 3
