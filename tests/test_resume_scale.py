"""The driver's share of a big run: listing streams, inputs go to the object
store in chunks, done videos are skipped while listing."""

from __future__ import annotations

import tracemalloc

import pyarrow as pa

from engine.curate import feed_inputs
from engine.schema import video_id_for
from engine.uris import iter_inputs


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
