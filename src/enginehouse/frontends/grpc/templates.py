"""ModelInfer requests decoded once per kind: a client's steady stream of requests differs
only in its tensors' bytes.

Decoding a ModelInferRequest walks every input's name, datatype and shape through protobuf's
Python objects: 11-16 us of the core's time for three small inputs on the 2-core machine,
the largest single share of the event loop in a profile of served BERT. Clients send the
same metadata again and again. So the serialized metadata (the message's bytes before its
raw_input_contents, which a canonical serialization puts last) is remembered with what it
decoded to and where its tensors lie. A request of the same size that starts with those
bytes and has its tensors' tags and lengths where they lay is that kind: it is not parsed
at all, and its tensors are views of it.

A request is remembered only when its metadata alone says everything: no tensor or output
parameters (shared memory, classification), no typed contents, no BYTES tensors, one raw
entry per input, and a canonical serialization (checked byte for byte when the kind is
remembered); everything else is decoded as always. Request parameters are part of the
metadata (perf_analyzer sends one with every request) and each request gets its own copy.
A match is never wrong: the remembered metadata holds no raw_input_contents field, and the
rest of a matching message is exactly its raw entries, so it decodes to the same metadata
and these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from enginehouse import datatypes
from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.frontends.grpc.codec import decode_infer_request
from enginehouse.frontends.grpc.frames import varint
from enginehouse.frontends.request_kinds import RequestKind, TensorPlace
from enginehouse.messages import InferRequest

_RAW_TAG = pb.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER << 3 | 2
# Kinds of requests remembered at once (the memory is emptied when full: a client that
# sends a new id with every request fills it with kinds never seen again), and the longest
# metadata remembered.
CAPACITY = 256
MAX_METADATA_BYTES = 4096
# Kinds remembered per message size.
KINDS_PER_SIZE = 8


@dataclass(frozen=True, slots=True)
class _Template:
    """What a kind of request decoded to, but for its tensors: its metadata bytes, the
    message's whole size, and where each tensor's raw entry lies (its tag and length prefix
    at ``prefixes``, its bytes at the kind's tensor places)."""

    key: bytes
    size: int
    model_name: str
    model_version: str
    kind: RequestKind
    prefixes: tuple[tuple[int, bytes], ...]

    def matches(self, payload: bytes) -> bool:
        """Whether ``payload`` is this metadata followed by exactly its raw entries."""
        if len(payload) != self.size or not payload.startswith(self.key):
            return False
        return all(payload.startswith(prefix, at) for at, prefix in self.prefixes)

    def request(self, payload: bytes) -> InferRequest:
        """A request of this kind, its tensors views of ``payload`` (which matches)."""
        return self.kind.request(self.model_name, self.model_version, payload)


def _prefix(size: int) -> bytes:
    """A raw_input_contents entry's tag and shortest length prefix, as serializers write it."""
    return bytes([_RAW_TAG]) + varint(size)


def _metadata(payload: bytes, contents: list[bytes]) -> bytes | None:
    """The bytes before the raw contents, where they all come last; None otherwise."""
    cut = len(payload) - sum(len(_prefix(len(raw))) + len(raw) for raw in contents)
    if not contents or cut <= 0 or cut > MAX_METADATA_BYTES or payload[cut] != _RAW_TAG:
        return None
    return payload[:cut]


def _template(
    message: pb.ModelInferRequest,
    request: InferRequest,
    payload: bytes,
    contents: list[bytes],
    cut: int,
) -> _Template | None:
    """The kind of ``message`` (already decoded into ``request``; ``contents`` its raw
    contents, which start at ``cut``), where its metadata alone says everything: None
    unless everything from ``cut`` on is the raw contents, one after another, each with its
    shortest length prefix, so that the bytes before ``cut`` are the whole metadata."""
    if len(contents) != len(message.inputs):
        return None
    for tensor in message.inputs:
        if tensor.parameters or tensor.HasField("contents"):
            return None
    if any(output.parameters for output in message.outputs):
        return None
    places = []
    prefixes = []
    position = cut
    for item, raw in zip(request.inputs, contents):
        dtype = datatypes.from_name(item.datatype)
        prefix = _prefix(len(raw))
        # BYTES elements are parsed, not viewed.
        if dtype.name == "BYTES" or not payload.startswith(prefix, position):
            return None
        prefixes.append((position, prefix))
        start = position + len(prefix)
        position = start + len(raw)
        places.append(
            TensorPlace(item.name, item.datatype, np.dtype(dtype.numpy), item.shape, start)
        )
    if position != len(payload):
        return None
    return _Template(
        payload[:cut],
        len(payload),
        request.model_name,
        request.model_version,
        RequestKind.of(request, places),
        tuple(prefixes),
    )


class RequestTemplates:
    """The kinds of ModelInfer requests seen, by the size of their messages (the metadata
    fixes every tensor's size, so a kind has one size; a few kinds may share it). A kind is
    remembered the second time it is seen: one sighting costs only its metadata bytes."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        # By message size, the kinds of that size (models with names of one length and the
        # same shapes share one), newest last.
        self._known: dict[int, list[_Template]] = {}
        self._seen: set[bytes] = set()
        self.hits = 0

    def decode(
        self, payload: bytes | memoryview, regions: SharedMemoryRegions | None
    ) -> InferRequest:
        """The core request for a serialized ModelInferRequest, as decode_infer_request
        makes it (the same request, the same errors)."""
        data = payload if isinstance(payload, bytes) else bytes(payload)
        for known in self._known.get(len(data), ()):
            if known.matches(data):
                self.hits += 1
                return known.request(data)
        message = pb.ModelInferRequest.FromString(data)
        contents = list(message.raw_input_contents)
        request = decode_infer_request(message, contents, regions)
        key = _metadata(data, contents)
        if key is None:
            return request
        if key not in self._seen:
            if len(self._seen) >= self.capacity:
                self._seen.clear()
            self._seen.add(key)
        elif (template := _template(message, request, data, contents, len(key))) is not None:
            if len(self._known) >= self.capacity:
                self._known.clear()
            same_size = self._known.setdefault(template.size, [])
            same_size.append(template)
            del same_size[:-KINDS_PER_SIZE]
        return request
