"""The gRPC worker's relay client over a real Unix socket, the core's side played by a
frame receiver in the same event loop: answers resolve their calls' futures in any order,
a failed unary call raises its status, and calls the core can no longer answer end as
UNAVAILABLE."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from enginehouse.frontends.grpc.frames import METHODS, CallAborted, Coalescer
from enginehouse.frontends.grpc.receive import FrameReceiver
from enginehouse.frontends.grpc.worker import RelayCalls, RelayClient

INFER = METHODS.index("ModelInfer")
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class Core(FrameReceiver):
    """Answers the frames it gets only when told to, with a status and payload of choice."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, bytes]] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.out = Coalescer(transport)  # type: ignore[arg-type]

    def frame(self, call: int, code: int, payload: bytes | memoryview) -> None:
        self.calls.append((call, code, bytes(payload)))
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        while len(self.calls) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)


async def connected(tmp_path: Path) -> tuple[Core, RelayClient, asyncio.AbstractServer]:
    core = Core()
    path = str(tmp_path / "relay.sock")
    server = await asyncio.get_running_loop().create_unix_server(lambda: core, path)
    return core, await RelayClient.connect(path), server


def test_answers_resolve_their_own_calls_in_any_order(tmp_path: Path) -> None:
    async def run() -> None:
        core, relay, server = await connected(tmp_path)
        calls = RelayCalls(relay)
        first = calls.unary("ModelInfer", b"one")
        second = relay.request(INFER, b"two")
        third = calls.unary("ModelInfer", b"three")
        await core.wait_for(3)
        assert [(code, payload) for _, code, payload in core.calls] == [
            (INFER, b"one"),
            (INFER, b"two"),
            (INFER, b"three"),
        ]
        ids = [call for call, _, _ in core.calls]
        assert len(set(ids)) == 3
        core.out.send(ids[2], 0, b"answer three")
        core.out.send(ids[1], NOT_FOUND, b"no such model")
        core.out.send(ids[0], NOT_FOUND, b"no such model either")
        assert await third == b"answer three"
        # (status, body) for a plain request; the status raised for a unary call.
        assert await second == (NOT_FOUND, b"no such model")
        with pytest.raises(CallAborted) as failure:
            await first
        assert failure.value.code == grpc.StatusCode.NOT_FOUND
        assert failure.value.details == "no such model either"
        server.close()

    asyncio.run(run())


def test_calls_the_core_cannot_answer_end_unavailable(tmp_path: Path) -> None:
    async def run() -> None:
        core, relay, server = await connected(tmp_path)
        unary = RelayCalls(relay).unary("ModelInfer", b"waiting")
        plain = relay.request(INFER, b"waiting too")
        await core.wait_for(2)
        assert core.transport is not None
        core.transport.close()  # the core goes away with both calls unanswered
        await asyncio.wait_for(relay.closed.wait(), 5)
        with pytest.raises(CallAborted) as failure:
            await unary
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        status, _ = await plain
        assert status == grpc.StatusCode.UNAVAILABLE.value[0]
        # A call made after that is answered at once, the same way.
        status, _ = await relay.call(INFER, b"late")
        assert status == grpc.StatusCode.UNAVAILABLE.value[0]
        server.close()

    asyncio.run(run())
