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

Methods: `ours` (engine.index.build_indexes with the default config, then
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
