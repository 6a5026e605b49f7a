"""The channel arguments every gRPC server of enginehouse starts with.

grpc-core keeps calls that arrived before the Python server asked for them in a queue of its
own, and past 1,000 such calls it cancels those that waited, past 3,000 every new one: a
client's burst then ended in CANCELLED for calls the server never saw, or saw and answered
(measured here: 2-14% of bursts of 3,000 calls, a third of a burst of 10,000, against
enginehouse and against a bare grpc.aio server alike). Those limits are lifted
here, so that every call reaches the server, which answers an overload itself with a fast,
explicit UNAVAILABLE (the per-model pending limits). Kept free of the core so that worker
processes import it cheaply.
"""

from __future__ import annotations

# Calls grpc-core may hold before the server takes them; far above any per-model bound.
MAX_UNTAKEN_CALLS = 1 << 20


def server_options(max_message_bytes: int, reuse_port: bool) -> list[tuple[str, int]]:
    """grpc.aio server options: message limits, port sharing and the untaken-call queue."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.server.max_pending_requests", MAX_UNTAKEN_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_UNTAKEN_CALLS),
    ]
