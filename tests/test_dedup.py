"""Semantic dedup: the stages on numpy/Arrow data, then task=dedup on Lance
tables with planted near-duplicates, checked against brute-force SemDeDup
and exact all-pairs similarity, and end to end from videos."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.dedup.task import pruning_table, resolve_n_clusters, run
from engine.store.lance_columns import replace_columns, write_columns
from udfs.schema import CLIP_DEDUP_FIELDS, DEDUP_ASSIGN_SCHEMA, DEDUP_EPS_COLUMNS
from scripts.planted_embeddings import PlantedSpec, planted_embeddings, row_ids
from udfs.dedup.kmeans import KMeans, KMeansAssign, assign, have_faiss
from udfs.dedup.pairwise import SemDedupCluster, max_sim_to_higher_ranked, rank_members
from udfs.dedup.vectors import (SKIP_DIM, SKIP_NONFINITE, SKIP_NULL, SKIP_ZERO, fixed_size_vectors,
                                vectors_from_arrow)

DEDUP_COLUMNS = [f.name for f in CLIP_DEDUP_FIELDS]


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=["task=dedup", *overrides])


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(n_per: int, centres: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    label = np.repeat(np.arange(centres), n_per)
    return unit(c[label] + spread * rng.standard_normal((len(label), dim))), label


# ------------------------------------------------------------------ vectors
def test_vectors_from_arrow_normalises_and_names_every_bad_row():
    col = pa.array([[3.0, 4.0], None, [1.0, float("nan")], [0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 2.0]],
                   pa.list_(pa.float32()))
    x, reason = vectors_from_arrow(col, 2)
    assert reason.tolist() == [None, SKIP_NULL, SKIP_NONFINITE, SKIP_ZERO, SKIP_DIM, None]
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    fixed = pa.array([[3.0, 4.0], None, [0.0, 5.0]], pa.list_(pa.float32(), 2))
    x, reason = vectors_from_arrow(fixed.slice(1), 2)  # an offset slice with a null row
    assert reason.tolist() == [SKIP_NULL, None]
    np.testing.assert_allclose(x, [[0.0, 1.0]])
    x, reason = vectors_from_arrow(fixed, 3)
    assert len(x) == 0 and reason.tolist() == [SKIP_DIM, SKIP_NULL, SKIP_DIM]


# ------------------------------------------------------------------ k-means
BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not have_faiss(), reason="faiss-cpu missing"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["k-means||", "k-means++"])
def test_kmeans_finds_separated_clusters(backend, init):
    x, label = blobs(60, 6, 24, 0.15)
    fit = KMeans(n_clusters=6, init=init, backend=backend, device="cpu", seed=3).fit(x)
    got, _ = assign(x, fit.centroids)
    # Every true blob maps to one cluster and no two blobs share one.
    assert {tuple(np.unique(got[label == b])) for b in range(6)} == {(c,) for c in np.unique(got)}
    assert len(np.unique(got)) == 6 and fit.converged and fit.backend == backend
    again = KMeans(n_clusters=6, init=init, backend=backend, device="cpu", seed=3).fit(x)
    np.testing.assert_array_equal(fit.centroids, again.centroids)


def test_kmeans_tol_and_max_iter():
    x, _ = blobs(100, 20, 16, 0.6, seed=1)
    loose = KMeans(n_clusters=20, max_iter=200, tol=1e-2, backend="torch").fit(x)
    capped = KMeans(n_clusters=20, max_iter=2, tol=0.0, backend="torch").fit(x)
    assert loose.converged and loose.n_iter < 200
    assert capped.n_iter == 2 and not capped.converged
    assert KMeans(n_clusters=50, backend="torch").fit(x[:10]).centroids.shape == (10, 16)  # k <= rows


def test_backend_choice():
    from udfs.dedup.kmeans import have_cuml, resolve_backend

    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown k-means backend"):
        resolve_backend("sklearn")
    if not have_cuml():
        with pytest.raises(ImportError, match=r"reelsift\[gpu\]"):
            resolve_backend("cuml")


def test_assign_is_nearest_centroid_and_cosine_distance():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((300, 8)))
    c = rng.standard_normal((7, 8)).astype(np.float32) * 0.5
    labels, dist = assign(x, c)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d2.argmin(1))
    cos = (x * unit(c)[labels]).sum(1)
    np.testing.assert_allclose(dist, 1 - cos, atol=1e-5)


def test_kmeans_assign_stage_skips_bad_rows():
    centroids = np.eye(3, dtype=np.float32)
    batch = pa.table({
        "_rowaddr": pa.array([0, 1, 2, 3], pa.uint64()), "_rowid": pa.array([0, 1, 2, 3], pa.uint64()),
        "cid": ["a", "b", "c", "d"],
        "vec": pa.array([[0, 2, 0.1], None, [5, 0, 0], [float("inf"), 0, 0]], pa.list_(pa.float32(), 3)),
    })
    out = KMeansAssign(centroids=centroids, id_column="cid", vector_column="vec", device="cpu", dtype="auto",
                       margin=None)(batch)
    assert out.schema == DEDUP_ASSIGN_SCHEMA
    assert out.column("cluster").to_pylist() == [1, -1, 0, -1]
    assert out.column("skip").to_pylist() == [None, SKIP_NULL, None, SKIP_NONFINITE]
    assert out.column("centroid_dist").to_pylist()[1] is None
    assert all(out.column("primary").to_pylist()) and all(out.column("new").to_pylist())
    # With a margin: the first row (nearer centroid 1, 0.1 towards 2) also comes out under cluster 2.
    near = KMeansAssign(centroids=centroids, id_column="cid", vector_column="vec", device="cpu", dtype="auto",
                        margin=0.7)(batch)
    assert near.column("cluster").to_pylist() == [1, -1, 0, -1, 2]
    assert near.column("primary").to_pylist() == [True] * 4 + [False]
    assert near.column("centroid_dist")[4] == near.column("centroid_dist")[0]  # ranked by its own centroid


# ------------------------------------------------------------------ pairwise
def test_rank_members_follows_nemo():
    ids = np.array(["b", "a", "c", "d"], dtype=object)
    dist = np.array([0.5, 0.5, 0.9, 0.1], dtype=np.float32)
    # hard: distance descending, ties by id descending; easy: both ascending.
    assert ids[rank_members(ids, dist, "hard")].tolist() == ["c", "b", "a", "d"]
    assert ids[rank_members(ids, dist, "easy")].tolist() == ["d", "a", "b", "c"]
    r1 = ids[rank_members(ids, dist, "random", seed=1)].tolist()
    perm = [3, 1, 0, 2]
    assert ids[perm][rank_members(ids[perm], dist[perm], "random", seed=1)].tolist() == r1  # order-independent
    with pytest.raises(ValueError, match="keep"):
        rank_members(ids, dist, "first")


@pytest.mark.parametrize("tile", [1, 3, 1024])
def test_max_sim_to_higher_ranked_matches_dense(tile):
    x = unit(np.random.default_rng(tile).standard_normal((50, 6)))
    sim = x @ x.T
    best, where = (t.numpy() for t in max_sim_to_higher_ranked(torch.from_numpy(x), tile))
    assert where[0] == -1 and best[0] == -np.inf
    for j in range(1, 50):
        assert where[j] == np.argmax(sim[:j, j])
        assert best[j] == pytest.approx(sim[:j, j].max(), abs=1e-6)


def nemo_reference(x: np.ndarray, ids: np.ndarray, dist: np.ndarray, keep: str) -> tuple[np.ndarray, np.ndarray]:
    """NeMo Curator's per-cluster step, by hand: sort, full N x N matrix,
    upper triangle, column max. Returns (max sim, argmax position) in input
    order; the top-ranked member has (nan, -1)."""
    order = rank_members(ids, dist, keep)
    xs = x[order].astype(np.float64)
    sim = np.triu(xs @ xs.T, k=1)
    sim[np.tril_indices(len(xs))] = -np.inf
    best, arg = sim.max(0), sim.argmax(0)
    out_sim = np.full(len(x), np.nan)
    out_pos = np.full(len(x), -1)
    out_sim[order[1:]] = best[1:]
    out_pos[order[1:]] = order[arg[1:]]
    return out_sim, out_pos


def test_semdedup_cluster_matches_reference_and_splits_big_clusters():
    x, _ = planted_embeddings(PlantedSpec(n=400, dim=16, n_topics=3, dup_fraction=0.3))
    ids = np.array(row_ids(0, len(x)), dtype=object)
    dist = (1 - x @ unit(x.mean(0, keepdims=True)).T).ravel().astype(np.float32)
    whole = SemDedupCluster(keep="hard", max_cluster_size=10_000)
    sim, pos = whole(x, ids, dist)
    ref_sim, ref_pos = nemo_reference(x, ids, dist, "hard")
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    np.testing.assert_array_equal(pos, ref_pos)
    # Over max_cluster_size: compared within k-means sub-clusters; planted
    # twins are close, so each group still keeps exactly one member.
    split = SemDedupCluster(keep="hard", max_cluster_size=60)
    sim_s, _ = split(x, ids, dist)
    assert split.splits >= 1
    assert ((sim_s >= 0.99) == (sim >= 0.99)).mean() > 0.98
    # Identical rows cannot be split: compared as they are, all but one flagged.
    same = np.repeat(x[:1], 30, axis=0)
    cut = SemDedupCluster(keep="easy", max_cluster_size=8)
    s, p = cut(same, ids[:30], np.zeros(30, np.float32))
    assert cut.oversized == 1 and np.isnan(s).sum() == 1 and (s[~np.isnan(s)] > 0.9999).all()
    assert ids[:30][np.isnan(s)][0] == min(ids[:30])  # easy: ties by id ascending


# ------------------------------------------------------------------ Lance write-back
def small_table(path: Path, n: int = 10) -> lance.LanceDataset:
    from udfs.schema import blob_field

    schema = pa.schema([pa.field("clip_id", pa.string()), blob_field("mp4")])
    t = pa.table({"clip_id": [f"c{i}" for i in range(n)], "mp4": [bytes([i]) * 50 for i in range(n)]}, schema=schema)
    return lance.write_dataset(t, str(path), schema=schema, max_rows_per_file=4)


def data_files(ds: lance.LanceDataset) -> dict[str, list[int]]:
    return {f.path: list(f.fields) for fr in ds.get_fragments() for f in fr.data_files()}


def dedup_values(ds: lance.LanceDataset, which: list[int]) -> pa.Table:
    rows = ds.to_table(columns=["clip_id"], with_row_id=True, with_row_address=True).take(which)
    n = len(which)
    return pa.table({"_rowid": rows["_rowid"], "_rowaddr": rows["_rowaddr"],
                     "dedup_cluster": pa.array(range(n), pa.int32()),
                     "dedup_centroid_dist": pa.array([0.5] * n, pa.float32()),
                     "dedup_max_sim": pa.array([0.9] * n, pa.float32()),
                     "dedup_max_id": pa.array(["x"] * n), "dedup_group": pa.array(range(n), pa.int64()),
                     "duplicate": pa.array([True] * n)})


def test_columns_are_added_then_replaced_without_touching_media(tmp_path, monkeypatch):
    ds = small_table(tmp_path / "t.lance")
    base = data_files(ds)
    ds.delete("clip_id = 'c5'")  # deletions shift no physical offsets
    ds = lance.dataset(str(tmp_path / "t.lance"))
    v0 = ds.version
    ds = write_columns(ds, dedup_values(ds, [0, 2, 7]), CLIP_DEDUP_FIELDS)
    assert ds.version == v0 + 1
    assert set(base) <= set(data_files(ds))  # media files untouched
    rows = ds.to_table(columns=["clip_id", "dedup_cluster", "duplicate"]).to_pylist()
    assert [(r["clip_id"], r["dedup_cluster"], r["duplicate"]) for r in rows if r["dedup_cluster"] is not None] == [
        ("c0", 0, True), ("c2", 1, True), ("c8", 2, True)]
    before = data_files(ds)
    dup_only = [f for f in CLIP_DEDUP_FIELDS if f.name == "duplicate"]
    values = dedup_values(ds, [0]).set_column(7, "duplicate", pa.array([False]))
    ds = write_columns(ds, values, dup_only)
    after = data_files(ds)
    assert set(base) <= set(after) and ds.version == v0 + 2
    new = {p: f for p, f in after.items() if p not in before}
    dup_id = next(f.id() for f in ds.lance_schema.fields() if f.name() == "duplicate")
    assert all(f == [dup_id] for f in new.values())  # only `duplicate` was written
    t = ds.to_table(columns=["clip_id", "dedup_cluster", "duplicate"]).to_pylist()
    assert [r["duplicate"] for r in t] == [False] + [None] * 8
    assert [r["dedup_cluster"] for r in t][:3] == [0, None, 1]
    # All six replaced at once, across the files the two writes left.
    ds = write_columns(ds, dedup_values(ds, [3, 4]), CLIP_DEDUP_FIELDS)
    assert set(base) <= set(data_files(ds)) and ds.version == v0 + 3
    t = ds.to_table(columns=["clip_id", *DEDUP_COLUMNS]).to_pylist()
    assert [(r["clip_id"], r["dedup_cluster"], r["dedup_max_id"], r["duplicate"]) for r in t
            if r["dedup_cluster"] is not None] == [("c3", 0, "x", True), ("c4", 1, "x", True)]
    assert t[0]["duplicate"] is None
    # A failure while writing commits nothing.
    import engine.store.lance_columns as lc

    calls = []

    class Failing(lc.LanceFileWriter):
        def write_batch(self, batch):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return super().write_batch(batch)

    monkeypatch.setattr(lc, "LanceFileWriter", Failing)
    with pytest.raises(OSError, match="disk full"):
        replace_columns(ds, dedup_values(ds, [1]), CLIP_DEDUP_FIELDS)
    again = lance.dataset(str(tmp_path / "t.lance"))
    assert again.version == ds.version and data_files(again) == data_files(ds)


# ------------------------------------------------------------------ task=dedup
def pair_recall(x: np.ndarray, duplicate: np.ndarray, eps: float) -> tuple[float, int]:
    """Recall against exact global all-pairs at `eps`: the share of pairs
    with cosine >= 1 - eps of which dedup did not keep both."""
    sim = x @ x.T
    i, j = np.nonzero(np.triu(sim >= 1 - eps, k=1))
    resolved = duplicate[i] | duplicate[j]
    return float(resolved.mean()) if len(i) else 1.0, len(i)


BAD_ROWS = {"bad-null": None, "bad-nan": [float("nan")] * 32, "bad-dim": [0.5] * 31, "bad-zero": [0.0] * 32}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_session):
    """A clip-table-like Lance table deduped once with the defaults (keep=hard,
    eps=0.01, the curated view): 3,000 curated rows with planted
    near-duplicates, rows with unusable vectors, and copies of a planted row
    outside the curated view (filtered out, failed)."""
    root = tmp_path_factory.mktemp("planted")
    spec = PlantedSpec(n=3000, dim=32, n_topics=200, dup_fraction=0.15, seed=7)
    x, group = planted_embeddings(spec)
    ids = row_ids(0, len(x))
    vectors = [list(map(float, v)) for v in x] + list(BAD_ROWS.values()) + [list(map(float, x[0]))] * 2
    table = pa.table({
        "clip_id": ids + list(BAD_ROWS) + ["copy-filtered", "copy-failed"],
        "embedding": pa.array(vectors, pa.list_(pa.float32())),  # variable length: a wrong one can exist
        "planted_group": np.r_[group, [-1] * 6],
        "passed": [True] * (len(x) + len(BAD_ROWS)) + [False, None],
        "error": pa.array([None] * (len(x) + len(BAD_ROWS) + 1) + ["encode failed"], pa.string()),
    })
    before = lance.write_dataset(table, str(root / "emb.lance"), max_rows_per_file=1000)
    lance.write_dataset(table, str(root / "semdedup.lance"), max_rows_per_file=1000)
    out = root / "out"
    summary = run(config(f"output={out}", f"dedup.table={root / 'emb.lance'}"))
    semdedup = run(config(f"output={root / 'out_semdedup'}", f"dedup.table={root / 'semdedup.lance'}",
                          "dedup.mode=semdedup"))
    return {"root": root, "out": out, "table": root / "emb.lance", "summary": summary, "spec": spec,
            "files_before": data_files(before), "version_before": before.version,
            "semdedup_table": root / "semdedup.lance", "semdedup": semdedup}


def read_results(table: Path, considered: bool = True) -> pa.Table:
    ds = lance.dataset(str(table))
    return ds.to_table(columns=["clip_id", "embedding", "planted_group", *DEDUP_COLUMNS],
                       filter="dedup_cluster IS NOT NULL" if considered else None)


def matrix(t: pa.Table) -> np.ndarray:
    return unit(np.stack([np.asarray(v, np.float32) for v in t.column("embedding").to_pylist()]))


def test_semdedup_mode_equals_brute_force_semdedup(planted):
    """dedup.mode=semdedup is NeMo Curator's SemDeDup, as before components."""
    t = read_results(planted["semdedup_table"])
    x = matrix(t)
    ids = np.array(t.column("clip_id").to_pylist(), dtype=object)
    cluster = t.column("dedup_cluster").to_numpy()
    dist = t.column("dedup_centroid_dist").to_numpy()
    eps = planted["semdedup"]["eps"]
    kept_ref = np.ones(len(ids), bool)
    for c in np.unique(cluster):
        m = np.flatnonzero(cluster == c)
        sim, _ = nemo_reference(x[m], ids[m], dist[m], "hard")
        kept_ref[m] = ~(np.nan_to_num(sim, nan=-1) >= 1 - eps)
    duplicate = np.asarray(t.column("duplicate").to_pylist())
    assert set(ids[~duplicate]) == set(ids[kept_ref])
    assert duplicate.sum() > 100  # the planted groups were found
    k = planted["semdedup"]["run"]["n_clusters"]
    assert k == resolve_n_clusters("auto", 3004) == 55
    assert set(np.unique(cluster)) <= set(range(k))
    assert planted["semdedup"]["run"]["boundary_members"] == 0 and planted["semdedup"]["run"]["edges"] is None
    # dedup_max_id names a higher-ranked member of the same cluster.
    by_id = {i: n for n, i in enumerate(ids)}
    max_id = t.column("dedup_max_id").to_pylist()
    for n in np.flatnonzero(duplicate)[:200]:
        partner = by_id[max_id[n]]
        assert cluster[partner] == cluster[n] and (dist[partner], ids[partner]) > (dist[n], ids[n])
        assert float(x[n] @ x[partner]) == pytest.approx(t.column("dedup_max_sim")[n].as_py(), abs=1e-5)
    # Its groups are the trees of those links: a flagged row shares its partner's group.
    group = t.column("dedup_group").to_numpy(zero_copy_only=False)
    for n in np.flatnonzero(duplicate)[:200]:
        assert group[n] == group[by_id[max_id[n]]]


def exact_components(x: np.ndarray, eps: float) -> np.ndarray:
    """Component label of every row in the exact all-pairs graph at cosine >= 1 - eps."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    return connected_components(csr_matrix(np.triu(x @ x.T >= 1 - eps, k=1)), directed=False)[1]


def kept_by_rank(label: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """True for every row that is not the best-ranked of its component."""
    best = np.full(label.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(best, label, rank)
    return rank != best[label]


def hard_rank(ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
    rank = np.empty(len(ids), np.int64)
    rank[rank_members(ids, dist, "hard")] = np.arange(len(ids))
    return rank


def test_components_equal_exact_all_pairs_groups(planted):
    """The default mode keeps exactly the best-ranked (keep=hard) member of
    every group of the exact all-pairs graph at eps: nothing straddling a
    cluster boundary was missed and no chain was left open."""
    t = read_results(planted["table"])
    x = matrix(t)
    ids = np.array(t.column("clip_id").to_pylist(), dtype=object)
    dist = t.column("dedup_centroid_dist").to_numpy()
    label = exact_components(x, planted["summary"]["eps"])
    duplicate = np.asarray(t.column("duplicate").to_pylist())
    np.testing.assert_array_equal(duplicate, kept_by_rank(label, hard_rank(ids, dist)))
    assert planted["summary"]["mode"] == "components" and planted["summary"]["run"]["boundary_members"] > 0
    # dedup_group: the smallest _rowid of the group, null for rows without a near-duplicate.
    ds = lance.dataset(str(planted["table"]))
    g = ds.to_table(columns=["dedup_group"], filter="dedup_cluster IS NOT NULL", with_row_id=True)
    group = g.column("dedup_group").to_numpy(zero_copy_only=False).astype(float)
    rowid = g.column("_rowid").to_numpy()
    size = np.bincount(label)
    for c in np.unique(label[size[label] > 1]):
        members = label == c
        assert (group[members] == rowid[members].min()).all()
    assert np.isnan(group[size[label] == 1]).all()


def test_recall_of_planted_pairs_against_exact_all_pairs(planted):
    t = read_results(planted["table"])
    duplicate = np.asarray(t.column("duplicate").to_pylist())
    recall, pairs = pair_recall(matrix(t), duplicate, planted["summary"]["eps"])
    assert pairs > 200 and recall == 1.0, (recall, pairs)
    group = t.column("planted_group").to_numpy()
    # Precision against the planted truth: every removed row has a planted
    # twin, and every planted group keeps exactly one member.
    assert (group[duplicate] >= 0).all()
    kept_per_group = np.bincount(group[(group >= 0) & ~duplicate], minlength=group.max() + 1)
    assert (kept_per_group[np.unique(group[group >= 0])] == 1).all()


def test_unusable_and_unselected_rows_are_skipped_and_counted(planted):
    summary = planted["summary"]
    assert summary["rows"] == 3006 and summary["run"]["matched_rows"] == 3004 and summary["considered"] == 3000
    assert summary["run"]["skipped"] == {SKIP_NULL: 1, SKIP_NONFINITE: 1, SKIP_DIM: 1, SKIP_ZERO: 1}
    rows = {r["clip_id"]: r for r in read_results(planted["table"], considered=False).to_pylist()}
    # Bad vectors, a filtered clip and a failed clip (both exact copies of a
    # curated row) are left out with nulls; they never make a curated row a duplicate.
    for rid in [*BAD_ROWS, "copy-filtered", "copy-failed"]:
        assert all(rows[rid][c] is None for c in DEDUP_COLUMNS), rid
    assert not any(r["dedup_max_id"] in ("copy-filtered", "copy-failed") for r in rows.values())


def test_dedup_files_and_media_untouched(planted):
    out, summary = planted["out"] / "dedup", planted["summary"]
    ds = lance.dataset(str(planted["table"]))
    assert ds.version == planted["version_before"] + 1
    assert set(planted["files_before"]) <= set(data_files(ds))  # nothing of the table was rewritten
    k = summary["run"]["n_clusters"]
    assert np.load(out / "centroids.npy").shape == (k, 32)
    prune = pq.read_table(out / "pruning.parquet")
    assert prune.column_names == ["id", "max_id", "cosine_sim_score"] and prune.num_rows == 3000
    t = read_results(planted["table"])
    dups = sorted(np.array(t.column("clip_id").to_pylist())[np.asarray(t.column("duplicate").to_pylist())])
    assert pq.read_table(out / "duplicates").column("id").to_pylist() == dups
    scores = prune.column("cosine_sim_score").to_numpy()
    # NeMo's removal rule on pruning.parquet flags a subset: a chain's far end has no direct higher-ranked twin.
    assert set(prune.filter(pa.compute.greater_equal(prune["cosine_sim_score"], 0.99))["id"].to_pylist()) <= set(dups)
    assert (scores >= 0).all()
    edges = pq.read_table(out / "edges.parquet")
    assert edges.num_rows == summary["run"]["edges"] > 0
    assert (edges.column("sim").to_numpy() >= 1 - 0.1 - 1e-6).all()  # the largest eps of the sweep
    assert (edges.column("a").to_numpy() < edges.column("b").to_numpy()).all()
    assert pq.read_table(out / "boundary.parquet").num_rows == summary["run"]["boundary_members"]
    lines = (out / "dedup_summary.csv").read_text().splitlines()
    assert lines[0] == "eps,kept,removed,total"
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert [float(r["eps"]) for r in rows] == [0.001, 0.005, 0.01, 0.02, 0.05, 0.1]
    removed = [int(r["removed"]) for r in rows]
    assert removed == sorted(removed) and removed[2] == len(dups) == summary["removed"]
    assert all(int(r["kept"]) + int(r["removed"]) == int(r["total"]) == 3000 for r in rows)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["removed"] == summary["removed"] and on_disk["run"]["kmeans"]["converged"]


def test_new_eps_rewrites_only_the_eps_columns(planted):
    table = planted["table"]
    ds = lance.dataset(str(table))
    before_files = data_files(ds)
    before = read_results(table, considered=False)
    summary = run(config(f"output={planted['out']}", f"dedup.table={table}", "dedup.eps=0.0035"))
    assert summary["run"]["reused"] and summary["columns_written"] == list(DEDUP_EPS_COLUMNS)
    ds2 = lance.dataset(str(table))
    assert ds2.version == ds.version + 1
    after = read_results(table, considered=False)
    for col in ["clip_id", "dedup_cluster", "dedup_centroid_dist", "dedup_max_sim", "dedup_max_id"]:
        assert after.column(col).equals(before.column(col)), col
    flat = [pa.compute.list_flatten(t.column("embedding")).to_numpy() for t in (before, after)]
    np.testing.assert_array_equal(*flat)  # NaN-aware: the bad-nan row is in there
    # The groups at the new eps come from the stored edges: those of exact all-pairs.
    t = read_results(table)
    ids = np.array(t.column("clip_id").to_pylist(), dtype=object)
    label = exact_components(matrix(t), 0.0035)
    want = kept_by_rank(label, hard_rank(ids, t.column("dedup_centroid_dist").to_numpy()))
    np.testing.assert_array_equal(np.asarray(t.column("duplicate").to_pylist()), want)
    assert after.column("duplicate").to_pylist() != before.column("duplicate").to_pylist()
    eps_ids = {f.id() for f in ds2.lance_schema.fields() if f.name() in DEDUP_EPS_COLUMNS}
    new_files = {p: f for p, f in data_files(ds2).items() if p not in before_files}
    assert new_files and all(set(f) == eps_ids for f in new_files.values())
    assert pq.read_table(planted["out"] / "dedup" / "duplicates").num_rows == summary["removed"]
    # Back to the first eps: the same duplicates as the first run.
    run(config(f"output={planted['out']}", f"dedup.table={table}"))
    again = read_results(table, considered=False)
    assert again.column("duplicate").equals(before.column("duplicate"))
    assert again.column("dedup_group").equals(before.column("dedup_group"))
    # Above the eps the boundary margin was chosen for: computed again, in full.
    wider = run(config(f"output={planted['out']}", f"dedup.table={table}", "dedup.eps=0.02"))
    assert not wider["run"]["reused"] and wider["run"]["boundary_eps"] == 0.02


def keep_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One cluster: a near-duplicate trio at different distances from the
    centroid, an exact-duplicate pair (equal distances: ties by id) and
    unrelated rows. Returns (ids, vectors)."""
    rng = np.random.default_rng(5)
    dim = 16
    centre = unit(rng.standard_normal((1, dim)))[0]
    base = unit(centre + 0.3 * unit(rng.standard_normal((1, dim))))[0]
    trio = [unit((base + s * centre)[None])[0] for s in (0.0, 0.02, 0.04)]  # s pulls towards the centre
    twin = unit(centre + 0.3 * unit(rng.standard_normal((1, dim))))[0]
    others = unit(centre + 0.5 * rng.standard_normal((12, dim)))
    vecs = np.stack([*trio, twin, twin, *others]).astype(np.float32)
    ids = np.array(["t-far", "t-mid", "t-near", "twin-a", "twin-b", *[f"o{i:02d}" for i in range(12)]], dtype=object)
    lance.write_dataset(pa.table({"clip_id": ids.tolist(), "embedding": fixed_size_vectors(vecs)}), str(path))
    return ids, vecs


NEAR_DUPS = ("t-far", "t-mid", "t-near", "twin-a", "twin-b")


def test_keep_hard_and_easy_keep_nemos_member(tmp_path, ray_session):
    ids, vecs = keep_table(tmp_path / "k.lance")
    dist = 1 - vecs @ unit(vecs.mean(0, keepdims=True))[0]  # k = 1: the centroid is the mean
    # hard keeps the member farthest from the centroid and, on a tie, the larger
    # id; easy keeps the closest and the smaller id (NeMo Curator's ranking).
    expected = {"hard": {"t-far", "twin-b"}, "easy": {"t-near", "twin-a"}}
    for keep, want in expected.items():
        sim, _ = SemDedupCluster(keep=keep)(vecs, ids, dist)
        assert {i for i, s in zip(ids, sim) if i in NEAR_DUPS and not s >= 0.98} == want
        assert not any(s >= 0.98 for i, s in zip(ids, sim) if i not in NEAR_DUPS)
    # Through the task (hard is what the planted table runs with).
    run(config(f"output={tmp_path / 'easy'}", f"dedup.table={tmp_path / 'k.lance'}", "dedup.keep=easy",
               "dedup.kmeans.n_clusters=1", "dedup.eps=0.02"))
    rows = {r["clip_id"]: r for r in lance.dataset(str(tmp_path / "k.lance")).to_table().to_pylist()}
    assert {i for i in NEAR_DUPS if not rows[i]["duplicate"]} == expected["easy"]
    assert not any(rows[i]["duplicate"] for i in ids if i not in NEAR_DUPS)
    np.testing.assert_allclose([rows[i]["dedup_centroid_dist"] for i in ids], dist, atol=1e-5)


def test_bad_tables_fail_clearly_and_commit_nothing(tmp_path):
    t = pa.table({"clip_id": ["a", "b"], "other": [1, 2]})
    ds = lance.write_dataset(t, str(tmp_path / "t.lance"))
    with pytest.raises(ValueError, match="no embedding column 'embedding'"):
        run(config(f"output={tmp_path / 'o'}", f"dedup.table={tmp_path / 't.lance'}"))
    with pytest.raises(ValueError, match="no id column 'nope'"):
        run(config(f"output={tmp_path / 'o'}", f"dedup.table={tmp_path / 't.lance'}", "dedup.vector_column=other",
                   "dedup.id_column=nope"))
    with pytest.raises(ValueError, match="must be a list of floats"):
        run(config(f"output={tmp_path / 'o'}", f"dedup.table={tmp_path / 't.lance'}", "dedup.vector_column=other"))
    vec = pa.table({"clip_id": ["a", "b"], "embedding": fixed_size_vectors(np.eye(2, dtype=np.float32)),
                    "passed": [False, False], "error": pa.array([None, None], pa.string())})
    lance.write_dataset(vec, str(tmp_path / "v.lance"))
    with pytest.raises(ValueError, match="nothing to dedup: no row"):
        run(config(f"output={tmp_path / 'o'}", f"dedup.table={tmp_path / 'v.lance'}"))
    with pytest.raises(ValueError, match="not a valid filter"):
        run(config(f"output={tmp_path / 'o'}", f"dedup.table={tmp_path / 'v.lance'}", "dedup.where='no_such > 1'"))
    with pytest.raises(FileNotFoundError, match="run task=curate"):
        run(config(f"output={tmp_path / 'empty'}"))
    assert lance.dataset(str(tmp_path / "t.lance")).version == ds.version
    assert lance.dataset(str(tmp_path / "v.lance")).version == 1


def test_cli_task_dedup_fails_clearly_without_a_clip_table(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "engine", "task=dedup", f"output={tmp_path}"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode != 0
    assert "no clip table" in done.stderr and "run task=curate" in done.stderr


def test_pruning_table_is_nemo_shaped():
    results = pa.table({"id": ["a", "b", "c"], "max_id": [None, "a", "a"],
                        "max_sim": pa.array([None, 0.995, -0.2], pa.float32())})
    t = pruning_table(results)
    assert t.to_pylist() == [{"id": "a", "max_id": "a", "cosine_sim_score": 0.0},
                             {"id": "b", "max_id": "a", "cosine_sim_score": pytest.approx(0.995)},
                             {"id": "c", "max_id": "a", "cosine_sim_score": 0.0}]


# ------------------------------------------------------------------ end to end from videos
def reencode_cropped(src: Path, dst: Path, start: int, end: int, crop: int, crf: int = 30) -> None:
    """Frames [start, end) of `src`, `crop` pixels cut from every edge,
    encoded again with another quality: the kind of copy dedup must catch."""
    from engine.sample import _add_video_stream, _encode_rgb

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        rate = Fraction(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in inp.decode(stream)][start:end]
    frames = [f[crop:-crop, crop:-crop] for f in frames]
    h, w = frames[0].shape[:2]
    with av.open(str(dst), "w") as out:
        vs = _add_video_stream(out, codec="libx264", width=w, height=h, rate=rate, crf=crf, gop=30, pix_fmt=None)
        _encode_rgb(out, vs, frames, rate)


@pytest.mark.slow
def test_end_to_end_reencoded_crop_is_flagged(tmp_path, ray_session):
    from engine.sample import write_video
    from engine.tasks import run_tasks
    from udfs.models.tiny import build_clip

    videos = tmp_path / "videos"
    videos.mkdir()
    # Three scenes, 2 s each: fixed-stride 2 s clips give one clip per scene.
    write_video(videos / "source.mp4", width=128, height=96, fps=30, scenes=[60, 60, 60])
    reencode_cropped(videos / "source.mp4", videos / "copy.mp4", 60, 120, crop=4)
    clip = build_clip(tmp_path / "clip")
    cfg = config(f"input={videos}", f"output={tmp_path / 'out'}", "+experiment=full", f"embed.model={clip}",
                 "transcode.preset=ultrafast", "split.clip_len_s=2", "split.min_clip_s=1", "preview.enabled=false",
                 "dedup.eps=0.01")
    summaries = run_tasks(cfg)
    assert list(summaries) == ["curate", "dedup", "index"]
    t = lance.dataset(str(tmp_path / "out" / "clips.lance")).to_table(
        columns=["clip_id", "source_uri", "start_frame", "passed", "error", *DEDUP_COLUMNS])
    rows = {(os.path.basename(r["source_uri"]), r["start_frame"]): r for r in t.to_pylist()}
    assert set(rows) == {("source.mp4", 0), ("source.mp4", 60), ("source.mp4", 120), ("copy.mp4", 0)}
    pair = [rows[("source.mp4", 60)], rows[("copy.mp4", 0)]]
    assert sorted(r["duplicate"] for r in pair) == [False, True]  # flagged, and one of the two kept
    flagged = next(r for r in pair if r["duplicate"])
    assert flagged["dedup_max_sim"] >= 0.99 and flagged["dedup_max_id"] is not None
    assert not rows[("source.mp4", 0)]["duplicate"] and not rows[("source.mp4", 120)]["duplicate"]
    training = lance.dataset(str(tmp_path / "out" / "clips.lance")).to_table(
        filter="passed AND error IS NULL AND duplicate IS NOT TRUE", columns=["clip_id"])
    assert training.num_rows == 3
    # The index step ran on the deduplicated table: "more like this" on the
    # flagged copy, kept clips only, ranks the clip it duplicates first.
    import engine.search

    kept = next(r for r in pair if not r["duplicate"])
    found = engine.search.open(tmp_path / "out").search(clip_id=flagged["clip_id"], where="duplicate IS NOT TRUE", k=3)
    assert found.column("clip_id")[0].as_py() == kept["clip_id"]
    assert found.column("score")[0].as_py() >= 0.99


# ------------------------------------------------------------------ object store
@pytest.fixture(scope="module")
def bucket(local_s3):
    client, opts = local_s3
    client.create_bucket(Bucket="emb")  # moto's store is per process: a name of this module's own
    return client, opts


@pytest.mark.slow
def test_dedup_of_a_table_in_a_bucket(ray_session, bucket):
    from udfs.uris import lance_storage_options

    client, opts = bucket
    lance_opts = lance_storage_options(opts)
    spec = PlantedSpec(n=800, dim=16, n_topics=40, dup_fraction=0.2, seed=3)
    x, group = planted_embeddings(spec)
    table = pa.table({"clip_id": row_ids(0, len(x)), "embedding": fixed_size_vectors(x)})
    lance.write_dataset(table, "s3://emb/t.lance", storage_options=lance_opts, max_rows_per_file=300)
    cfg = config("output=s3://emb/out", "dedup.table=s3://emb/t.lance")
    cfg.storage_options = opts
    summary = run(cfg)
    ds = lance.dataset("s3://emb/t.lance", storage_options=lance_opts)
    dup = np.asarray(ds.to_table(columns=["duplicate"]).column("duplicate").to_pylist())
    assert dup.sum() == summary["removed"] > 50 and (group[dup] >= 0).all()
    stored = json.loads(client.get_object(Bucket="emb", Key="out/dedup/summary.json")["Body"].read())
    assert stored["removed"] == summary["removed"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="emb", Prefix="out/dedup/")["Contents"]}
    assert {"out/dedup/centroids.npy", "out/dedup/pruning.parquet", "out/dedup/dedup_summary.csv",
            "out/dedup/duplicates/duplicates.parquet"} <= keys
    # eps-only re-run on the bucket: `duplicate` replaced in place.
    cfg.dedup.eps = 0.001
    again = run(cfg)
    assert again["run"]["reused"] and again["removed"] <= summary["removed"]
    ds = lance.dataset("s3://emb/t.lance", storage_options=lance_opts)
    assert ds.to_table(columns=["duplicate"]).column("duplicate").to_pylist().count(True) == again["removed"]
