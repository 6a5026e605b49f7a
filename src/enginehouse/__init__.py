"""enginehouse: serve ONNX and PyTorch models over the KServe v2 / Triton protocol."""

__version__ = "0.1.0"

from enginehouse.core import (
    ControlMode,
    InferInput,
    InferRequest,
    InferResponse,
    OutputTensor,
    ServerCore,
)
from enginehouse.repository import ModelRepository

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
