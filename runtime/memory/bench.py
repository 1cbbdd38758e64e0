"""Episodic-memory retrieval benchmark: exact scan vs the HNSW index, by store size.

For each size n it measures single-query latency (p50, p99 with bootstrap 95% CIs) of the
exact scan and of the HNSW graph, the graph's recall@k against the exact top-k, the graph's
build time and the bytes each search structure holds, and writes one JSON with the config
and seeds (DESIGN.md rule 4). It drives `EmbeddingIndex`, the search code `EpisodicMemory`
runs, with bulk adds: building 10^6 validated Keyframe records would measure JSON and
dataclass overhead rather than retrieval.

Synthetic data (unit vectors with cluster structure, as keyframes of similar scenes have):
 - images: C = max(10, round(sqrt(n))) cluster centres drawn uniformly on the unit sphere;
   a keyframe is normalise(centre + `image_spread` * g / sqrt(D_img)), g ~ N(0, I), so it
   sits at cosine ~1 / sqrt(1 + spread^2) from its centre (0.71 for spread 1) and many
   keyframes are near-equally close to a query: a hard case for approximate search.
 - subgoal texts: 64 template directions (a task suite has few subgoal phrasings); cluster c
   uses template c mod 64 with a small spread (`text_spread`), i.e. near-duplicate texts.
 - queries: fresh samples of random clusters with their templates (never stored rows).
Threads are set deliberately: FAISS's OpenMP pool to `threads`, and numpy's BLAS (the
exact scan) to `threads` when threadpoolctl is importable; otherwise start the process with
OPENBLAS_NUM_THREADS set. Both are recorded in the JSON. It matters: on a loaded 2-core
machine a 2-thread BLAS made the exact scan of 1,000 x 896-d ~40x slower (8 ms vs 0.2 ms).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.memory.store import EmbeddingIndex, MemoryConfig, load_faiss
from runtime.stats import mean_ci, percentile_ci

logger = logging.getLogger(__name__)

N_TEXT_TEMPLATES = 64
_CHUNK = 65536  # rows generated and added per step, bounding the float64 temporaries


def _unit_rows(x: NDArray[np.float64]) -> NDArray[np.float32]:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class ClusteredEmbeddings:
    """The synthetic (image, text) embedding model described in the module docstring."""

    def __init__(self, n: int, image_dim: int, text_dim: int, seed: int,
                 image_spread: float = 1.0, text_spread: float = 0.25) -> None:
        rng = np.random.default_rng(seed)
        self.n_clusters = max(10, round(float(np.sqrt(n))))
        self.image_centres = _unit_rows(rng.standard_normal((self.n_clusters, image_dim)))  # (C, D_img)
        self.text_templates = _unit_rows(rng.standard_normal((N_TEXT_TEMPLATES, text_dim)))  # (64, D_txt)
        self.image_spread, self.text_spread = image_spread, text_spread

    def sample(self, rng: np.random.Generator, m: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """m keyframes: image (m, D_img), text (m, D_txt), unit rows."""
        clusters = rng.integers(self.n_clusters, size=m)
        d_img, d_txt = self.image_centres.shape[1], self.text_templates.shape[1]
        image = self.image_centres[clusters] + self.image_spread / np.sqrt(d_img) * rng.standard_normal((m, d_img))
        text = (self.text_templates[clusters % N_TEXT_TEMPLATES]
                + self.text_spread / np.sqrt(d_txt) * rng.standard_normal((m, d_txt)))
        return _unit_rows(image), _unit_rows(text)


def _blas_limit(threads: int) -> tuple[contextlib.AbstractContextManager, bool]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.warning("threadpoolctl not installed: numpy's BLAS threads follow OPENBLAS_NUM_THREADS/OMP_NUM_THREADS")
        return contextlib.nullcontext(), False
    return threadpool_limits(limits=threads, user_api="blas"), True


def _latency_summary(samples_ms: Sequence[float], seed: int) -> dict[str, Any]:
    p50, p99 = percentile_ci(samples_ms, 50, seed=seed), percentile_ci(samples_ms, 99, seed=seed)
    return {"p50_ms": p50["value"], "p50_ci95_ms": p50["ci95"], "p99_ms": p99["value"], "p99_ci95_ms": p99["ci95"],
            "mean_ms": float(np.mean(samples_ms)), "n": len(samples_ms)}


def _timed_queries(index: EmbeddingIndex, image: NDArray[np.float32], text: NDArray[np.float32], k: int,
                   method: str) -> tuple[list[float], list[NDArray[np.int64]]]:
    for i in range(min(5, len(image))):  # warm caches and lazy initialisation before timing
        index.search(image[i], text[i], k, method=method)
    latencies, results = [], []
    for q_image, q_text in zip(image, text):
        started = time.perf_counter_ns()
        ids, _ = index.search(q_image, q_text, k, method=method)
        latencies.append((time.perf_counter_ns() - started) / 1e6)
        results.append(ids)
    return latencies, results


def bench_size(n: int, config: MemoryConfig, queries: int, k: int, seed: int) -> dict[str, Any]:
    """One row of the table: store of n keyframes, `queries` combined (image + text) queries."""
    data = ClusteredEmbeddings(n, config.image_dim, config.text_dim, seed)
    rng = np.random.default_rng([seed, n])  # the stored rows: a stream per (seed, size)
    index = EmbeddingIndex(config)
    started = time.perf_counter()
    for start in range(0, n, _CHUNK):
        index.add(*data.sample(rng, min(_CHUNK, n - start)))
    add_s = time.perf_counter() - started
    q_image, q_text = data.sample(np.random.default_rng([seed, n, 1]), queries)  # the queries' own stream
    exact_ms, exact_ids = _timed_queries(index, q_image, q_text, k, "exact")
    build_s = index.build_approximate()
    hnsw_ms, hnsw_ids = _timed_queries(index, q_image, q_text, k, "approximate")
    recall = [len(np.intersect1d(a, e)) / len(e) for a, e in zip(hnsw_ids, exact_ids)]
    recall_ci = mean_ci(recall)
    row = {
        "n": n, "clusters": data.n_clusters, "add_s": add_s,
        "exact": _latency_summary(exact_ms, seed),
        "hnsw": {**_latency_summary(hnsw_ms, seed), "build_s": build_s,
                 f"recall_at_{k}": recall_ci["mean"], f"recall_at_{k}_ci95": recall_ci["ci95"],
                 f"recall_at_{k}_min": float(np.min(recall))},
        "memory_bytes": index.memory_bytes(),
    }
    logger.info("n=%d exact p50 %.3f ms, hnsw p50 %.3f ms, recall@%d %.4f, build %.1f s", n,
                row["exact"]["p50_ms"], row["hnsw"]["p50_ms"], k, recall_ci["mean"], build_s)
    return row


def run_memory_bench(sizes: Sequence[int] = (10**3, 10**5, 10**6), image_dim: int = 512, text_dim: int = 384,
                     queries: int = 200, k: int = 10, seed: int = 0, threads: int = 1, text_weight: float = 1.0,
                     hnsw_m: int = 32, hnsw_ef_construction: int = 80, hnsw_ef_search: int = 64,
                     out: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark (module docstring); writes JSON to `out` when given and returns it.

    Default dims: a 512-d open_clip image tower and a 384-d sentence encoder for subgoals
    (all-MiniLM-L6-v2 ships here), i.e. 896-d combined keys.
    """
    for name, value in (("queries", queries), ("k", k), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < k for n in sizes):
        raise ValueError(f"sizes must be integers >= k ({k}), got {list(sizes)!r}")
    config = MemoryConfig(image_dim=image_dim, text_dim=text_dim, text_weight=text_weight, index="exact",
                          hnsw_m=hnsw_m, hnsw_ef_construction=hnsw_ef_construction, hnsw_ef_search=hnsw_ef_search,
                          threads=threads)
    faiss = load_faiss()
    faiss.omp_set_num_threads(threads)
    blas_limit, blas_limited = _blas_limit(threads)
    with blas_limit:
        rows = [bench_size(int(n), config, queries, k, seed) for n in sizes]
    result = {
        "results": rows,
        "config": {
            "sizes": [int(n) for n in sizes], "queries": queries, "k": k, "threads": threads,
            "blas_threads_limited": blas_limited,
            "thread_env": {name: os.environ.get(name) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
            "memory": {**dataclasses.asdict(config), "index": "both: each query set forced to exact, then HNSW"},
            "data": {"image_clusters": "max(10, round(sqrt(n)))", "image_spread": 1.0,
                     "text_templates": N_TEXT_TEMPLATES, "text_spread": 0.25,
                     "queries": "fresh samples of random clusters (combined image + text queries)"},
            "latency": "one query per call, wall time of EmbeddingIndex.search (includes top-k sorting)",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "numpy": np.__version__,
                        "faiss": faiss.__version__},
        },
        "seeds": [seed],
        "command": command,
    }
    if out is not None:
        _write_json(Path(out), result)
    return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _sizes(text: str) -> list[int]:
    try:
        return [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--sizes must be comma-separated integers (1e5 allowed), got {text!r}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helmstack bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/memory.json", help="JSON output path")
    parser.add_argument("--sizes", type=_sizes, default=[10**3, 10**5, 10**6], help="e.g. 1000,1e5,1e6")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-dim", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=384)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its per-import CPU-dispatch chatter
    command = " ".join(["helmstack bench memory", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run_memory_bench(args.sizes, args.image_dim, args.text_dim, args.queries, args.k, args.seed,
                                  args.threads, out=args.out, command=command)
    except ValueError as exc:
        parser.error(str(exc))
    k = args.k
    print(f"{'n':>9} {'exact p50 ms':>13} {'exact p99 ms':>13} {'hnsw p50 ms':>12} {'hnsw p99 ms':>12} "
          f"{f'recall@{k}':>10} {'build s':>8} {'hnsw MB':>8}")
    for row in result["results"]:
        e, h = row["exact"], row["hnsw"]
        print(f"{row['n']:>9} {e['p50_ms']:>13.3f} {e['p99_ms']:>13.3f} {h['p50_ms']:>12.3f} {h['p99_ms']:>12.3f} "
              f"{h[f'recall_at_{k}']:>10.4f} {h['build_s']:>8.2f} {row['memory_bytes']['hnsw'] / 2**20:>8.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
