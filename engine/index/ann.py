"""Vector search over a Lance column: which index to build, the search knobs
(nprobes, refine) measured to reach a recall target, and exact search.

An index's name says little about the recall it gives: on clustered
768-d vectors, IVF_PQ at common settings finds half to three quarters of the
true top 10. So the index task does not trust defaults. It samples rows of
the table as queries, computes their exact neighbours by streaming the vector
column, and walks the knobs upwards until recall@k against that truth reaches
the target, unfiltered and under a 10 % filter. The result (`TunedSearch`) is
stored in the table's metadata, where every searcher reads it.

Everything here is plain Lance + NumPy: no Ray, no Hydra, no models.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.lance_rows import take_rows

# Index statistics without the centroids: only partition counts are read
# here, and Lance warns (and spends memory) otherwise.
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")

# Table metadata key holding the tuned search settings (JSON of `TunedSearch`).
METADATA_KEY = "reelsift.vector_search"
# Index types whose stored codes are approximate: their results are always
# re-ranked on the raw vectors (refine_factor >= 1), so scores are exact.
QUANTIZED = ("PQ", "SQ", "RQ")
# The pseudo-random filter used to tune filtered search: about 1 row in 10,
# unrelated to the vectors (row addresses are fragment << 32 | offset).
TUNE_FILTER = "_rowid % 10 = 3"
TUNE_SELECTIVITY = 0.1
DISTANCE_EPS = 1e-4


# ------------------------------------------------------------------ knobs
@dataclass(frozen=True)
class Knobs:
    """Search-time parameters of one vector query. None: not used (exact
    search, or an index type without that knob)."""

    nprobes: int | None = None
    refine_factor: int | None = None
    ef: int | None = None
    use_index: bool = True

    def nearest(self, column: str, q: np.ndarray, k: int, metric: str) -> dict[str, Any]:
        query: dict[str, Any] = {"column": column, "q": q, "k": k, "metric": metric}
        if not self.use_index:
            query["use_index"] = False
            return query
        if self.nprobes is not None:
            # Fixed, not adaptive: recall was measured at exactly this many.
            query["minimum_nprobes"] = self.nprobes
            query["maximum_nprobes"] = self.nprobes
        if self.refine_factor is not None:
            query["refine_factor"] = self.refine_factor
        if self.ef is not None:
            query["ef"] = self.ef
        return query


EXACT = Knobs(use_index=False)


@dataclass(frozen=True)
class Measured:
    """Knobs with the recall and latency measured for them."""

    knobs: Knobs
    recall: float
    p50_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self.knobs).items() if v is not None}, "recall": round(self.recall, 4),
                "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 3)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Measured:
        knobs = Knobs(**{k: d[k] for k in ("nprobes", "refine_factor", "ef", "use_index") if k in d})
        return cls(knobs, float(d["recall"]), d.get("p50_ms"))


@dataclass
class TunedSearch:
    """What the index task measured, stored with the table: the index it was
    measured on and the knobs that reach the target unfiltered and filtered."""

    column: str
    metric: str
    index_name: str | None
    index_uuid: str | None
    index_type: str | None
    num_partitions: int | None
    indexed_rows: int
    k: int
    target_recall: float
    queries: int
    unfiltered: Measured
    filtered: Measured
    # Matching rows at or below which a filtered query is answered exactly.
    exact_max_rows: int = 0
    id_column: str = "clip_id"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["unfiltered"] = self.unfiltered.to_json()
        d["filtered"] = self.filtered.to_json()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> TunedSearch:
        d = json.loads(text)
        d["unfiltered"] = Measured.from_json(d["unfiltered"])
        d["filtered"] = Measured.from_json(d["filtered"])
        return cls(**d)

    def knobs_for(self, selectivity: float | None, matching_rows: int | None) -> Knobs:
        """Knobs for a query whose filter keeps `selectivity` of the rows.

        A filter's true top k lie deeper in the unfiltered ranking (about
        k / selectivity), so a filtered query probes more partitions: the
        filtered knobs were measured at 10 % selectivity, and rarer filters
        scale nprobes up from there. Few enough matching rows are ranked
        exactly, which is both faster and perfect."""
        if self.index_name is None:
            return EXACT
        if matching_rows is not None and matching_rows <= self.exact_max_rows:
            return EXACT
        if selectivity is None or selectivity >= 0.5:
            return self.unfiltered.knobs
        knobs = self.filtered.knobs
        if selectivity < TUNE_SELECTIVITY and knobs.nprobes is not None and self.num_partitions:
            scaled = math.ceil(knobs.nprobes * TUNE_SELECTIVITY / max(selectivity, 1e-6))
            knobs = Knobs(min(self.num_partitions, scaled), knobs.refine_factor, knobs.ef)
        return knobs


def read_tuned(ds: lance.LanceDataset, column: str | None = None) -> TunedSearch | None:
    """The stored settings (for `column`, or whichever column they were
    measured on), if the index they were measured on is still there."""
    text = (ds.metadata or {}).get(METADATA_KEY)
    if not text:
        return None
    try:
        tuned = TunedSearch.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None
    if column is not None and tuned.column != column:
        return None
    if tuned.column not in ds.schema.names:
        return None
    current = vector_index(ds, tuned.column)
    if current is None:
        return tuned if tuned.index_name is None else None
    if (current["name"], current["type"]) != (tuned.index_name, tuned.index_type):
        return None  # the index was rebuilt or dropped by someone else: the measurements are stale
    if ann_partitions(ds, current["name"]) != tuned.num_partitions:
        return None
    return tuned


def ann_partitions(ds: lance.LanceDataset, name: str) -> int | None:
    return partitions_of(index_stats(ds, name))


def default_tuned(ds: lance.LanceDataset, column: str, metric: str = "cosine", k: int = 10) -> TunedSearch:
    """Settings for a table nobody tuned (a table from another tool, or an
    index built elsewhere): exact search without an index; with one,
    conservative knobs (a tenth of the partitions, refine 10) whose recall is
    unknown."""
    index = vector_index(ds, column)
    if index is None:
        exact = Measured(EXACT, 1.0)
        return TunedSearch(column, metric, None, None, None, None, 0, k, 1.0, 0, exact, exact,
                           notes=["no vector index: exact search"])
    stats = index_stats(ds, index["name"])
    parts = partitions_of(stats)
    itype = index["type"]
    nprobes = max(1, (parts or 10) // 10) if parts else None
    refine = 10 if any(q in itype for q in QUANTIZED) else None
    knobs = Knobs(nprobes, refine)
    guess = Measured(knobs, float("nan"))
    filtered = Measured(Knobs(min(parts or nprobes or 1, (nprobes or 1) * 3), refine), float("nan"))
    return TunedSearch(column, metric, index["name"], index["uuid"], itype, parts,
                       int(stats.get("num_indexed_rows", 0)), k, float("nan"), 0, guess, filtered,
                       notes=["not tuned by task=index: recall unknown"])


# ---------------------------------------------------------------- indexes
def list_indexes(ds: lance.LanceDataset) -> list[dict[str, Any]]:
    """Every index of `ds`: name, type (upper case), columns, segment uuids."""
    return [{"name": d.name, "type": str(d.index_type).upper(), "fields": list(d.field_names),
             "uuid": ",".join(sorted(str(seg.uuid) for seg in d.segments))} for d in ds.describe_indices()]


def vector_index(ds: lance.LanceDataset, column: str) -> dict[str, Any] | None:
    for index in list_indexes(ds):
        if index["fields"] == [column] and index["type"].startswith(("IVF", "HNSW", "VECTOR")):
            return index
    return None


def index_stats(ds: lance.LanceDataset, name: str) -> dict[str, Any]:
    return ds.stats.index_stats(name)


def partitions_of(stats: dict[str, Any]) -> int | None:
    for seg in stats.get("segments") or stats.get("indices") or []:
        if seg.get("num_partitions"):
            return int(seg["num_partitions"])
    return None


def coverage(stats: dict[str, Any]) -> float:
    indexed = int(stats.get("num_indexed_rows", 0))
    total = indexed + int(stats.get("num_unindexed_rows", 0))
    return indexed / total if total else 1.0


@dataclass(frozen=True)
class IndexPlan:
    """Which vector index to build (None: none, exact search) and why."""

    index_type: str | None
    params: dict[str, Any]
    reason: str


def default_partitions(num_rows: int, rows_per_partition: int) -> int:
    return int(min(max(1, round(num_rows / rows_per_partition)), 65536))


def default_sub_vectors(dim: int, dims_per_sub_vector: int) -> int:
    """The number of PQ sub-vectors: dim / dims_per_sub_vector, rounded to a
    divisor of dim (PQ needs equal-length sub-vectors)."""
    want = max(1, dim // dims_per_sub_vector)
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), -d))


def plan_index(num_rows: int, dim: int, *, index_type: str, params: dict[str, Any], exact_max_rows: int,
               rows_per_partition: int, dims_per_sub_vector: int, max_sq_gb: float = 16.0) -> IndexPlan:
    """The index for `num_rows` vectors of size `dim`.

    `index_type=auto`: none up to `exact_max_rows` (exact search over so few
    vectors is fast and perfect); else IVF with about `rows_per_partition`
    rows per partition, and 8-bit scalar quantisation (IVF_SQ: one byte per
    dimension, no codebook to train, and distances close enough that a small
    refine on the raw vectors restores the exact top k) while its codes stay
    under `max_sq_gb`; beyond that, product quantisation (IVF_PQ, `dim /
    dims_per_sub_vector` bytes per vector) whose coarser distances need more
    refine. The search knobs are tuned after the build. An explicit type is
    built as asked, with the same derived parameters unless `params` sets them."""
    kind = index_type.upper()
    if kind == "NONE" or (kind == "AUTO" and num_rows <= exact_max_rows):
        why = ("index.type=none" if kind == "NONE"
               else f"{num_rows} rows <= index.exact_max_rows={exact_max_rows}: exact search is fast and exact")
        return IndexPlan(None, {}, why)
    if kind == "AUTO":
        sq_gb = num_rows * dim / 2**30
        kind = "IVF_SQ" if sq_gb <= max_sq_gb else "IVF_PQ"
        why = (f"{num_rows} rows x {dim} dims: {kind} ({'8-bit codes' if kind == 'IVF_SQ' else 'SQ codes would be'} "
               f"{sq_gb:.1f} GB{'' if kind == 'IVF_SQ' else f' > index.max_sq_gb={max_sq_gb}'}), knobs tuned by measured recall")
    else:
        why = f"index.type={kind}"
    chosen: dict[str, Any] = {}
    if kind.startswith("IVF"):
        chosen["num_partitions"] = default_partitions(num_rows, rows_per_partition)
    if kind.endswith("PQ"):
        chosen["num_sub_vectors"] = default_sub_vectors(dim, dims_per_sub_vector)
    chosen.update(params)
    return IndexPlan(kind, chosen, why)


# ------------------------------------------------------------- exact search
def normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def vectors_of(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, float32 matrix of the valid rows) of a fixed-size-list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    dim = column.type.list_size
    values = pc.drop_null(column).flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return valid, values.reshape(-1, dim)


def distances(queries: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """Lance's distance for `metric` between every query and row."""
    if metric == "cosine":
        return 1.0 - normalise(queries) @ normalise(x).T
    if metric == "dot":
        return 1.0 - queries @ x.T
    if metric in ("l2", "euclidean"):
        return (queries * queries).sum(1)[:, None] - 2 * queries @ x.T + (x * x).sum(1)[None, :]
    raise ValueError(f"unknown metric {metric!r}")


def iter_vectors(ds: lance.LanceDataset, column: str, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids, vectors) of every row with a vector, in batches."""
    for batch in ds.to_batches(columns=[column], with_row_id=True, batch_size=batch_rows):
        valid, x = vectors_of(batch.column(column))
        ids = batch.column("_rowid").to_numpy()[valid]
        finite = np.isfinite(x).all(axis=1)
        yield ids[finite], x[finite]


def exact_kth(ds: lance.LanceDataset, column: str, queries: np.ndarray, query_ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The k-th smallest exact distance of each query, over all rows and over
    the rows the tuning filter keeps; each query's own row excluded."""
    inf = np.float32(np.inf)
    best = np.full((len(queries), k), inf, np.float32)
    best_f = np.full((len(queries), k), inf, np.float32)
    for ids, x in iter_vectors(ds, column):
        if not len(ids):
            continue
        d = distances(queries, x, metric).astype(np.float32)
        d[query_ids[:, None] == ids[None, :]] = inf
        best = np.sort(np.concatenate([best, np.partition(d, min(k, d.shape[1] - 1), axis=1)[:, :k]
                                       if d.shape[1] > k else d], axis=1), axis=1)[:, :k]
        keep = ids % 10 == 3  # TUNE_FILTER
        if keep.any():
            df = d[:, keep]
            part = np.partition(df, k, axis=1)[:, :k] if df.shape[1] > k else df
            best_f = np.sort(np.concatenate([best_f, part], axis=1), axis=1)[:, :k]
    return best[:, k - 1], best_f[:, k - 1]


# -------------------------------------------------------------- measuring
def sample_queries(ds: lance.LanceDataset, column: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, vectors) of up to `n` random rows that have a vector.

    Row ids cost nothing to list; the vectors of a random oversample are
    taken and rows without one dropped, so the vector column is not scanned."""
    ids = ds.to_table(columns=[], with_row_id=True).column("_rowid").to_numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    chosen: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    have, start, step = 0, 0, max(n, 1)
    while have < n and start < len(ids):
        pick = ids[np.sort(order[start:start + step])]
        start += step
        valid, x = vectors_of(take_rows(ds, pick.tolist(), [column]).column(column))
        finite = np.isfinite(x).all(axis=1) & (np.abs(x).sum(axis=1) > 0)
        chosen.append(pick[valid][finite])
        vectors.append(x[finite])
        have += int(finite.sum())
        step *= 2
    if not have:
        return np.array([], np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(chosen)[:n], np.concatenate(vectors)[:n]


def quote_ident(name: str) -> str:
    """A column name as a SQL identifier Lance accepts."""
    return name if name.replace("_", "a").isalnum() and not name[0].isdigit() else f"`{name}`"


def search_batch(ds: lance.LanceDataset, column: str, queries: np.ndarray, k: int, knobs: Knobs, metric: str,
                 where: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row ids, distances) of the top k of each query, one Lance call."""
    table = ds.to_table(columns=["_distance"], nearest=knobs.nearest(column, queries, k, metric), filter=where,
                        prefilter=where is not None, with_row_id=True)
    qi = table.column("query_index").to_numpy()
    ids = table.column("_rowid").to_numpy()
    dist = table.column("_distance").to_numpy()
    return [(ids[qi == i], dist[qi == i]) for i in range(len(queries))]


def recall_at(results: list[tuple[np.ndarray, np.ndarray]], query_ids: np.ndarray, kth: np.ndarray, k: int) -> float:
    """Share of the true top k found. A result counts when its exact distance
    is within the k-th true one (ties in the data are not misses)."""
    found = []
    for (ids, dist), own, limit in zip(results, query_ids, kth):
        if not np.isfinite(limit):
            continue
        dist = dist[ids != own][:k]
        found.append(min(k, int((dist <= limit + DISTANCE_EPS).sum())) / k)
    return float(np.mean(found)) if found else 1.0


def time_queries(ds: lance.LanceDataset, column: str, queries: np.ndarray, k: int, knobs: Knobs, metric: str,
                 where: str | None = None, repeat: int = 1) -> list[float]:
    """Latency of single queries in milliseconds (what a user waits for)."""
    out = []
    for _ in range(repeat):
        for q in queries:
            start = time.perf_counter()
            ds.to_table(columns=["_distance"], nearest=knobs.nearest(column, q, k, metric), filter=where,
                        prefilter=where is not None, with_row_id=True)
            out.append((time.perf_counter() - start) * 1000)
    return out


def knob_ladders(index_type: str, num_partitions: int | None) -> tuple[list[int | None], list[int | None], str]:
    """Candidate values of the two knobs, cheapest first, and the second knob's name."""
    parts = num_partitions or 1
    nprobes = sorted({max(1, min(parts, round(parts * f))) for f in
                      (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0)})
    if "HNSW" in index_type:
        return nprobes, [20, 40, 80, 160, 320, 640], "ef"
    if any(q in index_type for q in QUANTIZED):
        return nprobes, [1, 2, 4, 8, 16, 32, 64], "refine_factor"
    return nprobes, [None], "refine_factor"


def tune_knobs(ds: lance.LanceDataset, column: str, queries: np.ndarray, query_ids: np.ndarray, kth: np.ndarray,
               *, k: int, target: float, index_type: str, num_partitions: int | None, metric: str,
               where: str | None = None, log: list[str] | None = None) -> list[Measured]:
    """Knob pairs that reach `target`, for `choose_fastest` to time; if none
    does, the best one measured (recall below target).

    Recall grows with both knobs: nprobes bounds which true neighbours are
    candidates at all, the second knob (refine or ef) how well the
    candidates are ranked. The walk starts at the cheapest pair and raises
    whichever knob is limiting, so expensive settings are measured only when
    the data needs them; then one or two more probes are tried with less of
    the second knob, for `choose_fastest` to time."""
    first, second, name = knob_ladders(index_type, num_partitions)
    cache: dict[tuple[int | None, int | None], Measured] = {}

    def knobs(nprobes: int | None, other: int | None) -> Knobs:
        return Knobs(nprobes, other if name == "refine_factor" else None, other if name == "ef" else None)

    def measure(nprobes: int | None, other: int | None) -> Measured:
        key = (nprobes, other)
        if key not in cache:
            results = search_batch(ds, column, queries, k + 1, knobs(nprobes, other), metric, where)
            cache[key] = Measured(knobs(nprobes, other), recall_at(results, query_ids, kth, k))
            if log is not None:
                log.append(f"nprobes={nprobes} {name}={other}: recall@{k}={cache[key].recall:.4f}"
                           + (f" ({where})" if where else ""))
        return cache[key]

    # Walk up the nprobes ladder; at each step raise the second knob until
    # the target holds, or until doubling it stops helping (the missing
    # neighbours are not among the candidates: more partitions are needed).
    j = 0
    found: tuple[int, int] | None = None
    for i, nprobes in enumerate(first):
        m = measure(nprobes, second[j])
        while m.recall < target and j + 1 < len(second):
            nxt = measure(nprobes, second[j + 1])
            saturated = nxt.recall - m.recall < 0.005 and i + 1 < len(first)
            if saturated:
                break
            j, m = j + 1, nxt
        if m.recall >= target:
            found = (i, j)
            break
    if found is None:
        return [max(cache.values(), key=lambda m: m.recall)]
    i, j = found
    hits = [measure(first[i], second[j])]
    # More probes may need less of the second knob: try one or two.
    for nprobes in first[i + 1: i + 3]:
        if j == 0:
            break
        while j > 0 and measure(nprobes, second[j - 1]).recall >= target:
            j -= 1
        if measure(nprobes, second[j]).recall >= target:
            hits.append(measure(nprobes, second[j]))
    return hits


def choose_fastest(ds: lance.LanceDataset, column: str, queries: np.ndarray, candidates: Sequence[Measured], *,
                   k: int, metric: str, where: str | None = None, timing_queries: int = 30) -> Measured:
    """The candidate with the lowest measured median latency."""
    qs = queries[:timing_queries]
    timed = []
    for cand in candidates:
        time_queries(ds, column, qs[:3], k, cand.knobs, metric, where)  # warm caches
        lat = time_queries(ds, column, qs, k, cand.knobs, metric, where)
        timed.append(Measured(cand.knobs, cand.recall, float(np.median(lat))))
    return min(timed, key=lambda m: m.p50_ms)
