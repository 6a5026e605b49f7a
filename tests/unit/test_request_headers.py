"""Request header blocks remembered while the HPACK dynamic table stays as it was: every
answer is the one a plain ``hpack`` decoder gives for the same sequence of blocks."""

from __future__ import annotations

import hpack

from enginehouse.frontends.grpc.http2 import RequestHeaders


def call_headers(path: str, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1:8001"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def test_remembered_blocks_mean_what_hpack_says_they_mean() -> None:
    encoder = hpack.Encoder()
    infer = "/inference.GRPCInferenceService/ModelInfer"
    ready = "/inference.GRPCInferenceService/ServerReady"
    blocks = [
        encoder.encode(call_headers(infer)),  # inserts its fields into the table
        encoder.encode(call_headers(infer)),  # indexes only: remembered
        encoder.encode(call_headers(infer)),  # the same bytes: answered from memory
        encoder.encode(call_headers(ready)),  # a new path inserted: the indexes shift
        encoder.encode(call_headers(infer)),  # the old bytes may now mean something else
        encoder.encode(call_headers(infer, (("x-key", "secret"),))),
        encoder.encode(call_headers(infer)),
    ]
    assert blocks[1] == blocks[2]
    ours, reference = RequestHeaders(), hpack.Decoder()
    for block in blocks:
        want = {str(name): str(value) for name, value in reference.decode(block)}
        got = ours.decode(block)
        assert got == want
        got["mutated"] = "by a caller"  # each answer is the caller's own
    # Bytes seen before a table change, decoded after it, against the reference.
    stale = blocks[1]
    assert ours.decode(stale) == {str(name): str(value) for name, value in reference.decode(stale)}
