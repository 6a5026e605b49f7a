"""The native gRPC frontend's calls in the core's process: straight into the service.

An inference that ran inline is encoded at once; one that waits (a batch, a busy instance)
answers when its future resolves, with no task of its own. Other methods run the service's
own coroutine. ModelStreamInfer messages answer with a ModelStreamInferResponse each, an
inference's error in its ``error_message`` as Triton sends it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from enginehouse.errors import EnginehouseError
from enginehouse.frontends.grpc.codec import encode_infer_response, encode_infer_response_wire
from enginehouse.frontends.grpc.native import Answer, Body
from enginehouse.frontends.grpc.relay import REQUESTS, RelayContext
from enginehouse.frontends.grpc.service import InferenceService
from enginehouse.frontends.grpc.streams import stream_error
from enginehouse.messages import InferResponse


def _converted(
    pending: Awaitable[InferResponse],
    convert: Callable[[InferResponse], Body],
    on_error: Callable[[BaseException], bytes] | None = None,
) -> asyncio.Future[Body]:
    """A future of ``convert(response)`` once ``pending`` resolves (``on_error(exc)``, or the
    error itself, when it fails)."""
    source = asyncio.ensure_future(pending)
    out: asyncio.Future[Body] = asyncio.get_running_loop().create_future()

    def done(_: Any) -> None:
        if out.done():
            return
        if source.cancelled():
            out.cancel()
            return
        error = source.exception()
        try:
            if error is None:
                out.set_result(convert(source.result()))
            elif on_error is not None:
                out.set_result(on_error(error))
            else:
                out.set_exception(error)
        except Exception as failure:  # a broken response fails this call only
            out.set_exception(failure)

    source.add_done_callback(done)
    out.source = source  # type: ignore[attr-defined]  # held while the call waits
    return out


def _encoded(response: InferResponse) -> Body:
    return encode_infer_response_wire(response)


def _stream_encoded(response: InferResponse) -> bytes:
    message = pb.ModelStreamInferResponse(infer_response=encode_infer_response(response))
    return bytes(message.SerializeToString())


class ServiceCalls:
    """Calls answered by the in-process service."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def unary(self, method: str, payload: bytes | memoryview) -> Answer:
        if method != "ModelInfer":
            return self._other(method, payload)
        result = self.service.infer_wire(payload, time.perf_counter_ns())
        if isinstance(result, InferResponse):
            return _encoded(result)
        return _converted(result, _encoded)

    async def _other(self, method: str, payload: bytes | memoryview) -> bytes:
        request = REQUESTS[method].FromString(payload)
        response = await getattr(self.service, method)(request, RelayContext())
        return bytes(response.SerializeToString())

    def stream_message(self, payload: bytes | memoryview) -> Answer:
        message = pb.ModelInferRequest.FromString(payload)
        try:
            result = self.service.infer_message(message, time.perf_counter_ns())
        except EnginehouseError as exc:
            return stream_error(message, exc.message).SerializeToString()
        if isinstance(result, InferResponse):
            return _stream_encoded(result)

        def failed(error: BaseException) -> bytes:
            text = error.message if isinstance(error, EnginehouseError) else str(error)
            return stream_error(message, text).SerializeToString()

        return _converted(result, _stream_encoded, failed)
