"""The PyTorch backend: torch.export programs (``model.pt2``) served as AOTInductor engines,
and TorchScript modules (``model.pt``, Triton's PyTorch backend's file) served frozen.

A ``torch.export`` program is the source; the engine builder compiles it ahead of time into
an AOTInductor package for the target, which loads in milliseconds. With ``engine_build:
false`` the exported program runs as it is (eager), which is slower but needs no compiler.
Inputs and outputs follow the config's order; the program takes the inputs positionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends import torch_compile
from enginehouse.backends.base import Backend, Engine, Placement, SourceFacts
from enginehouse.backends.cuda_graphs import CudaGraphEngine
from enginehouse.backends.graph_setup import default_buckets
from enginehouse.backends.torch_programs import (
    TORCH_LOCK,
    import_torch,
    is_onnx,
    is_torchscript,
    load_program,
    load_torchscript,
    program_arity,
    program_on,
)
from enginehouse.config import model_config
from enginehouse.config.autocomplete import GraphSignature, read_signature
from enginehouse.config.build_spec import engine_precision, static_batch_sizes
from enginehouse.errors import ModelLoadError

TORCH_BACKEND = "pytorch"
TORCH_PLATFORM = "pytorch_libtorch"


class TorchEngine(Engine):
    """A callable (AOTInductor runner or exported module) over positional tensors."""

    def __init__(self, run: Any, config: mc.ModelConfig, device: str) -> None:
        self._torch = import_torch()
        self._run = run
        self._inputs = tuple(t.name for t in config.input)
        self._index = {t.name: i for i, t in enumerate(config.output)}
        self._device = device

    def execute(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str]
    ) -> list[np.ndarray]:
        torch = self._torch
        tensors = [
            torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self._device) for n in self._inputs
        ]
        with torch.inference_mode():
            results = self._run(*tensors)
        if isinstance(results, torch.Tensor):
            results = (results,)
        return [results[self._index[name]].detach().cpu().numpy() for name in output_names]

    def close(self) -> None:
        self._run = None


class TorchBackend(Backend):
    """Serves ``model.pt2`` (torch.export) sources, compiled by the engine builder."""

    name = TORCH_BACKEND
    platform = TORCH_PLATFORM
    # Triton's PyTorch backend reads model.pt (TorchScript); a torch.export program is found
    # by its own name when no model.pt is there.
    default_filenames = ("model.pt", "model.pt2")

    def complete_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> mc.ModelConfig:
        if not config.input or not config.output:
            raise ModelLoadError(
                f"model '{config.name}': the pytorch backend needs inputs and outputs in "
                "config.pbtxt (an exported program does not name them)"
            )
        if not config.platform:
            config.platform = TORCH_PLATFORM
        return config

    def remembered_signature(
        self, config: mc.ModelConfig, model_file: Path, facts: SourceFacts
    ) -> object | None:
        """An exported program's arity (loading it takes seconds for a big model); ONNX
        sources' graph signatures."""
        if model_file.suffix == ".pt2":
            return facts.remembered(
                model_file, "program_arity", lambda path: program_arity(path, config.name)
            )
        return super().remembered_signature(config, model_file, facts)

    def check_config(
        self, config: mc.ModelConfig, model_file: Path, signature: object | None = None
    ) -> None:
        if is_torchscript(model_file):
            script = load_torchscript(model_file, config.name)
            arguments = len(list(script.graph.inputs())) - 1  # the first is self
            if arguments != len(config.input):
                raise ModelLoadError(
                    f"model '{config.name}': the TorchScript module takes {arguments} inputs, "
                    f"the config declares {len(config.input)}"
                )
            return
        if is_onnx(model_file):
            graph = (
                signature if isinstance(signature, GraphSignature) else read_signature(model_file)
            )
            inputs, outputs = len(graph.inputs), len(graph.outputs)
        elif isinstance(signature, list | tuple):
            inputs, outputs = signature
        else:
            inputs, outputs = program_arity(model_file, config.name)
        if inputs != len(config.input):
            raise ModelLoadError(
                f"model '{config.name}': the exported program takes {inputs} inputs, "
                f"the config declares {len(config.input)}"
            )
        if outputs != len(config.output):
            raise ModelLoadError(
                f"model '{config.name}': the exported program returns {outputs} outputs, "
                f"the config declares {len(config.output)}"
            )

    def has_gpu(self) -> bool:
        try:
            torch = import_torch()
        except ModelLoadError:
            return False
        return bool(torch.cuda.is_available())

    def gpu_count(self) -> int:
        return int(import_torch().cuda.device_count()) if self.has_gpu() else 0

    def free_device_memory(self, placement: Placement) -> int | None:
        if placement.kind != mc.ModelInstanceGroup.KIND_GPU:
            return None
        torch = import_torch()
        free, _ = torch.cuda.mem_get_info(placement.device_id)
        return int(free)

    def load(
        self,
        config: mc.ModelConfig,
        model_file: Path,
        placement: Placement,
        optimized: bool = False,
    ) -> Engine:
        torch = import_torch()
        if placement.kind != mc.ModelInstanceGroup.KIND_GPU:
            return TorchEngine(_load_runner(torch, config, model_file, "cpu", 0), config, "cpu")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"model '{config.name}': KIND_GPU but CUDA is not available")
        index = placement.device_id
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"model '{config.name}': instance_group names GPU {index}, but this machine "
                f"has {torch.cuda.device_count()}"
            )
        device = f"cuda:{index}"
        try:
            with torch.cuda.device(index):
                shared = model_file.name in torch_compile.SHARED_ARTEFACTS
                runner = (
                    torch_compile.acquire(torch, model_file, config, index)
                    if shared
                    else _load_runner(torch, config, model_file, device, index)
                )
                buckets = (
                    graph_buckets(config)
                    if model_config.flag_parameter(config, "cuda_graphs", True)
                    else []
                )
                try:
                    # The builder's fp16 engines narrow every floating input first.
                    half_inputs = shared and engine_precision(config) == "fp16"
                    engine = CudaGraphEngine(torch, runner, config, device, buckets, half_inputs)
                except BaseException:
                    if shared:
                        torch_compile.release(model_file, index)
                    raise
                if shared:
                    engine.on_close = lambda: torch_compile.release(model_file, index)
                return engine
        except torch.cuda.OutOfMemoryError as exc:
            free, total = torch.cuda.mem_get_info(index)
            raise ModelLoadError(
                f"model '{config.name}': out of GPU memory on {device} loading an instance "
                f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB free): {str(exc).splitlines()[0]}"
            ) from None


def graph_buckets(config: mc.ModelConfig) -> list[int]:
    """The batch sizes to capture CUDA graphs for: ``cuda_graph_batch_buckets`` (e.g.
    ``"1,8,32"``) or powers of two up to max_batch_size plus the preferred batch sizes; and
    in either case the sizes that fixed-batch engines are built for
    (``engine_static_batch_sizes``), whose kernels only a graph of their own size runs."""
    static = static_batch_sizes(config)
    text = model_config.parameter(config, "cuda_graph_batch_buckets").strip()
    if not text:
        return default_buckets(
            config.max_batch_size,
            [*config.dynamic_batching.preferred_batch_size, *static],
        )
    try:
        sizes = sorted({int(item) for item in text.split(",")})
    except ValueError:
        sizes = [0]
    if sizes[0] < 1 or sizes[-1] > max(config.max_batch_size, 1):
        raise ModelLoadError(
            f"model '{config.name}': cuda_graph_batch_buckets must be batch sizes between 1 and "
            f"max_batch_size ({config.max_batch_size}), got '{text}'"
        )
    return sorted({*sizes, *static})


def _load_runner(
    torch: Any, config: mc.ModelConfig, model_file: Path, device: str, index: int
) -> Any:
    """The callable an engine runs: AOTInductor runner, TorchScript or exported module."""
    if model_file.suffix == ".pt2" and model_file.name.startswith("aoti"):
        try:
            with TORCH_LOCK:
                if device == "cpu":
                    return torch._inductor.aoti_load_package(str(model_file))
                return torch._inductor.aoti_load_package(str(model_file), device_index=index)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"model '{config.name}': cannot load AOTInductor package: {exc}"
            ) from None
    if is_torchscript(model_file):
        return load_torchscript(model_file, config.name).to(device)
    if is_onnx(model_file):  # engine_build: false — the converted graph, run eagerly
        from enginehouse.backends.onnx_to_torch import onnx_module

        return onnx_module(model_file, config.name).to(device)
    return program_on(load_program(model_file, config.name), device)
