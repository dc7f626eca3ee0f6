"""The curation workbench (task=serve): thresholds against `judge`, the eps
slider against the table, the map, labels through the guarded write path,
and the readers (ClipDataset, task=export) honouring rejects."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.serve.app import BackgroundServer, make_app
from engine.serve.columns import TableColumns
from engine.serve.duplicates import Duplicates
from engine.serve.mapview import MapView
from engine.serve.thresholds import Thresholds
from engine.index.projection import compute, ensure, projection_uri
from udfs import registry
from udfs.analysis.rules import judge


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def request(url: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def synthetic(tmp_path: Path, n: int = 3000, seed: int = 0) -> lance.LanceDataset:
    """Scores as curate writes them: nulls, NaN, errors, a gated motion rule."""
    rng = np.random.default_rng(seed)
    motion = rng.exponential(0.002, n)
    patch = rng.exponential(1e-5, n)
    both_null = rng.random(n) < 0.05
    aesthetic = rng.normal(5, 1, n)
    aesthetic[rng.random(n) < 0.02] = np.nan
    sim = rng.uniform(0.8, 1.0, n)
    sim[rng.random(n) < 0.3] = np.nan
    sim[0] = np.nan  # the first row has no higher-ranked partner
    ids = [f"c{i:06d}" for i in range(n)]
    partner = [ids[max(0, i - 1 - int(rng.integers(0, 5)))] if np.isfinite(sim[i]) and i else None for i in range(n)]
    start = rng.uniform(0, 100, n)
    table = pa.table({
        "clip_id": ids, "start_s": start, "end_s": start + rng.uniform(1, 10, n),
        "error": pa.array([("bad" if rng.random() < 0.03 else None) for _ in range(n)], pa.string()),
        "motion_global_mean": pa.array(np.where(both_null, np.nan, motion), mask=both_null),
        "motion_per_patch_min": pa.array(patch, mask=both_null | (rng.random(n) < 0.05)),
        "aesthetic_score": pa.array(aesthetic.astype(np.float32)),
        "dedup_max_sim": pa.array(sim.astype(np.float32), mask=~np.isfinite(sim)),
        "dedup_max_id": pa.array(partner, pa.string()),
        "dedup_cluster": pa.array(rng.integers(0, 7, n).astype(np.int32)),
        "dedup_centroid_dist": pa.array(rng.uniform(0, 0.5, n).astype(np.float32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 8).astype(np.float32)), 8),
    })
    return lance.write_dataset(table, str(tmp_path / "clips.lance"))


def settings(motion_mode: str = "enable", motion: float | None = 0.001, patch: float | None = 1e-6,
             aesthetic: float | None = 4.5) -> dict:
    return {"motion": {"mode": motion_mode, "global_mean_threshold": motion, "per_patch_min_threshold": patch},
            "aesthetic": {"threshold": aesthetic}, "quality": {}}


def judged_kept(ds: lance.LanceDataset, s: dict) -> int:
    table = ds.to_table()
    errors = table.column("error").to_pylist()
    return sum(e is None and r is None for e, r in zip(errors, judge(table, registry.FILTERS, s)))


def test_a_threshold_sliders_kept_count_is_judges(tmp_path):
    ds = synthetic(tmp_path)
    base = settings()
    panel = Thresholds(TableColumns(ds, "clip_id"), registry.FILTERS, base)
    keys = {s.bound.key for s in panel.sliders}
    assert {"motion.global_mean_threshold", "motion.per_patch_min_threshold", "aesthetic.threshold"} <= keys
    assert not any(s.bound.column == "text_area_ratio" for s in panel.sliders)  # no such column: no slider
    cases = [("aesthetic.threshold", 3.0), ("aesthetic.threshold", 5.2), ("aesthetic.threshold", None),
             ("motion.global_mean_threshold", 0.0005), ("motion.global_mean_threshold", 0.004),
             ("motion.per_patch_min_threshold", 2e-5), ("motion.global_mean_threshold", None)]
    for key, value in cases:
        params = {"focus": key, key: "null" if value is None else repr(value)}
        got = panel.answer(params, "OUT")
        s = settings()
        node, leaf = key.split(".", 1)
        s[node][leaf] = value
        assert got["kept"] == judged_kept(ds, s), (key, value)
        assert f"{key}={'null' if value is None else repr(value)}" in got["command"]
        assert got["command"].startswith("python -m engine task=filter output=OUT motion.mode=enable ")
        below, above = got["focus"]["below"], got["focus"]["above"]
        if value is not None and below and above:
            assert max(e["value"] for e in below) <= value <= min(e["value"] for e in above)
    # The gate: motion judges nothing unless motion.mode=enable.
    off = panel.answer({"focus": "aesthetic.threshold", "motion.mode": "score-only"}, "OUT")
    assert off["kept"] == judged_kept(ds, settings(motion_mode="score-only"))
    assert off["kept"] > panel.answer({"focus": "aesthetic.threshold"}, "OUT")["kept"]
    kept_s = panel.answer({"focus": "aesthetic.threshold", "aesthetic.threshold": "5"}, "OUT")["kept_s"]
    mask = panel.kept_mask(panel.settings_from({"aesthetic.threshold": "5"}))
    table = ds.to_table(columns=["start_s", "end_s"])
    lengths = np.asarray(table.column("end_s")) - np.asarray(table.column("start_s"))
    assert kept_s == pytest.approx(float(lengths[mask].sum()))
    with pytest.raises(ValueError, match="not a number"):
        panel.answer({"aesthetic.threshold": "abc"}, "OUT")


def test_check_rules_are_inputs_counted_as_judge_counts(tmp_path):
    """Rules with a check of their own (bars, camera motion) are inputs, not
    sliders; the panel calls the check once per distinct value combination
    and still counts what `judge` does."""
    rng = np.random.default_rng(5)
    n = 2000
    kinds = np.array(["static", "pan_left", "zoom_in", "complex"])
    bars = lambda: pa.array(np.where(rng.random(n) < 0.2, rng.integers(0, 120, n), 0), pa.int32(),  # noqa: E731
                            mask=rng.random(n) < 0.03)
    table = pa.table({
        "clip_id": [f"k{i}" for i in range(n)], "start_s": np.zeros(n), "end_s": rng.uniform(1, 5, n),
        "error": pa.array([None] * n, pa.string()),
        "camera_motion": pa.array(kinds[rng.integers(0, 4, n)], mask=rng.random(n) < 0.1),
        "border_top": bars(), "border_bottom": bars(), "border_left": bars(), "border_right": bars(),
        "width": pa.array(np.full(n, 640), pa.int32()), "height": pa.array(np.full(n, 360), pa.int32()),
        "sharpness": pa.array(rng.uniform(0, 500, n).astype(np.float32)),
    })
    ds = lance.write_dataset(table, str(tmp_path / "clips.lance"))
    base = {"quality": {"borders": {"max_fraction": None}, "camera": {"reject": None}, "sharpness": {"min": None}},
            "transcode": {"crop_borders": False}}
    panel = Thresholds(TableColumns(ds, "clip_id"), registry.FILTERS, base)
    assert panel.check_keys() == ["quality.borders.max_fraction", "quality.camera.reject"]
    assert [s.bound.key for s in panel.sliders] == ["quality.sharpness.min"]
    for params, camera, fraction in (({}, None, None),
                                     ({"quality.camera.reject": "complex, zoom_in"}, ["complex", "zoom_in"], None),
                                     ({"quality.borders.max_fraction": "0.1"}, None, 0.1),
                                     ({"quality.borders.max_fraction": "0.05", "quality.camera.reject": "static",
                                       "quality.sharpness.min": "200"}, ["static"], 0.05)):
        got = panel.answer({"focus": "quality.sharpness.min", **params}, "OUT")
        s = {"quality": {"borders": {"max_fraction": fraction}, "camera": {"reject": camera},
                         "sharpness": {"min": float(params["quality.sharpness.min"]) if "quality.sharpness.min" in params
                                       else None}}, "transcode": {"crop_borders": False}}
        truth = sum(r is None for r in judge(ds.to_table(), registry.FILTERS, s))
        assert got["kept"] == truth, params
        assert {c["key"]: c["value"] for c in got["checks"]} == {"quality.borders.max_fraction": fraction,
                                                                 "quality.camera.reject": camera}
    assert "quality.camera.reject=[static]" in got["command"]


def test_the_eps_slider_counts_what_the_table_holds(tmp_path):
    ds = synthetic(tmp_path)
    d = Duplicates(TableColumns(ds, "clip_id"))
    sims = ds.to_table(columns=["dedup_max_sim"]).column("dedup_max_sim").to_pylist()
    for eps in (0.0, 0.01, 0.05, 0.123, 0.2):
        got = d.answer(eps, "OUT", groups=5)
        assert got["removed"] == sum(s is not None and s >= 1 - eps for s in sims)
        assert got["command"] == f"python -m engine task=dedup output=OUT dedup.eps={eps:g}"
        assert all(p["sim"] >= 1 - eps for p in got["margin_removed"])
        assert all(p["sim"] < 1 - eps for p in got["margin_kept"])
        assert sum(g["size"] - 1 for g in d.groups(eps, 10 ** 6)[1]) == got["removed"]


def test_the_eps_slider_joins_components_as_dedup_does(tmp_path):
    """dedup.mode=components: the removed count at any eps is what
    engine.dedup.groups.components_at decides from the same stored edges."""
    from engine.dedup.groups import components_at, global_rank
    from engine.serve.duplicates import load_run
    from engine.store.outputs import OutputLayout

    ds = synthetic(tmp_path, n=2000, seed=3)
    rng = np.random.default_rng(1)
    t = ds.to_table(columns=["clip_id", "dedup_centroid_dist", "dedup_cluster"], with_row_id=True)
    rowid = t.column("_rowid").to_numpy()
    # Chains, stars and near-misses: pairs among 600 rows at similarities across the slider's range.
    a, b = rng.integers(0, 600, 1500), rng.integers(0, 600, 1500)
    a, b = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
    pairs = np.unique(np.c_[rowid[a], rowid[b]], axis=0)
    edges = pa.table({"a": pa.array(pairs[:, 0], pa.uint64()), "b": pa.array(pairs[:, 1], pa.uint64()),
                      "sim": pa.array(rng.uniform(0.9, 1.0, len(pairs)).astype(np.float32))})
    (tmp_path / "dedup").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(edges, tmp_path / "dedup" / "edges.parquet")
    summary = {"table": ds.uri, "mode": "components", "eps": 0.01, "config": {"keep": "hard", "seed": 42},
               "run": {"edges_eps": 0.1, "boundary_eps": 0.01}}
    (tmp_path / "dedup" / "summary.json").write_text(json.dumps(summary))
    run = load_run(OutputLayout(str(tmp_path)), ds.uri, None)
    assert run.mode == "components" and run.note is None
    d = Duplicates(TableColumns(ds, "clip_id"), run)
    results = pa.table({"_rowid": t.column("_rowid"), "id": t.column("clip_id"),
                        "centroid_dist": t.column("dedup_centroid_dist")})
    rank = global_rank(results, "hard", 42)
    span = ds.to_table(columns=["start_s", "end_s"])
    lengths = np.asarray(span.column("end_s")) - np.asarray(span.column("start_s"))
    for eps in (0.0, 0.003, 0.01, 0.04, 0.1):
        truth = components_at(results, edges, rank, eps).duplicate
        got = d.answer(eps, "OUT", groups=1000)
        assert got["removed"] == int(truth.sum()), eps
        assert np.array_equal(d.removed_positions(eps), np.flatnonzero(truth)), eps
        assert got["removed_s"] == pytest.approx(float(lengths[truth].sum()))
        assert sum(g["size"] - 1 for g in got["groups"]) == got["removed"]
        assert all(m["sim"] >= np.float32(1 - eps) for m in got["margin_removed"])
        assert all(m["sim"] < np.float32(1 - eps) for m in got["margin_kept"])
    assert got["mode"] == "components" and "dedup.eps=0.1" in got["command"]
    with pytest.raises(ValueError, match="eps_table"):
        d.answer(0.2, "OUT")
    # Summary of another table: counted by dedup_max_sim, and said why.
    (tmp_path / "dedup" / "summary.json").write_text(json.dumps({**summary, "table": "/elsewhere/clips.lance"}))
    other = load_run(OutputLayout(str(tmp_path)), ds.uri, None)
    assert other.mode == "semdedup" and "another table" in other.note


def test_the_map_has_one_point_per_clip_and_selects_by_polygon(tmp_path):
    ds = synthetic(tmp_path, n=500)
    proj, source = ensure(ds, ds.uri, vector_column="embedding", id_column="clip_id", fit_rows=200, seed=0,
                          umap=False, storage_options=None, write=True)
    assert source == "computed" and Path(projection_uri(ds.uri)).is_file()
    assert proj.column("id").to_pylist() == ds.to_table(columns=["clip_id"]).column("clip_id").to_pylist()
    # A new version with the same rows (dedup, index) keeps the map; new rows make it stale.
    ds.add_columns({"extra": "1"})
    assert ensure(lance.dataset(ds.uri), ds.uri, vector_column="embedding", id_column="clip_id", fit_rows=200,
                  seed=0, umap=False, storage_options=None, write=True)[1] == "stored"
    # The same ids with other vectors (a curate re-run with another model, overwriting): stale.
    other = synthetic(tmp_path / "other", n=500, seed=9).to_table()
    redone = lance.write_dataset(ds.to_table().set_column(ds.schema.get_field_index("embedding"), "embedding",
                                                          other.column("embedding")), ds.uri, mode="overwrite")
    assert ensure(redone, ds.uri, vector_column="embedding", id_column="clip_id", fit_rows=200, seed=0,
                  umap=False, storage_options=None, write=False)[1] == "computed"
    m = MapView(TableColumns(ds, "clip_id"), proj, max_points=1000, bins=16)
    points = m.answer("pca", "dedup_cluster", None, None)
    assert points["mode"] == "points" and len(points["ids"]) == 500 and points["kind"] == "category"
    x, y = np.asarray(points["x"]), np.asarray(points["y"])
    box = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)]
    inside = m.select("pca", box)
    assert len(inside) == int(((x >= 0) & (y >= 0)).sum()) > 0
    binned_view = MapView(TableColumns(ds, "clip_id"), proj, max_points=100, bins=16)
    binned = binned_view.answer("pca", "aesthetic_score", None, None)
    assert binned["mode"] == "bins" and sum(binned["count"]) == 500
    # The page's encoding: the same bins as base64 typed arrays.
    import base64

    packed = binned_view.answer("pca", "aesthetic_score", None, None, encoding="b64")
    cell = np.frombuffer(base64.b64decode(packed["cell"]), "<u4")
    assert cell.tolist() == [i * 16 + j for i, j in zip(binned["ix"], binned["iy"])]
    assert np.frombuffer(base64.b64decode(packed["count"]), "<u4").tolist() == binned["count"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed["c"]), "<f4"),
                       [np.nan if v is None else v for v in binned["c"]], atol=1e-4, equal_nan=True)
    by_video = binned_view.answer("pca", "dedup_cluster", None, None, encoding="b64")
    assert len(np.frombuffer(base64.b64decode(by_video["c"]), "<i2")) == len(binned["count"])
    # A zoomed view holds exactly the points inside it.
    xs, ys = np.asarray(points["x"]), np.asarray(points["y"])
    zoom = (float(np.median(xs)), float(xs.max()), float(ys.min()), float(np.median(ys)))
    inside_zoom = m.answer("pca", None, zoom, None)
    assert sorted(inside_zoom["ids"]) == sorted(i for i, x, y in zip(points["ids"], xs, ys)
                                                if zoom[0] <= x <= zoom[1] and zoom[2] <= y <= zoom[3])
    again = compute(ds, "embedding", "clip_id", fit_rows=200, seed=0, umap=False)
    assert np.allclose(again.column("pca_x").to_numpy(), proj.column("pca_x").to_numpy())


# ------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def workbench(embedded_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("workbench") / "out"
    shutil.copytree(embedded_output, out)
    clips_before = {p: p.stat().st_mtime_ns for p in (out / "clips.lance").rglob("*") if p.is_file()}
    app = make_app(str(out), page_size=24)
    with BackgroundServer(app) as url:
        yield out, url, app.token
    clips_after = {p: p.stat().st_mtime_ns for p in (out / "clips.lance").rglob("*") if p.is_file()}
    assert clips_after == clips_before, "the UI wrote to clips.lance"


def post_label(url: str, token: str | None, body: dict, extra: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **(extra or {})}
    if token is not None:
        headers["X-Reelsift-Token"] = token
    return request(f"{url}/api/labels", method="POST", body=json.dumps(body).encode(), headers=headers)


def raw_post(url: str, token: str, body: bytes, *, chunked: bool) -> tuple[int, str]:
    """POST `body` over a plain socket and read the answer even where the
    server answers before reading it all (urllib then fails on the broken pipe)."""
    import select
    import socket

    host, port = url.split("//", 1)[1].split(":")
    head = (f"POST /api/labels HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"X-Reelsift-Token: {token}\r\nConnection: close\r\n")
    if chunked:
        step = 64 * 1024
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                           for i in range(0, len(body), step)) + b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        payload = body
        head += f"Content-Length: {len(body)}\r\n\r\n"
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode())
        # A piece at a time, stopping once the server has answered: the
        # rest would only make it reset the connection over the answer.
        for i in range(0, len(payload), 16384):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(payload[i:i + 16384])
            except OSError:
                break
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.decode(errors="replace")


def test_writes_need_the_token_and_bad_input_is_refused(workbench):
    out, url, token = workbench
    ids = lance.dataset(out / "clips.lance").to_table(columns=["clip_id"]).column("clip_id").to_pylist()
    status, body = post_label(url, None, {"clip_ids": ids[:1], "label": "reject"})
    assert status == 403 and "token" in body["error"] and not (out / "labels.lance").exists()
    status, _ = post_label(url, "wrong", {"clip_ids": ids[:1], "label": "reject"})
    assert status == 403 and not (out / "labels.lance").exists()
    status, _ = post_label(url, token, {"clip_ids": ids[:1], "label": "reject"}, {"Origin": "http://evil.example"})
    assert status == 403 and not (out / "labels.lance").exists()
    status, body = post_label(url, token, {"clip_ids": ["no-such-clip"], "label": "reject"})
    assert status == 400 and "unknown clip ids" in body["error"] and not (out / "labels.lance").exists()
    status, body = post_label(url, token, {"clip_ids": ids[:1], "label": "delete"})
    assert status == 400
    huge = json.dumps({"clip_ids": ids[:1], "label": "tag", "tag": "x", "note": "n" * 2_000_000}).encode()
    # Refused from its Content-Length, before the body is read ...
    assert raw_post(url, token, huge, chunked=False)[0] == 413
    # ... and a chunked one (no length to check first) once it passes the bound.
    status, text = raw_post(url, token, huge, chunked=True)
    assert status == 413 and "over 1048576 bytes" in text and not (out / "labels.lance").exists()
    status, _ = request(f"{url}/", headers={"Host": "evil.example"})
    assert status == 403
    status, _ = request(f"{url}/api/search", headers={"Host": "evil.example:8000"})
    assert status == 403
    status, _ = request(f"{url}/", headers={"Host": "localhost"})
    assert status == 200
    status, body = request(f"{url}/media/{ids[0]}/x.bin")
    assert status == 404
    status, body = request(f"{url}/api/duplicates?eps=0.01")
    assert status == 400 and "task=dedup" in body["error"]
    status, body = request(f"{url}/duplicates")
    assert status == 400 and "no dedup_max_sim" in body["text"]


def test_a_rejected_clip_leaves_clipdataset_search_and_export(workbench, tmp_path):
    from engine.export.task import run as run_export
    from engine.search import open as open_searcher
    from engine.training import ClipDataset

    out, url, token = workbench
    curated = ClipDataset(str(out), num_frames=2)
    assert curated.num_clips > 1
    victim = lance.dataset(out / "clips.lance").to_table(columns=["clip_id"], filter="passed AND error IS NULL") \
        .column("clip_id")[0].as_py()
    status, body = post_label(url, token, {"clip_ids": [victim], "label": "reject", "note": "logo"})
    assert status == 200 and body["written"] == 1
    status, body = request(f"{url}/api/labels")
    assert body["counts"] == {"accept": 0, "reject": 1} and body["labels"][0]["note"] == "logo"
    after = ClipDataset(str(out), num_frames=2)
    assert after.num_clips == curated.num_clips - 1
    assert ClipDataset(str(out), num_frames=2, include_rejected=True).num_clips == curated.num_clips
    searcher = open_searcher(str(out))
    assert victim not in searcher.browse(limit=100).column("clip_id").to_pylist()
    assert victim in open_searcher(str(out), include_rejected=True).browse(limit=100).column("clip_id").to_pylist()
    result = run_export(config("task=export", f"output={out}", "export.format=parquet", f"export.dir={tmp_path / 'ex'}"))
    import pyarrow.parquet as pq

    files = sorted((tmp_path / "ex").rglob("*.parquet"))
    exported = pa.concat_tables([pq.read_table(p, columns=["clip_id"]) for p in files])
    assert victim not in exported.column("clip_id").to_pylist()
    assert exported.num_rows == curated.num_clips - 1 and "NOT IN" in result["where"]
    # Undo: the clip comes back.
    assert post_label(url, token, {"clip_ids": [victim], "label": "clear"})[0] == 200
    assert ClipDataset(str(out), num_frames=2).num_clips == curated.num_clips


def test_map_and_thresholds_over_http(workbench):
    out, url, _ = workbench
    n = lance.dataset(out / "clips.lance").count_rows()
    status, body = request(f"{url}/api/map?color=passed")
    assert status == 200 and body["mode"] == "points" and len(body["ids"]) == n
    assert Path(projection_uri(str(out / "clips.lance"))).is_file()
    status, body = request(f"{url}/api/map?color=nope")
    assert status == 400
    status, body = request(f"{url}/api/thresholds?focus=aesthetic.threshold")
    assert status == 400 or "kept" in body  # a table without an aesthetic column has no such slider
    status, body = request(f"{url}/api/thresholds")
    assert status == 200 and body["command"].startswith("python -m engine task=filter output=")
    keys = [s["key"] for s in body["sliders"]]
    assert "motion.global_mean_threshold" in keys


def test_read_only_and_remote_binding(embedded_output):
    from engine.serve.app import RemoteRefused, check_host
    from engine.serve.settings import ServeSettings, default_config

    with BackgroundServer(make_app(str(embedded_output), read_only=True)) as url:
        status, page = request(f"{url}/")
        assert status == 200 and "data-label=\"reject\"" not in page["text"]
        token = page["text"].split('name="reelsift-token" content="')[1].split('"')[0]
        status, body = post_label(url, token, {"clip_ids": ["x"], "label": "reject"})
        assert status == 403 and "read-only" in body["error"]
    assert not (embedded_output / "labels.lance").exists()
    # Bound to every interface with allow_remote: the machine's own names and addresses are Hosts too.
    with BackgroundServer(make_app(str(embedded_output), read_only=True, host="0.0.0.0", allow_remote=True)) as url:
        assert request(f"{url}/api/overview", headers={"Host": "curation-box.lan:8000"})[0] == 200
    # Bound to one address: that address and the local names only.
    with BackgroundServer(make_app(str(embedded_output), read_only=True, host="10.1.2.3", allow_remote=True)) as url:
        assert request(f"{url}/api/overview", headers={"Host": "10.1.2.3:8000"})[0] == 200
        assert request(f"{url}/api/overview", headers={"Host": "evil.example"})[0] == 403
    base = ServeSettings.from_config(default_config().serve)
    with pytest.raises(RemoteRefused, match="allow_remote"):
        check_host(ServeSettings.from_config({**default_config().serve, "host": "0.0.0.0"}))
    check_host(base)


def test_tables_without_embeddings_say_why_there_is_no_map(embedded_output, tmp_path):
    src = lance.dataset(embedded_output / "clips.lance")
    clone = src.shallow_clone(str(tmp_path / "clips.lance"), src.version)
    clone.drop_columns(["embedding"])
    with BackgroundServer(make_app(str(tmp_path / "clips.lance"))) as url:
        status, body = request(f"{url}/api/map")
        assert status == 400 and "no embedding column" in body["error"]
        status, body = request(f"{url}/map")
        assert status == 400 and "no embedding column" in body["text"]


# ------------------------------------------------------------ real browser
@pytest.fixture(scope="module")
def deduped(embedded_output, tmp_path_factory):
    """The curate run, deduped (task=dedup, the defaults) and indexed (which
    projects the map), served from a background thread."""
    from engine.dedup.task import run as run_dedup
    from engine.index.task import run as run_index

    out = tmp_path_factory.mktemp("deduped") / "out"
    shutil.copytree(embedded_output, out)
    run_dedup(config("task=dedup", f"output={out}"))
    summary = run_index(config("task=index", f"output={out}"))
    assert summary["map"]["status"] == "computed" and summary["map"]["rows"] == 6
    pristine = tmp_path_factory.mktemp("pristine") / "out"
    shutil.copytree(out, pristine)  # for the tasks the page's copied commands are checked against
    app = make_app(str(out), page_size=24)
    with BackgroundServer(app) as url:
        yield out, pristine, url


def shots_dir(tmp_path: Path) -> Path:
    """Where the screenshots go: $REELSIFT_UI_SCREENSHOTS if set, else the test's tmp folder."""
    import os

    shots = Path(os.environ.get("REELSIFT_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def browser_module():
    """tests/test_ui.py, whose Chromium set-up this test shares (the test
    folder is not a package: loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reelsift_test_ui", Path(__file__).with_name("test_ui.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def label_rows(out: Path) -> int:
    return lance.dataset(out / "labels.lance").count_rows() if (out / "labels.lance").exists() else 0


@pytest.mark.slow
def test_the_workbench_in_a_real_browser(deduped, tmp_path):
    """Headless Chromium: the map, the eps slider against task=dedup, a
    threshold against task=filter, rejecting from the keyboard against
    ClipDataset and task=export, and a POST without the token."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from engine.dedup.task import run as run_dedup
    from engine.export.task import run as run_export
    from engine.filter.task import run as run_filter
    from engine.training import ClipDataset

    out, pristine, url = deduped
    shots = shots_dir(tmp_path)
    driver = browser_module().chromium_driver(tmp_path)
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))
    ready = lambda d: d.execute_script("return document.body.dataset.ready") == "true"  # noqa: E731
    try:
        # -- The map: one point per clip with an embedding; a box selection opens exactly those clips.
        driver.get(url + "/map")
        wait.until(ready)
        table = lance.dataset(out / "clips.lance").to_table(columns=["clip_id", "embedding"])
        with_vectors = sum(v is not None for v in table.column("embedding").to_pylist())
        assert int(driver.find_element(By.ID, "map").get_attribute("data-points")) == with_vectors == 6
        painted = driver.execute_script(
            "const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
        assert painted > 6 * 10  # every point is a disc of several pixels
        Select(driver.find_element(By.ID, "color")).select_by_value("video_id")
        wait.until(lambda d: d.execute_script("return window.reelsiftMap.data().color") == "video_id")
        legend = driver.find_element(By.ID, "legend").text
        assert all(n in legend for n in ("hd_30fps_23s.mp4", "odd_25fps_12s.mp4", "short_15fps_3s.mp4")), legend
        driver.save_screenshot(str(shots / "map.png"))
        points = driver.execute_script("const d = window.reelsiftMap.data(); return [d.ids, d.x, d.y];")
        Select(driver.find_element(By.ID, "tool")).select_by_value("box")
        canvas = driver.find_element(By.ID, "map")
        w, h = canvas.size["width"], canvas.size["height"]
        # The left half of the map, corner to corner (offsets from the canvas' centre).
        ActionChains(driver).move_to_element_with_offset(canvas, -w // 2 + 4, -h // 2 + 4).click_and_hold() \
            .move_to_element_with_offset(canvas, 0, 0).move_to_element_with_offset(canvas, 0, h // 2 - 4) \
            .release().perform()
        wait.until(lambda d: "poly=" in d.current_url)
        wait.until(lambda d: d.find_elements(By.ID, "selection"))
        from urllib.parse import parse_qs, urlparse

        poly = [float(v) for v in parse_qs(urlparse(driver.current_url).query)["poly"][0].split(",")]
        xs, ys = poly[0::2], poly[1::2]
        expected = {i for i, x, y in zip(*points) if min(xs) <= x <= max(xs) and min(ys) <= y <= max(ys)}
        shown = {c.get_attribute("data-clip-id") for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card")}
        assert shown == expected and 0 < len(expected) < 6, (shown, expected)
        assert driver.find_element(By.ID, "selection").text.startswith(f"{len(expected)} clips selected")
        driver.save_screenshot(str(shots / "map_selection.png"))

        # -- The eps slider: the removed count is what task=dedup marks at that eps.
        driver.get(url + "/duplicates")
        wait.until(ready)
        sims = sorted(s for s in lance.dataset(out / "clips.lance").to_table(columns=["dedup_max_sim"])
                      .column("dedup_max_sim").to_pylist() if s is not None)
        assert sims, "the six clips have no dedup partner at all"
        slider = driver.find_element(By.ID, "eps")
        high, step = float(slider.get_attribute("max")), float(slider.get_attribute("step"))
        # Just past the most similar pair (the slider snaps to its step): at least one clip goes.
        target = min(high, 1.0 - sims[-1] + 2 * step)
        eps = float(driver.execute_script(
            "const r = document.getElementById('eps'); r.value = arguments[0]; r.dispatchEvent(new Event('input'));"
            "return r.value;", str(target)))
        wait.until(lambda d: f"dedup.eps={eps:g}" in d.find_element(By.ID, "command").text)
        wait.until(lambda d: d.find_element(By.ID, "eps-value").text == f"= {d.find_element(By.ID, 'eps-box').get_attribute('value')}")
        removed = int(driver.find_element(By.ID, "removed").text)
        wait.until(lambda d: d.execute_script("return document.body.dataset.groups") is not None)
        driver.save_screenshot(str(shots / "duplicates.png"))
        run_dedup(config("task=dedup", f"output={pristine}", f"dedup.eps={eps}"))
        marked = lance.dataset(pristine / "clips.lance").to_table(columns=["duplicate"]).column("duplicate").to_pylist()
        assert removed == sum(bool(m) for m in marked) > 0, (removed, marked, eps)

        # -- A threshold slider: the kept count is what task=filter keeps at that threshold.
        driver.get(url + "/thresholds")
        wait.until(ready)
        key = "quality.sharpness.min"
        sharp = sorted(lance.dataset(out / "clips.lance").to_table(columns=["sharpness"]).column("sharpness").to_pylist())
        # Between the third and the fourth clip (the slider snaps to its step; read back where it went).
        value = float(driver.execute_script(
            "const s = document.querySelector(`.slider[data-key='${arguments[0]}']`), r = s.querySelector('input[type=range]');"
            "r.value = arguments[1]; r.dispatchEvent(new Event('input')); return r.value;",
            key, str((sharp[2] + sharp[3]) / 2)))
        wait.until(lambda d: f"{key}={value!r}" in d.find_element(By.ID, "command").text)
        kept = int(driver.find_element(By.ID, "kept").text)
        assert kept == sum(v >= value for v in sharp) == 3
        driver.save_screenshot(str(shots / "thresholds.png"))
        result = run_filter(config("task=filter", f"output={pristine}", f"{key}={value}"))
        assert result["clips_passed"] == kept

        # -- Rejecting from the keyboard: j moves to the first card, r rejects it.
        curated = ClipDataset(str(out), num_frames=2).num_clips
        driver.get(url + "/?status=all")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("j")
        first = driver.find_element(By.CSS_SELECTOR, "#gallery .card.focused")
        victim = first.get_attribute("data-clip-id")
        body.send_keys("r")
        wait.until(lambda d: "reject: 1 clip" in d.find_element(By.ID, "label-status").text)
        assert "labelled-reject" in first.get_attribute("class")
        driver.save_screenshot(str(shots / "rejected.png"))
        assert ClipDataset(str(out), num_frames=2).num_clips == curated - 1
        run_export(config("task=export", f"output={out}", "export.format=parquet", f"export.dir={tmp_path / 'ex'}"))
        import pyarrow.parquet as pq

        exported = pa.concat_tables([pq.read_table(p, columns=["clip_id"]) for p in (tmp_path / "ex").rglob("*.parquet")])
        assert victim not in exported.column("clip_id").to_pylist() and exported.num_rows == curated - 1

        # The rest of the keyboard: r moved on to the next card; a accepts it, k goes back, space plays, / searches.
        second = driver.find_element(By.CSS_SELECTOR, "#gallery .card.focused")
        assert second.get_attribute("data-clip-id") != victim
        body.send_keys("a")
        wait.until(lambda d: "accept: 1 clip" in d.find_element(By.ID, "label-status").text)
        assert "labelled-accept" in second.get_attribute("class")
        body.send_keys("k")
        body.send_keys("k")
        assert driver.find_element(By.CSS_SELECTOR, "#gallery .card.focused").get_attribute("data-clip-id") == victim
        body.send_keys(" ")
        wait.until(lambda d: d.execute_script(
            "const v = document.querySelector('#gallery .card.focused video'); return v && v.readyState >= 2;"))
        body.send_keys("/")
        assert driver.execute_script("return document.activeElement.id") == "q"

        # -- A POST without the token, from the page itself: 403, nothing written.
        rows = label_rows(out)
        status = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/labels', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            " body: JSON.stringify({clip_ids: [arguments[0]], label: 'accept'})}).then(r => done(r.status));", victim)
        assert status == 403 and label_rows(out) == rows == 2
        # -- Past serve.map.max_points the page draws bins (base64 typed arrays) instead of points.
        import dataclasses

        from engine.serve.settings import ServeSettings, default_config

        base = ServeSettings.from_config(default_config().serve)
        few = dataclasses.replace(base, map=dataclasses.replace(base.map, max_points=2, bins=8), read_only=True)
        with BackgroundServer(make_app(str(out), settings=few)) as binned_url:
            driver.get(binned_url + "/map")
            wait.until(ready)
            assert "bins" in driver.find_element(By.ID, "map-status").text
            counted = driver.execute_script("const d = window.reelsiftMap.data(); return d.count.reduce((a, b) => a + b, 0);")
            assert counted == 6
            assert driver.execute_script(
                "const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;") > 100
            driver.save_screenshot(str(shots / "map_bins.png"))

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/api/labels" not in e["message"]]
        assert not errors, errors
    finally:
        driver.quit()
    names = ("map.png", "map_selection.png", "duplicates.png", "thresholds.png", "rejected.png")
    assert all((shots / n).stat().st_size > 1000 for n in names)
    print(f"screenshots: {shots}")


@pytest.mark.slow
def test_labels_survive_dedup_index_and_curate_reruns(embedded_output, video_dir, tiny_clip, tmp_path):
    """labels.lance is beside the tables, not in them, and clip ids are a
    function of source and span: a label finds its clip after task=dedup,
    task=index, a resumed curate and a curate that starts over."""
    from engine.curate.task import run as run_curate
    from engine.dedup.task import run as run_dedup
    from engine.index.task import run as run_index
    from engine.store.labels import LabelStore
    from engine.training import ClipDataset

    out = tmp_path / "out"
    shutil.copytree(embedded_output, out)
    table = str(out / "clips.lance")
    ids = lance.dataset(table).to_table(columns=["clip_id"], filter="passed AND error IS NULL").column("clip_id")
    victim = ids[0].as_py()
    LabelStore(table, None).append([victim], "reject", note="logo")
    curated = ClipDataset(str(out), num_frames=2, include_rejected=True).num_clips
    inputs = [str(video_dir / n) for n in ("hd_30fps_23s.mp4", "odd_25fps_12s.mp4", "short_15fps_3s.mp4", "corrupt.mp4")]
    curate = [f"input=[{','.join(inputs)}]", f"output={out}", "transcode.preset=ultrafast", "embed=clip",
              f"embed.model={tiny_clip}", "embed.resources.batch_size=8"]
    for step in (lambda: run_curate(config(*curate)),                       # resumes: every video committed
                 lambda: run_dedup(config("task=dedup", f"output={out}")),
                 lambda: run_index(config("task=index", f"output={out}")),
                 lambda: run_curate(config(*curate, "overwrite=true"))):    # starts over: new tables, same ids
        step()
        assert LabelStore(table, None).rejected() == [victim]
    # Counted in a fresh process: this one's Lance caches still hold the overwritten table's files.
    import subprocess
    import sys

    probe = ("import lance, sys; from engine.training import ClipDataset; "
             f"ids = lance.dataset({table!r}).to_table(columns=['clip_id']).column('clip_id').to_pylist(); "
             f"print({victim!r} in ids, ClipDataset({str(out)!r}, num_frames=2).num_clips, "
             f"ClipDataset({str(out)!r}, num_frames=2, include_rejected=True).num_clips)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert done.stdout.split()[-3:] == ["True", str(curated - 1), str(curated)], done.stderr[-2000:]


def test_umap_joins_the_map_when_umap_learn_is_installed(tmp_path):
    """The optional projection (umap-learn is not a dependency: skipped without it)."""
    pytest.importorskip("umap")
    ds = synthetic(tmp_path, n=600)
    args = dict(vector_column="embedding", id_column="clip_id", fit_rows=400, seed=0, storage_options=None, write=True)
    pca_only, source = ensure(ds, ds.uri, umap=False, **args)
    assert source == "computed" and "umap_x" not in pca_only.column_names
    # A map stored without UMAP is projected again once umap-learn is there ...
    proj, source = ensure(ds, ds.uri, umap="auto", **args)
    assert source == "computed" and {"umap_x", "umap_y"} <= set(proj.column_names)
    assert np.isfinite(proj.column("umap_x").to_numpy()).all()
    # ... and then read as it is.
    assert ensure(ds, ds.uri, umap="auto", **args)[1] == "stored"
    view = MapView(TableColumns(ds, "clip_id"), proj, max_points=1000, bins=16)
    assert view.answer("umap", None, None, None)["n"] == 600 and view.methods == ["pca", "umap"]
