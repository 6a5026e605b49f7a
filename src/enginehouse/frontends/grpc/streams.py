"""ModelStreamInfer's shape, shared by the in-process service and the worker processes.

The requests of one stream run concurrently and each response goes out when it is done;
a failed request answers with ``error_message`` (as Triton does) and the stream stays open.
Kept free of the core so that worker processes can import it cheaply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

log = logging.getLogger(__name__)

Answer = Callable[[pb.ModelInferRequest], Awaitable[pb.ModelStreamInferResponse]]


def stream_error(message: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
    """A stream response that reports ``text`` for ``message``, naming its id and model."""
    failed = pb.ModelStreamInferResponse(error_message=text)
    failed.infer_response.id = message.id
    failed.infer_response.model_name = message.model_name
    failed.infer_response.model_version = message.model_version
    return failed


async def answer_concurrently(
    requests: AsyncIterator[pb.ModelInferRequest],
    answer: Answer,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Yield ``answer(request)`` for every request of the stream, in completion order.

    A message that cannot be decoded ends the stream, since its framing cannot be trusted
    past it: the answers still due for the messages before it go out first, then the stream
    ends with INVALID_ARGUMENT (never with OK, which would tell the client that nothing was
    lost)."""
    done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    undecodable: list[str] = []

    async def one(message: pb.ModelInferRequest) -> None:
        try:
            done.put_nowait(await answer(message))
        except Exception as exc:  # never let one request end the stream
            log.exception("stream request failed")
            done.put_nowait(pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"))

    async def read() -> None:
        try:
            async for message in requests:
                task = asyncio.create_task(one(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except DecodeError as exc:
            undecodable.append(str(exc))
        finally:
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            done.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await done.get()) is not None:
            yield item
    finally:
        reader.cancel()
    if undecodable:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"ModelStreamInfer: a message could not be decoded ({undecodable[0]}); the stream "
            "ends after the answers to the messages before it",
        )
