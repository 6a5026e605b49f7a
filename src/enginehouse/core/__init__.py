"""The in-process server: registry, request path, request and response types."""

from enginehouse.core.server import ControlMode, ServerCore
from enginehouse.messages import InferInput, InferRequest, InferResponse, OutputTensor

__all__ = [
    "ControlMode",
    "InferInput",
    "InferRequest",
    "InferResponse",
    "OutputTensor",
    "ServerCore",
]
