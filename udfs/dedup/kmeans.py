"""K-means over L2-normalised embeddings: seeding, Lloyd fit, assignment.

Backends (`backend=`):

- `torch`: seeding and Lloyd iterations as chunked matmuls on any torch
  device (fp32 on CPU, fp16 matmuls with fp32 sums on CUDA).
- `faiss`: faiss's CPU k-means (`faiss.Clustering`) after our seeding, run
  one iteration at a time so `tol` applies.
- `cuml`: cuML's k-means on CUDA (optional extra `reelsift[gpu]`, imported
  only when chosen).
- `auto`: cuML when it is installed and a GPU is visible, else the fastest
  CPU backend measured on a 2-core machine (see docs/dedup.md).

Seeding (`init=`): `k-means++` (Arthur & Vassilvitskii: one centre at a
time, each drawn with probability proportional to D^2) or `k-means||`
(Bahmani et al.: a few rounds that each oversample ~2k candidates at once,
then weighted k-means++ over the candidates; the default, as in cuML and
NeMo Curator: it does the same job in a handful of matmuls).

`tol` is relative: iterations stop once the objective (sum of squared
distances to the nearest centroid) improves by less than `tol` of itself.

Centroids are plain Euclidean means of unit vectors (as in SemDeDup and NeMo
Curator); assignment is to the nearest one, and a row's centroid distance is
the cosine distance to the normalised centroid.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from udfs.schema import DEDUP_ASSIGN_SCHEMA
from udfs.dedup.vectors import checked_rows, pick_device, pick_dtype

BACKENDS = ("auto", "torch", "faiss", "cuml")
SEEDINGS = ("k-means||", "k-means++")

# The CPU backend `auto` picks. `scripts/bench_dedup.py --backends` measured
# torch and faiss level per Lloyd iteration here; torch needs no extra package.
FASTEST_CPU_BACKEND = "torch"

# Score-matrix elements per chunk (rows x centroids): 64 MB in fp32.
CHUNK_ELEMENTS = 1 << 24


def have_cuml() -> bool:
    return importlib.util.find_spec("cuml") is not None


def have_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str = "auto", device: str = "auto") -> str:
    """`auto` -> cuml on a visible GPU with cuML installed, else the CPU one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        if pick_device(device).type == "cuda" and have_cuml():
            return "cuml"
        return FASTEST_CPU_BACKEND
    if backend == "faiss" and not have_faiss():
        raise ImportError("k-means backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
    if backend == "cuml":
        if not have_cuml():
            raise ImportError("k-means backend 'cuml' needs cuML: pip install 'reelsift[gpu]'")
        if pick_device(device).type != "cuda":
            raise RuntimeError("k-means backend 'cuml' needs a CUDA device")
    return backend


@dataclass
class KMeansFit:
    centroids: np.ndarray  # (k, d) float32, not normalised
    n_iter: int
    inertia: float  # sum of squared distances to the nearest centroid
    converged: bool
    backend: str
    init_s: float
    fit_s: float


def _chunk_rows(k: int) -> int:
    return max(256, CHUNK_ELEMENTS // max(1, k))


class _Nearest:
    """Nearest centroid of every row, chunk by chunk: for unit rows
    argmin |x - c|^2 = argmax (x.c - |c|^2 / 2). Rows that are not unit
    length are scaled through `inv_norms` on the scores, never copied.

    With a `margin`, also the boundary clusters of each row: the `extra`
    centroids whose bisectors with the nearest one are closest to the row,
    those within `margin` (-1 otherwise). The distance from x to the bisector of
    centroids a and b is (s_a - s_b) / |c_a - c_b| for the scores s above."""

    def __init__(self, centroids: torch.Tensor, dtype: torch.dtype, margin: float | None = None,
                 extra: int = 1) -> None:
        self.c = centroids.to(dtype)
        self.half_sq = 0.5 * (centroids.float() ** 2).sum(1)
        self.dtype = dtype
        self.margin = margin
        self.extra = max(1, min(int(extra), len(centroids) - 1))
        if margin is not None:
            cf = centroids.float()
            self.gap = torch.cdist(cf, cf).clamp_min_(1e-12)

    def __call__(self, x: torch.Tensor, inv_norms: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(label int64, unit(x) . c_label float32[, boundary label int64]) for the rows of `x`."""
        labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
        dots = torch.empty(len(x), dtype=torch.float32, device=x.device)
        second = torch.full((len(x), self.extra), -1, dtype=torch.int64, device=x.device)
        step = _chunk_rows(len(self.c))
        for s in range(0, len(x), step):
            xs = x[s : s + step].to(self.dtype)
            score = (xs @ self.c.T).float()
            if inv_norms is not None:
                score.mul_(inv_norms[s : s + step, None])
            score -= self.half_sq
            best, idx = score.max(dim=1)
            labels[s : s + step] = idx
            dots[s : s + step] = best + self.half_sq[idx]
            if self.margin is not None and len(self.c) > 1:
                # In place: the score chunk becomes the distance to each bisector.
                h = torch.neg(score, out=score).add_(best[:, None]).div_(self.gap[idx])
                h.scatter_(1, idx[:, None], math.inf)
                near, which = torch.topk(h, self.extra, dim=1, largest=False)
                second[s : s + step] = torch.where(near <= self.margin, which, -1)
        if self.margin is None:
            return labels, dots
        return labels, dots, second


def _sq_dist(x_sq: torch.Tensor, dots: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    return (x_sq - 2 * dots + c_sq).clamp_min_(0)


class KMeans:
    """Fit k centroids to the rows of a float32 matrix (rows L2-normalised).

    `KMeans(n_clusters=1000, device="cuda").fit(x)` works the same on CPU and
    CUDA; `assign(x, fit.centroids)` labels any number of rows against it."""

    def __init__(self, *, n_clusters: int, max_iter: int = 50, tol: float = 1e-4, seed: int = 0,
                 init: str = "k-means||", oversampling_factor: float = 2.0, init_rounds: int = 5,
                 backend: str = "auto", device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> None:
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if init not in SEEDINGS:
            raise ValueError(f"unknown k-means init {init!r}; choose one of {list(SEEDINGS)}")
        self.n_clusters = int(n_clusters)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.init = init
        self.oversampling_factor = float(oversampling_factor)
        self.init_rounds = int(init_rounds)
        self.backend = resolve_backend(backend, device)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        set_threads(threads)

    # ------------------------------------------------------------ seeding
    def seed_centroids(self, x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        if self.init == "k-means++":
            return _kmeans_pp(x, torch.ones(len(x), device=x.device), k, gen, self.dtype)
        return _kmeans_parallel(x, k, gen, self.dtype, self.oversampling_factor, self.init_rounds)

    # ------------------------------------------------------------ fit
    def fit(self, x: np.ndarray) -> KMeansFit:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"k-means needs a non-empty (n, d) matrix, got shape {x.shape}")
        k = min(self.n_clusters, len(x))
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        xt = torch.from_numpy(x).to(self.device)
        t0 = time.perf_counter()
        if self.backend == "cuml" and self.init == "k-means||":
            init = None  # cuML seeds with its own k-means||
        else:
            init = self.seed_centroids(xt, k, gen)
        t1 = time.perf_counter()
        if self.backend == "torch":
            centroids, n_iter, inertia, converged = _lloyd_torch(xt, init, self.max_iter, self.tol, self.dtype)
        elif self.backend == "faiss":
            centroids, n_iter, inertia, converged = _lloyd_faiss(x, init.cpu().numpy(), self.max_iter, self.tol,
                                                                 self.seed)
        else:
            centroids, n_iter, inertia, converged = _fit_cuml(xt, k, init, self.max_iter, self.tol, self.seed,
                                                              self.oversampling_factor)
        return KMeansFit(centroids=np.asarray(centroids, dtype=np.float32), n_iter=n_iter, inertia=inertia,
                         converged=converged, backend=self.backend, init_s=t1 - t0,
                         fit_s=time.perf_counter() - t1)


def _sample_index(weights: torch.Tensor, gen: torch.Generator) -> int:
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        return int(torch.randint(len(weights), (1,), generator=gen, device=weights.device))
    return int(torch.multinomial(weights / total, 1, generator=gen))


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weighted k-means++: each next centre drawn with probability w * D^2."""
    n = len(x)
    k = min(k, n)
    x_sq = (x.float() ** 2).sum(1)
    centres = torch.empty((k, x.shape[1]), dtype=torch.float32, device=x.device)
    xd = x.to(dtype)
    with _one_thread_on_cpu(x.device):
        first = _sample_index(w, gen)
        centres[0] = x[first].float()
        d2 = _sq_dist(x_sq, (xd @ xd[first]).float(), x_sq[first])
        for i in range(1, k):
            j = _sample_index(w * d2, gen)
            centres[i] = x[j].float()
            torch.minimum(d2, _sq_dist(x_sq, (xd @ xd[j]).float(), x_sq[j]), out=d2)
    return centres


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """k-means++ is k sequential matrix-vector products: memory-bound, so a
    second thread adds only synchronisation (3-10x slower per step on a
    busy 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _kmeans_parallel(x: torch.Tensor, k: int, gen: torch.Generator, dtype: torch.dtype, oversampling: float,
                     rounds: int) -> torch.Tensor:
    """k-means||: oversample candidates in a few rounds, weight each by the
    rows nearest to it, reduce them to k with weighted k-means++.

    Each row's nearest candidate is tracked as rounds add candidates, so the
    weights cost no extra pass over the rows."""
    n = len(x)
    if k >= n:
        return x.float().clone()
    ell = oversampling * k
    x_sq = (x.float() ** 2).sum(1)
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    chosen = [torch.tensor([first], device=x.device)]
    nearest = torch.zeros(n, dtype=torch.int64, device=x.device)  # index into cat(chosen)
    d2 = _sq_dist(x_sq, (x.to(dtype) @ x[first].to(dtype)).float(), x_sq[first])
    found = 1
    for _ in range(rounds):
        total = d2.sum()
        if total <= 0:
            break
        p = (ell * d2 / total).clamp_(max=1.0)
        new = torch.nonzero(torch.rand(n, generator=gen, device=x.device) < p).flatten()
        if len(new) == 0:
            continue
        labels, dots = _Nearest(x[new].float(), dtype)(x)
        d2_new = _sq_dist(x_sq, dots, x_sq[new][labels])
        closer = d2_new < d2
        d2 = torch.where(closer, d2_new, d2)
        nearest = torch.where(closer, labels + found, nearest)
        chosen.append(new)
        found += len(new)
    cand = torch.cat(chosen)
    weights = torch.bincount(nearest, minlength=len(cand)).float()
    if len(cand) <= k:
        # Too few candidates (tiny or degenerate data): top up at random.
        rest = torch.randperm(n, generator=gen, device=x.device)
        extra = rest[~torch.isin(rest, cand)][: k - len(cand)]
        return x[torch.cat([cand, extra])].float()
    return _kmeans_pp(x[cand], weights, k, gen, dtype)


def _lloyd_torch(x: torch.Tensor, centroids: torch.Tensor, max_iter: int, tol: float,
                 dtype: torch.dtype) -> tuple[np.ndarray, int, float, bool]:
    n, d = x.shape
    k = len(centroids)
    x_sq = (x.float() ** 2).sum(1)
    c = centroids.float().clone()
    prev = math.inf
    inertia = math.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        labels, dots = _Nearest(c, dtype)(x)
        d2 = _sq_dist(x_sq, dots, (c**2).sum(1)[labels])
        inertia = float(d2.sum())
        sums = torch.zeros((k, d), dtype=torch.float32, device=x.device)
        sums.index_add_(0, labels, x.float() if x.dtype != torch.float32 else x)
        counts = torch.bincount(labels, minlength=k)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None].float()
        empty = torch.nonzero(~nonempty).flatten()
        if len(empty):
            # Restart empty clusters on the rows farthest from their centroid.
            far = torch.topk(d2, min(len(empty), n)).indices
            c[empty[: len(far)]] = x[far].float()
        if prev - inertia <= tol * inertia and not len(empty):
            converged = True
            break
        prev = inertia
    return c.cpu().numpy(), it, inertia, converged


def _lloyd_faiss(x: np.ndarray, init: np.ndarray, max_iter: int, tol: float,
                 seed: int) -> tuple[np.ndarray, int, float, bool]:
    import faiss

    n, d = x.shape
    k = len(init)
    c = np.ascontiguousarray(init, dtype=np.float32)
    prev = math.inf
    inertia = math.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        cp = faiss.ClusteringParameters()
        cp.niter = 1
        cp.seed = seed + it
        cp.max_points_per_centroid = max(1, -(-n // k))  # never subsample: fit_fraction already did
        cp.min_points_per_centroid = 1
        cp.verbose = False
        clus = faiss.Clustering(d, k, cp)
        clus.centroids.resize(c.size)
        faiss.copy_array_to_vector(c.reshape(-1), clus.centroids)
        index = faiss.IndexFlatL2(d)
        clus.train(x, index)
        # faiss reports the objective of the assignment that began the iteration.
        stats = clus.iteration_stats
        inertia = float(stats.at(stats.size() - 1).obj)
        c = faiss.vector_to_array(clus.centroids).reshape(k, d).copy()
        if prev - inertia <= tol * inertia:
            converged = True
            break
        prev = inertia
    return c, it, inertia, converged


def _fit_cuml(x: torch.Tensor, k: int, init: torch.Tensor | None, max_iter: int, tol: float, seed: int,
              oversampling: float) -> tuple[np.ndarray, int, float, bool]:
    import cupy as cp
    from cuml.cluster import KMeans as CumlKMeans

    xs = cp.asarray(x.float().contiguous())
    model = CumlKMeans(n_clusters=k, max_iter=max_iter, tol=tol, random_state=seed, n_init=1,
                       init="scalable-k-means++" if init is None else cp.asarray(init.float().contiguous()),
                       oversampling_factor=oversampling, output_type="numpy")
    model.fit(xs)
    n_iter = int(getattr(model, "n_iter_", max_iter))
    return (np.asarray(model.cluster_centers_, dtype=np.float32), n_iter, float(model.inertia_),
            n_iter < max_iter)


def assign(x: np.ndarray | torch.Tensor, centroids: np.ndarray, *, device: str | torch.device = "cpu",
           dtype: str | torch.dtype = "auto", norms: np.ndarray | None = None,
           margin: float | None = None, extra: int = 1) -> tuple[np.ndarray, ...]:
    """(nearest centroid int32, cosine distance to its normalised centroid float32)
    for the rows of `x`: unit rows, or any rows with their L2 `norms`. With a
    `margin`, a third array (n, extra): the boundary clusters within
    `margin`, nearest bisector first (int32, -1 for none; `boundary_margin`)."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    # Centroids shipped to a Ray task arrive as a read-only view; nothing writes to them.
    c = read_only_tensor(np.ascontiguousarray(centroids, dtype=np.float32)).to(dev)
    xt = (x if isinstance(x, torch.Tensor) else read_only_tensor(np.asarray(x, dtype=np.float32))).to(dev)
    inv = None if norms is None else (1.0 / torch.from_numpy(np.asarray(norms, dtype=np.float32))).to(dev)
    found = _Nearest(c, dt, margin, extra)(xt, inv)
    labels, dots = found[0], found[1]
    cnorm = c.norm(dim=1).clamp_min(1e-12)
    dist = (1.0 - dots / cnorm[labels]).clamp_(0.0, 2.0)
    out = (labels.to(torch.int32).cpu().numpy(), dist.cpu().numpy().astype(np.float32, copy=False))
    if margin is None:
        return out
    return (*out, found[2].to(torch.int32).cpu().numpy())


def boundary_margin(eps: float) -> float:
    """How close to a bisector a unit row must be to be compared across it
    too, so that no pair at cosine >= 1 - eps straddling it is missed.

    Such a pair x, y has |x - y| <= sqrt(2 eps). The bisector of centroids
    a, b is a hyperplane, and x (nearest a) and y (nearest b) lie on either
    side of it, so their distances to it add up to at most |x - y|: one of
    the two is within sqrt(2 eps) / 2 of it, and is compared in the other's
    cluster."""
    return math.sqrt(2.0 * eps) / 2.0


def read_only_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor over `x` without a copy, even when `x` is a read-only view of
    an Arrow buffer (torch warns about those; nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for this process (None leaves them alone):
    a worker given N CPUs should use N, not every core of the machine."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))


class KMeansAssign:
    """Batch UDF: each row's nearest centroid and its cosine distance to it.

    In: Lance `_rowaddr`, `_rowid`, the id column and the vector column.
    Out: DEDUP_ASSIGN_SCHEMA (no vectors). A row whose vector is null, of
    another length than the centroids, non-finite or all zeros gets
    cluster -1 and the reason in `skip`. With a `margin` (see
    `boundary_margin`), a row that close to the bisector with another
    centroid comes out again, `primary` false, under that cluster (for at
    most `extra` such centroids, the nearest bisectors first)."""

    def __init__(self, *, centroids: np.ndarray, id_column: str, vector_column: str, device: str, dtype: str,
                 margin: float | None, extra: int = 1, new: bool = True, threads: int | None = None) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.id_column = id_column
        self.vector_column = vector_column
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.margin = margin
        self.extra = int(extra)
        self.new = bool(new)
        set_threads(threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.memberships(batch)[0]

    def memberships(self, batch: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """The output rows and, for each, the position of its input row."""
        n = batch.num_rows
        # Raw rows and their norms: the scores are scaled instead of copying
        # every vector into a normalised array.
        x, norms, reason = checked_rows(batch.column(self.vector_column), self.centroids.shape[1])
        ok = np.equal(reason, None)
        cluster = np.full(n, -1, dtype=np.int32)
        second = np.full((n, self.extra), -1, dtype=np.int32)
        dist = np.zeros(n, dtype=np.float32)
        if len(x):
            found = assign(x, self.centroids, device=self.device, dtype=self.dtype, norms=norms, margin=self.margin,
                           extra=self.extra)
            cluster[ok], dist[ok] = found[0], found[1]
            if self.margin is not None:
                second[ok, : found[2].shape[1]] = found[2]
        near_row, near_col = np.nonzero(second >= 0)
        rows = np.r_[np.arange(n), near_row]
        other = np.r_[cluster, second[near_row, near_col]].astype(np.int32)
        primary = np.arange(len(rows)) < n
        ids = batch.column(self.id_column).cast(pa.string())
        return pa.Table.from_arrays([
            batch.column("_rowaddr").cast(pa.uint64()).take(rows),
            batch.column("_rowid").cast(pa.uint64()).take(rows),
            ids.take(rows),
            pa.array(other),
            pa.array(dist[rows], mask=~ok[rows]),
            pa.array(reason[rows].tolist(), pa.string()),
            pa.array(primary),
            pa.array(np.full(len(rows), self.new)),
        ], schema=DEDUP_ASSIGN_SCHEMA), rows
