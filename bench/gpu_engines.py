"""GPU engines against eager PyTorch, in one run on one GPU.

For ResNet-50 (224x224) and BERT-base (sequence 128), random weights: our fp16 engine (an
AOTInductor package from the engine builder, loaded by the pytorch backend as a KIND_GPU
instance with a CUDA graph per batch bucket) against eager PyTorch (fp32, and fp16 with
channels-last for the convnet). Two figures for our engine: the graph replay on device
tensors (what the eager figures measure too) and the full execution from host arrays to
host arrays (pinned copies in and out, what a served request pays).

    python bench/gpu_engines.py [--models resnet50,bert] [--precision bf16,int8,fp8] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_models import MODELS, BenchModel, gpu_config

OUT = Path(__file__).resolve().parent / "out" / "gpu"
RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = {"resnet50": (1, 256), "bert": (1, 32)}
# fp16 overflows the attention mask's fp32 minimum that BERT's export bakes in; bf16 does not.
PRECISION = {"resnet50": "fp16", "bert": "bf16"}


def timed(torch: Any, run: Callable[[], Any], iters: int) -> tuple[float, float]:
    """(p50 ms of single runs, mean ms over a back-to-back loop)."""
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    singles = []
    for _ in range(max(10, iters // 4)):
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        singles.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    torch.cuda.synchronize()
    loop = (time.perf_counter() - start) / iters
    return float(np.median(singles) * 1e3), loop * 1e3


def build(model: BenchModel, precision: str, autotune: bool) -> tuple[Any, Any, float, bool]:
    """Our engine for ``model``: (config, engine, build seconds, cache hit)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from enginehouse.backends.base import Placement
    from enginehouse.backends.torch import TorchBackend
    from enginehouse.compiler import engine as compiler
    from enginehouse.compiler.cache import EngineCache
    from enginehouse.core import loader
    from enginehouse.repository import ModelRepository

    extra = 'parameters { key: "engine_autotune" value: { string_value: "true" } }\n'
    model.write(OUT / "repo", gpu_config(precision, extra=extra if autotune else ""))
    location = ModelRepository([OUT / "repo"]).locate(model.name)
    config, backend, files = loader.prepare_config(location, strict=False)
    started = time.perf_counter()
    print(f"  building {model.name} {precision} (cache {OUT / 'cache'})", flush=True)
    built = compiler.prepare(
        config, backend.name, 1, files[1], location.path, EngineCache(OUT / "cache"), "cuda:0"
    )
    seconds = time.perf_counter() - started
    engine = TorchBackend().load(
        config, built.path, Placement(mc.ModelInstanceGroup.KIND_GPU, 0), True
    )
    return config, engine, seconds, built.hit


def measure_eager(
    torch: Any, model: BenchModel, module: Any, half: Any, batch: int, iters: int
) -> dict[str, tuple[float, float]]:
    """Eager fp32 and eager fp16 (channels-last for the convnet) at one batch."""
    device_inputs = [torch.from_numpy(a).cuda() for a in model.inputs(batch).values()]
    half_inputs = [
        t.half().contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
        for t in device_inputs
    ]
    with torch.inference_mode():
        return {
            "eager fp32": timed(torch, lambda: module(*device_inputs), iters),
            "eager fp16": timed(torch, lambda: half(*half_inputs), iters),
        }


def measure_ours(
    torch: Any, model: BenchModel, engine: Any, batch: int, iters: int, precision: str
) -> dict[str, tuple[float, float]]:
    """Our graph replay and our host-to-host execution at one batch."""
    host = model.inputs(batch)
    outputs = [t.name for t in engine.config.output]
    engine.execute(host, outputs)  # fills the static buffers that replay() reads
    return {
        f"ours {precision} replay": timed(torch, lambda: engine.replay(batch), iters),
        f"ours {precision} host->host": timed(torch, lambda: engine.execute(host, outputs), iters),
    }


def show(batch: int, figures: dict[str, tuple[float, float]]) -> None:
    """Print figures as they are measured: long runs show progress (and survive a timeout)."""
    for label, (p50, loop) in figures.items():
        print(f"    b{batch} {label}: p50 {p50:.3f} ms, {batch / loop * 1e3:.1f}/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,bert")
    parser.add_argument(
        "--precision",
        default="",
        help="comma-separated, for every model (default: fp16, bf16 for BERT); int8 and fp8 "
        "quantise the linear layers through torchao",
    )
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--autotune", action="store_true")
    args = parser.parse_args()
    import torch

    rows: list[dict[str, Any]] = []
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = MODELS[name]
        module = model.module().cuda()
        half = model.module().cuda().half()
        if name == "resnet50":
            half = half.to(memory_format=torch.channels_last)
        figures = {
            batch: measure_eager(torch, model, module, half, batch, args.iters)
            for batch in BATCHES[name]
        }
        for batch, eager in figures.items():
            show(batch, eager)
        del module, half
        torch.cuda.empty_cache()
        build_seconds: dict[str, float] = {}
        for precision in (args.precision or PRECISION[name]).split(","):
            _, engine, build_s, hit = build(model, precision, args.autotune)
            print(f"  {name} {precision}: {'cache hit' if hit else f'built in {build_s:.0f} s'}")
            for batch in BATCHES[name]:
                ours = measure_ours(torch, model, engine, batch, args.iters, precision)
                figures[batch].update(ours)
                show(batch, ours)
            build_seconds[precision] = build_s
            engine.close()
            torch.cuda.empty_cache()
        for batch, measured in figures.items():
            for label, (p50, loop) in measured.items():
                precision = label.split()[1]
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "engine": label,
                        "p50_ms": round(p50, 3),
                        "per_s": round(batch / (loop / 1e3), 1),
                        "build_s": round(build_seconds[precision], 1)
                        if label.startswith("ours")
                        else None,
                    }
                )

    print(f"\n{'model':9} {'batch':>5} {'engine':24} {'p50 ms':>8} {'items/s':>10} {'vs eager':>9}")
    base: dict[tuple[str, int, str], float] = {}
    for row in rows:
        base[(row["model"], row["batch"], row["engine"])] = row["per_s"]
    for row in rows:
        reference = "eager fp32" if row["batch"] == 1 else "eager fp16"
        ratio = row["per_s"] / base[(row["model"], row["batch"], reference)]
        row["vs"] = f"{ratio:.2f}x {reference}"
        print(
            f"{row['model']:9} {row['batch']:5d} {row['engine']:24} {row['p50_ms']:8.3f} "
            f"{row['per_s']:10.1f} {row['vs']:>9}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_engines.json").write_text(
        json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1)
    )
    summary = [
        f"{r['model']} b{r['batch']} {r['p50_ms']:.2f} ms {r['vs']}"
        for r in rows
        if r["engine"].endswith("replay")
    ]
    print("gpu_engines: " + "; ".join(summary))


if __name__ == "__main__":
    main()
