"""enginehouse: serve ONNX and PyTorch models over the KServe v2 / Triton protocol."""

from enginehouse.core import (
    ControlMode,
    InferInput,
    InferRequest,
    InferResponse,
    OutputTensor,
    ServerCore,
)
from enginehouse.repository import ModelRepository
from enginehouse.version import __version__

__all__ = [
    "ControlMode",
    "InferInput",
    "InferRequest",
    "InferResponse",
    "ModelRepository",
    "OutputTensor",
    "ServerCore",
    "__version__",
]
