"""GPU engines: one compiled module per device, shared by that device's instances.

For the cuda target the engine builder saves a standalone Inductor artifact where it can
(``inductor_artifact.py``: loads without tracing). Quantised programs (torchao's tensor
subclasses) and programs it refuses (``inductor_artifact.Unsupported``: updated buffers,
inputs between weights, a graph specialised to its traced shapes) are saved instead as the
program, wrapped and converted to its precision (``compiled.pt2``), with Inductor's compiled
kernels (``inductor.bin``, from ``torch.compiler.save_cache_artifacts``): loading restores
those kernels into Inductor's caches first, so compiling again with torch.compile is a cache
hit, seconds rather than minutes. (AOTInductor packages are what the CPU target builds; loading a
CUDA one crashes the process with torch 2.11 on CUDA 13, so the GPU path does not use them.)

The batch dimension is compiled dynamic, once, so every CUDA-graph bucket reuses one
compiled graph. Instances of a version on one device share the compiled module and its
weights (inference reads them only); each has its own stream, buffers and graphs. The
module is released when the last instance using it closes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import cudnn_fused, inductor_artifact
from enginehouse.backends.graph_setup import input_specs
from enginehouse.backends.torch_quantize import QUANTIZED, quantize
from enginehouse.config import model_config
from enginehouse.config.build_spec import engine_precision
from enginehouse.errors import ModelLoadError

log = logging.getLogger(__name__)

PROGRAM = "compiled.pt2"
KERNELS = "inductor.bin"
# The artefacts that acquire() loads (the others are loaded per instance).
SHARED_ARTEFACTS = (inductor_artifact.ARTIFACT, PROGRAM)

_LOCK = threading.Lock()


@dataclass(slots=True)
class _Shared:
    run: Any
    users: int


_SHARED: dict[tuple[str, int], _Shared] = {}


def compile_mode(autotune: bool) -> str | None:
    """torch.compile's mode: our own CUDA graphs replace Inductor's."""
    return "max-autotune-no-cudagraphs" if autotune else None


def compile_module(
    torch: Any, module: Any, config: mc.ModelConfig, device: str, autotune: bool
) -> Any:
    """torch.compile ``module`` with a dynamic batch and run it once per specialisation
    (batch 1 and batch 2), so no request pays for compilation."""
    compiled = torch.compile(module, dynamic=None, mode=compile_mode(autotune))
    specs = input_specs(torch, config)
    if config.max_batch_size <= 0 or any(d < 1 for dims, _ in specs for d in dims):
        return compiled
    with torch.inference_mode():
        for batch in sorted({1, min(2, config.max_batch_size)}, reverse=True):
            inputs = zero_inputs(torch, config, device, batch)
            if batch > 1:  # bounds come from the program's own batch range
                for tensor in inputs:
                    torch._dynamo.mark_dynamic(tensor, 0)
            compiled(*inputs)
    torch.cuda.synchronize(device)
    return compiled


def zero_inputs(torch: Any, config: mc.ModelConfig, device: str, rows: int) -> list[Any]:
    """Zero inputs of ``rows`` rows (no batch dim for non-batching models; variable dims
    at 1) on ``device``."""
    batch = (rows,) if config.max_batch_size > 0 else ()
    return [
        torch.zeros((*batch, *(max(d, 1) for d in dims)), dtype=dtype, device=device)
        for dims, dtype in input_specs(torch, config)
    ]


def module_on(torch: Any, path: Path, config: mc.ModelConfig, device: str, precision: str) -> Any:
    """The saved program at ``path`` on ``device``, its linear layers quantised when the
    precision asks for it (the cache keeps the bf16 program): what both the build and every
    load compile."""
    from enginehouse.backends.torch_programs import load_program, program_on

    cudnn_fused.register(torch)  # the builder may have fused the program's convolutions
    module = program_on(load_program(path, config.name), device)
    if precision in QUANTIZED:
        example = zero_inputs(torch, config, device, 1)
        module = quantize(torch, module, precision, config.name, example)
    return module


def acquire(torch: Any, path: Path, config: mc.ModelConfig, index: int) -> Any:
    """The shared compiled module of ``path`` on GPU ``index``, compiling it if needed."""
    from enginehouse.backends.torch_programs import TORCH_LOCK

    key = (str(path), index)
    with _LOCK:
        shared = _SHARED.get(key)
        if shared is not None:
            shared.users += 1
            return shared.run
    with TORCH_LOCK:  # Dynamo and Inductor are not thread-safe while compiling
        with _LOCK:
            shared = _SHARED.get(key)
            if shared is not None:
                shared.users += 1
                return shared.run
        started = time.perf_counter()
        device = f"cuda:{index}"
        if path.name == inductor_artifact.ARTIFACT:
            run = inductor_artifact.load(torch, path, device, config.name)
            how = "loaded"
            if run.by_batch:
                sizes = ",".join(map(str, sorted(run.by_batch)))
                how += f" with fixed-batch engines for batch {sizes}"
        else:
            run, how = _compile_cached(torch, path, config, device), "compiled from cached kernels"
        log.info(
            "model '%s': engine %s onto %s in %.1f s",
            config.name,
            how,
            device,
            time.perf_counter() - started,
        )
        with _LOCK:
            _SHARED[key] = _Shared(run, 1)
        return run


def _compile_cached(torch: Any, path: Path, config: mc.ModelConfig, device: str) -> Any:
    """torch.compile the saved program, its kernels restored into Inductor's caches first."""
    kernels = path.with_name(KERNELS)
    if kernels.is_file():
        torch.compiler.load_cache_artifacts(kernels.read_bytes())
    module = module_on(torch, path, config, device, engine_precision(config))
    autotune = model_config.flag_parameter(config, "engine_autotune", False)
    try:
        # Every kernel is in the cache: no pool of compile workers to start.
        with torch._inductor.config.patch(compile_threads=1):
            return compile_module(torch, module, config, device, autotune)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model '{config.name}': torch.compile failed: {exc}") from None


def release(path: Path, index: int) -> None:
    """One instance stopped using the module; the last one frees it."""
    key = (str(path), index)
    with _LOCK:
        shared = _SHARED.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users <= 0:
            del _SHARED[key]
