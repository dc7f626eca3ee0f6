"""Inputs that fail mid-read: retried with backoff from the byte reached, then
an error row; the run goes on and keeps everything else."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error

import lance
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.curate.task import run
from engine.store.lance_io import read_blob_bytes
from engine.sample import read_frame_index
from udfs.uris import HttpRangeFile, RetryingStoreFile, RetryPolicy, with_retries
from udfs.media.video import decode_rgb_bytes

FAST = RetryPolicy(attempts=3, backoff_s=0.02, max_backoff_s=0.05)


class FlakyServer:
    """A local HTTP server with range requests that drops connections: GETs of
    a path in `drops` send half of what was asked and hang up (that many
    times); GETs of a path in `cut` never send past that byte of the file."""

    def __init__(self, files: dict[str, bytes], drops: dict[str, int], cut: dict[str, int]) -> None:
        self.files, self.drops, self.cut, self.gets = files, dict(drops), cut, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "File not found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                data = server.files.get(self.path)
                server.gets[self.path] = server.gets.get(self.path, 0) + 1
                if data is None:
                    self.send_error(404, "File not found")
                    return
                start = 0
                ranged = self.headers.get("Range")
                if ranged:
                    start = int(ranged.split("=")[1].split("-")[0])
                body = data[start:]
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(len(body)))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                left = server.drops.get(self.path, 0)
                if left and len(body) > 1:
                    server.drops[self.path] = left - 1
                    self.hang_up(body[: len(body) // 2])
                elif self.path in server.cut:
                    self.hang_up(body[: max(0, server.cut[self.path] - start)])
                else:
                    self.wfile.write(body)

            def hang_up(self, sent: bytes) -> None:
                self.wfile.write(sent)
                self.wfile.flush()
                self.close_connection = True  # the rest never comes

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def flaky(good_videos):
    data = good_videos["odd_25fps_12s.mp4"].read_bytes()
    short = good_videos["short_15fps_3s.mp4"].read_bytes()
    server = FlakyServer({"/flaky.mp4": data, "/dead.mp4": data, "/fine.mp4": short},
                         drops={"/flaky.mp4": 2}, cut={"/dead.mp4": len(data) // 2})
    yield server
    server.close()


def test_dropped_connection_is_resumed_at_the_byte_reached(flaky):
    expected = flaky.files["/flaky.mp4"]
    with HttpRangeFile(f"{flaky.url}/flaky.mp4", FAST) as fh:
        assert fh.read() == expected
    assert flaky.gets["/flaky.mp4"] == 3  # two drops, then the rest from where it stopped
    with HttpRangeFile(f"{flaky.url}/flaky.mp4", FAST) as fh:  # seeks reopen at the offset
        fh.seek(1000)
        assert fh.read(10) == expected[1000:1010]
        assert fh.seek(-5, 2) == len(expected) - 5 and fh.read() == expected[-5:]


def test_retries_give_up_with_the_cause_and_not_found_is_not_retried(flaky):
    with pytest.raises(OSError, match="giving up after 3 attempts: IncompleteRead"):
        HttpRangeFile(f"{flaky.url}/dead.mp4", FAST).read()
    assert flaky.gets["/dead.mp4"] == 3
    with pytest.raises(urllib.error.HTTPError, match="404"):
        HttpRangeFile(f"{flaky.url}/nope.mp4", FAST).read(10)
    assert flaky.gets["/nope.mp4"] == 1


def test_object_store_reads_are_retried(tmp_path):
    """The object-store reader reopens at the offset after an I/O error (a
    local file stands in for the bucket; the failure is injected)."""
    path = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 100
    path.write_bytes(payload)
    reader = RetryingStoreFile(f"file://{path}", None, FAST)
    real_open = reader._open_at
    failures = iter([OSError("AWS Error NETWORK_CONNECTION during GetObject"), None, None, None])

    def flaky_open(pos: int):
        error = next(failures, None)
        if error:
            raise error
        return real_open(pos)

    reader._open_at = flaky_open
    reader.seek(300)
    assert reader.read(1000) == payload[300:1300]
    calls = []
    assert with_retries("x", FAST, lambda: calls.append(1) or len(calls)) == 1


def test_run_goes_on_past_a_dropped_input(ray_session, flaky, tmp_path):
    listing = tmp_path / "remote.json"
    listing.write_text(json.dumps({"root": flaky.url, "videos": ["flaky.mp4", "dead.mp4", "fine.mp4", "gone.mp4"]}))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"input={listing}", f"output={tmp_path / 'out'}", "transcode.preset=ultrafast", "motion.mode=disable",
            "preview.enabled=false", "read_retries.attempts=3", "read_retries.backoff_s=0.02",
            "read_retries.max_backoff_s=0.05"])
    summary = run(cfg)
    videos = {r["uri"].rsplit("/", 1)[1]: r for r in
              lance.dataset(str(tmp_path / "out" / "videos.lance")).to_table().to_pylist()}
    assert videos["flaky.mp4"]["error"] is None and videos["flaky.mp4"]["num_clips"] == 2
    assert "giving up after 3 attempts" in videos["dead.mp4"]["error"]
    assert "404" in videos["gone.mp4"]["error"]
    assert videos["fine.mp4"]["num_clips"] == 1
    assert summary["videos_failed"] == 2 and summary["clips"] == 3
    clips = lance.dataset(str(tmp_path / "out" / "clips.lance"))
    table = clips.to_table(columns=["source_uri", "start_frame", "end_frame"], with_row_id=True)
    flaky_rows = [(r, i) for r, i in zip(table.to_pylist(), table.column("_rowid").to_pylist())
                  if r["source_uri"].endswith("flaky.mp4")]
    assert sorted((r["start_frame"], r["end_frame"]) for r, _ in flaky_rows) == [(0, 250), (250, 300)]
    for (row, _), mp4 in zip(flaky_rows, read_blob_bytes(clips, "mp4", [i for _, i in flaky_rows])):
        frames = decode_rgb_bytes(mp4)
        assert [read_frame_index(f) for f in frames] == list(range(row["start_frame"], row["end_frame"]))
