"""Indexes and search: recall against exact search, filters, text through a
tiny CLIP, full-text and hybrid search, appends, LanceDB, the CLI, image and
video queries on a real curate run, and clear errors for bad queries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

import engine.search
from engine.cli import CONFIG_DIR
from engine.index.task import run as run_index
from engine.search.searcher import CapabilityError, FilterError, SearchError, UnknownClipError
from scripts.bench_search import scalar_columns, topic_centres, topic_vectors

REPO = Path(__file__).resolve().parent.parent
DIM = 32
WORDS = ["red", "blue", "green", "car", "boat", "dog", "street", "beach", "night", "forest"]


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_clips(path: Path, n: int, *, dim: int = DIM, start: int = 0, seed: int = 0, mode: str = "create",
               metadata: dict[str, str] | None = None) -> np.ndarray:
    """A clip-like Lance table of `n` topic-structured vectors with scalar
    columns and captions; returns the vectors."""
    rng = np.random.default_rng(seed)
    centres = topic_centres(np.random.default_rng(1234), dim, topics=100, super_topics=10)
    x = topic_vectors(rng, n, centres)
    cols = scalar_columns(rng, start, n)
    cols["caption"] = [" ".join(rng.choice(WORDS, 4)) + f" take{start + i}" for i in range(n)]
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
    table = pa.table(cols)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    lance.write_dataset(table, path, mode=mode)
    return x


def exact_top(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    sims = unit(q) @ unit(x).T
    if mask is not None:
        sims[:, ~mask] = -np.inf
    return np.argsort(-sims, axis=1)[:, :k]


def ids_at(indices: np.ndarray, start: int = 0) -> list[str]:
    return [str(__import__("uuid").UUID(int=int(i) + start + 1)) for i in indices]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


INDEX_OVERRIDES = ["index.exact_max_rows=1000", "index.rows_per_partition=150", "index.tune_queries=100"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An output folder whose clips.lance holds 12,000 generated vectors,
    indexed by task=index with an IVF index forced (exact_max_rows=1000)."""
    out = tmp_path_factory.mktemp("indexed")
    x = make_clips(out / "clips.lance", 12000)
    summary = run_index(config("task=index", f"output={out}", *INDEX_OVERRIDES))
    return out, x, summary


def test_index_reaches_the_recall_target_against_exact_search(indexed):
    out, x, summary = indexed
    vec = summary["vector"]
    assert vec["action"] == "built" and vec["index_type"] == "IVF_SQ" and vec["coverage"] == 1.0
    assert vec["search"]["unfiltered"]["recall"] >= 0.95
    assert json.loads((out / "index" / "summary.json").read_text())["vector"]["index_type"] == "IVF_SQ"
    # Independently: fresh queries from the same distribution, exact top 10 by NumPy.
    centres = topic_centres(np.random.default_rng(1234), DIM, topics=100, super_topics=10)
    queries = topic_vectors(np.random.default_rng(99), 100, centres)
    searcher = engine.search.open(out)
    assert searcher.tuned.index_type == "IVF_SQ"
    found = [searcher.search(vector=q, k=10).column("clip_id").to_pylist() for q in queries]
    truth = [ids_at(row) for row in exact_top(x, queries, 10)]
    assert recall(found, truth) >= 0.95
    # Filtered (10 %): still >= 0.95, and only matching rows.
    buckets = lance.dataset(out / "clips.lance").to_table(columns=["bucket"]).column("bucket").to_numpy()
    found_f = []
    for q in queries:
        res = searcher.search(vector=q, k=10, where="bucket = 3", columns=["bucket"])
        assert set(res.column("bucket").to_pylist()) == {3}
        found_f.append(res.column("clip_id").to_pylist())
    truth_f = [ids_at(row) for row in exact_top(x, queries, 10, buckets == 3)]
    assert recall(found_f, truth_f) >= 0.95
    # Scores are exact cosine similarities, best first.
    res = searcher.search(vector=queries[0], k=10)
    scores = np.asarray(res.column("score").to_pylist())
    assert np.all(np.diff(scores) <= 1e-6)
    position = {cid: i for i, cid in enumerate(ids_at(np.arange(len(x))))}
    expect = unit(queries[0]) @ unit(x[[position[c] for c in res.column("clip_id").to_pylist()]]).T
    np.testing.assert_allclose(scores, expect, atol=1e-4)


@pytest.mark.slow
def test_a_product_quantised_index_is_tuned_to_the_target_too(tmp_path):
    """IVF_PQ's coarse codes miss neighbours at default knobs; the tuning
    raises refine until the target holds on fresh queries."""
    x = make_clips(tmp_path / "clips.lance", 8000)
    summary = run_index(config("task=index", f"output={tmp_path}", "index.type=IVF_PQ", *INDEX_OVERRIDES))
    vec = summary["vector"]
    assert vec["index_type"] == "IVF_PQ" and vec["params"]["num_sub_vectors"] == 4
    assert vec["search"]["unfiltered"]["refine_factor"] > 1
    centres = topic_centres(np.random.default_rng(1234), DIM, topics=100, super_topics=10)
    queries = topic_vectors(np.random.default_rng(98), 100, centres)
    searcher = engine.search.open(tmp_path)
    found = [searcher.search(vector=q, k=10).column("clip_id").to_pylist() for q in queries]
    assert recall(found, [ids_at(row) for row in exact_top(x, queries, 10)]) >= 0.95


def test_where_filter_returns_only_matching_rows(indexed):
    out, x, _ = indexed
    searcher = engine.search.open(out)
    table = lance.dataset(out / "clips.lance").to_table(columns=["clip_id", "passed", "aesthetic_score", "video_id"])
    rows = {r["clip_id"]: r for r in table.to_pylist()}
    where = "passed AND aesthetic_score > 5"
    res = searcher.search(vector=x[7], k=25, where=where, columns=["passed", "aesthetic_score"])
    assert res.num_rows == 25
    assert all(r["passed"] and r["aesthetic_score"] > 5 for r in res.to_pylist())
    # A rare filter (one video: 50 rows) is ranked exactly: the exact filtered top 10.
    mask = np.array([rows[c]["video_id"] == "video-000042" for c in ids_at(np.arange(len(x)))])
    res = searcher.search(vector=x[7], k=10, where="video_id = 'video-000042'")
    assert res.column("clip_id").to_pylist() == ids_at(exact_top(x, x[7:8], 10, mask)[0])
    assert searcher.search(vector=x[7], where="aesthetic_score > 100").num_rows == 0
    # Browsing applies the same filter.
    browsed = searcher.browse(where="video_id = 'video-000042'", limit=100)
    assert browsed.num_rows == 50 and browsed.column("score").null_count == 50


def test_full_text_search_finds_a_caption(indexed):
    out, _, summary = indexed
    assert summary["columns"]["fts"] == ["caption"]
    searcher = engine.search.open(out)
    res = searcher.search(text="take4321", k=5)  # no model in this table: auto is full-text
    assert res.column("clip_id")[0].as_py() == ids_at([4321])[0]
    assert res.column("caption")[0].as_py().endswith("take4321")
    res = searcher.search(text="forest night", mode="fts", k=20, where="bucket = 2", columns=["bucket"])
    assert res.num_rows == 20 and set(res.column("bucket").to_pylist()) == {2}
    assert all({"forest", "night"} & set(c.split()) for c in res.column("caption").to_pylist())


def test_opens_as_a_lancedb_table(indexed):
    import lancedb

    out, x, _ = indexed
    table = lancedb.connect(str(out)).open_table("clips")
    assert table.count_rows() == 12000
    names = {ix.name for ix in table.list_indices()}
    assert {"embedding_idx", "caption_idx", "clip_id_idx"} <= names
    theirs = table.search(x[11], vector_column_name="embedding").distance_type("cosine").limit(1).to_arrow()
    ours = engine.search.open(out).search(vector=x[11], k=1)
    assert theirs.column("clip_id")[0].as_py() == ours.column("clip_id")[0].as_py() == ids_at([11])[0]
    assert engine.search.open(out).lancedb_table().count_rows() == 12000


def test_clip_id_search_uses_the_stored_vector(indexed):
    out, x, _ = indexed
    searcher = engine.search.open(out)
    res = searcher.search(clip_id=ids_at([5])[0], k=10)
    assert ids_at([5])[0] not in res.column("clip_id").to_pylist()  # the query clip itself is left out
    truth = ids_at(exact_top(x, x[5:6], 11)[0])[1:]
    assert recall([res.column("clip_id").to_pylist()], [truth]) >= 0.8


def _data_files(table: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (table / "data").iterdir()}


@pytest.mark.slow
def test_append_then_index_keeps_every_row_searchable(tmp_path):
    out = tmp_path
    path = out / "clips.lance"
    x0 = make_clips(path, 6000)
    cfg = config("task=index", f"output={out}", *INDEX_OVERRIDES)
    assert run_index(cfg)["vector"]["action"] == "built"
    before = _data_files(path)
    x1 = make_clips(path, 2000, start=6000, seed=1, mode="append")
    second = run_index(cfg)
    assert second["vector"]["action"].startswith("extended") and second["vector"]["coverage"] == 1.0
    assert second["columns"]["extended"]  # scalar and full-text indexes took the new rows too
    searcher = engine.search.open(out)
    new_ids = ids_at(np.arange(2000), start=6000)
    for i in range(0, 2000, 7):
        assert searcher.search(vector=x1[i], k=1).column("clip_id")[0].as_py() == new_ids[i]
        assert searcher.search(clip_id=new_ids[i], k=1, where=f"clip_id = '{new_ids[i]}' OR bucket >= 0").num_rows == 1
    res = searcher.search(text=f"take{6000 + 1234}", mode="fts", k=1)
    assert res.column("clip_id")[0].as_py() == new_ids[1234]
    # Far more new rows than the index was trained on: retrain.
    make_clips(path, 12000, start=8000, seed=2, mode="append")
    third = run_index(cfg)
    assert third["vector"]["action"].startswith("retrained") and third["vector"]["coverage"] == 1.0
    assert third["vector"]["search"]["unfiltered"]["recall"] >= 0.95
    # Indexing never rewrote a data file (the media live in them).
    after = _data_files(path)
    assert {k: after[k] for k in before} == before
    assert len(lance.dataset(path).to_table(columns=["clip_id"])) == 20000
    del x0


def test_small_tables_are_searched_exactly(tmp_path):
    x = make_clips(tmp_path / "clips.lance", 800)
    summary = run_index(config("task=index", f"output={tmp_path}"))
    assert summary["vector"]["action"] == "none (exact search)" and summary["vector"]["index_type"] is None
    searcher = engine.search.open(tmp_path)
    res = searcher.search(vector=x[3], k=10)
    assert res.column("clip_id").to_pylist() == ids_at(exact_top(x, x[3:4], 10)[0])
    # An explicit type is built as asked (and tuned); index.type=none drops it again.
    forced = run_index(config("task=index", f"output={tmp_path}", "index.type=IVF_FLAT",
                              "index.rows_per_partition=100"))
    assert forced["vector"]["action"] == "built" and forced["vector"]["index_type"] == "IVF_FLAT"
    assert engine.search.open(tmp_path).tuned.index_type == "IVF_FLAT"
    dropped = run_index(config("task=index", f"output={tmp_path}", "index.type=none"))
    assert dropped["vector"]["action"] == "dropped"
    searcher = engine.search.open(tmp_path)
    assert searcher.tuned.index_name is None
    assert searcher.search(vector=x[3], k=10).column("clip_id").to_pylist() == res.column("clip_id").to_pylist()


def test_tables_from_other_tools_need_only_ids_and_vectors(tmp_path):
    rng = np.random.default_rng(5)
    x = unit(rng.standard_normal((3000, 16)).astype(np.float32))
    lance.write_dataset(pa.table({"id": [f"v{i}" for i in range(3000)],
                                  "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}),
                        tmp_path / "clips.lance")
    summary = run_index(config("task=index", f"output={tmp_path}", "index.exact_max_rows=100",
                               "index.rows_per_partition=100", "index.column=vector", "index.id_column=id"))
    assert summary["vector"]["index_type"] == "IVF_SQ"
    assert summary["columns"]["skipped"] == {"caption": "no such column", "caption_enhanced": "no such column"}
    assert summary["columns"]["scalar"] == ["id"]
    # The searcher finds the columns the index task recorded; results name the id clip_id.
    searcher = engine.search.open(tmp_path / "clips.lance")
    assert searcher.capabilities.vector_column == "vector" and searcher.id_column == "id"
    res = searcher.search(vector=x[9], k=3)
    assert res.column("clip_id")[0].as_py() == "v9"
    assert res.column("source_uri").null_count == 3 and res.column("caption").null_count == 3
    assert searcher.search(clip_id="v9", k=1).column("clip_id")[0].as_py() != "v9"


@pytest.fixture(scope="module")
def text_table(tmp_path_factory, tiny_clip):
    """300 random clips in the tiny CLIP's 24-d space, with captions; the
    model is named in the schema metadata as the curate task writes it."""
    out = tmp_path_factory.mktemp("text_table")
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((300, 24)).astype(np.float32))
    captions = [" ".join(rng.choice(WORDS, 3)) for _ in range(300)]
    captions[17] = "a crimson roadster drives along the coastal road at midnight"
    meta = {"embedding_name": "clip", "embedding_model": tiny_clip, "embedding_dim": "24"}
    table = pa.table({"clip_id": [f"c{i:03d}" for i in range(300)], "source_uri": ["/v/a.mp4"] * 300,
                      "start_s": np.arange(300, dtype=np.float64), "end_s": np.arange(300, dtype=np.float64) + 1,
                      "caption": captions,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 24)})
    lance.write_dataset(table.replace_schema_metadata(meta), out / "clips.lance")
    run_index(config("task=index", f"output={out}"))
    return out, x


def independent_text_embedding(model_dir: str, text: str) -> np.ndarray:
    """The text tower called directly through transformers, not our code."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        out = model.get_text_features(**proc(text=[text], return_tensors="pt", padding=True))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return unit(out[0].numpy().astype(np.float32))


def test_text_search_goes_through_the_models_text_tower(text_table, tiny_clip):
    out, x = text_table
    text = "a red car at night"
    q = independent_text_embedding(tiny_clip, text)
    searcher = engine.search.open(out)
    assert searcher.capabilities.text_vector and searcher.capabilities.fts
    res = searcher.search(text=text, mode="vector", k=5)
    order = np.argsort(-(x @ q))
    assert res.column("clip_id").to_pylist() == [f"c{i:03d}" for i in order[:5]]
    np.testing.assert_allclose(res.column("score").to_pylist(), (x @ q)[order[:5]], atol=1e-4)


def test_hybrid_search_fuses_vector_and_bm25_ranks(text_table, tiny_clip):
    out, x = text_table
    text = "crimson roadster at midnight"
    searcher = engine.search.open(out)
    vec = searcher.search(text=text, mode="vector", k=20).column("clip_id").to_pylist()
    fts = searcher.search(text=text, mode="fts", k=20).column("clip_id").to_pylist()
    assert fts[0] == "c017"
    fused: dict[str, float] = {}
    for ranking in (vec, fts):
        for rank, cid in enumerate(ranking, 1):
            fused[cid] = fused.get(cid, 0.0) + 1 / (60 + rank)
    res = searcher.search(text=text, mode="hybrid", k=10)
    got = dict(zip(res.column("clip_id").to_pylist(), res.column("score").to_pylist()))
    for cid, score in got.items():
        assert score == pytest.approx(fused[cid], rel=1e-5)
    assert min(got.values()) >= sorted(fused.values(), reverse=True)[9] - 1e-9
    assert searcher.search(text=text, k=10).column("clip_id").to_pylist() == res.column("clip_id").to_pylist()


def test_bad_queries_give_clear_errors(indexed, tmp_path):
    out, x, _ = indexed
    searcher = engine.search.open(out)
    with pytest.raises(UnknownClipError, match="no clip with clip_id 'nope'"):
        searcher.search(clip_id="nope")
    with pytest.raises(FilterError, match="invalid where filter 'no_such_column > 3'.*no_such_column") as err:
        searcher.search(vector=x[0], where="no_such_column > 3")
    assert ".rs:" not in str(err.value)
    with pytest.raises(FilterError, match="invalid where filter"):
        searcher.browse(where="passed AND AND")
    with pytest.raises(CapabilityError, match="embedding model"):
        searcher.search(text="red", mode="vector")
    with pytest.raises(SearchError, match="32 dims"):
        searcher.search(vector=[1.0, 2.0])
    with pytest.raises(SearchError, match="exactly one query"):
        searcher.search(text="a", vector=x[0])
    with pytest.raises(SearchError, match="k must be"):
        searcher.search(vector=x[0], k=0)
    with pytest.raises(SearchError, match="no column 'nope'"):
        searcher.search(vector=x[0], columns=["nope"])
    with pytest.raises(SearchError, match="media"):
        searcher.search(vector=x[0], columns=["mp4"])
    # A table without embeddings asked for a vector search.
    lance.write_dataset(pa.table({"clip_id": ["a", "b"], "caption": ["x", "y"]}), tmp_path / "clips.lance")
    bare = engine.search.open(tmp_path)
    with pytest.raises(CapabilityError, match="no embedding column"):
        bare.search(vector=[0.1, 0.2])
    with pytest.raises(CapabilityError, match="no embedding column"):
        bare.search(clip_id="a")
    with pytest.raises(CapabilityError, match="full-text index.*task=index"):
        bare.search(text="x", mode="fts")
    with pytest.raises(FileNotFoundError, match="run task=curate"):
        engine.search.open(tmp_path / "nothing_here")


def _engine(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_task_search_prints_a_table_or_json_lines(text_table, capsys):
    out, _ = text_table
    expected = engine.search.open(out).search(text="a red car", k=3).column("clip_id").to_pylist()
    table = _engine("task=search", f"output={out}", "query=a red car", "k=3")  # the CLI, once
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["#", "score", "clip_id", "source", "span_s"]
    assert [line.split()[2] for line in lines[2:]] == expected
    # The rest in-process: the same task function the CLI calls.
    capsys.readouterr()
    engine.search.run(config("task=search", f"output={out}", "query=a red car", "k=3", "jsonl=true",
                             'where="start_s >= 0"', "columns=[end_s]"))
    parsed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["clip_id"] for r in parsed] == expected and set(parsed[0]) >= {"score", "caption", "end_s"}
    with pytest.raises(SystemExit) as exited:
        engine.search.run(config("task=search", f"output={out}", "query=a red car", 'where="nope >"'))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid where filter" in err and "Traceback" not in err


def test_the_full_experiment_indexes_after_curating_and_dedup():
    cfg = config("+experiment=full", "input=x", "output=y")
    assert list(cfg.task.steps) == ["curate", "dedup", "index"]
    assert config("task=index", "output=y").task.steps == ["index"]


# ----------------------------------------------- a real curate run (tiny CLIP)
@pytest.fixture(scope="module")
def curated(embedded_output, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "out"
    shutil.copytree(embedded_output, out)
    summary = run_index(config("task=index", f"output={out}"))
    return out, summary


def test_index_task_on_a_curate_run(curated):
    out, summary = curated
    assert summary["vector"]["action"] == "none (exact search)"  # six clips
    assert summary["columns"]["skipped"] == {"caption": "no such column", "caption_enhanced": "no such column"}
    assert {"clip_id", "video_id", "passed", "motion_global_mean"} <= set(summary["columns"]["scalar"])
    assert summary["rows"] == 6


def test_video_and_image_queries_go_through_the_vision_tower(curated, tmp_path):
    out, _ = curated
    searcher = engine.search.open(out)
    ds = lance.dataset(out / "clips.lance")
    table = ds.to_table(columns=["clip_id", "embedding"], filter="error IS NULL", with_row_id=True)
    clip_id = table.column("clip_id")[2].as_py()
    mp4 = searcher.media(clip_id, "mp4").readall()
    query = tmp_path / "query.mp4"
    query.write_bytes(mp4)
    # The clip's own file, embedded as a query, is the clip's stored vector.
    res = searcher.search(video=query, k=3)
    assert res.column("clip_id")[0].as_py() == clip_id and res.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-4)
    # An image: its vector is the stage's, and the top hit is the stored vector nearest to it.
    from udfs.media.video import decode_rgb_bytes

    frame = decode_rgb_bytes(mp4)[10]
    stored = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    vec = searcher.embed_image(frame)
    res = searcher.search(image=frame, k=6)
    assert res.column("clip_id").to_pylist() == [table.column("clip_id")[i].as_py() for i in np.argsort(-(stored @ vec))]
    from PIL import Image

    Image.fromarray(frame).save(tmp_path / "frame.png")
    assert searcher.search(image=tmp_path / "frame.png", k=1).column("clip_id")[0].as_py() == res.column("clip_id")[0].as_py()
    with pytest.raises(SearchError, match="query video not found"):
        searcher.search(video=tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(SearchError, match="cannot read query video"):
        searcher.search(video=tmp_path / "bad.mp4")


@pytest.mark.slow
def test_index_and_search_an_output_in_an_object_store(tmp_path, local_s3):
    """task=index and the searcher on s3:// (a local S3 server)."""
    from udfs.uris import lance_storage_options

    client, opts = local_s3
    client.create_bucket(Bucket="search-out")
    lance_opts = lance_storage_options(opts)
    x = make_clips(tmp_path / "local.lance", 3000)
    lance.write_dataset(lance.dataset(tmp_path / "local.lance").to_table(), "s3://search-out/run/clips.lance",
                        storage_options=lance_opts)
    cfg = config("task=index", "output=s3://search-out/run", "index.exact_max_rows=100",
                 "index.rows_per_partition=300")
    cfg.storage_options = opts
    summary = run_index(cfg)
    assert summary["vector"]["index_type"] == "IVF_SQ" and summary["report"] == "s3://search-out/run/index/summary.json"
    searcher = engine.search.open("s3://search-out/run", storage_options=lance_opts)
    assert searcher.tuned.index_type == "IVF_SQ"
    assert searcher.search(vector=x[42], k=1).column("clip_id")[0].as_py() == ids_at([42])[0]
    assert searcher.search(text="take42", mode="fts", k=1).column("clip_id")[0].as_py() == ids_at([42])[0]
