"""Semantic dedup at scale: task=dedup in both modes against SemDeDup by hand.

A Lance table of N x D float32 embeddings with planted near-duplicate groups
(scripts/planted_embeddings.py: clustered "topics", ~10% of rows in groups of
2-4 whose pairs have cosine ~0.997) is deduped three times in one run, each
in its own process so their memory is measured apart:

- reelsift `dedup.mode=components` (the default) and `dedup.mode=semdedup`:
  `python -m engine task=dedup dedup.table=... output=...` (Ray starts
  inside it; its wall time and the peak memory of its whole process tree,
  Ray's workers and object store included);
- by hand: one Python process, no Ray: read the vectors, normalise, faiss
  k-means on the same sample size for the same number of iterations, assign
  every row with faiss, then per cluster sort by NeMo's `hard` rule and take
  the upper triangle's column max with numpy (SemDeDup, what
  `dedup.mode=semdedup` computes).

Each is scored against the planted truth: the share of planted groups left
with exactly one member, pair recall (planted pairs not both kept) and
precision (removed rows that have a planted twin). Prints a table; `--json`
keeps the figures.

    python scripts/bench_dedup.py [--rows 1000000] [--dim 768] [--modes components semdedup] [--json F]
    python scripts/bench_dedup.py --backends [--rows 224000]   # torch vs faiss k-means fit, same data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.planted_embeddings import PlantedSpec, write_planted_table  # noqa: E402


class TreeMemory:
    """Peak memory of a process and its descendants, sampled: summed RSS
    (shared pages such as Ray's object store or libtorch counted once per
    process that maps them) and summed PSS (each shared page split between
    its users: what the tree really holds)."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid = pid
        self.every_s = every_s
        self.rss = 0
        self.pss = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_done, daemon=True)

    def _sample_until_done(self) -> None:
        while not self._done.is_set():
            rss = pss = 0
            try:
                tree = [psutil.Process(self.pid)]
                tree += tree[0].children(recursive=True)
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._done.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, TreeMemory, str]:
    """Run `cmd`, returning (wall s, its tree's peak memory, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}):\n{err[-4000:]}")
    return wall, mem, out


# ------------------------------------------------------------------ data
def ensure_table(path: Path, spec: PlantedSpec) -> Path:
    """The planted table at `path`, made once per spec (minutes at 1M rows)."""
    stamp = path.with_suffix(".spec.json")
    want = json.dumps(asdict(spec), sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == want:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    write_planted_table(path, spec)
    stamp.write_text(want)
    print(f"wrote {spec.n} x {spec.dim} planted table in {time.perf_counter() - t:.0f} s: {path}", flush=True)
    return path


# ------------------------------------------------------------------ scoring
def score(group: np.ndarray, duplicate: np.ndarray) -> dict[str, float]:
    """Recall: planted pairs of which not both members were kept.
    Precision: removed rows that do have a planted twin."""
    planted = group >= 0
    order = np.argsort(group[planted], kind="stable")
    g = group[planted][order]
    kept = ~duplicate[planted][order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(g)])
    kept_n = np.add.reduceat(kept.astype(np.int64), starts)
    pairs = sizes * (sizes - 1) // 2
    both_kept = kept_n * (kept_n - 1) // 2
    removed = int(duplicate.sum())
    return {
        "planted_pairs": int(pairs.sum()),
        "recall": float(1 - both_kept.sum() / max(1, pairs.sum())),
        "precision": float((duplicate & planted).sum() / max(1, removed)),
        "removed": removed,
        "expected_removed": int((sizes - 1).sum()),
        "groups_keeping_one": float((kept_n == 1).mean()),
    }


# ------------------------------------------------------------------ the two sides
def run_task(table: Path, out: Path, overrides: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "engine", "task=dedup", f"output={out}", f"dedup.table={table}", *overrides]
    wall, mem, _ = run_measured(cmd)
    summary = json.loads((out / "dedup" / "summary.json").read_text())
    import lance

    t = lance.dataset(str(table)).to_table(columns=["planted_group", "duplicate"])
    duplicate = np.asarray(t.column("duplicate").fill_null(False).to_numpy(zero_copy_only=False))
    return {"wall_s": wall, "peak_rss_gb": mem.rss / 1e9, "peak_pss_gb": mem.pss / 1e9,
            "phases_s": summary["wall_s"], "n_clusters": summary["run"]["n_clusters"],
            "fit_rows": summary["run"]["fit_rows"], "kmeans": summary["run"]["kmeans"],
            "cluster_sizes": summary["run"]["cluster_sizes"], "mode": summary["mode"],
            "runner": summary["run"].get("runner"),
            "boundary_members": summary["run"].get("boundary_members"), "edges": summary["run"].get("edges"),
            **score(t.column("planted_group").to_numpy(), duplicate)}


def by_hand(table: str, k: int, fit_rows: int, iters: int, eps: float, seed: int, out: str) -> None:
    """The same algorithm in one process, no Ray (run as a subprocess)."""
    import faiss
    import lance

    t0 = time.perf_counter()
    ds = lance.dataset(table)
    data = ds.to_table(columns=["clip_id", "embedding"])
    ids = np.asarray(data.column("clip_id").to_pylist(), dtype=object)
    col = data.column("embedding").combine_chunks()
    x = np.array(col.values.to_numpy().reshape(len(col), -1), dtype=np.float32)
    del data, col
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t_read = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), fit_rows, replace=False))] if fit_rows < len(x) else x
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=len(sample) // k + 1)
    km.train(sample)
    del sample
    t_fit = time.perf_counter()
    _, nearest = km.index.search(x, 1)
    labels = nearest[:, 0]
    centroids = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
    dist = 1 - np.einsum("ij,ij->i", x, centroids[labels])
    t_assign = time.perf_counter()
    duplicate = np.zeros(len(x), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0, True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = order[a:b]
        ranked = members[np.lexsort((ids[members].astype(str), dist[members]))[::-1]]  # NeMo's hard
        xs = x[ranked]
        sims = np.triu(xs @ xs.T, k=1)
        duplicate[ranked] = sims.max(axis=0) >= 1 - eps
    t_pair = time.perf_counter()
    np.save(out, duplicate)
    print(json.dumps({"read_s": t_read - t0, "fit_s": t_fit - t_read, "assign_s": t_assign - t_fit,
                      "pairwise_s": t_pair - t_assign}))


def run_by_hand(table: Path, task: dict, eps: float, seed: int, work: Path) -> dict:
    out = work / "by_hand_duplicate.npy"
    cmd = [sys.executable, __file__, "--by-hand", str(table), str(task["n_clusters"]), str(task["fit_rows"]),
           str(task["kmeans"]["n_iter"]), str(eps), str(seed), str(out)]
    wall, mem, stdout = run_measured(cmd)
    import lance

    group = lance.dataset(str(table)).to_table(columns=["planted_group"]).column("planted_group").to_numpy()
    return {"wall_s": wall, "peak_rss_gb": mem.rss / 1e9, "peak_pss_gb": mem.pss / 1e9,
            "phases_s": json.loads(stdout.strip().splitlines()[-1]), **score(group, np.load(out))}


# ------------------------------------------------------------------ k-means backends
def bench_backends(table: Path, rows: int, k: int, iters: int) -> list[dict]:
    """torch vs faiss: the same fit (seeding + Lloyd) on the same rows, here,
    with every core; the fit runs at this scale in task=dedup."""
    import lance
    import torch

    from udfs.dedup.kmeans import KMeans
    from udfs.dedup.vectors import vectors_from_arrow

    ds = lance.dataset(str(table))
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(ds.count_rows(), min(rows, ds.count_rows()), replace=False))
    col = ds.take(picked, columns=["embedding"]).column("embedding")
    x, _ = vectors_from_arrow(col, ds.schema.field("embedding").type.list_size)
    results = []
    for backend in ("torch", "faiss"):
        t = time.perf_counter()
        fit = KMeans(n_clusters=k, max_iter=iters, tol=0.0, backend=backend, device="cpu").fit(x)
        results.append({"backend": backend, "rows": len(x), "k": k, "threads": torch.get_num_threads(),
                        "init_s": fit.init_s, "lloyd_s": fit.fit_s, "s_per_iter": fit.fit_s / fit.n_iter,
                        "iters": fit.n_iter, "inertia": fit.inertia, "total_s": time.perf_counter() - t})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--by-hand":
        table, k, fit_rows, iters, eps, seed, out = sys.argv[2:9]
        by_hand(table, int(k), int(fit_rows), int(iters), float(eps), int(seed), out)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--topics", type=int, default=5000)
    ap.add_argument("--work", type=Path, default=REPO / "bench_out" / "dedup")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--modes", nargs="+", default=["components", "semdedup"], choices=["components", "semdedup"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--backends", action="store_true", help="compare the k-means backends instead")
    ap.add_argument("--backend-rows", type=int, default=224_000)
    ap.add_argument("--backend-k", type=int, default=1000)
    ap.add_argument("--backend-iters", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="extra task=dedup overrides (key=value)")
    args = ap.parse_args()

    spec = PlantedSpec(n=args.rows, dim=args.dim, n_topics=args.topics)
    table = ensure_table(args.work / f"planted_{args.rows}x{args.dim}.lance", spec)
    if args.backends:
        result = {"backends": bench_backends(table, args.backend_rows, args.backend_k, args.backend_iters)}
    else:
        runs: dict[str, dict] = {}
        for mode in args.modes:
            # Runs add dedup columns, so each one starts from the generated version.
            _reset(table)
            runs[mode] = run_task(table, args.work / f"out_{mode}",
                                  [f"dedup.eps={args.eps}", f"dedup.mode={mode}", *args.overrides])
            print(f"{mode}: {runs[mode]['wall_s']:.1f} s", flush=True)
        _reset(table)
        any_run = runs.get("semdedup") or next(iter(runs.values()))
        hand = run_by_hand(table, any_run, args.eps, 42, args.work)
        result = {"machine": {"cpus": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / 1e9},
                  "rows": args.rows, "dim": args.dim, "eps": args.eps, "overrides": args.overrides,
                  "reelsift": runs, "by_hand": hand,
                  "overhead": {mode: r["wall_s"] / hand["wall_s"] for mode, r in runs.items()}}
        if {"components", "semdedup"} <= set(runs):
            result["boundary_cost"] = runs["components"]["wall_s"] / runs["semdedup"]["wall_s"]
        print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


def _reset(table: Path) -> None:
    """Back to the generated data: no dedup columns, older versions' files gone."""
    from datetime import timedelta

    import lance

    ds = lance.dataset(str(table))
    if "duplicate" in ds.schema.names:
        # The oldest version left: the generated one, or a restored copy of it.
        ds.checkout_version(ds.versions()[0]["version"]).restore()
        lance.dataset(str(table)).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)


def print_table(r: dict) -> None:
    runs, h = r["reelsift"], r["by_hand"]
    first = next(iter(runs.values()))
    print(f"\n{r['rows']:,} x {r['dim']} float32, eps={r['eps']}, {first['n_clusters']} clusters, "
          f"{r['machine']['cpus']} CPUs")
    print("| | wall s | peak RSS GB (summed) | peak PSS GB | groups keeping exactly one | pair recall | precision "
          "| removed / planted extras |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [(f"reelsift task=dedup mode={mode} (runner {x['runner']})", x) for mode, x in runs.items()]
    for name, x in (*rows, ("by hand (faiss + numpy SemDeDup)", h)):
        print(f"| {name} | {x['wall_s']:.1f} | {x['peak_rss_gb']:.2f} | {x['peak_pss_gb']:.2f} | "
              f"{x['groups_keeping_one']:.4f} | {x['recall']:.4f} | {x['precision']:.4f} | "
              f"{x['removed']:,} / {x['expected_removed']:,} |")
    print("\noverhead (task / by hand): " + ", ".join(f"{m} {v:.2f}x" for m, v in r["overhead"].items()))
    if "boundary_cost" in r:
        print(f"boundary pass (components / semdedup): {r['boundary_cost']:.2f}x")
    for mode, x in runs.items():
        print(f"task phases, {mode} (s):", {k: round(v, 1) for k, v in x["phases_s"].items()})
        if x.get("boundary_members") is not None:
            print(f"  boundary members {x['boundary_members']:,}, edges {x['edges']}")
    print("by-hand phases (s):", {k: round(v, 1) for k, v in h["phases_s"].items()})


if __name__ == "__main__":
    main()
