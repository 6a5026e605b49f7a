"""The relay's frame receiver and the cutting of raw tensors out of a serialized request."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from enginehouse.frontends.grpc import receive
from enginehouse.frontends.grpc.codec import decode_infer_request, split_raw_contents
from enginehouse.frontends.grpc.frames import HEADER


class Collect(receive.FrameReceiver):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[int, int, bytes]] = []
        self.kinds: list[type] = []

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        self.kinds.append(type(payload))
        self.frames.append((call, code, bytes(payload)))


def frame(call: int, code: int, payload: bytes) -> bytes:
    return HEADER.pack(5 + len(payload), call, code) + payload


def deliver(receiver: receive.FrameReceiver, data: bytes, read: int) -> None:
    """As a socket would: at most ``read`` bytes at a time, into the buffer offered."""
    position = 0
    while position < len(data):
        buffer = receiver.get_buffer(-1)
        assert len(buffer) > 0, "the receiver offered no room"
        count = min(len(buffer), read, len(data) - position)
        buffer[:count] = data[position : position + count]
        position += count
        receiver.buffer_updated(count)


@pytest.mark.parametrize("read", [1, 7, 4096, 100_000, 1 << 22])
def test_small_and_large_frames_survive_any_read_size(read: int) -> None:
    rng = np.random.default_rng(read)
    sizes = [0, 10, receive.LARGE_FRAME - 1, receive.LARGE_FRAME, 300_000, 5, 1_000_000, 3]
    if read == 1:
        sizes = [0, 10, receive.LARGE_FRAME + 3, 5]  # byte by byte: keep it quick
    sent = [(i, i % 7, rng.bytes(size)) for i, size in enumerate(sizes)]
    receiver = Collect()
    deliver(receiver, b"".join(frame(*f) for f in sent), read)
    assert receiver.frames == sent
    for (_, _, payload), kind in zip(sent, receiver.kinds):
        assert kind is (memoryview if len(payload) >= receive.LARGE_FRAME else bytes)


def test_a_large_payload_is_not_overwritten_by_later_frames() -> None:
    """Tensors may keep views of a large payload: later reads must not touch it."""
    kept: list[memoryview] = []

    class Keep(receive.FrameReceiver):
        def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
            kept.append(memoryview(payload))

    first = b"\x01" * 100_000
    receiver = Keep()
    deliver(
        receiver, frame(1, 0, first) + frame(2, 0, b"\x02" * 100_000) + frame(3, 0, b"x"), 65536
    )
    assert bytes(kept[0]) == first
    assert len(kept) == 3


def request() -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", model_version="2", id="r1")
    message.parameters["priority"].int64_param = 3
    for name, data in (("a", np.arange(6, dtype=np.float32)), ("b", np.ones(4, np.int64))):
        tensor = message.inputs.add(name=name, datatype="FP32" if name == "a" else "INT64")
        tensor.shape.extend([1, data.size])
        message.raw_input_contents.append(data.tobytes())
    message.outputs.add(name="out")
    return message


def test_split_raw_contents_matches_protobuf() -> None:
    message = request()
    serialized = message.SerializeToString()
    rest, raw = split_raw_contents(serialized)
    parsed = pb.ModelInferRequest.FromString(rest)
    assert not parsed.raw_input_contents
    assert [bytes(r) for r in raw] == list(message.raw_input_contents)
    parsed.raw_input_contents.extend(bytes(r) for r in raw)
    assert parsed == message
    decoded = decode_infer_request(pb.ModelInferRequest.FromString(rest), raw)
    assert decoded.parameters == {"priority": 3} and decoded.outputs == ["out"]
    np.testing.assert_array_equal(decoded.inputs[0].data, np.arange(6, dtype=np.float32)[None])


def test_split_raw_contents_keeps_unknown_fields() -> None:
    serialized = request().SerializeToString()
    # Field 15 as a varint, field 14 as fixed32, field 2047 (a two-byte key) as fixed64.
    unknown = bytes([(15 << 3) | 0, 5, (14 << 3) | 5, 1, 2, 3, 4, 0xF9, 0x7F, *range(8)])
    rest, raw = split_raw_contents(unknown + serialized)
    assert rest.startswith(unknown) and len(raw) == 2


def test_truncated_messages_raise_decode_error() -> None:
    """Cut anywhere but between two fields, the message is refused, never misread."""
    serialized = request().SerializeToString()
    boundaries = {0}
    position = 0
    while position < len(serialized):  # every field here is length-delimited, lengths < 128
        position += 2 + serialized[position + 1]
        boundaries.add(position)
    for cut in range(len(serialized)):
        if cut in boundaries:
            split_raw_contents(serialized[:cut])
        else:
            with pytest.raises(DecodeError):
                split_raw_contents(serialized[:cut])


def test_bad_wire_type_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        split_raw_contents(bytes([(1 << 3) | 3]))


@pytest.mark.parametrize("entries", [1, 3])
def test_raw_contents_must_match_the_inputs_not_in_shared_memory(entries: int) -> None:
    from enginehouse.errors import InvalidArgumentError

    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 4])
    for _ in range(entries):
        request.raw_input_contents.append(np.zeros(4, np.int32).tobytes())
    with pytest.raises(InvalidArgumentError, match=f"has {entries} entries for 2 inputs"):
        decode_infer_request(request)
