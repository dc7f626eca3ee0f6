"""task=export: webdataset shards, Cosmos-Predict2 and NeMo layouts and
Parquet, from a real clip table (`training_output`), locally and on S3."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.export.task import run
from engine.export.exporters.webdataset import aspect_bin, duration_bin, resolution_bin
from udfs.schema import CLIP_FILTER_FIELDS, blob_field, clip_id_for, clip_schema, conform
from engine.sample import read_frame_index, write_video
from udfs.media.probe import probe_video
from udfs.media.video import decode_rgb_bytes

REPO = Path(__file__).resolve().parent.parent
BUCKET = "training-exports"


def export(output, *overrides: str, storage_options=None) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=export", f"output={output}", *overrides])
    if storage_options:
        cfg.storage_options = storage_options
    return run(cfg)


def table_rows(out, where: str | None = "passed AND error IS NULL AND duplicate IS NOT TRUE") -> dict[str, dict]:
    clips = lance.dataset(str(Path(out) / "clips.lance"))
    cols = [n for n in clips.schema.names if n not in ("mp4", "preview_webp")]
    return {r["clip_id"]: r for r in clips.to_table(columns=cols, filter=where).to_pylist()}


def barcodes(mp4: bytes) -> list[int]:
    return [read_frame_index(f) for f in decode_rgb_bytes(mp4)]


# ----------------------------------------------------------------- bins
def test_bins_follow_cosmos_curate():
    assert [resolution_bin(w, h) for w, h in ((1920, 1080), (1080, 1920), (1280, 720), (1279, 719), (640, 360))] == \
        ["1080", "1080", "720", "lt_720", "lt_720"]
    assert [aspect_bin(w, h) for w, h in ((1080, 1920), (3, 4), (1, 1), (4, 3), (16, 9), (21, 9))] == \
        ["9_16", "3_4", "1_1", "4_3", "16_9", "16_9"]
    assert [duration_bin(s) for s in (0.5, 4.99, 5.0, 12.0, 30.0, 600.0)] == \
        ["0_5", "0_5", "5_10", "10_30", "30_inf", "30_inf"]
    assert duration_bin(3.0, (2.0, 4.5)) == "2_4p5"


@pytest.fixture(scope="module")
def shaped_output(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A clip table written directly: each clip is a whole synthetic video of
    a real size and length (probed, not declared), so every bin is decided
    by true media facts. Low frame rates keep the big frames cheap."""
    root = tmp_path_factory.mktemp("shaped")
    specs = {
        "1080p_12s.mp4": (dict(width=1920, height=1080, fps=1, num_frames=12),
                          "resolution_1080/aspect_ratio_16_9/duration_10_30"),
        "720p_6s.mp4": (dict(width=1280, height=720, fps=2, num_frames=12),
                        "resolution_720/aspect_ratio_16_9/duration_5_10"),
        "portrait720_6s.mp4": (dict(width=720, height=1280, fps=1, num_frames=6),
                               "resolution_720/aspect_ratio_9_16/duration_5_10"),
        "tall1080_31s.mp4": (dict(width=1080, height=1350, fps=1, num_frames=31),
                             "resolution_1080/aspect_ratio_3_4/duration_30_inf"),
        "small_3s.mp4": (dict(width=320, height=240, fps=10, num_frames=30),
                         "resolution_lt_720/aspect_ratio_4_3/duration_0_5"),
    }
    rows, expected = [], {}
    for name, (spec, bin_dir) in specs.items():
        path = write_video(root / "in" / name, crf=40, **spec)
        facts = probe_video(str(path))
        clip_id = clip_id_for(str(path), 0, facts["num_frames"])
        expected[clip_id] = bin_dir
        rows.append({"clip_id": clip_id, "video_id": "v", "source_uri": str(path), "clip_index": 0, "start_s": 0.0,
                     "end_s": facts["duration_s"], "start_frame": 0, "end_frame": facts["num_frames"],
                     "mp4": path.read_bytes(), "codec": facts["codec"], "width": facts["width"],
                     "height": facts["height"], "fps": facts["fps"], "num_frames": facts["num_frames"],
                     "num_bytes": path.stat().st_size, "has_audio": False, "passed": True})
    schema = clip_schema(CLIP_FILTER_FIELDS)
    lance.write_dataset(conform(pa.Table.from_pylist(rows), schema), str(root / "out" / "clips.lance"), schema=schema)
    return root / "out", expected


def test_webdataset_bins_are_right(shaped_output):
    out, expected = shaped_output
    result = export(out, "export.format=webdataset")["results"]["webdataset"]
    assert result["clips"] == len(expected) and result["unbinned"] == 0
    for clip_id, bin_dir in expected.items():
        shard = out / "exports" / "webdataset" / bin_dir / "part_000000" / "000000.tar"
        keys = [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]
        assert keys == [clip_id], bin_dir


# ------------------------------------------------------------- webdataset
def test_webdataset_shards_round_trip_and_parts_continue(training_output, tmp_path):
    rows = table_rows(training_output)
    target = tmp_path / "wds"
    first = export(training_output, "export.format=webdataset", f"export.dir={target}",
                   "export.webdataset.max_clips_per_shard=2")["results"]["webdataset"]
    assert first["clips"] == len(rows) == 7
    shards = sorted(glob.glob(str(target / "**" / "*.tar"), recursive=True))
    assert len(shards) == first["shards"] == sum(len(b["shards"]) for b in first["bins"].values())
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(rows)
    sizes = {160: "4_3", 192: "16_9", 120: "3_4"}
    for s in samples:
        row = rows[s["__key__"]]
        assert {"mp4", "json", "npy"} <= set(s)
        # The mp4 is the clip: its frames are the span's source frames.
        assert barcodes(s["mp4"]) == list(range(row["start_frame"], row["end_frame"]))
        meta = s["json"]
        for key in ("clip_id", "source_uri", "start_s", "end_s", "width", "height", "fps", "num_frames", "caption",
                    "caption_enhanced", "caption_windows", "passed", "duplicate",
                    # The quality signals, as every score column, travel in the metadata.
                    "text_area_ratio", "border_top", "sharpness", "brightness", "camera_motion", "cut_inside"):
            assert meta[key] == row[key], key
        assert "embedding" not in meta
        np.testing.assert_array_equal(s["npy"], np.asarray(row["embedding"], dtype=np.float32))
        bin_dir = f"resolution_lt_720/aspect_ratio_{sizes[row['width']]}/duration_0_5"
        assert meta["bin"] == bin_dir and bin_dir in s["__url__"]
    # Shards hold at most 2 clips each.
    per_bin = {b: len(v["shards"]) for b, v in first["bins"].items()}
    clips_per_bin = {b: sum(1 for s in samples if s["json"]["bin"] == b) for b in per_bin}
    assert per_bin == {b: -(-n // 2) for b, n in clips_per_bin.items()} and len(per_bin) == 3
    # A second export into the same folder adds a part per bin and leaves the first one alone.
    before = {p: Path(p).read_bytes() for p in shards}
    second = export(training_output, "export.format=webdataset", f"export.dir={target}",
                    "export.webdataset.shard_size_mb=1")["results"]["webdataset"]
    assert {b["part"] for b in second["bins"].values()} == {1}
    assert {p: Path(p).read_bytes() for p in shards} == before
    again = sorted(glob.glob(str(target / "**" / "part_000001" / "*.tar"), recursive=True))
    assert len(again) == 3  # one shard per bin: the clips are far below 1 MB
    assert sorted(s["__key__"] for s in wds.WebDataset(again, shardshuffle=False)) == sorted(rows)


def test_a_curate_run_exports_at_its_end(training_output):
    """`training_output` was curated with export.format=parquet: the curated
    view of that run (all 9 clips passed then) is in OUT/exports/parquet/."""
    summary = json.loads((training_output.parent / "curate_summary.json").read_text())
    path = training_output / "exports" / "parquet" / "clips.parquet"
    assert summary["exports"] == {"parquet": str(path)}
    assert sorted(pq.read_table(path)["clip_id"].to_pylist()) == sorted(table_rows(training_output, None))


def test_export_where_all_takes_every_row(training_output, tmp_path):
    result = export(training_output, "export.format=parquet", "export.where=all",
                    f"export.dir={tmp_path}")["results"]["parquet"]
    table = pq.read_table(tmp_path / "clips.parquet")
    assert result["rows"] == table.num_rows == len(table_rows(training_output, None)) == 9
    assert "mp4" not in table.column_names and table.schema.metadata[b"embedding_name"] == b"cosmos_embed1"
    curated = export(training_output, "export.format=parquet", f"export.dir={tmp_path / 'c'}")
    assert curated["results"]["parquet"]["rows"] == 7


# ------------------------------------------------------------- cosmos_predict2
def test_cosmos_predict2_one_entry_per_caption_window(training_output):
    rows = table_rows(training_output)
    result = export(training_output, "export.format=cosmos_predict2",
                    "export.cosmos_predict2.caption=caption_enhanced", "export.cosmos_predict2.preset=ultrafast")
    root = training_output / "exports" / "cosmos_predict2"
    assert result["results"]["cosmos_predict2"]["entries"] == 2 * len(rows)
    videos = sorted(os.listdir(root / "videos"))
    assert sorted(os.listdir(root / "metas")) == sorted(v[:-4] + ".txt" for v in videos)
    assert len(videos) == 2 * len(rows)
    for name in videos:
        clip_id, start, end = name[:-4].rsplit("_", 2)
        row = rows[clip_id]
        start, end = int(start), int(end)
        window = next(w for w in row["caption_windows"] if (w["start_frame"], w["end_frame"]) == (start, end))
        # Each video is exactly the window's frames, cut from the clip.
        assert barcodes((root / "videos" / name).read_bytes()) == list(
            range(row["start_frame"] + start, row["start_frame"] + end))
        assert (root / "metas" / (name[:-4] + ".txt")).read_text() == (window["caption_enhanced"] or window["caption"])


# ------------------------------------------------------------------- nemo
def test_nemo_layout_with_embeddings_parquet_and_windows(training_output, tmp_path):
    rows = table_rows(training_output)
    result = export(training_output, "export.format=nemo", f"export.dir={tmp_path}")["results"]["nemo"]
    assert result["clips"] == result["metas"] == result["embeddings"] == result["previews"] == 7
    assert {p[:-4] for p in os.listdir(tmp_path / "clips")} == set(rows)
    assert {p[:-5] for p in os.listdir(tmp_path / "previews")} == set(rows)
    for clip_id, row in rows.items():
        meta = json.loads((tmp_path / "metas" / "v0" / f"{clip_id}.json").read_text())
        assert meta["span_uuid"] == clip_id and meta["source_video"] == row["source_uri"]
        assert meta["duration_span"] == [row["start_s"], row["end_s"]] and meta["valid"] is True
        assert meta["width_source"] == row["width"] and meta["framerate_source"] == row["fps"]
        assert [(w["start_frame"], w["end_frame"], w["qwen_caption"], w["qwen_lm_enhanced_caption"])
                for w in meta["windows"]] == [(w["start_frame"], w["end_frame"], w["caption"], w["caption_enhanced"])
                                              for w in row["caption_windows"]]
        assert barcodes((tmp_path / "clips" / f"{clip_id}.mp4").read_bytes()) == list(
            range(row["start_frame"], row["end_frame"]))
    # What NeMo's semantic dedup reads: id + embedding, in ce1_embd_parquet/ for Cosmos-Embed1 vectors.
    emb = pq.read_table(tmp_path / "ce1_embd_parquet")
    assert emb.column_names == ["id", "embedding"]
    by_id = dict(zip(emb["id"].to_pylist(), emb["embedding"].to_pylist()))
    assert set(by_id) == set(rows)
    for clip_id, row in rows.items():
        np.testing.assert_allclose(by_id[clip_id], row["embedding"])


# ------------------------------------------------------------------- CLI
def test_cli_export_task_and_its_errors(training_output, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "engine", "task=export", f"output={training_output}",
                           "export.format=[webdataset,parquet]", f"export.dir={tmp_path / 'both'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert glob.glob(str(tmp_path / "both" / "webdataset" / "**" / "*.tar"), recursive=True)
    assert pq.read_table(tmp_path / "both" / "parquet" / "clips.parquet").num_rows == 7
    with pytest.raises(ValueError, match=r"unknown export.format \['tfrecord'\]"):
        export(training_output, "export.format=tfrecord")
    # Without export.format, task=export writes its default (webdataset); with the default
    # switched off it says what to set.
    done = export(training_output, f"export.dir={tmp_path / 'default'}")
    assert list(done["exports"]) == ["webdataset"] and glob.glob(str(tmp_path / "default" / "**" / "*.tar"),
                                                                  recursive=True)
    with pytest.raises(ValueError, match="nothing to do"):
        export(training_output, "task.default_format=null")
    with pytest.raises(FileNotFoundError, match="run task=curate on this output first"):
        export(tmp_path / "none", "export.format=webdataset")


# -------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3_output(local_s3, training_output):
    """The training table copied into a bucket on a local S3 server. moto's
    store is per process, shared with tests/test_s3.py: this module uses its
    own bucket and empties it afterwards."""
    from udfs.uris import lance_storage_options

    client, opts = local_s3
    client.create_bucket(Bucket=BUCKET)
    clips = lance.dataset(str(training_output / "clips.lance"))
    table = clips.to_table(columns=[n for n in clips.schema.names if n != "mp4" and n != "preview_webp"],
                           with_row_id=True)
    ids = table.column("_rowid").to_pylist()
    for name in ("mp4", "preview_webp"):
        found = dict(clips.read_blobs(name, ids=ids))
        table = table.append_column(blob_field(name), pa.array([found.get(i) for i in ids], pa.large_binary()))
    table = table.drop_columns(["_rowid"]).replace_schema_metadata(clips.schema.metadata)
    lance.write_dataset(table, f"s3://{BUCKET}/run/clips.lance", storage_options=lance_storage_options(opts))
    yield client, opts
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def test_exports_and_loader_read_an_s3_output(s3_output, training_output):
    from engine.training.dataset import ClipDataset

    client, opts = s3_output
    rows = table_rows(training_output)
    result = export(f"s3://{BUCKET}/run", "export.format=[webdataset,nemo]", storage_options=opts)["results"]
    assert result["webdataset"]["clips"] == result["nemo"]["clips"] == 7
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="run/exports/")["Contents"]]
    tars = [k for k in keys if k.startswith("run/exports/webdataset/") and k.endswith(".tar")]
    assert len(tars) == 3 and all("/part_000000/" in k for k in tars)
    got = []
    for key in tars:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        local = training_output.parent / key.replace("/", "_")
        local.write_bytes(body)
        got += [s["__key__"] for s in wds.WebDataset(str(local), shardshuffle=False)]
    assert sorted(got) == sorted(rows)
    assert sum(k.startswith("run/exports/nemo/metas/v0/") for k in keys) == 7
    assert any(k.startswith("run/exports/nemo/ce1_embd_parquet/") for k in keys)
    # Exporting again continues the part numbering on the object store too.
    again = export(f"s3://{BUCKET}/run", "export.format=webdataset", storage_options=opts)["results"]["webdataset"]
    assert {b["part"] for b in again["bins"].values()} == {1}
    # The training loader reads the same bucket.
    ds = ClipDataset(f"s3://{BUCKET}/run", num_frames=2, size=16, caption="clip", storage_options=opts)
    assert sorted(s["clip_id"] for s in ds) == sorted(rows)


def test_export_reads_in_bounded_chunks(training_output, tmp_path, monkeypatch):
    """Blobs are read `chunk_rows` clips at a time, never the whole table."""
    import engine.export.exporters.rows as rows_mod

    seen = []
    real = rows_mod.read_blob_bytes

    def spy(dataset, column, ids):
        seen.append(len(ids))
        return real(dataset, column, ids)

    monkeypatch.setattr(rows_mod, "read_blob_bytes", spy)
    export(training_output, "export.format=webdataset", "export.chunk_rows=3", f"export.dir={tmp_path}")
    assert seen and max(seen) <= 3 and sum(seen) == 7
