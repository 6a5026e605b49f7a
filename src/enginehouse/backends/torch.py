"""The PyTorch backend: torch.export programs (``model.pt2``) served as AOTInductor engines,
and TorchScript modules (``model.pt``, via ``default_model_filename``) served frozen.

A ``torch.export`` program is the source; the engine builder compiles it ahead of time into
an AOTInductor package for the target, which loads in milliseconds. With ``engine_build:
false`` the exported program runs as it is (eager), which is slower but needs no compiler.
Inputs and outputs follow the config's order; the program takes the inputs positionally.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.base import Backend, Engine, Placement
from enginehouse.errors import ModelLoadError

TORCH_BACKEND = "pytorch"
TORCH_PLATFORM = "pytorch_libtorch"


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            "the pytorch backend needs PyTorch: pip install 'enginehouse[examples]' or torch"
        ) from None
    return torch


# torch.export's loader and Inductor keep process-wide state: one load or build at a time.
TORCH_LOCK = threading.RLock()


def is_torchscript(path: Path) -> bool:
    """TorchScript files are ``.pt``; torch.export programs and AOTInductor packages ``.pt2``."""
    return path.suffix == ".pt"


def load_torchscript(path: Path, model: str) -> Any:
    torch = import_torch()
    try:
        with TORCH_LOCK:
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model}': cannot load TorchScript {path.name}: {exc}"
        ) from None


def load_program(path: Path, model: str) -> Any:
    torch = import_torch()
    try:
        with TORCH_LOCK:
            return torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for unreadable archives
        raise ModelLoadError(
            f"model '{model}': cannot load ExportedProgram {path.name}: {exc}"
        ) from None


class TorchEngine(Engine):
    """A callable (AOTInductor runner or exported module) over positional tensors."""

    def __init__(
        self, run: Any, input_names: Sequence[str], output_names: Sequence[str], device: str
    ) -> None:
        self._torch = import_torch()
        self._run = run
        self._inputs = tuple(input_names)
        self._index = {name: i for i, name in enumerate(output_names)}
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
    default_filename = "model.pt2"

    def complete_config(self, config: mc.ModelConfig, model_file: Path) -> mc.ModelConfig:
        if not config.input or not config.output:
            raise ModelLoadError(
                f"model '{config.name}': the pytorch backend needs inputs and outputs in "
                "config.pbtxt (an exported program does not name them)"
            )
        if not config.platform:
            config.platform = TORCH_PLATFORM
        return config

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
        program = load_program(model_file, config.name)
        user_inputs = list(program.graph_signature.user_inputs)
        if len(user_inputs) != len(config.input):
            raise ModelLoadError(
                f"model '{config.name}': the exported program takes {len(user_inputs)} inputs, "
                f"the config declares {len(config.input)}"
            )
        outputs = list(program.graph_signature.user_outputs)
        if len(outputs) != len(config.output):
            raise ModelLoadError(
                f"model '{config.name}': the exported program returns {len(outputs)} outputs, "
                f"the config declares {len(config.output)}"
            )

    def has_gpu(self) -> bool:
        try:
            torch = import_torch()
        except ModelLoadError:
            return False
        return bool(torch.cuda.is_available())

    def load(
        self,
        config: mc.ModelConfig,
        model_file: Path,
        placement: Placement,
        optimized: bool = False,
    ) -> Engine:
        torch = import_torch()
        device = "cpu"
        if placement.kind == mc.ModelInstanceGroup.KIND_GPU:
            if not torch.cuda.is_available():
                raise ModelLoadError(f"model '{config.name}': KIND_GPU but CUDA is not available")
            device = f"cuda:{placement.device_id}"
        inputs = [t.name for t in config.input]
        outputs = [t.name for t in config.output]
        if model_file.suffix == ".pt2" and model_file.name.startswith("aoti"):
            try:
                with TORCH_LOCK:
                    runner = torch._inductor.aoti_load_package(str(model_file))
            except Exception as exc:
                raise ModelLoadError(
                    f"model '{config.name}': cannot load AOTInductor package: {exc}"
                ) from None
            return TorchEngine(runner, inputs, outputs, device)
        if is_torchscript(model_file):
            return TorchEngine(
                load_torchscript(model_file, config.name).to(device), inputs, outputs, device
            )
        module = load_program(model_file, config.name).module().to(device)
        return TorchEngine(module, inputs, outputs, device)
