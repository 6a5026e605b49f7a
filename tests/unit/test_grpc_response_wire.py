"""A large ModelInferResponse sent as pieces (the outputs' own memory after the rest of the
message) parses into the same message protobuf makes of it whole."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from enginehouse.frontends.grpc.codec import encode_infer_response, encode_infer_response_wire
from enginehouse.messages import InferResponse, OutputTensor


def _response(size: int) -> InferResponse:
    big = np.arange(size, dtype=np.float32).reshape(1, size)
    shared = OutputTensor(
        "IN_REGION", "FP32", (1, 4), np.empty(0, np.uint8), {"shared_memory_region": "r"}
    )
    small = OutputTensor("SMALL", "INT64", (2,), np.array([7, -1], np.int64))
    return InferResponse(
        "m", "1", "x", [OutputTensor("BIG", "FP32", (1, size), big), shared, small]
    )


def test_pieces_parse_into_the_whole_message() -> None:
    response = _response(1 << 18)
    parts = encode_infer_response_wire(response)
    assert isinstance(parts, list)
    assert any(isinstance(p, memoryview) and p.nbytes == 1 << 20 for p in parts)
    whole = encode_infer_response(response)
    parsed = pb.ModelInferResponse.FromString(b"".join(bytes(p) for p in parts))
    assert parsed == whole
    assert list(parsed.raw_output_contents)[1] == b""  # the region's output keeps its place
    got = np.frombuffer(parsed.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(got, np.arange(1 << 18, dtype=np.float32))


def test_small_responses_are_one_piece() -> None:
    response = _response(16)
    wire = encode_infer_response_wire(response)
    assert isinstance(wire, bytes)
    assert pb.ModelInferResponse.FromString(wire) == encode_infer_response(response)
