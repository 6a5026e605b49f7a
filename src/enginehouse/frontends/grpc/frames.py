"""The relay's wire format between gRPC worker processes and the core (see relay.py).

Kept apart so that worker processes import only this, grpc and the protobuf messages.
"""

from __future__ import annotations

import asyncio
import struct

import grpc

METHODS: tuple[str, ...] = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "ModelInfer",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
)
# The RPCs of Triton extensions not offered yet, and the extension each belongs to: they
# answer UNIMPLEMENTED naming it, in process and through the workers.
UNSUPPORTED_RPCS = {
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
METHODS += tuple(UNSUPPORTED_RPCS)


def varint(value: int) -> bytes:
    """A protobuf varint: for writing a length-delimited field's header by hand."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class CallAborted(Exception):
    """A call ended with a status (what a servicer context's abort raises here)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


HELLO = 255  # worker -> core once bound; the payload is its private port, in decimal
SERVICE = "inference.GRPCInferenceService"
HEADER = struct.Struct("!IIB")  # length of the rest, call id, method or status
STATUS = {code.value[0]: code for code in grpc.StatusCode}
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


class Coalescer:
    """Writes the frames of one event-loop turn with one system call: a write per frame
    costs more than the rest of relaying a small call."""

    def __init__(self, writer: asyncio.StreamWriter | asyncio.WriteTransport) -> None:
        self._writer = writer
        self._pending: list[bytes | memoryview] = []

    def send(
        self, call: int, code: int, payload: bytes | memoryview | list[bytes | memoryview]
    ) -> None:
        """Queue one frame (header and payload, not joined: the payload is not copied); a
        payload given as pieces is sent as their concatenation, each piece as it is."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        if isinstance(payload, list):
            self._pending.append(HEADER.pack(5 + sum(len(p) for p in payload), call, code))
            self._pending.extend(payload)
            return
        self._pending.append(HEADER.pack(5 + len(payload), call, code))
        self._pending.append(payload)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.writelines(pending)
