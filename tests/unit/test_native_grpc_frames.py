"""The native gRPC frontend's HTTP/2 layer fed arbitrary frames: nothing a client sends may
raise out of it (the connection answers, refuses, or closes with GOAWAY), and a well-formed
call on the same connection after garbage-free frames is still answered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from enginehouse.core.server import ServerCore
from enginehouse.frontends.grpc import http2, native
from enginehouse.frontends.grpc.native_calls import ServiceCalls
from enginehouse.frontends.grpc.native_server import NativeGrpcServer
from enginehouse.frontends.grpc.service import InferenceService
from enginehouse.repository import ModelRepository


class _Transport:
    """What the protocol uses of a transport: writes collected, close remembered."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += part

    def close(self) -> None:
        self.closed = True


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return http2.frame(kind, flags, stream, payload)


def _headers(path: str) -> bytes:
    return hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
    )


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


_PATHS = st.sampled_from(
    [
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/inference.GRPCInferenceService/Nope",
        "/other/Thing",
        "",
    ]
)
_FRAMES = st.one_of(
    st.tuples(
        st.integers(0, 12), st.integers(0, 255), st.integers(0, 9), st.binary(max_size=48)
    ).map(lambda t: _frame(*t)),
    st.tuples(st.sampled_from([1, 3, 5, 7]), _PATHS, st.integers(0, 255)).map(
        lambda t: _frame(http2.HEADERS, t[2] | http2.END_HEADERS, t[0], _headers(t[1]))
    ),
    st.tuples(st.sampled_from([1, 3, 5, 7]), st.binary(max_size=64), st.booleans()).map(
        lambda t: _frame(http2.DATA, int(t[2]), t[0], _message(t[1]))
    ),
    st.binary(max_size=32),
)


def _server(tmp: Path) -> NativeGrpcServer:
    calls = ServiceCalls(InferenceService(ServerCore(ModelRepository([tmp]))))
    return NativeGrpcServer(calls, "127.0.0.1", 0, 1 << 20)


def _connection(server: NativeGrpcServer) -> tuple[native.NativeGrpcProtocol, _Transport]:
    protocol = native.NativeGrpcProtocol(server)
    transport = _Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(http2.PREFACE + _frame(http2.SETTINGS, 0, 0, b""))
    return protocol, transport


def _frames_out(written: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, position = [], 0
    while position + 9 <= len(written):
        high, low, kind, flags, stream = http2.HEADER.unpack_from(written, position)
        length = (high << 16) | low
        frames.append((kind, flags, stream, written[position + 9 : position + 9 + length]))
        position += 9 + length
    return frames


@settings(
    deadline=None,
    database=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(_FRAMES, max_size=12), st.integers(1, 64))
def test_arbitrary_frames_never_raise(tmp_path: Path, frames: list[bytes], chunk: int) -> None:
    async def scenario() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        protocol, transport = _connection(_server(tmp_path))
        wire = b"".join(frames)
        for start in range(0, len(wire), chunk):
            protocol.data_received(wire[start : start + chunk])
            if transport.closed:
                break
        await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        assert errors == []  # nothing raised in a callback or a task either

    asyncio.run(scenario())


def test_a_call_is_answered_with_a_status(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[int, int, int, bytes]]:
        protocol, transport = _connection(_server(tmp_path))
        live = "/inference.GRPCInferenceService/ServerLive"
        infer = "/inference.GRPCInferenceService/ModelInfer"
        request = pb.ModelInferRequest(model_name="absent").SerializeToString()
        protocol.data_received(
            _frame(http2.HEADERS, http2.END_HEADERS, 1, _headers(live))
            + _frame(http2.DATA, http2.END_STREAM, 1, _message(b""))
            + _frame(http2.HEADERS, http2.END_HEADERS, 3, _headers(infer))
            + _frame(http2.DATA, http2.END_STREAM, 3, _message(request))
        )
        await asyncio.sleep(0.05)
        return _frames_out(bytes(transport.written))

    frames = asyncio.run(scenario())
    decoder = hpack.Decoder()
    statuses: dict[int, dict[str, Any]] = {}
    bodies: dict[int, bytes] = {}
    for kind, _, stream, payload in frames:
        if kind == http2.HEADERS:
            statuses.setdefault(stream, {}).update(dict(decoder.decode(payload)))
        elif kind == http2.DATA:
            bodies[stream] = bodies.get(stream, b"") + payload
    assert statuses[1]["grpc-status"] == "0"
    assert pb.ServerLiveResponse.FromString(bodies[1][5:]).live
    assert statuses[3]["grpc-status"] == str(5)  # NOT_FOUND
    assert "absent" in statuses[3]["grpc-message"]
