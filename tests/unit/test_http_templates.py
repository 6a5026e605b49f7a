"""Remembered JSON headers of binary-tensor HTTP requests: a request decoded from a
remembered header is the request the full decode makes, with the same errors; headers that
do not say everything are always decoded in full; the memory stays bounded."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from enginehouse import datatypes
from enginehouse.errors import EnginehouseError
from enginehouse.frontends.http.codec import OutputOptions, decode_infer_request
from enginehouse.frontends.http.templates import HeaderTemplates
from enginehouse.messages import InferRequest


def body(
    seed: int = 0, request_id: str = "", extra_input: dict[str, Any] | None = None
) -> tuple[bytes, int]:
    """A binary-tensor body (two INT64 [2, 8] inputs) and its header's length."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1000, (2, 8), np.int64) for _ in range(2)]
    inputs: list[dict[str, Any]] = [
        {
            "name": name,
            "datatype": "INT64",
            "shape": [2, 8],
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in zip(("input_ids", "attention_mask"), arrays)
    ]
    if extra_input is not None:
        inputs.append(extra_input)
    document: dict[str, Any] = {
        "inputs": inputs,
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        "parameters": {"priority": 1},
    }
    if request_id:
        document["id"] = request_id
    header = orjson.dumps(document)
    raw = b"".join(a.tobytes() for a in arrays)
    if extra_input is not None and extra_input.get("datatype") == "BYTES":
        raw += datatypes.serialize_bytes(np.array([b"abc"], dtype=np.object_))
    return header + raw, len(header)


def same(got: tuple[InferRequest, OutputOptions], want: tuple[InferRequest, OutputOptions]) -> None:
    (request, options), (expected, expected_options) = got, want
    assert (request.model_name, request.model_version, request.id) == (
        expected.model_name,
        expected.model_version,
        expected.id,
    )
    assert request.outputs == expected.outputs and request.parameters == expected.parameters
    assert options == expected_options
    assert [(i.name, i.datatype, i.shape) for i in request.inputs] == [
        (i.name, i.datatype, i.shape) for i in expected.inputs
    ]
    for a, b in zip(request.inputs, expected.inputs):
        assert a.data.dtype == b.data.dtype
        np.testing.assert_array_equal(a.data, b.data)


def same_error(templates: HeaderTemplates, raw: bytes, header_length: int | None) -> None:
    """The body is refused with the error the full decode gives it."""
    with pytest.raises(EnginehouseError) as remembered:
        templates.decode("bert", "", raw, header_length)
    with pytest.raises(EnginehouseError) as full:
        decode_infer_request("bert", "", raw, header_length)
    assert remembered.value.message == full.value.message


def test_a_header_seen_before_is_not_parsed_and_decodes_to_the_same_request() -> None:
    templates = HeaderTemplates()
    first, length = body(0)
    templates.decode("bert", "2", first, length)
    later, _ = body(1)  # the same header, other tensors
    got = templates.decode("bert", "2", later, length)
    assert templates.hits == 1
    same(got, decode_infer_request("bert", "2", later, length))
    # The tensors are this body's bytes, not the first one's.
    assert not np.array_equal(
        got[0].inputs[0].data, decode_infer_request("bert", "2", first, length)[0].inputs[0].data
    )


def test_the_model_comes_from_the_url_and_each_request_has_its_own_parameters() -> None:
    templates = HeaderTemplates()
    raw, length = body(0, request_id="r1")
    templates.decode("bert", "", raw, length)
    one, _ = templates.decode("bert", "", raw, length)
    other, _ = templates.decode("other", "3", raw, length)
    assert templates.hits == 2
    assert (one.model_name, one.model_version, one.id) == ("bert", "", "r1")
    assert (other.model_name, other.model_version) == ("other", "3")
    assert one.outputs is not None and other.outputs is not None
    one.parameters["priority"] = 7
    one.outputs.append("extra")
    assert other.parameters == {"priority": 1} and other.outputs == ["logits"]


def test_a_body_of_another_length_is_decoded_in_full_with_its_error() -> None:
    templates = HeaderTemplates()
    raw, length = body(0)
    templates.decode("bert", "", raw, length)
    for broken in (raw[:-8], raw + b"\0" * 8):
        same_error(templates, broken, length)
    assert templates.hits == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"name": "mask", "datatype": "INT32", "shape": [2], "data": [1, 2]},
        {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}},
    ],
    ids=["json data", "BYTES"],
)
def test_headers_that_do_not_say_everything_are_always_decoded(extra: dict[str, Any]) -> None:
    templates = HeaderTemplates()
    raw, length = body(0, extra_input=extra)
    for _ in range(3):
        same(
            templates.decode("bert", "", raw, length), decode_infer_request("bert", "", raw, length)
        )
    assert templates.hits == 0


def test_json_only_bodies_and_bad_header_lengths_take_the_full_decode() -> None:
    templates = HeaderTemplates()
    raw, _ = body(0)
    for header_length in (None, 0, len(raw) + 1, -1):
        same_error(templates, raw, header_length)
    assert templates.hits == 0


def test_the_memory_is_emptied_when_full() -> None:
    templates = HeaderTemplates(capacity=4)
    for i in range(4):
        raw, length = body(0, request_id=f"id-{i}")
        templates.decode("bert", "", raw, length)
    raw, length = body(0, request_id="id-0")
    templates.decode("bert", "", raw, length)
    assert templates.hits == 1
    raw, length = body(0, request_id="id-new")  # the fifth kind: the memory starts over
    templates.decode("bert", "", raw, length)
    raw, length = body(0, request_id="id-1")
    templates.decode("bert", "", raw, length)
    assert templates.hits == 1
    assert len(templates._known) == 2
