"""The typed messages that cross the frontend/core boundary and reach the scheduler.

A frontend turns wire bytes into an :class:`InferRequest` and an :class:`InferResponse`
back into bytes; nothing else crosses. Tensors travel by reference as NumPy arrays, views
over the request body where the wire format allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferInput:
    """One input tensor as the client sent it: wire datatype name, shape and data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(slots=True)
class OutputTensor:
    """One output tensor of a response. An output written into a shared-memory region has
    the region's parameters (``shared_memory_region``, ``shared_memory_byte_size``) and no
    data for the wire."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SharedMemoryTarget:
    """Where a requested output goes instead of the response: bytes of a registered
    system shared-memory region, from ``offset`` (within the region) for ``byte_size``."""

    region: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class InferRequest:
    """An inference request for one model version ("" means the policy's choice)."""

    model_name: str
    inputs: list[InferInput]
    model_version: str = ""
    id: str = ""
    # Names of the outputs to return; None returns every output.
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # perf_counter_ns when the frontend received the request; 0 means "when the core did".
    arrival_ns: int = 0
    # perf_counter_ns when the core accepted it (validated); queue time counts from here.
    admitted_ns: int = 0
    # Outputs to write into shared-memory regions rather than send, by output name.
    output_regions: dict[str, SharedMemoryTarget] | None = None


@dataclass(slots=True)
class InferResponse:
    """The outputs of one request, in the order the request asked for them."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """Name, datatype and shape (-1 for variable, batch dim included) of a model tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What KServe v2's model metadata endpoint returns."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """A row of the repository index: a model (and version) and its state."""

    name: str
    version: str
    state: str
    reason: str
