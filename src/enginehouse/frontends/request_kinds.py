"""A kind of inference request, remembered: what its metadata decoded to and where in a
message its tensors' bytes lie.

Both frontends remember the kinds of small requests a client sends again and again (the
gRPC ModelInfer message's metadata, frontends/grpc/templates.py; the JSON header of an HTTP
request with binary tensors, frontends/http/templates.py), and make a later request of a
kind from its own bytes without parsing it. What such a request is made of is the same on
both protocols, and is kept here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from enginehouse.messages import InferInput, InferRequest


@dataclass(frozen=True, slots=True)
class TensorPlace:
    """One input of a kind: its name, datatype and shape, and where its bytes begin (its
    shape and datatype say how many there are)."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True, slots=True)
class RequestKind:
    """What a kind of request decoded to, but for the model it names (HTTP names it in the
    URL) and its tensors' bytes."""

    id: str
    inputs: tuple[TensorPlace, ...]
    outputs: tuple[str, ...] | None
    parameters: dict[str, Any]

    @classmethod
    def of(cls, request: InferRequest, inputs: list[TensorPlace]) -> RequestKind:
        """The kind of a decoded ``request``, whose tensors lie at ``inputs``."""
        return cls(
            request.id,
            tuple(inputs),
            tuple(request.outputs) if request.outputs is not None else None,
            dict(request.parameters),
        )

    def request(self, model_name: str, model_version: str, data: bytes) -> InferRequest:
        """A request of this kind for the model, its tensors views of ``data`` (the whole
        message: the places' offsets count from its start); its own copies of the output
        list and the parameters."""
        # An array over the buffer at the place's offset: the same read-only view as a
        # slice through np.frombuffer and a reshape, for two thirds of the cost.
        inputs = [
            InferInput(
                place.name,
                place.datatype,
                place.shape,
                np.ndarray(place.shape, place.dtype, data, place.offset),
            )
            for place in self.inputs
        ]
        return InferRequest(
            model_name=model_name,
            inputs=inputs,
            model_version=model_version,
            id=self.id,
            outputs=list(self.outputs) if self.outputs is not None else None,
            parameters=dict(self.parameters),
        )
