"""Remembered ModelInfer request kinds: a request decoded from a remembered kind is the
request the full decode makes, with the same errors; requests whose metadata does not say
everything, or that are not serialized canonically, are always decoded in full; the memory
stays bounded."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core.shared_memory import SharedMemoryRegions
from enginehouse.errors import EnginehouseError, InvalidArgumentError
from enginehouse.frontends.grpc.codec import decode_infer_request
from enginehouse.frontends.grpc.templates import RequestTemplates
from enginehouse.messages import InferRequest


def message(
    seed: int = 0, request_id: str = "", outputs: tuple[str, ...] = ()
) -> pb.ModelInferRequest:
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name="bert", model_version="2", id=request_id)
    for name in ("input_ids", "attention_mask"):
        request.inputs.add(name=name, datatype="INT64", shape=[2, 8])
        request.raw_input_contents.append(rng.integers(0, 1000, (2, 8), np.int64).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def same(got: InferRequest, want: InferRequest) -> None:
    assert (got.model_name, got.model_version, got.id) == (
        want.model_name,
        want.model_version,
        want.id,
    )
    assert got.outputs == want.outputs and got.parameters == want.parameters
    assert [(i.name, i.datatype, i.shape) for i in got.inputs] == [
        (i.name, i.datatype, i.shape) for i in want.inputs
    ]
    for a, b in zip(got.inputs, want.inputs):
        np.testing.assert_array_equal(a.data, b.data)


def test_a_kind_seen_twice_is_decoded_from_memory_as_the_full_decode_would() -> None:
    templates = RequestTemplates()
    for seed in range(5):
        wire = message(seed, outputs=("embedding",)).SerializeToString()
        got = templates.decode(wire, None)
        same(got, decode_infer_request(pb.ModelInferRequest.FromString(wire)))
    assert templates.hits == 3  # remembered at the second, used from the third on
    # Each request has lists of its own: one request's changes never reach the next.
    first = templates.decode(message(7, outputs=("embedding",)).SerializeToString(), None)
    assert first.outputs is not None
    first.outputs.append("other")
    first.parameters["x"] = 1
    second = templates.decode(message(8, outputs=("embedding",)).SerializeToString(), None)
    assert second.outputs == ["embedding"] and second.parameters == {}


def test_wrong_sizes_and_counts_fail_as_the_full_decode_fails() -> None:
    templates = RequestTemplates()
    for seed in range(3):
        templates.decode(message(seed).SerializeToString(), None)
    short = message(3)
    short.raw_input_contents[1] = short.raw_input_contents[1][:-1]
    with pytest.raises(InvalidArgumentError, match="expected 128 bytes of INT64"):
        templates.decode(short.SerializeToString(), None)
    missing = message(4)
    del missing.raw_input_contents[1]
    with pytest.raises(InvalidArgumentError) as from_memory:
        templates.decode(missing.SerializeToString(), None)
    with pytest.raises(InvalidArgumentError) as in_full:
        decode_infer_request(missing)
    assert from_memory.value.message == in_full.value.message


def test_request_parameters_are_remembered_and_each_request_has_its_own() -> None:
    templates = RequestTemplates()
    for seed in range(4):
        sent = message(seed)
        sent.parameters["priority"].int64_param = 2
        sent.parameters["triton_enable_empty_final_response"].bool_param = True
        got = templates.decode(sent.SerializeToString(), None)
        same(got, decode_infer_request(sent))
        assert got.parameters == {"priority": 2, "triton_enable_empty_final_response": True}
        got.parameters.clear()
    assert templates.hits == 2


def test_requests_whose_metadata_does_not_say_everything_are_decoded_in_full() -> None:
    templates = RequestTemplates()
    shared = message()
    shared.inputs[0].parameters["shared_memory_region"].string_param = "nowhere"
    shared.inputs[0].parameters["shared_memory_byte_size"].int64_param = 128
    del shared.raw_input_contents[0]
    output_region = message()
    output_region.outputs.add(name="embedding")
    output_region.outputs[0].parameters["shared_memory_region"].string_param = "elsewhere"
    output_region.outputs[0].parameters["shared_memory_byte_size"].int64_param = 64
    for _ in range(3):
        with pytest.raises(EnginehouseError, match="elsewhere"):
            templates.decode(output_region.SerializeToString(), SharedMemoryRegions())
    for _ in range(3):  # an unregistered region is named, every time
        with pytest.raises(EnginehouseError, match="nowhere"):
            templates.decode(shared.SerializeToString(), SharedMemoryRegions())
    assert templates.hits == 0


def test_a_message_with_its_tensors_before_its_metadata_is_never_taken_from_memory() -> None:
    templates = RequestTemplates()
    for seed in range(4):
        whole = message(seed)
        tensors = pb.ModelInferRequest(raw_input_contents=whole.raw_input_contents)
        rest = pb.ModelInferRequest()
        rest.CopyFrom(whole)
        del rest.raw_input_contents[:]
        # Concatenated serializations merge: the same message, tensors first.
        wire = tensors.SerializeToString() + rest.SerializeToString()
        same(templates.decode(wire, None), decode_infer_request(whole))
    assert templates.hits == 0


def test_memory_stays_bounded_when_every_request_is_a_new_kind() -> None:
    templates = RequestTemplates(capacity=4)
    for number in range(50):
        wire = message(number, request_id=f"request-{number // 2}").SerializeToString()
        templates.decode(wire, None)
        assert len(templates._seen) <= 4 and len(templates._known) <= 4
    assert templates.hits == 0


def test_kinds_of_one_size_are_all_remembered() -> None:
    templates = RequestTemplates()
    kinds = []
    for name in ("bert_a", "bert_b", "bert_c"):
        kind = message()
        kind.model_name = name
        kinds.append(kind)
    assert len({len(k.SerializeToString()) for k in kinds}) == 1
    for _ in range(4):
        for kind in kinds:
            got = templates.decode(kind.SerializeToString(), None)
            assert got.model_name == kind.model_name
    assert templates.hits == 3 * 2
