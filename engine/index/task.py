"""The index task: make `clips.lance` searchable.

`python -m engine task=index output=OUT` builds, on the clip table:

- a vector index on `index.column` (cosine), of the type `engine.index.ann.plan_index`
  picks from the row count and dimension (or `index.type`), with its search
  knobs tuned until recall@k measured against exact search reaches
  `index.target_recall`; the knobs are stored in the table's metadata;
- a full-text (BM25) index on each `index.fts` column that holds text;
- scalar indexes on the columns people filter by (`index.scalar`).

Run again after clips were appended, it adds the new rows to every index, or
retrains the vector index when it covers less than `index.retrain_below` of
the rows (its partitions were learnt on too small a sample). Indexes live in
the dataset's `_indices/`; data files (and the media in them) are never
rewritten. Only the id and vector columns are needed, so tables written by
other tools can be indexed too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import lance
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from engine.index import ann

from engine.store import outputs
from udfs.uris import arrow_fs, lance_storage_options, scheme_of

log = logging.getLogger(__name__)

SCALAR_TYPES = ("BTREE", "BITMAP", "LABEL_LIST", "ZONEMAP", "BLOOMFILTER")


@dataclass
class IndexSettings:
    """The `index` config node (conf/config.yaml holds the defaults)."""

    column: str = "embedding"
    id_column: str = "clip_id"
    type: str = "auto"
    metric: str = "cosine"
    params: dict[str, Any] = field(default_factory=dict)
    exact_max_rows: int = 10000
    rows_per_partition: int = 4096
    dims_per_sub_vector: int = 8
    max_sq_gb: float = 16.0
    fallback: list[str] = field(default_factory=list)
    target_recall: float = 0.95
    recall_margin: float = 0.02
    k: int = 10
    tune_queries: int = 200
    retrain_below: float = 0.6
    rebuild: bool = False
    fts: list[str] = field(default_factory=list)
    fts_params: dict[str, Any] = field(default_factory=dict)
    scalar: dict[str, str] = field(default_factory=dict)
    accelerator: str | None = None

    @classmethod
    def from_config(cls, node: DictConfig | dict[str, Any] | None) -> IndexSettings:
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown index settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        settings = cls(**{k: v for k, v in values.items() if v is not None or k == "accelerator"})
        if not 0 < settings.target_recall <= 1:
            raise ValueError(f"index.target_recall must be in (0, 1], got {settings.target_recall}")
        bad = {c: t for c, t in settings.scalar.items() if str(t).upper() not in SCALAR_TYPES}
        if bad:
            raise ValueError(f"index.scalar: unknown index types {bad}; choose from {SCALAR_TYPES}")
        return settings


# ------------------------------------------------------------------ vectors
def _vector_dim(ds: lance.LanceDataset, column: str) -> int:
    kind = ds.schema.field(column).type
    if not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
        raise ValueError(f"column {column!r} is {kind}, not a fixed-size list of floats: it cannot hold vectors")
    return int(kind.list_size)


def _create_vector_index(ds: lance.LanceDataset, settings: IndexSettings, plan: ann.IndexPlan) -> float:
    started = time.perf_counter()
    kwargs = dict(plan.params)
    accelerator = _accelerator(settings.accelerator, plan.index_type)
    if accelerator:
        kwargs["accelerator"] = accelerator
    log.info("index: building %s on %s %s", plan.index_type, settings.column, kwargs)
    ds.create_index(settings.column, plan.index_type, metric=settings.metric, replace=True, **kwargs)
    return time.perf_counter() - started


def _accelerator(wanted: str | None, index_type: str | None) -> str | None:
    """Lance trains IVF_PQ on a GPU through torch; `auto` uses one when present."""
    if not wanted or index_type != "IVF_PQ":
        return None
    if wanted == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else None
    return wanted


def _tune(ds: lance.LanceDataset, settings: IndexSettings, index_type: str | None, notes: list[str]) -> ann.TunedSearch:
    column, k, metric = settings.column, settings.k, settings.metric
    if index_type is None:
        exact = ann.Measured(ann.EXACT, 1.0)
        return ann.TunedSearch(column, metric, None, None, None, None, 0, k, settings.target_recall, 0, exact, exact,
                               exact_max_rows=settings.exact_max_rows, id_column=settings.id_column, notes=notes)
    index = ann.vector_index(ds, column)
    stats = ann.index_stats(ds, index["name"])
    parts = ann.partitions_of(stats)
    started = time.perf_counter()
    query_ids, queries = ann.sample_queries(ds, column, settings.tune_queries)
    kth, kth_filtered = ann.exact_kth(ds, column, queries, query_ids, k, metric)
    notes.append(f"exact top {k} of {len(queries)} sampled rows: {time.perf_counter() - started:.1f}s")
    steps: list[str] = []
    results = {}
    for name, where, kth_ in (("unfiltered", None, kth), ("filtered", ann.TUNE_FILTER, kth_filtered)):
        phase = time.perf_counter()
        # The margin covers the sampling error of a few hundred queries.
        target = min(1.0, settings.target_recall + settings.recall_margin)
        candidates = ann.tune_knobs(ds, column, queries, query_ids, kth_, k=k, target=target,
                                    index_type=index_type, num_partitions=parts, metric=metric, where=where,
                                    log=steps)
        results[name] = ann.choose_fastest(ds, column, queries, candidates, k=k, metric=metric, where=where)
        steps.append(f"{name}: {len(candidates)} candidate(s), {time.perf_counter() - phase:.1f}s")
    notes.append(f"tuned on {len(queries)} sampled rows in {time.perf_counter() - started:.1f}s")
    notes.extend(steps)
    return ann.TunedSearch(column, metric, index["name"], index["uuid"], index_type, parts,
                           int(stats.get("num_indexed_rows", 0)), k, settings.target_recall, len(queries),
                           results["unfiltered"], results["filtered"], exact_max_rows=settings.exact_max_rows,
                           id_column=settings.id_column, notes=notes)


def index_vectors(ds: lance.LanceDataset, settings: IndexSettings) -> tuple[lance.LanceDataset, dict[str, Any]]:
    """Build, extend or retrain the vector index and store tuned knobs."""
    column = settings.column
    if column not in ds.schema.names:
        return ds, {"status": "skipped", "reason": f"the table has no {column!r} column (embed=none?)"}
    dim = _vector_dim(ds, column)
    # All rows, not those with a vector: counting nulls would read the whole
    # vector column, and the plan needs only the order of magnitude.
    rows = ds.count_rows()
    if rows == 0 or not len(ann.sample_queries(ds, column, 1)[0]):
        return ds, {"status": "skipped", "reason": f"no row has a value in {column!r}"}
    plan = ann.plan_index(rows, dim, index_type=settings.type, params=settings.params,
                          exact_max_rows=settings.exact_max_rows, rows_per_partition=settings.rows_per_partition,
                          dims_per_sub_vector=settings.dims_per_sub_vector, max_sq_gb=settings.max_sq_gb)
    existing = ann.vector_index(ds, column)
    report: dict[str, Any] = {"column": column, "rows": rows, "dim": dim, "metric": settings.metric,
                              "reason": plan.reason}
    notes: list[str] = [plan.reason]
    build_s = 0.0
    index_type = plan.index_type
    built: ann.IndexPlan | None = None  # what this run built, if anything
    if existing is not None:
        existing_type = existing["type"]
        stats = ann.index_stats(ds, existing["name"])
        cov = ann.coverage(stats)
        report["coverage_before"] = round(cov, 4)
        same_kind = plan.index_type is None and settings.type.lower() == "auto" or plan.index_type == existing_type
        if settings.rebuild and plan.index_type is not None:
            build_s, built = _create_vector_index(ds, settings, plan), plan
            action = "rebuilt (index.rebuild=true)"
        elif settings.type.lower() == "none":
            ds.drop_index(existing["name"])
            ds = _latest(ds)
            action, index_type = "dropped", None
        elif not same_kind:
            build_s, built = _create_vector_index(ds, settings, plan), plan
            action = f"rebuilt ({existing_type} -> {plan.index_type})"
        elif cov >= 1.0:
            action, index_type = "up to date", existing_type
        elif cov < settings.retrain_below:
            # Partitions learnt on a small part of the data fit the rest badly.
            built = plan if plan.index_type else ann.plan_index(
                rows, dim, index_type=existing_type, params=settings.params, exact_max_rows=0,
                rows_per_partition=settings.rows_per_partition, dims_per_sub_vector=settings.dims_per_sub_vector)
            build_s = _create_vector_index(ds, settings, built)
            action = f"retrained (covered {cov:.0%} < index.retrain_below={settings.retrain_below:.0%})"
            index_type = built.index_type
        else:
            started = time.perf_counter()
            ds.optimize.optimize_indices(index_names=[existing["name"]])
            build_s = time.perf_counter() - started
            action, index_type = f"extended (covered {cov:.0%})", existing_type
    elif plan.index_type is not None:
        build_s, built = _create_vector_index(ds, settings, plan), plan
        action = "built"
    else:
        action = "none (exact search)"
    ds = _latest(ds)
    report.update({"action": action, "index_type": index_type,
                   "params": built.params if built else None,
                   "build_s": round(build_s, 2)})

    previous = ann.read_tuned(ds, column)
    if (action == "up to date" and previous is not None and previous.target_recall == settings.target_recall
            and previous.id_column == settings.id_column):
        tuned = previous
    else:
        tuned = _tune(ds, settings, index_type, notes)
        ladder = [t.upper() for t in settings.fallback] if settings.type.lower() == "auto" else []
        while tuned.unfiltered.recall < settings.target_recall and ladder:
            # The planned type cannot reach the target on this data at any
            # knob setting: build the next, more exact, type.
            nxt = ladder.pop(0)
            fallback = ann.plan_index(rows, dim, index_type=nxt, params={}, exact_max_rows=0,
                                      rows_per_partition=settings.rows_per_partition,
                                      dims_per_sub_vector=settings.dims_per_sub_vector)
            notes.append(f"{index_type} reached recall {tuned.unfiltered.recall:.3f} < {settings.target_recall}: "
                         f"falling back to {nxt}")
            build_s += _create_vector_index(ds, settings, fallback)
            ds = _latest(ds)
            index_type = nxt
            report.update({"action": f"{action}, fell back to {nxt}", "index_type": nxt, "params": fallback.params,
                           "build_s": round(build_s, 2)})
            tuned = _tune(ds, settings, index_type, notes)
        ds.update_metadata({ann.METADATA_KEY: tuned.to_json()})
        ds = _latest(ds)
    index = ann.vector_index(ds, column)
    if index is not None:
        report["coverage"] = round(ann.coverage(ann.index_stats(ds, index["name"])), 4)
    report["search"] = {"unfiltered": tuned.unfiltered.to_json(), "filtered_10pct": tuned.filtered.to_json(),
                        "exact_max_rows": tuned.exact_max_rows}
    if tuned.unfiltered.recall < settings.target_recall:
        report["warning"] = (f"recall@{settings.k} {tuned.unfiltered.recall:.3f} is below index.target_recall="
                             f"{settings.target_recall}: use a more exact index.type or more index.params")
        log.warning("index: %s", report["warning"])
    report["tuning"] = tuned.notes
    return ds, report


# ----------------------------------------------------------- text, scalars
def _indexes_on(ds: lance.LanceDataset) -> dict[str, dict[str, Any]]:
    """Column -> its (single-column) index."""
    return {ix["fields"][0]: ix for ix in ann.list_indexes(ds) if len(ix["fields"]) == 1}


def _has_text(ds: lance.LanceDataset, column: str) -> bool:
    kind = ds.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return False
    return ds.count_rows(f"{ann.quote_ident(column)} IS NOT NULL") > 0


def index_columns(ds: lance.LanceDataset, settings: IndexSettings) -> tuple[lance.LanceDataset, dict[str, Any]]:
    """Full-text and scalar indexes: create the missing, extend the rest."""
    names = set(ds.schema.names)
    existing = _indexes_on(ds)
    wanted: dict[str, tuple[str, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for column in settings.fts:
        if column not in names:
            skipped[column] = "no such column"
        elif not _has_text(ds, column):
            skipped[column] = "no text in it"
        else:
            wanted[column] = ("INVERTED", dict(settings.fts_params))
    id_kind = {settings.id_column: "BTREE"} if settings.id_column in names else {}
    for column, kind in {**id_kind, **settings.scalar}.items():
        if column in names and column not in wanted:
            wanted[column] = (str(kind).upper(), {})
    created, extended, current = [], [], []
    started = time.perf_counter()
    for column, (kind, params) in wanted.items():
        index = existing.get(column)
        if index is None:
            ds.create_scalar_index(column, kind, **params)
            created.append(column)
        elif ann.index_stats(ds, index["name"]).get("num_unindexed_rows", 0):
            extended.append(index["name"])
        else:
            current.append(column)
    if extended:
        ds.optimize.optimize_indices(index_names=extended)
    ds = _latest(ds)
    return ds, {
        "fts": sorted(c for c, (kind, _) in wanted.items() if kind == "INVERTED"),
        "scalar": sorted(c for c, (kind, _) in wanted.items() if kind != "INVERTED"),
        "created": created, "extended": extended, "up_to_date": current, "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _latest(ds: lance.LanceDataset) -> lance.LanceDataset:
    """The dataset at its newest version (after an index commit), same storage options."""
    return ds.checkout_version(ds.latest_version)


def build_indexes(ds: lance.LanceDataset, settings: IndexSettings) -> dict[str, Any]:
    """Every index `settings` asks for on `ds`; the task's summary."""
    started = time.perf_counter()
    if settings.id_column not in ds.schema.names:
        raise ValueError(f"the table has no id column {settings.id_column!r} (index.id_column); "
                         f"its columns: {ds.schema.names}")
    before = ds.version
    ds, vector = index_vectors(ds, settings)
    ds, columns = index_columns(ds, settings)
    return {
        "table": ds.uri,
        "rows": ds.count_rows(),
        "version_before": before,
        "version": ds.version,
        "vector": vector,
        "columns": columns,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def write_report(summary: dict[str, Any], layout: outputs.OutputLayout,
                 storage_options: dict[str, Any] | None = None) -> str:
    path = layout.path("index", "summary.json")
    text = json.dumps(summary, indent=2, default=str)
    if scheme_of(path):
        fs, fs_path = arrow_fs(path, storage_options)
        with fs.open_output_stream(fs_path) as fh:
            fh.write(text.encode())
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    """Index `OUT/clips.lance`; the report is also written to `OUT/index/summary.json`."""
    layout = outputs.OutputLayout(str(cfg.output))
    storage_options = outputs.storage_options(cfg)
    settings = IndexSettings.from_config(cfg.get("index"))
    ds = layout.open_clips(lance_storage_options(storage_options))
    summary = build_indexes(ds, settings)
    serve = cfg.get("serve")
    if serve is not None and serve.get("map") is not None:
        # The UI's map, projected while the vectors are being read anyway.
        from engine.index import projection

        summary["map"] = projection.for_index(layout.open_clips(lance_storage_options(storage_options)),
                                              vector_column=settings.column, id_column=settings.id_column,
                                              node=serve.map, storage_options=storage_options)
    summary["report"] = write_report(summary, layout, storage_options)
    return summary
