"""Benchmark vector search: our index task + searcher against LanceDB's
defaults and exact search, on one table, in one run.

    PYTHONPATH=. python scripts/bench_search.py                    # 1,000,000 x 768 (the target scale)
    PYTHONPATH=. python scripts/bench_search.py --rows 100000      # quicker look
    flock -x /tmp/reelsift-cpu.lock .venv/bin/python scripts/bench_search.py --json bench_out/search.json

The table: `--rows` L2-normalised float32 vectors with topic structure
(50 super-topics, 1,000 topics, noise; nearest neighbours sit close together
in similarity, as in real CLIP embeddings, which is what makes quantised
indexes miss them), plus scalar columns (`clip_id`, `video_id`, `bucket` in
0..9, `aesthetic_score`, `passed`). Queries are fresh vectors from the same
distribution, not rows of the table. The filtered case is `bucket = 3`
(10 % selectivity, unrelated to the vectors).

Measured, for each method:
- build: index build time (ours includes the recall tuning the index task runs);
- unfiltered and filtered: p50 / p99 latency of single queries, recall@10
  against exact top 10 computed with NumPy over the whole column.

Methods: `ours` (engine.index.task.build_indexes with the default config, then
engine.search.open(...).search(vector=...)), `lancedb-defaults` (a shallow
clone of the same table; `create_index` and `search` with LanceDB's default
parameters, plus a default scalar index on `bucket`), `exact` (Lance's flat
search, no index). The table is cached under `--workdir` between runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 768
K = 10
FILTER = "bucket = 3"


def topic_vectors(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float = 0.9) -> np.ndarray:
    """`n` unit vectors, each a random topic centre plus isotropic noise of
    `noise` times the centre's norm."""
    dim = centres.shape[1]
    topic = rng.integers(0, len(centres), n)
    base = centres[topic]
    scale = noise * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(dim)
    x = base + scale * rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def topic_centres(rng: np.random.Generator, dim: int, topics: int = 1000, super_topics: int = 50) -> np.ndarray:
    sup = rng.standard_normal((super_topics, dim), dtype=np.float32)
    return sup[rng.integers(0, super_topics, topics)] + 0.7 * rng.standard_normal((topics, dim), dtype=np.float32)


def scalar_columns(rng: np.random.Generator, start: int, n: int) -> dict[str, Any]:
    ids = np.arange(start, start + n)
    return {
        "clip_id": [str(uuid.UUID(int=int(i) + 1)) for i in ids],
        "video_id": [f"video-{i // 50:06d}" for i in ids],
        "source_uri": [f"/videos/{i // 50:06d}.mp4" for i in ids],
        "start_s": ((ids % 50) * 10.0).astype(np.float64),
        "end_s": ((ids % 50) * 10.0 + 10.0).astype(np.float64),
        "bucket": rng.integers(0, 10, n).astype(np.int32),
        "aesthetic_score": (rng.random(n) * 10).astype(np.float32),
        "passed": rng.random(n) < 0.8,
    }


def make_table(path: Path, rows: int, dim: int = DIM, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """Write the benchmark table (in chunks: 1M x 768 is 3 GB) and return
    1,000 query vectors from the same distribution."""
    import lance

    rng = np.random.default_rng(seed)
    centres = topic_centres(rng, dim)
    queries = topic_vectors(rng, 1000, centres)
    shutil.rmtree(path, ignore_errors=True)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = topic_vectors(rng, n, centres)
        cols = scalar_columns(rng, start, n)
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
        lance.write_dataset(pa.table(cols), path, mode="append" if start else "create",
                            max_rows_per_file=1 << 20)
    np.save(path.with_suffix(".queries.npy"), queries)
    (path.with_suffix(".meta.json")).write_text(json.dumps({"rows": rows, "dim": dim, "seed": seed}))
    return queries


def cached_table(workdir: Path, rows: int, dim: int = DIM) -> tuple[Path, np.ndarray]:
    path = workdir / f"vectors_{rows}x{dim}.lance"
    meta = path.with_suffix(".meta.json")
    if meta.exists() and json.loads(meta.read_text()) == {"rows": rows, "dim": dim, "seed": 0}:
        return path, np.load(path.with_suffix(".queries.npy"))
    started = time.perf_counter()
    queries = make_table(path, rows, dim)
    print(f"wrote {rows} x {dim} table in {time.perf_counter() - started:.0f}s: {path}", flush=True)
    return path, queries


# ------------------------------------------------------------------ truth
def exact_truth(path: Path, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the exact top k of every query, unfiltered and under
    FILTER (bucket = 3), by NumPy over the whole column in batches."""
    import lance

    from engine.index.ann import vectors_of

    nq = len(queries)
    inf = np.float32(np.inf)
    best = [np.full((nq, k), inf, np.float32), np.full((nq, k), inf, np.float32)]
    where = [np.zeros((nq, k), np.int64), np.zeros((nq, k), np.int64)]
    position = 0
    for batch in lance.dataset(path).to_batches(columns=["embedding", "bucket"], batch_size=65536):
        _, x = vectors_of(batch.column("embedding"))
        pos = np.arange(position, position + len(x))
        position += len(x)
        d = 1.0 - queries @ x.T
        for i, mask in enumerate((None, batch.column("bucket").to_numpy() == 3)):
            dd, pp = (d, pos) if mask is None else (d[:, mask], pos[mask])
            cat = np.concatenate([best[i], dd], axis=1)
            ids = np.concatenate([where[i], np.broadcast_to(pp, dd.shape)], axis=1)
            order = np.argpartition(cat, k, axis=1)[:, :k] if cat.shape[1] > k else np.argsort(cat, axis=1)
            best[i] = np.take_along_axis(cat, order, axis=1)
            where[i] = np.take_along_axis(ids, order, axis=1)
    return where[0], where[1]


def clip_ids(positions: np.ndarray) -> list[list[str]]:
    return [[str(uuid.UUID(int=int(p) + 1)) for p in row] for row in positions]


# ---------------------------------------------------------------- methods
def measure(search: Any, queries: np.ndarray, truth: list[list[str]], warmup: int = 5) -> dict[str, float]:
    """p50 / p99 latency (ms) of single queries and recall@K against `truth`."""
    for q in queries[:warmup]:
        search(q)
    latencies, recalls = [], []
    for q, expect in zip(queries, truth):
        start = time.perf_counter()
        found = search(q)
        latencies.append((time.perf_counter() - start) * 1000)
        recalls.append(len(set(found) & set(expect)) / K)
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "recall": float(np.mean(recalls)), "queries": len(queries)}


def clone(source: Path, target: Path) -> Any:
    import lance

    shutil.rmtree(target, ignore_errors=True)
    ds = lance.dataset(source)
    return ds.shallow_clone(str(target), ds.version)


def run_ours(source: Path, workdir: Path, queries: np.ndarray, truth: tuple[list, list]) -> dict[str, Any]:
    """Our index task with the default config, then our searcher."""
    from hydra import compose, initialize_config_dir

    import engine.search
    from engine.cli import CONFIG_DIR
    from engine.index.task import IndexSettings, build_indexes

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        node = compose(config_name="config", overrides=["task=index", "output=unused"]).index
    settings = IndexSettings.from_config(node)
    settings.scalar = {**settings.scalar, "bucket": "BTREE"}  # the filtered case's column
    ds = clone(source, workdir / "ours" / "clips.lance")
    started = time.perf_counter()
    report = build_indexes(ds, settings)
    build_s = time.perf_counter() - started
    searcher = engine.search.open(workdir / "ours")

    def unfiltered(q: np.ndarray) -> list[str]:
        return searcher.search(vector=q, k=K).column("clip_id").to_pylist()

    def filtered(q: np.ndarray) -> list[str]:
        return searcher.search(vector=q, k=K, where=FILTER).column("clip_id").to_pylist()

    vec = report["vector"]
    return {"build_s": build_s, "vector_build_s": vec.get("build_s"), "scalar_build_s": report["columns"]["wall_s"],
            "tuning": [n for n in vec.get("tuning", []) if n.startswith(("exact top", "tuned on", "unfiltered:",
                                                                          "filtered:"))],
            "index": vec.get("index_type"), "params": vec.get("params"), "knobs": vec.get("search"),
            "unfiltered": measure(unfiltered, queries, truth[0]), "filtered": measure(filtered, queries, truth[1])}


def run_lancedb_defaults(source: Path, workdir: Path, queries: np.ndarray, truth: tuple[list, list]) -> dict[str, Any]:
    """LanceDB's own defaults: IvfPq() (cosine, as the vectors need), a
    default scalar index on the filter column, searches without knobs."""
    import lancedb
    from lancedb.index import BTree, IvfPq

    clone(source, workdir / "lancedb" / "clips.lance")
    table = lancedb.connect(str(workdir / "lancedb")).open_table("clips")
    started = time.perf_counter()
    table.create_index("embedding", config=IvfPq(distance_type="cosine"))
    table.create_index("bucket", config=BTree())
    build_s = time.perf_counter() - started

    def unfiltered(q: np.ndarray) -> list[str]:
        return table.search(q, vector_column_name="embedding").limit(K).select(["clip_id"]).to_arrow() \
            .column("clip_id").to_pylist()

    def filtered(q: np.ndarray) -> list[str]:
        return table.search(q, vector_column_name="embedding").where(FILTER, prefilter=True).limit(K) \
            .select(["clip_id"]).to_arrow().column("clip_id").to_pylist()

    stats = table.index_stats("embedding_idx")
    return {"build_s": build_s, "index": "IVF_PQ (LanceDB defaults)",
            "params": {"num_partitions": getattr(stats, "num_partitions", None)} if stats else None,
            "unfiltered": measure(unfiltered, queries, truth[0]), "filtered": measure(filtered, queries, truth[1])}


def run_exact(source: Path, queries: np.ndarray, truth: tuple[list, list], n: int) -> dict[str, Any]:
    """Lance's flat (brute-force) search, no index: the baseline."""
    import lance

    ds = lance.dataset(source)

    def search(where: str | None) -> Any:
        def run(q: np.ndarray) -> list[str]:
            nearest = {"column": "embedding", "q": q, "k": K, "use_index": False, "metric": "cosine"}
            return ds.to_table(columns=["clip_id", "_distance"], nearest=nearest, filter=where,
                               prefilter=where is not None).column("clip_id").to_pylist()
        return run

    return {"build_s": 0.0, "index": "none (flat scan)",
            "unfiltered": measure(search(None), queries[:n], truth[0][:n], warmup=1),
            "filtered": measure(search(FILTER), queries[:n], truth[1][:n], warmup=1)}


def report(results: dict[str, dict[str, Any]], rows: int) -> str:
    lines = [f"{rows:,} x {DIM} vectors, k={K}; filtered = `{FILTER}` (10 %)", "",
             "| method | build s | unfiltered p50 / p99 ms | recall@10 | filtered p50 / p99 ms | recall@10 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        u, f = r["unfiltered"], r["filtered"]
        lines.append(f"| {name} ({r['index']}) | {r['build_s']:.0f} | {u['p50_ms']:.1f} / {u['p99_ms']:.1f} | "
                     f"{u['recall']:.3f} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} | {f['recall']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=20, help="flat scans are slow: time fewer")
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/search"))
    parser.add_argument("--methods", default="ours,lancedb,exact")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, queries = cached_table(args.workdir, args.rows)
    queries = queries[: args.queries]
    started = time.perf_counter()
    positions = exact_truth(source, queries)
    truth = (clip_ids(positions[0]), clip_ids(positions[1]))
    print(f"exact top {K} of {len(queries)} queries by NumPy: {time.perf_counter() - started:.1f}s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    methods = args.methods.split(",")
    if "ours" in methods:
        results["ours"] = run_ours(source, args.workdir, queries, truth)
        print("ours:", json.dumps(results["ours"], default=str), flush=True)
    if "lancedb" in methods:
        results["lancedb defaults"] = run_lancedb_defaults(source, args.workdir, queries, truth)
        print("lancedb defaults:", json.dumps(results["lancedb defaults"], default=str), flush=True)
    if "exact" in methods:
        results["exact"] = run_exact(source, queries, truth, args.exact_queries)
        print("exact:", json.dumps(results["exact"], default=str), flush=True)
    text = report(results, args.rows)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "dim": DIM, "k": K, "filter": FILTER,
                                         "results": results, "table": text}, indent=2, default=str))


if __name__ == "__main__":
    main()
