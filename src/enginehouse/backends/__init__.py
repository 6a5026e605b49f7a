"""Runtimes that serve models, one module each, chosen by a config's backend/platform."""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from enginehouse.backends.base import Backend, Engine, Placement
from enginehouse.backends.onnxruntime import OnnxRuntimeBackend
from enginehouse.backends.torch import TorchBackend
from enginehouse.errors import ModelLoadError

_BACKENDS: list[Backend] = [OnnxRuntimeBackend(), TorchBackend()]


def register_backend(backend: Backend) -> None:
    """Serve models whose config names ``backend.name`` (or its platform) with ``backend``,
    in this process: how a runtime outside this package (the testing API's fake) plugs in."""
    if all(known.name != backend.name for known in _BACKENDS):
        _BACKENDS.append(backend)


def backend_for(config: mc.ModelConfig) -> Backend:
    """The backend a config names by ``backend`` or ``platform``, or a load error."""
    for backend in _BACKENDS:
        if config.backend == backend.name or config.platform == backend.platform:
            return backend
    wanted = config.backend or config.platform
    known = ", ".join(f"{b.name} ({b.platform})" for b in _BACKENDS)
    raise ModelLoadError(
        f"model '{config.name}': unsupported backend/platform '{wanted}'; this server has {known}"
    )


def backend_for_file(filenames: list[str]) -> Backend | None:
    """The backend whose default model file is among ``filenames`` (for auto-complete)."""
    for backend in _BACKENDS:
        if any(name in filenames for name in backend.default_filenames):
            return backend
    return None


__all__ = [
    "Backend",
    "Engine",
    "Placement",
    "backend_for",
    "backend_for_file",
    "register_backend",
]
