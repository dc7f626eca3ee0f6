"""dedup.mode=components on data built to defeat SemDeDup: near-duplicate
pairs and chains planted right across the bisector of two k-means clusters;
and incremental dedup of a table that grew, against a full run."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.dedup.task import run
from scripts.planted_embeddings import PlantedSpec, planted_embeddings, row_ids
from udfs.dedup.vectors import fixed_size_vectors

EPS = 0.01


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=["task=dedup", *overrides])


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def straddling(seed: int = 0, dim: int = 16, blobs: int = 8, per_blob: int = 150, pairs: int = 40,
               chains: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated blobs (k-means with k = blobs finds them), plus groups
    planted on the bisector of two blob centres: pairs at cosine 1 - eps/2
    one on each side, and chains x ~ y ~ z (each step at 1 - 0.6 eps, x and z
    at ~1 - 2.4 eps, not near-duplicates themselves) across it. Returns
    (vectors, planted group or -1)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((blobs, dim)))
    x = [unit(centres[np.repeat(np.arange(blobs), per_blob)] + 0.25 * rng.standard_normal((blobs * per_blob, dim)))]
    group = [np.full(blobs * per_blob, -1)]

    def across(step_cos: float, steps: list[int], g: int) -> None:
        a, b = rng.choice(blobs, 2, replace=False)
        axis = centres[a] - centres[b]
        wobble = rng.standard_normal(dim)
        wobble -= (wobble @ axis) / (axis @ axis) * axis  # along the bisector, not across it
        m = unit(centres[a] + centres[b] + 0.3 * unit(wobble))
        u = unit(axis - (axis @ m) * m)  # across the bisector, tangent to the sphere at m
        theta = np.arccos(step_cos)
        x.append(unit(np.stack([np.cos(s * theta) * m + np.sin(s * theta) * u for s in steps])))
        group.append(np.full(len(steps), g))

    for g in range(pairs):
        across(1 - EPS / 2, [0.5, -0.5], g)  # the pair's angle is theta: cosine 1 - eps/2
    for g in range(pairs, pairs + chains):
        across(1 - 0.6 * EPS, [-1, 0, 1], g)
    order = rng.permutation(sum(len(p) for p in x))
    return np.concatenate(x)[order], np.concatenate(group)[order]


def write(path: Path, x: np.ndarray, group: np.ndarray, start: int = 0, mode: str = "create") -> lance.LanceDataset:
    table = pa.table({"clip_id": row_ids(start, len(x)), "embedding": fixed_size_vectors(x),
                      "planted_group": group})
    return lance.write_dataset(table, str(path), mode=mode, max_rows_per_file=500)


def results(path: Path) -> pa.Table:
    return lance.dataset(str(path)).to_table(
        columns=["clip_id", "embedding", "planted_group", "duplicate", "dedup_group"], with_row_id=True)


def all_pairs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.nonzero(np.triu(x @ x.T >= 1 - EPS, k=1))
    return i, j


@pytest.fixture(scope="module")
def across(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("across")
    x, group = straddling()
    out = {}
    for mode in ("components", "semdedup"):
        write(root / f"{mode}.lance", x, group)
        out[mode] = run(config(f"output={root / mode}", f"dedup.table={root / mode}.lance", f"dedup.mode={mode}",
                               "dedup.kmeans.n_clusters=8", f"dedup.eps={EPS}"))
        out[mode + "_rows"] = results(root / f"{mode}.lance")
    return x, group, out


def verdicts(t):
    """(duplicate flags, the vectors, each row's planted group) of a deduped table."""
    duplicate = np.asarray(t.column("duplicate").to_pylist())
    xs = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return duplicate, xs, t.column("planted_group").to_numpy()


def test_pairs_across_a_boundary_are_found_and_groups_keep_one(across):
    x, group, out = across
    t = out["components_rows"]
    duplicate, xs, g = verdicts(t)
    i, j = all_pairs(xs)
    assert len(i) >= 40 + 2 * 15
    assert (duplicate[i] | duplicate[j]).all()  # pair recall 1.0 against exact all-pairs
    assert (g[duplicate] >= 0).all()  # no false positive: every removed row is planted
    kept = np.bincount(g[(g >= 0) & ~duplicate], minlength=g.max() + 1)
    assert (kept == 1).all()  # exactly one per group, chains included
    # A chain is one group, though its ends are not near-duplicates of each other.
    dg = t.column("dedup_group").to_numpy(zero_copy_only=False)
    for c in range(40, 55):
        members = g == c
        assert members.sum() == 3 and len(np.unique(dg[members])) == 1 and not np.isnan(dg[members][0])
    assert out["components"]["run"]["boundary_members"] > 0


def test_semdedup_mode_misses_them_as_nemo_does(across):
    """The same rows under dedup.mode=semdedup: pairs across the boundary are
    never compared and chains stay open, so some groups keep two."""
    x, group, out = across
    t = out["semdedup_rows"]
    duplicate, xs, g = verdicts(t)
    i, j = all_pairs(xs)
    recall = (duplicate[i] | duplicate[j]).mean()
    kept = np.bincount(g[(g >= 0) & ~duplicate], minlength=g.max() + 1)
    assert recall < 0.9 and (kept > 1).sum() >= 10, (recall, (kept > 1).sum())
    assert (g[duplicate] >= 0).all()


@pytest.mark.parametrize("keep", ["random", "hard"])
def test_incremental_on_a_grown_table_equals_a_full_run(tmp_path, ray_session, keep):
    """Dedup 1,500 rows, append 700 more (new members of old groups, new
    groups, pairs across a boundary), dedup incrementally; a full run on the
    same grown table finds the same groups. With keep=random the ranking
    does not depend on the centroids, so the same rows are kept as well."""
    x, group = planted_embeddings(PlantedSpec(n=2000, dim=32, n_topics=100, dup_fraction=0.2, seed=11))
    extra, extra_group = straddling(seed=3, dim=32, blobs=4, per_blob=0, pairs=40, chains=10)
    grow_x = np.concatenate([x[1500:], extra])
    grow_g = np.concatenate([group[1500:], np.where(extra_group >= 0, extra_group + 10_000, -1)])
    # The planted chains sit where several clusters meet: compared across
    # three bisectors, so that no pair is outside the boundary rule's reach.
    common = [f"dedup.keep={keep}", f"dedup.eps={EPS}", "dedup.boundary.clusters=3"]
    inc, full = tmp_path / "inc.lance", tmp_path / "full.lance"
    write(inc, x[:1500], group[:1500])
    first = run(config(f"output={tmp_path / 'out'}", f"dedup.table={inc}", *common))
    assert first["run"]["incremental"] is None
    before = {fr.fragment_id: sorted(d.path for d in fr.data_files()) for fr in lance.dataset(str(inc)).get_fragments()}
    write(inc, grow_x, grow_g, start=1500, mode="append")
    for path in (full,):
        write(path, x[:1500], group[:1500])
        write(path, grow_x, grow_g, start=1500, mode="append")
    summary = run(config(f"output={tmp_path / 'out'}", f"dedup.table={inc}", "dedup.incremental=true", *common))
    step = summary["run"]["incremental"]
    assert step["new_rows"] == len(grow_x) and step["previous_version"] == first["deduped"]["version"]
    assert summary["considered"] == 1500 + len(grow_x)
    ref = run(config(f"output={tmp_path / 'out_full'}", f"dedup.table={full}", *common))
    a, b = results(inc), results(full)
    assert a.column("clip_id").equals(b.column("clip_id"))
    da, db = (np.asarray(t.column("duplicate").to_pylist()) for t in (a, b))

    def partition(t: pa.Table) -> set[frozenset[str]]:
        ids, g = np.asarray(t.column("clip_id").to_pylist()), t.column("dedup_group").to_numpy(zero_copy_only=False)
        return {frozenset(ids[g == v]) for v in np.unique(g[~np.isnan(g.astype(float))])}

    assert partition(a) == partition(b) and len(partition(a)) > 100
    assert da.sum() == db.sum() == ref["removed"] == summary["removed"]
    if keep == "random":
        np.testing.assert_array_equal(da, db)
    g = a.column("planted_group").to_numpy()
    kept = np.bincount(g[(g >= 0) & ~da])
    assert (kept[np.unique(g[g >= 0])] == 1).all()
    # Written: the new fragments and the earlier ones where a row changed, no other.
    written = set(step["fragments_written"])
    after = {fr.fragment_id: sorted(d.path for d in fr.data_files()) for fr in lance.dataset(str(inc)).get_fragments()}
    new = set(after) - set(before)
    assert new <= written
    assert all(after[f] == before[f] for f in before if f not in written)
    stored = json.loads((tmp_path / "out" / "dedup" / "summary.json").read_text())
    assert stored["deduped"]["fragments"] == sorted(after)


def test_local_and_ray_runners_agree(tmp_path, ray_session):
    """dedup.runner=local (one process, no Ray) and dedup.runner=ray (Ray Data
    passes) compute the same clusters, groups, duplicates and partners."""
    x, group = straddling(seed=5)
    tables = {}
    for runner in ("local", "ray"):
        path = tmp_path / f"{runner}.lance"
        write(path, x, group)
        summary = run(config(f"output={tmp_path / runner}", f"dedup.table={path}", f"dedup.runner={runner}",
                             "dedup.kmeans.n_clusters=8", f"dedup.eps={EPS}"))
        assert summary["run"]["runner"] == runner and summary["run"]["boundary_members"] > 0
        tables[runner] = (summary, lance.dataset(str(path)).to_table(
            columns=["clip_id", "dedup_cluster", "dedup_centroid_dist", "dedup_max_sim", "dedup_max_id",
                     "dedup_group", "duplicate"]))
    (local, a), (ray_, b) = tables["local"], tables["ray"]
    for name in ("clip_id", "dedup_cluster", "dedup_max_id", "dedup_group", "duplicate"):
        assert a.column(name).equals(b.column(name)), name
    for name in ("dedup_centroid_dist", "dedup_max_sim"):
        np.testing.assert_allclose(a.column(name).to_numpy(zero_copy_only=False),
                                   b.column(name).to_numpy(zero_copy_only=False), atol=1e-6)
    assert local["run"]["edges"] == ray_["run"]["edges"] > 0
    assert local["run"]["boundary_members"] == ray_["run"]["boundary_members"]
    assert local["removed"] == ray_["removed"] > 0
