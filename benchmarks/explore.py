"""Query latency of ``crlf explore`` at CIFAR-10 train + test scale (60,000 points x 512 dims) on this machine's CPU.

    python benchmarks/explore.py                 # 60,000 x 512, 200 neighbour queries
    python benchmarks/explore.py --smoke         # 2,000 x 64, 20 queries (the test suite runs this)

Measures the code the server runs, on random unit rows: ``Space.neighbors`` (one matrix-vector product and a top-k
over the L2-normalised float32 matrix: /api/neighbors and the neighbours of an upload), ``Space.search`` (a substring
over every id), ``Space.points`` serialised to JSON (/api/points, fetched once per page load) and, with Flask, the
whole GET /api/neighbors/<i> request through Flask's test client. Prints one line per measurement (median, 95th
percentile and worst of the repeats, in ms); --json FILE writes them. Nothing is asserted.

Measured on the 2-core development machine (shared): neighbours 8 ms median, 16 ms p95 (24 ms median while other
jobs loaded it); the whole HTTP request 13 ms median; /api/points 2.1 MB, serialised in 48 ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlf.engine.explore import Space


def _space(n: int, dim: int, seed: int) -> Space:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32))
    labels = rng.integers(0, 10, n)
    return Space(
        x,
        rng.random((n, 2), dtype=np.float32),
        "pca",
        labels,
        [f"class{c}" for c in range(10)],
        [f"{'train' if i < n * 5 // 6 else 'test'}/{i}" for i in range(n)],
        torch.zeros((n, 3, 8, 8), dtype=torch.uint8),
        "random",
        "benchmark",
    )


def _timed(work: Any, repeats: int) -> dict[str, float]:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        work(i)
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3),
        "max_ms": round(times[-1], 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2,000 x 64 points, 20 queries: a quick check")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.points, args.dim, args.queries = 2_000, 64, 20
    space = _space(args.points, args.dim, 0)
    queries = np.random.default_rng(1).integers(0, args.points, args.queries).tolist()
    space.neighbors(queries[0], args.k)  # warm-up: thread pool, first allocation
    rows = {
        "neighbors": _timed(lambda i: space.neighbors(queries[i], args.k), args.queries),
        "neighbors_of_a_row": _timed(lambda i: space.neighbors(space.x[queries[i]], args.k), args.queries),
        "search": _timed(lambda i: space.search(f"/{queries[i]}"), min(args.queries, 20)),
        "points_json": _timed(lambda i: json.dumps(space.points()), 3),
    }
    if importlib.util.find_spec("flask") is not None:  # the whole request: routing, the query, JSON
        from crlf.explore_app import create_app

        client = create_app(space, args.k).test_client()
        rows["http_neighbors"] = _timed(lambda i: client.get(f"/api/neighbors/{queries[i]}"), args.queries)
    result = {
        "points": args.points,
        "dim": args.dim,
        "k": args.k,
        "torch_threads": torch.get_num_threads(),
        "points_json_bytes": len(json.dumps(space.points())),
        "rows": rows,
    }
    print(f"{args.points:,} points x {args.dim} dims, k {args.k}, {torch.get_num_threads()} torch threads")
    for name, row in rows.items():
        median, p95, worst = row["median_ms"], row["p95_ms"], row["max_ms"]
        print(f"  {name:20s} median {median:8.2f} ms  p95 {p95:8.2f} ms  max {worst:8.2f} ms")
    print(f"  /api/points payload {result['points_json_bytes'] / 1e6:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
