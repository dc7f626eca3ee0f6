"""The driver's share of a big run: listing streams, inputs go to the object
store in chunks, done videos are skipped while listing."""

from __future__ import annotations

import tracemalloc

import pyarrow as pa

from engine.curate.task import feed_inputs
from udfs.schema import video_id_for
from udfs.uris import iter_inputs


def test_listing_streams(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "1.mp4").write_bytes(b"x")
    (first / "1.mp4.txt").write_bytes(b"not listed")
    (second / "2.mp4").write_bytes(b"x")
    listing = iter_inputs([str(first), str(second), str(first / "1.mp4")])
    assert next(listing) == str(first / "1.mp4")
    # The second folder is walked only when reached: a file added now is seen.
    (second / "3.mp4").write_bytes(b"x")
    assert list(listing) == [str(second / "2.mp4"), str(second / "3.mp4")]  # and 1.mp4 only once


def test_100k_inputs_never_held_by_the_driver(ray_session):
    n = 100_000
    uris = (f"/data/raw/{i // 1000:03d}/video_{i:06d}.mp4" for i in range(n))
    done = {video_id_for(f"/data/raw/000/video_{i:06d}.mp4") for i in range(500)}
    feed_inputs(iter(["/warm/up.mp4"]), set(), chunk=256)  # first-use imports are not the inputs' memory
    tracemalloc.start()
    chunks, listed, skipped = feed_inputs(uris, done, chunk=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (listed, skipped, sum(rows for _, rows in chunks)) == (n, 500, n - 500)
    # The URIs alone are ~6 MB as Python strings; the driver peaked at a chunk's worth.
    assert peak < 1.5 * 2**20, peak
    table = ray_session.get(chunks[0][0])
    assert isinstance(table, pa.Table) and table.column("uri")[0].as_py() == "/data/raw/000/video_000500.mp4"
    assert ray_session.get(chunks[-1][0]).column("uri")[-1].as_py() == f"/data/raw/099/video_{n - 1:06d}.mp4"


def test_videos_waiting_for_a_commit_are_small():
    """Between two commits the driver holds every finished video's report;
    with 100,000 quick inputs that is tens of thousands of videos. Each must
    cost a few KB (a one-row Arrow table each cost ~24 KB: 2.4 GB of driver
    memory), and the commit still gets whole video-table rows."""
    import gc

    from engine.curate.commits import Progress
    from engine.curate.ledger import row_bytes
    from udfs.schema import VIDEO_SCHEMA, conform

    def rss() -> int:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024

    progress = Progress()
    template = conform(pa.table({"video_id": ["v"], "uri": ["/x/v.mp4"], "error": ["empty file"]}), VIDEO_SCHEMA)

    def report(video_id: str) -> None:
        row = template.set_column(0, "video_id", pa.array([video_id]))
        progress.add_reports([(pa.ipc.open_stream(row_bytes(row)).read_all(), [])])

    for i in range(500):  # the allocator's own warm-up
        report(f"w{i}")
    gc.collect()
    before = rss()
    n = 20_000
    for i in range(n):
        report(f"v{i:05d}")
    gc.collect()
    assert (rss() - before) / n < 8 * 1024
    ready = progress.complete()
    assert len(ready) == n + 500
    rows, fragments, clip_rows = progress.take(ready)
    assert rows.schema == VIDEO_SCHEMA and rows.num_rows == n + 500 and fragments == [] and clip_rows == 0
    assert set(rows.column("error").to_pylist()) == {"empty file"}
    assert rows.column("num_clips").to_pylist() == [0] * (n + 500)
