"""Embedding columns to clean float32 matrices: L2-normalised rows, and a
reason for every row that cannot take part (null, wrong length, NaN/inf,
all zeros). Shared by the k-means and pairwise stages, and by the torch
device/dtype choice they all make."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from udfs.models.loading import pick_device as pick_device_name
from udfs.lance_rows import take_rows

# Why a row was left out of dedup (it gets nulls in every dedup column).
SKIP_NULL = "null vector"
SKIP_DIM = "wrong dimension"
SKIP_NONFINITE = "NaN or inf in vector"
SKIP_ZERO = "zero vector"


def vector_dim(arrow_type: pa.DataType) -> int | None:
    """The fixed length of a vector column's type, or None for variable-length lists."""
    if pa.types.is_fixed_size_list(arrow_type):
        return arrow_type.list_size
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return None
    raise TypeError(f"a vector column must be a list of floats, not {arrow_type}")


def check_vector_type(arrow_type: pa.DataType) -> None:
    vector_dim(arrow_type)
    value = arrow_type.value_type
    if not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise TypeError(f"a vector column must hold numbers, not {value}")


def vectors_from_arrow(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit-length float32 rows of the valid vectors (m, dim), reason per input row).

    `reason[i]` is None for a row that is in the matrix (in input order) and
    says why otherwise. Variable-length lists are accepted; rows of another
    length than `dim` are skipped."""
    mat, norms, reason = checked_rows(column, dim)
    return np.divide(mat, norms[:, None], dtype=np.float32), reason


def checked_rows(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid rows as float32, not normalised (a view of the Arrow buffer when
    possible), their L2 norms, reason per input row): `vectors_from_arrow`
    without the normalised copy, for callers that can scale by the norms."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    reason = np.full(n, None, dtype=object)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    reason[~valid] = SKIP_NULL
    if pa.types.is_fixed_size_list(column.type):
        if column.type.list_size != dim:
            reason[valid] = SKIP_DIM
            return np.zeros((0, dim), np.float32), np.zeros(0, np.float32), reason
        # Null rows still own `dim` slots in a fixed-size list's values.
        values = column.values.slice(column.offset * dim, n * dim)
        mat = values.to_numpy(zero_copy_only=False).reshape(n, dim)
        if not valid.all():
            mat = mat[valid]
    else:
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        wrong = valid & (lengths != dim)
        reason[wrong] = SKIP_DIM
        valid &= ~wrong
        mat = pc.list_flatten(column.filter(pa.array(valid))).to_numpy(zero_copy_only=False).reshape(-1, dim)
    mat = mat.astype(np.float32, copy=False)
    idx = np.flatnonzero(valid)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", mat, mat))
    odd = np.flatnonzero(~np.isfinite(norms))
    if len(odd):  # NaN / inf, or finite values whose squares overflow float32
        finite = np.isfinite(mat[odd]).all(axis=1)
        norms[odd[finite]] = np.linalg.norm(mat[odd[finite]].astype(np.float64), axis=1)
        reason[idx[odd[~finite]]] = SKIP_NONFINITE
    zero = norms == 0
    reason[idx[zero]] = SKIP_ZERO
    good = np.isfinite(norms) & ~zero
    if not good.all():
        mat, norms = mat[good], norms[good]
    return mat, norms.astype(np.float32), reason


def fixed_size_vectors(mat: np.ndarray) -> pa.FixedSizeListArray:
    """A (n, d) float32 matrix as an Arrow fixed-size-list column (no copy)."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])


def matrix_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The (n, d) float32 view of an all-valid fixed-size-list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(pick_device_name(str(device)))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """fp16 on CUDA (unit vectors lose ~1e-5 of cosine to it; bf16 would
    lose ~1e-4, too close to small eps), fp32 on CPU, where half precision
    matmuls are slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}") from None


def take_vectors(dataset, row_ids: np.ndarray, column: str) -> pa.ChunkedArray:
    """The `column` values of rows `row_ids` (Lance `_rowid`s) of a Lance
    dataset, in the order given.

    Dedup groups rows by cluster without moving their vectors through a
    shuffle; each cluster fetches its members' vectors here instead."""
    row_ids = np.asarray(row_ids, dtype=np.uint64)
    order = np.argsort(row_ids, kind="stable")
    # Sorted ids read each fragment's pages in order.
    taken = take_rows(dataset, row_ids[order].tolist(), [column]).column(column)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return taken.take(pa.array(inverse))
