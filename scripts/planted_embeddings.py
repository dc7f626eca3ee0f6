"""Synthetic embeddings with planted near-duplicates, for dedup tests and benchmarks.

Real clip embeddings are clustered: many fine-grained "topics" (a kind of
scene, a subject), each a spread of points around its centre. This draws
that shape, then plants groups of near-duplicates (a clip and its
re-encoded / cropped copies): one base point plus copies a tiny random step
away, so every pair inside a group has cosine similarity above
`min_pair_sim`, and no pair across groups comes anywhere near it.

The truth comes back with the vectors: `group[i]` is the planted group of
row i, or -1 for a row with no planted twin.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

ID_NAMESPACE = uuid.UUID("0f6d7a52-3c1b-4c7e-9a55-2b9d7d1e8f10")


@dataclass(frozen=True)
class PlantedSpec:
    n: int
    dim: int = 768
    # Fine-grained topics: a row is its topic's unit centre plus an offset
    # of this norm, so rows of one topic have cosine ~1 / (1 + noise^2) ~0.45.
    n_topics: int = 5000
    topic_noise: float = 1.1
    # Fraction of rows that belong to a planted group, and the group sizes.
    dup_fraction: float = 0.1
    group_sizes: tuple[int, ...] = (2, 2, 2, 3, 4)
    # Every member is its base plus a step of this norm relative to the base:
    # pairs inside a group have cosine ~1 - dup_noise^2 (~0.997).
    dup_noise: float = 0.055
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def planted_chunks(spec: PlantedSpec, chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(vectors float32 (m, dim), group int64 (m,)) chunks adding up to `spec.n` rows.

    Chunks are generated one at a time, so a million-row table never needs
    two copies of its vectors in memory. Groups never straddle chunks."""
    rng = np.random.default_rng(spec.seed)
    topics = _unit(rng.standard_normal((spec.n_topics, spec.dim), dtype=np.float32))
    sizes = np.asarray(spec.group_sizes)
    next_group = 0
    done = 0
    while done < spec.n:
        m = min(chunk_rows, spec.n - done)
        # Planted rows first (whole groups), then singletons; shuffled below.
        groups: list[np.ndarray] = []
        planted = 0
        target = int(round(m * spec.dup_fraction))
        while planted < target:
            size = int(rng.choice(sizes))
            if planted + size > m:
                break
            groups.append(np.full(size, next_group, dtype=np.int64))
            next_group += 1
            planted += size
        group = np.concatenate([*groups, np.full(m - planted, -1, dtype=np.int64)])
        # One base point per group (and per singleton), copies a tiny step away.
        base_of_row = np.empty(m, dtype=np.int64)
        pos = 0
        nbase = 0
        for g in groups:
            base_of_row[pos : pos + len(g)] = nbase
            pos += len(g)
            nbase += 1
        base_of_row[pos:] = np.arange(nbase, nbase + m - pos)
        nbase += m - pos
        topic = rng.integers(0, spec.n_topics, nbase)
        per_coord = 1 / np.sqrt(spec.dim)
        base = topics[topic] + (spec.topic_noise * per_coord) * rng.standard_normal((nbase, spec.dim),
                                                                                      dtype=np.float32)
        vectors = base[base_of_row]
        is_copy = group >= 0
        step = spec.dup_noise * per_coord * np.linalg.norm(vectors[is_copy], axis=1, keepdims=True)
        vectors[is_copy] += step * rng.standard_normal((int(is_copy.sum()), spec.dim), dtype=np.float32)
        _unit(vectors)
        order = rng.permutation(m)
        yield vectors[order], group[order]
        done += m


def planted_embeddings(spec: PlantedSpec) -> tuple[np.ndarray, np.ndarray]:
    """All of `planted_chunks` in one array (tests, small benchmarks)."""
    parts = list(planted_chunks(spec))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def row_ids(start: int, count: int) -> list[str]:
    """Clip-id-like strings (uuid5), stable for a row number."""
    return [str(uuid.uuid5(ID_NAMESPACE, str(i))) for i in range(start, start + count)]


def embedding_schema(dim: int, id_column: str = "clip_id", vector_column: str = "embedding") -> pa.Schema:
    return pa.schema([
        pa.field(id_column, pa.string()),
        pa.field(vector_column, pa.list_(pa.float32(), dim)),
        pa.field("planted_group", pa.int64()),
    ])


def embedding_batches(spec: PlantedSpec, id_column: str = "clip_id",
                      vector_column: str = "embedding") -> Iterator[pa.RecordBatch]:
    schema = embedding_schema(spec.dim, id_column, vector_column)
    start = 0
    for vectors, group in planted_chunks(spec):
        m = len(group)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), spec.dim)
        yield pa.RecordBatch.from_arrays([pa.array(row_ids(start, m)), vec, pa.array(group)], schema=schema)
        start += m


def write_planted_table(path: str | Path, spec: PlantedSpec, *, id_column: str = "clip_id",
                        vector_column: str = "embedding", max_rows_per_file: int = 131072):
    """A Lance table of `spec` (id, vector, planted_group), written in chunks."""
    import lance

    schema = embedding_schema(spec.dim, id_column, vector_column)
    reader = pa.RecordBatchReader.from_batches(schema, embedding_batches(spec, id_column, vector_column))
    return lance.write_dataset(reader, str(path), schema=schema, mode="overwrite",
                               max_rows_per_file=max_rows_per_file)
