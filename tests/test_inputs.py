"""Input listing and probing: local paths, globs, JSON lists, HTTP, bad files."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pyarrow as pa
import pytest

from reelsift_conf import stage_args
from udfs.uris import list_inputs
from udfs.media.probe import ProbeVideos


def test_directory_is_recursive_and_filtered(tmp_path, video_dir):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "clip.MOV").write_bytes(b"x")
    (nested / "notes.txt").write_text("not a video")
    assert list_inputs(str(tmp_path)) == [str(nested / "clip.MOV")]
    names = [u.rsplit("/", 1)[1] for u in list_inputs(str(video_dir))]
    assert "hd_30fps_23s.mp4" in names and "ntsc_29.97fps_5s.mkv" in names and "empty.mp4" in names


def test_glob_json_list_and_missing(tmp_path, video_dir):
    assert [u.rsplit("/", 1)[1] for u in list_inputs(str(video_dir / "*.mkv"))] == ["ntsc_29.97fps_5s.mkv"]
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["hd_30fps_23s.mp4", {"uri": "odd_25fps_12s.mp4"}]))
    assert list_inputs(str(listing), root=str(video_dir)) == [
        str(video_dir / "hd_30fps_23s.mp4"), str(video_dir / "odd_25fps_12s.mp4")]
    listing.write_text(json.dumps({"root": str(video_dir), "videos": ["tiny_24fps_1s.mp4"]}))
    assert list_inputs(str(listing)) == [str(video_dir / "tiny_24fps_1s.mp4")]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_inputs(str(tmp_path / "nope"))


def test_probe_facts_and_bad_files(video_dir, video_frames, tmp_path):
    text = tmp_path / "readme.mp4"
    text.write_text("this is not a video at all\n" * 50)
    uris = [str(video_dir / n) for n in video_frames] + [
        str(video_dir / "empty.mp4"), str(video_dir / "corrupt.mp4"), str(text)]
    table = ProbeVideos(**stage_args("probe"))(pa.table({"uri": uris}))
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    for name, frames in video_frames.items():
        row = rows[name]
        assert row["error"] is None, row
        assert row["num_frames"] == frames
        assert row["codec"] == "h264"
        assert row["pix_fmt"] == ("yuv444p" if name.startswith("odd") else "yuv420p")
    hd = rows["hd_30fps_23s.mp4"]
    assert (hd["width"], hd["height"], hd["fps"], hd["has_audio"]) == (320, 180, 30.0, True)
    assert hd["duration_s"] == pytest.approx(23.0)
    odd = rows["odd_25fps_12s.mp4"]
    assert (odd["width"], odd["height"], odd["has_audio"]) == (253, 141, False)
    assert rows["ntsc_29.97fps_5s.mkv"]["fps"] == pytest.approx(30000 / 1001)
    assert rows["empty.mp4"]["error"] == "probe failed: ValueError: file is empty"
    assert rows["corrupt.mp4"]["error"].startswith("probe failed: InvalidDataError")
    assert rows["readme.mp4"]["error"].startswith("probe failed")
    assert table.schema.field("num_frames").type == pa.int64()


@pytest.fixture()
def http_root(video_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_inputs_are_probed(http_root, tmp_path):
    listing = tmp_path / "remote.json"
    listing.write_text(json.dumps({"root": http_root, "videos": ["short_15fps_3s.mp4", "missing.mp4"]}))
    uris = list_inputs(str(listing))
    assert uris == [f"{http_root}/missing.mp4", f"{http_root}/short_15fps_3s.mp4"]
    rows = {r["uri"]: r for r in ProbeVideos(**stage_args("probe"))(pa.table({"uri": uris})).to_pylist()}
    good = rows[f"{http_root}/short_15fps_3s.mp4"]
    assert good["error"] is None and good["num_frames"] == 45 and good["size_bytes"] > 0
    assert "404" in rows[f"{http_root}/missing.mp4"]["error"]
