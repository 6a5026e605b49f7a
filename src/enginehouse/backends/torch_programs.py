"""Loading PyTorch sources: torch itself, exported programs, TorchScript modules, and moving a
program to a device. Shared by the backend (which serves them) and the compile cache of
torch.compile engines, which both need them and must not import each other.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from enginehouse.backends.graph_setup import SETUP_LOCK
from enginehouse.errors import ModelLoadError


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            "the pytorch backend needs PyTorch: pip install 'enginehouse[torch]'"
        ) from None
    # Request tensors are read-only views over the request body, and engines only read
    # their inputs: torch's warning about it is nothing an operator could act on.
    warnings.filterwarnings(
        "ignore", message="The given NumPy array is not writable", category=UserWarning
    )
    return torch


# torch.export's loader and Inductor keep process-wide state: one load or build at a time.
# The same lock as CUDA-graph captures, which a compile in another thread would break.
TORCH_LOCK = SETUP_LOCK


def is_onnx(path: Path) -> bool:
    """ONNX sources (``default_model_filename: "model.onnx"``) are converted by the builder."""
    return path.suffix == ".onnx"


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


def program_on(program: Any, device: str) -> Any:
    """The program's module with everything on ``device``: parameters and buffers, lifted
    constants (plain attributes that ``Module.to`` misses) and the devices that tracing on
    the CPU wrote into ops such as ``arange(..., device=cpu)``."""
    torch = import_torch()
    if device == "cpu":
        return program.module()
    target = torch.device(device)
    try:
        from torch.export.passes import move_to_device_pass

        return move_to_device_pass(program, target).module()
    except Exception:
        module = program.module().to(device)
    for node in module.graph.nodes:
        found = node.kwargs.get("device")
        if isinstance(found, torch.device) and found.type == "cpu":
            node.update_kwarg("device", target)
    module.recompile()
    for sub in module.modules():
        for key, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.device != target:
                setattr(sub, key, value.to(target))
    return module


def program_arity(path: Path, model: str) -> list[int]:
    """[inputs, outputs] of an exported program (loading it takes seconds for big models,
    so the loader remembers this in the engine cache's source facts)."""
    signature = load_program(path, model).graph_signature
    return [len(list(signature.user_inputs)), len(list(signature.user_outputs))]


def load_program(path: Path, model: str) -> Any:
    torch = import_torch()
    try:
        with TORCH_LOCK:
            return torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for unreadable archives
        raise ModelLoadError(
            f"model '{model}': cannot load ExportedProgram {path.name}: {exc}"
        ) from None
