"""The parts of HTTP/2 that gRPC needs, as bytes: frame layout, settings, and the header
blocks a server sends (HPACK literals that change no table, so the encoder keeps no state).
Request header blocks are decoded with the ``hpack`` package (:class:`RequestHeaders`)."""

from __future__ import annotations

import struct
import urllib.parse

import grpc
import hpack

from enginehouse.frontends.grpc.frames import SERVICE

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
HEADER = struct.Struct(">BHBBI")  # length as one byte and two, type, flags, stream id
MAX_WINDOW = (1 << 31) - 1
MAX_STREAMS = 4096  # open calls per connection
OUR_MAX_FRAME = 1 << 20
# What this side advertises (MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE):
# frames up to 1 MiB, every stream's window as large as allowed.
OUR_SETTINGS = struct.pack(">HIHIHI", 3, MAX_STREAMS, 4, MAX_WINDOW, 5, OUR_MAX_FRAME)
# Received bytes acknowledged with WINDOW_UPDATE once this many have been consumed.
REPLENISH = 1 << 24
MAX_HEADER_BLOCK = 64 * 1024
REFUSED_STREAM, ENHANCE_YOUR_CALM = 7, 11
PREFIX = "/" + SERVICE + "/"


def string(value: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded."""
    return integer(len(value), 7, 0) + value


def integer(value: int, prefix: int, first: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field literal without indexing, with a new name: no table state changes."""
    return b"\x00" + string(name) + string(value)


# ":status: 200" is static entry 8; content-type (static name 31) as a literal.
RESPONSE_HEADERS = b"\x88" + integer(31, 4, 0) + string(b"application/grpc")
OK_TRAILERS = literal(b"grpc-status", b"0")


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream) + payload


def status_block(code: grpc.StatusCode, message: str) -> bytes:
    details = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    return literal(b"grpc-status", str(code.value[0]).encode()) + literal(
        b"grpc-message", details.encode()
    )


class RequestHeaders:
    """A connection's request header blocks, decoded.

    A client sends the same few header blocks call after call: once its fields are in the
    dynamic table, each block is the same handful of index bytes. Decoding them with
    ``hpack`` took about 6% of a profile's samples of small calls, so a block that left the
    dynamic table as it was is remembered with its headers, and the same bytes later are
    answered from memory for as long as the table stays unchanged (any change forgets every
    block, since what an index names may have moved). Only short blocks are kept, a few to a
    connection: a client's repeated block is tens of bytes of indexes, and a connection may
    not make the server hold more than a few kilobytes this way.
    """

    LIMIT = 32
    LONGEST = 512

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._table = self._decoder.header_table.dynamic_entries
        self._known: dict[bytes, dict[str, str]] = {}

    def decode(self, block: bytes) -> dict[str, str]:
        """The headers of ``block`` (a dict of its own); hpack's errors for a bad block."""
        known = self._known.get(block)
        if known is not None:
            return dict(known)
        table = self._table
        count, newest = len(table), (table[0] if table else None)
        headers = {str(name): str(value) for name, value in self._decoder.decode(block)}
        if len(table) != count or (table[0] if table else None) is not newest:
            self._known.clear()
        elif len(block) <= self.LONGEST and len(self._known) < self.LIMIT:
            self._known[block] = dict(headers)
        return headers
