"""GPU engines against eager PyTorch, in one run on one GPU.

For ResNet-50 (224x224) and BERT-base (sequence 128), random weights: our fp16 engine (a
standalone Inductor artifact from the engine builder, loaded by the pytorch backend as a KIND_GPU
instance with a CUDA graph per batch bucket) against eager PyTorch (fp32, and fp16 with
channels-last for the convnet). Two figures for our engine: the graph replay on device
tensors (what the eager figures measure too) and the full execution from host arrays to
host arrays (pinned copies in and out, what a served request pays), on one instance and on
two instances of the engine taking turns as a server's two instances per GPU do (one batch's
host copies beside the other's graph); the table gives each host-to-host rate against the
replay's, and the last line, at batch 1, what host to host adds to the replay. All of a batch's
engines run side by side in alternating rounds, so that the GPU's drift over a run (clocks,
neighbours) reaches each of them alike; each figure is an engine's median round.

Each engine is built with a fixed-batch engine for the model's largest batch beside the one of
symbolic batch (``engine_static_batch_sizes``); the builder keeps it where it replays faster,
and what it measured is printed and saved. ``resnet50_fp16_image`` is ResNet-50 with its image
declared FP16 in the config (half the bytes cross).

    python bench/gpu_engines.py [--models resnet50,bert,resnet50_fp16_image]
        [--precision bf16,int8,fp8] [--iters 200] [--static-batches largest|none]
"""

from __future__ import annotations

import argparse
import json
import os
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


ROUNDS = 5


def timed(
    torch: Any, runs: dict[str, Callable[[], Any]], iters: int
) -> dict[str, tuple[float, float]]:
    """Per engine: (p50 ms of single synchronised runs, mean ms per run of back-to-back
    loops). The loops go in rounds, every engine once a round, and each engine's figure is
    its median round: the GPU's clocks and its neighbours' load drift over a run, and
    alternating puts every engine through the same drift instead of one engine through the
    cool start and another through the hot end."""
    for run in runs.values():
        for _ in range(5):
            run()
    torch.cuda.synchronize()
    singles: dict[str, list[float]] = {label: [] for label in runs}
    for label, run in runs.items():
        for _ in range(max(10, iters // 4)):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            singles[label].append(time.perf_counter() - start)
    per_round = max(5, iters // ROUNDS)
    loops: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(ROUNDS):
        for label, run in runs.items():
            start = time.perf_counter()
            for _ in range(per_round):
                run()
            torch.cuda.synchronize()
            loops[label].append((time.perf_counter() - start) / per_round)
    return {
        label: (float(np.median(singles[label]) * 1e3), float(np.median(loops[label]) * 1e3))
        for label in runs
    }


def build(
    model: BenchModel, precision: str, autotune: bool, static: str = ""
) -> tuple[Any, Callable[[], Any], float, bool, dict[str, Any]]:
    """Our engine for ``model``: (config, a loader of one more instance of it, build
    seconds, cache hit, the builder's measurement of fixed-batch engines for the sizes in
    ``static``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from enginehouse.backends import inductor_artifact
    from enginehouse.backends.base import Placement
    from enginehouse.backends.torch import TorchBackend
    from enginehouse.builder import artifacts
    from enginehouse.builder.cache import EngineCache
    from enginehouse.core import loader
    from enginehouse.repository import ModelRepository

    extra = 'parameters { key: "engine_autotune" value: { string_value: "true" } }\n'
    extra = extra if autotune else ""
    if static:
        extra += (
            'parameters { key: "engine_static_batch_sizes" '
            f'value: {{ string_value: "{static}" }} }}\n'
        )
    model.write(OUT / "repo", gpu_config(precision, extra=extra))
    location = ModelRepository([OUT / "repo"]).locate(model.name)
    config, backend, files = loader.prepare_config(location, strict=False)
    started = time.perf_counter()
    print(f"  building {model.name} {precision} (cache {OUT / 'cache'})", flush=True)
    built = artifacts.prepare(
        config, backend.name, 1, files[1], location.path, EngineCache(OUT / "cache"), "cuda:0"
    )
    seconds = time.perf_counter() - started

    def instance() -> Any:
        return TorchBackend().load(
            config, built.path, Placement(mc.ModelInstanceGroup.KIND_GPU, 0), True
        )

    index = built.path.parent / inductor_artifact.STATIC_INDEX
    measured = json.loads(index.read_text()) if index.is_file() else {}
    return config, instance, seconds, built.hit, measured


class TakingTurns:
    """Two instances of one engine as a server runs them: each call gathers one batch into
    one instance's staging buffers and launches it (the served path: ``gather``, ``launch``),
    then takes the outputs of the batch the other instance launched before, once done. So
    one batch's host copies run beside the other's graph, and each call is one batch."""

    def __init__(self, engines: list[Any], host: dict[str, np.ndarray], outputs: list[str]):
        self.engines = engines
        self.parts = {name: [array] for name, array in host.items()}
        self.outputs = outputs
        self.turn = 0
        self.pending: Any = None

    def __call__(self) -> None:
        engine = self.engines[self.turn]
        self.turn ^= 1
        launched = engine.launch(engine.gather(self.parts), self.outputs)
        previous, self.pending = self.pending, launched
        if previous is not None:
            while not previous.done():
                time.sleep(0)
            previous.outputs()


def eager_runs(
    torch: Any, model: BenchModel, module: Any, half: Any, batch: int
) -> dict[str, Callable[[], Any]]:
    """Eager fp32 and eager fp16 (channels-last for the convnet) at one batch."""
    device_inputs = [
        torch.from_numpy(a).cuda().float() if a.dtype.kind == "f" else torch.from_numpy(a).cuda()
        for a in model.inputs(batch).values()
    ]
    half_inputs = [
        t.half().contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t
        for t in device_inputs
    ]
    return {
        "eager fp32": lambda: module(*device_inputs),
        "eager fp16": lambda: half(*half_inputs),
    }


def our_runs(
    model: BenchModel, engines: list[Any], batch: int, precision: str
) -> dict[str, Callable[[], Any]]:
    """Our graph replay and our host-to-host execution at one batch, the latter also with
    its host copies on one thread (``ENGINEHOUSE_HOST_COPY_THREADS=1``), as before they were
    split over threads, and on two instances taking turns (:class:`TakingTurns`)."""
    engine = engines[0]
    host = model.inputs(batch)
    outputs = [t.name for t in engine.config.output]
    engine.execute(host, outputs)  # fills the static buffers that replay() reads

    def one_copy_thread() -> Any:
        os.environ["ENGINEHOUSE_HOST_COPY_THREADS"] = "1"
        try:
            return engine.execute(host, outputs)
        finally:
            os.environ.pop("ENGINEHOUSE_HOST_COPY_THREADS", None)

    return {
        f"ours {precision} replay": lambda: engine.replay(batch),
        f"ours {precision} host->host": lambda: engine.execute(host, outputs),
        f"ours {precision} host->host, 1 copy thread": one_copy_thread,
        f"ours {precision} host->host, 2 instances": TakingTurns(engines, host, outputs),
    }


def show(batch: int, figures: dict[str, tuple[float, float]]) -> None:
    """Print figures as they are measured: long runs show progress (and survive a timeout)."""
    for label, (p50, loop) in figures.items():
        print(f"    b{batch} {label}: p50 {p50:.3f} ms, {batch / loop * 1e3:.1f}/s", flush=True)


def report(rows: list[dict[str, Any]]) -> None:
    """Print the table, and set each row's ``vs`` (its rate against eager, fp32 at batch 1 and
    fp16 above) and, for host-to-host rows, ``vs_replay`` (its rate against the same
    engine's graph replay at that batch: what the copies cost)."""
    print(
        f"\n{'model':9} {'batch':>5} {'engine':42} {'p50 ms':>8} {'items/s':>10} "
        f"{'vs eager':>18} {'vs replay':>9}"
    )
    base = {(row["model"], row["batch"], row["engine"]): row["per_s"] for row in rows}
    for row in rows:
        reference = "eager fp32" if row["batch"] == 1 else "eager fp16"
        ratio = row["per_s"] / base[(row["model"], row["batch"], reference)]
        row["vs"] = f"{ratio:.2f}x {reference}"
        engine = row["engine"]
        replay = engine.split(" host->host")[0] + " replay"
        if " host->host" in engine and (row["model"], row["batch"], replay) in base:
            row["vs_replay"] = round(row["per_s"] / base[(row["model"], row["batch"], replay)], 3)
        shown = f"{row['vs_replay']:.2f}x" if "vs_replay" in row else ""
        print(
            f"{row['model']:9} {row['batch']:5d} {engine:42} {row['p50_ms']:8.3f} "
            f"{row['per_s']:10.1f} {row['vs']:>18} {shown:>9}"
        )


def summary(rows: list[dict[str, Any]]) -> str:
    """The final line: each replay against eager; at batch 1 what a host-to-host execution
    adds to the replay's p50 (its latency), above it the rate of two instances taking turns
    host to host against the replay's (see :func:`report`)."""
    p50 = {(r["model"], r["batch"], r["engine"]): r["p50_ms"] for r in rows}
    parts = []
    for r in rows:
        engine, head = r["engine"], f"{r['model']} b{r['batch']}"
        if engine.endswith("replay"):
            parts.append(f"{head} {r['p50_ms']:.2f} ms {r['vs']}")
        elif r["batch"] == 1 and engine.endswith("host->host"):
            replay = p50.get((r["model"], 1, engine.replace("host->host", "replay")))
            if replay is not None:
                parts.append(f"{head} host->host +{r['p50_ms'] - replay:.2f} ms over replay")
        elif r["batch"] > 1 and engine.endswith("2 instances") and "vs_replay" in r:
            parts.append(f"{head} host->host on 2 instances {r['vs_replay']:.2f}x replay")
    return "; ".join(parts)


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
    parser.add_argument(
        "--static-batches",
        choices=("largest", "none"),
        default="largest",
        help="build a fixed-batch engine for each model's largest batch here beside the one of "
        "symbolic batch (engine_static_batch_sizes; the builder keeps it where it measures "
        "faster, and its figures are printed)",
    )
    args = parser.parse_args()
    import torch

    rows: list[dict[str, Any]] = []
    fixed_batches: list[dict[str, Any]] = []
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}")
    for name in args.models.split(","):
        model = MODELS[name]
        module = model.module().cuda()
        half = model.module().cuda().half()
        if model.kind == "resnet50":
            half = half.to(memory_format=torch.channels_last)
        engines: dict[str, list[Any]] = {}
        build_seconds: dict[str, float] = {}
        static = str(BATCHES[model.kind][-1]) if args.static_batches == "largest" else ""
        for precision in (args.precision or PRECISION[model.kind]).split(","):
            _, instance, build_s, hit, measured = build(model, precision, args.autotune, static)
            engines[precision] = [instance(), instance()]
            print(f"  {name} {precision}: {'cache hit' if hit else f'built in {build_s:.0f} s'}")
            for verdict, batches in measured.items():
                for batch, facts in batches.items():
                    print(f"    fixed batch {batch} {verdict}: {facts}", flush=True)
                    fixed_batches.append(
                        {
                            "model": name,
                            "precision": precision,
                            "batch": int(batch),
                            "kept": verdict == "kept",
                            **facts,
                        }
                    )
            build_seconds[precision] = build_s
        # Eager and our engines measured side by side, in alternating rounds (see timed).
        figures: dict[int, dict[str, tuple[float, float]]] = {}
        for batch in BATCHES[model.kind]:
            runs = eager_runs(torch, model, module, half, batch)
            for precision, engine in engines.items():
                runs |= our_runs(model, engine, batch, precision)
            with torch.inference_mode():
                figures[batch] = timed(torch, runs, args.iters)
            show(batch, figures[batch])
        for pair in engines.values():
            for engine in pair:
                engine.close()
        del module, half
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

    report(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_engines.json").write_text(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "rows": rows,
                "fixed_batches": fixed_batches,
            },
            indent=1,
        )
    )
    print("gpu_engines: " + summary(rows))


if __name__ == "__main__":
    main()
