"""A batch's copy into a GPU engine's staging buffer, with streaming stores and without.

What a served batch of images pays on the host before its graph runs: each request's image
copied into its rows of the engine's staging buffer, spread over the host-copy threads as
``host_copies.copy_all`` spreads it. For 256 ResNet-50 images (588 KB each, 154 MB) this
times, on 1 to N threads, in alternating rounds:

- ``numpy``: ``np.copyto`` (memcpy, stores through the cache), the copy before ``_staging``;
- ``streamed``: ``_staging.copy``, streaming stores (what ``host_copies`` does now);
- ``fp16 cached`` and ``fp16 streamed``: FP32 images converted into an FP16 buffer by F16C
  (what an fp16 engine's FP32 inputs take), with plain stores and with streaming stores.

It needs no GPU (the copies are the CPU's half of the input copy); the destination is
ordinary memory, faulted in first, as page-locked memory is. Writes the figures and a plot
(bench/results/staging_copies.json, .png) and ends with one line of figures: streamed against
numpy, and fp16 streamed against cached, on the most threads.

    python bench/staging_copies.py [--images 256] [--threads 1,2,4,8] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from enginehouse.backends import host_copies

RESULTS = Path(__file__).resolve().parent / "results"
Copy = Callable[[np.ndarray, np.ndarray], None]


def kernels() -> dict[str, tuple[Copy, bool]]:
    """Each way of copying one image into its rows: (the copy, whether it converts to FP16)."""
    staging = host_copies._staging
    if staging is None:
        sys.exit("the compiled _staging module is not built: pip install -e . (needs a C compiler)")

    def numpy_copy(d: np.ndarray, s: np.ndarray) -> None:
        np.copyto(d, s, casting="no")

    found: dict[str, tuple[Copy, bool]] = {
        "numpy": (numpy_copy, False),
        "streamed": (lambda d, s: staging.copy(d, s, True), False),
    }
    if host_copies.HALF_STAGING:
        found["fp16 cached"] = (lambda d, s: staging.to_half(d, s, False), True)
        found["fp16 streamed"] = (lambda d, s: staging.to_half(d, s, True), True)
    return found


def batch_ms(
    pool: ThreadPoolExecutor, threads: int, copy: Copy, images: list[np.ndarray], out: np.ndarray
) -> float:
    """One batch copied, its images dealt round-robin to ``threads`` threads (ms)."""

    def share(k: int) -> None:
        for i in range(k, len(images), threads):
            copy(out[i], images[i])

    started = time.perf_counter()
    list(pool.map(share, range(threads)))
    return (time.perf_counter() - started) * 1e3


def plot(rows: list[dict[str, object]], names: list[str], path: Path) -> None:
    """GB/s of FP32 read per copy kind, grouped by thread count (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    threads = sorted({int(str(r["threads"])) for r in rows})
    rate = {(r["threads"], r["copy"]): float(str(r["fp32_read_gb_s"])) for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.bar(
            [i + k * width for i in range(len(threads))],
            [rate[(t, name)] for t in threads],
            width,
            label=name,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(threads))], [str(t) for t in threads])
    ax.set_xlabel("copy threads")
    ax.set_ylabel("GB/s of FP32 images read")
    ax.set_title("a batch copied into a staging buffer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    cores = os.cpu_count() or 1
    # Up to half the cores, as the host-copy threads (host_copies._threads).
    half = max(1, cores // 2)
    parser.add_argument("--threads", default=",".join(str(t) for t in (1, 2, 4, 8) if t <= half))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    found = kernels()
    rng = np.random.default_rng(0)
    # Separate arrays, as requests' images are: each one 588 KB.
    images = [rng.standard_normal((3, 224, 224), dtype=np.float32) for _ in range(args.images)]
    batch_mb = sum(i.nbytes for i in images) / 1e6
    targets = {
        False: np.ones((args.images, 3, 224, 224), np.float32),
        True: np.ones((args.images, 3, 224, 224), np.float16),
    }
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(
        f"{args.images} images of 3x224x224 FP32 ({batch_mb:.0f} MB) into a staging buffer, "
        f"{cores} cores, {args.rounds} alternating rounds"
    )
    rows = []
    with ThreadPoolExecutor(max(thread_counts)) as pool:
        for threads in thread_counts:
            times: dict[str, list[float]] = {name: [] for name in found}
            for copy, halved in found.values():  # warm: fault in, fill the caches' state
                batch_ms(pool, threads, copy, images, targets[halved])
            for _ in range(args.rounds):
                for name, (copy, halved) in found.items():
                    times[name].append(batch_ms(pool, threads, copy, images, targets[halved]))
            for name, (copy, halved) in found.items():
                copy(targets[halved][0], images[0])
                want = images[0].astype(np.float16) if halved else images[0]
                assert np.array_equal(targets[halved][0], want), name
                ms = statistics.median(times[name])
                rows.append(
                    {
                        "threads": threads,
                        "copy": name,
                        "ms": round(ms, 3),
                        "fp32_read_gb_s": round(batch_mb / ms, 2),
                    }
                )
                rate = batch_mb / ms
                print(f"  {threads:2d} threads  {name:14s} {ms:8.2f} ms  {rate:6.1f} GB/s read")
    by = {(r["threads"], r["copy"]): r["ms"] for r in rows}
    print(f"\n{'threads':>7} " + " ".join(f"{name:>14s}" for name in found) + "  streamed/numpy")
    for threads in thread_counts:
        ratio = by[(threads, "numpy")] / by[(threads, "streamed")]
        cells = " ".join(f"{by[(threads, name)]:11.2f} ms" for name in found)
        print(f"{threads:7d} {cells}  {ratio:13.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "staging_copies.json").write_text(json.dumps(rows, indent=1))
    plot(rows, list(found), RESULTS / "staging_copies.png")
    most = thread_counts[-1]
    line = (
        f"staging_copies: {args.images} images on {most} threads: streamed "
        f"{by[(most, 'numpy')] / by[(most, 'streamed')]:.2f}x numpy's copy"
    )
    if (most, "fp16 streamed") in by:
        line += (
            f", fp16 streamed {by[(most, 'fp16 cached')] / by[(most, 'fp16 streamed')]:.2f}x "
            f"fp16 cached, fp16 streamed {by[(most, 'numpy')] / by[(most, 'fp16 streamed')]:.2f}x "
            "numpy's fp32 copy"
        )
    print(line)


if __name__ == "__main__":
    main()
