from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from enginehouse.errors import InvalidArgumentError, UnsupportedError
from enginehouse.frontends.http.codec import (
    OutputOptions,
    decode_infer_request,
    encode_infer_response,
)
from enginehouse.messages import InferResponse, OutputTensor


def test_json_and_binary_inputs_mixed() -> None:
    raw = np.arange(4, dtype=np.float32)
    header = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "b", "datatype": "BYTES", "shape": [2], "data": ["x", "yz"]},
                {"name": "c", "datatype": "INT8", "shape": [2, 1], "data": [[1], [-2]]},
            ],
            "outputs": [{"name": "o", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True, "priority": 2},
        }
    ).encode()
    request, options = decode_infer_request("m", "", header + raw.tobytes(), len(header))
    assert request.id == "r1"
    a, b, c = request.inputs
    np.testing.assert_array_equal(a.data, raw.reshape(2, 2))
    assert b.data.tolist() == [b"x", b"yz"]
    assert c.data.dtype == np.int8 and c.data.tolist() == [[1], [-2]]
    assert request.outputs == ["o"]
    assert options.binary_default is True and options.binary == {"o": False}
    assert request.parameters["priority"] == 2


@pytest.mark.parametrize(
    "document",
    [
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [2]}]},
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0]}]},
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": "2", "data": [1.0]}]},
        {"inputs": [{"name": "a", "datatype": "UINT8", "shape": [1], "data": [256]}]},
        {"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [5]}]},
        {"inputs": [{"datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"inputs": [], "id": 5},
    ],
)
def test_malformed_inputs(document: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        decode_infer_request("m", "", json.dumps(document).encode(), None)


def test_shared_memory_tensors_need_the_server_regions() -> None:
    document = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [1],
                "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4},
            }
        ]
    }
    with pytest.raises(UnsupportedError, match="shared-memory"):
        decode_infer_request("m", "", json.dumps(document).encode(), None)


def test_response_binary_and_json_outputs() -> None:
    response = InferResponse(
        "m",
        "1",
        "r",
        [
            OutputTensor("x", "FP16", (2,), np.array([1.5, 2.0], np.float16)),
            OutputTensor("s", "BYTES", (1,), np.array([b"ok"], dtype=np.object_)),
        ],
    )
    header, buffers, length = encode_infer_response(response, OutputOptions(False, {"x": True}))
    assert length == len(header)
    document = orjson.loads(header)
    assert document["id"] == "r"
    assert document["outputs"][0]["parameters"]["binary_data_size"] == 4
    assert np.frombuffer(buffers[0], np.float16).tolist() == [1.5, 2.0]
    assert document["outputs"][1]["data"] == ["ok"]
    header, buffers, length = encode_infer_response(response, OutputOptions(False, {}))
    assert length is None and not buffers
    assert orjson.loads(header)["outputs"][0]["data"] == [1.5, 2.0]
