"""Decoding a folder (or tar shards) into crlf's cache: forked processes vs threads, interleaved, fresh caches.

    python benchmarks/decode.py --data-dir /tmp/c10 --size 32 --rounds 2     # CIFAR-10 JPEG copy, train split
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from crlf.engine.sources import cache, catalog
from crlf.options import DataSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="folder", choices=["folder", "tar"])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    listed = catalog(DataSettings(data=a.data, data_dir=a.data_dir), a.split)
    with tempfile.TemporaryDirectory(prefix="crlf-decode-") as tmp:
        for k in range(a.rounds):
            for how, minimum in (("threads", 10**12), ("processes", 1)):
                cache.PROCESS_MIN = minimum
                folder = Path(tmp) / how
                shutil.rmtree(folder, ignore_errors=True)
                t0 = time.perf_counter()
                decoded = cache.load_catalog(listed, a.size, folder)
                print(f"round {k + 1}: {how:<9} {time.perf_counter() - t0:6.2f} s  {len(decoded):,} images", flush=True)


if __name__ == "__main__":
    main()
