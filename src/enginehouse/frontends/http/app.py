"""The KServe v2 REST API with Triton's extensions, as handlers over ServerCore.

Routing is a split of the path and a match on its parts: the whole surface is a dozen
routes, and a request should not pay for a general router. Handlers return an
:class:`HttpResponse`; only inference and repository control are asynchronous.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import unquote

import orjson

from enginehouse import datatypes
from enginehouse.config.protojson import message_to_json_dict
from enginehouse.core.model import ModelVersion
from enginehouse.core.regions import CUDA, SYSTEM
from enginehouse.core.server import SERVER_NAME, ServerCore
from enginehouse.core.shared_memory import decode_raw_handle, region_status
from enginehouse.errors import (
    EnginehouseError,
    InternalError,
    InvalidArgumentError,
    MethodNotAllowedError,
    NotFoundError,
    UnsupportedError,
)
from enginehouse.frontends.http.codec import (
    OutputOptions,
    decode_infer_request,
    encode_infer_response,
)
from enginehouse.frontends.http.connections import Connections, HttpLimits
from enginehouse.frontends.http.protocol import (
    HttpProtocol,
    HttpRequest,
    HttpResponse,
    error_response,
)
from enginehouse.frontends.http.templates import HeaderTemplates
from enginehouse.frontends.security import RestrictedApis, TlsSettings
from enginehouse.messages import InferResponse, ModelMetadata

log = logging.getLogger(__name__)

_EMPTY_OK = HttpResponse(200, [])
_NOT_READY = HttpResponse(400, [])


def _json(value: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, [orjson.dumps(value)])


def _metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs
        ],
    }


def _body_json(request: HttpRequest) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        value = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError("request body must be a JSON object")
    return value


def _infer_response(response: InferResponse, options: OutputOptions) -> HttpResponse:
    header, buffers, header_length = encode_infer_response(response, options)
    if header_length is None:
        return HttpResponse(200, [header])
    return HttpResponse(
        200,
        [header, *buffers],
        content_type=b"application/octet-stream",
        extra_headers=[b"Inference-Header-Content-Length: %d" % header_length],
    )


_MODEL_ACTION_GROUPS = {
    "infer": "inference",
    "ready": "health",
    "config": "model-config",
    "stats": "statistics",
}
# Triton's HTTP extensions this server does not offer yet: a clear 400, not a 404.
_UNSUPPORTED_EXTENSIONS = {
    "trace": "trace",
    "logging": "logging",
}
_HEAD_GROUPS = {
    "health": "health",
    "repository": "model-repository",
    "systemsharedmemory": "shared-memory",
    "cudasharedmemory": "shared-memory",
    "trace": "trace",
    "logging": "logging",
}


def api_group(rest: list[str]) -> str:
    """The API group (Triton's restricted-API names) of a path below ``/v2``."""
    if not rest:
        return "metadata"
    head = rest[0]
    if head == "models":
        if rest[1:] == ["stats"]:
            return "statistics"
        return _MODEL_ACTION_GROUPS.get(rest[-1], "metadata")
    return _HEAD_GROUPS.get(head, "metadata")


class HttpApp:
    """Maps HTTP requests to ServerCore calls and their results to Triton's JSON."""

    def __init__(self, core: ServerCore, restricted: RestrictedApis | None = None) -> None:
        self.core = core
        self.restricted = restricted or RestrictedApis()
        self._restricted = bool(self.restricted)  # read per request: a plain attribute
        # Binary-tensor requests' JSON headers, decoded once per kind (templates.py).
        self._templates = HeaderTemplates()

    async def warm(self, version: ModelVersion) -> None:
        """Run warm-up requests through decoding, the new version and encoding, in process.

        The version is not routable yet (it becomes so once warm), so it is called directly.
        """
        for _ in range(2):
            request = warmup_request(version)
            header_length = int(request.headers["inference-header-content-length"])
            infer_request, options = decode_infer_request(
                version.name, version.version, request.body, header_length
            )
            response = _infer_response(await version.infer(infer_request), options)
            if response.status != 200:
                raise InternalError(f"HTTP warm-up request failed: {b''.join(response.body)!r}")

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        try:
            return self._route(request)
        except MethodNotAllowedError as exc:
            response = error_response(exc.http_status, exc.message)
            response.extra_headers.append(b"Allow: " + exc.allow.encode())
            return response
        except EnginehouseError as exc:
            return error_response(exc.http_status, exc.message)

    def _route(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        parts = request.path.split("/")
        if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
            raise NotFoundError(f"no route for {request.path}")
        method = request.method
        rest = parts[2:]
        if rest and rest[-1] == "":
            rest = rest[:-1]
        if self._restricted:
            self.restricted.check(api_group(rest), request.headers)
        if not rest:
            self._method(method, "GET")
            return _json(
                {
                    "name": SERVER_NAME,
                    "version": self.core.version,
                    "extensions": list(self.core.extensions),
                }
            )
        head = rest[0]
        if head == "models":
            return self._models(method, rest[1:], request)
        if head == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            self._method(method, "GET")
            ok = self.core.live if rest[1] == "live" else self.core.ready
            return _EMPTY_OK if ok else _NOT_READY
        if head == "repository":
            return self._repository(method, rest[1:], request)
        if head == "systemsharedmemory":
            return self._shared_memory(SYSTEM, method, rest[1:], request)
        if head == "cudasharedmemory":
            return self._shared_memory(CUDA, method, rest[1:], request)
        if head in _UNSUPPORTED_EXTENSIONS:
            raise UnsupportedError(
                f"the {_UNSUPPORTED_EXTENSIONS[head]} extension is not supported by this server yet"
            )
        raise NotFoundError(f"no route for {request.path}")

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise MethodNotAllowedError(
                f"method {method} is not allowed here, use {allowed}", allowed
            )

    def _models(
        self, method: str, rest: list[str], request: HttpRequest
    ) -> HttpResponse | Awaitable[HttpResponse]:
        if rest == ["stats"]:
            self._method(method, "GET")
            return self._stats("", "")
        if not rest:
            raise NotFoundError("no route for /v2/models")
        name = unquote(rest[0])
        version = ""
        rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version = unquote(rest[1])
            rest = rest[2:]
        if not rest:
            self._method(method, "GET")
            meta = self.core.model_metadata(name, version)
            return _json(_metadata_json(meta))
        if len(rest) != 1 or rest[0] not in _MODEL_ACTION_GROUPS:
            raise NotFoundError(f"no route for {request.path}")
        action = rest[0]
        if action == "infer":
            self._method(method, "POST")
            return self._infer(name, version, request)
        self._method(method, "GET")
        if action == "ready":
            return _EMPTY_OK if self.core.model_ready(name, version) else _NOT_READY
        if action == "config":
            return _json(message_to_json_dict(self.core.model_config(name, version)))
        if action == "stats":
            return self._stats(name, version)
        raise NotFoundError(f"no route for {request.path}")

    def _stats(self, name: str, version: str) -> HttpResponse:
        stats = self.core.model_statistics(name, version)
        return _json({"model_stats": [s.as_dict() for s in stats]})

    def _infer(
        self, name: str, version: str, request: HttpRequest
    ) -> HttpResponse | Awaitable[HttpResponse]:
        arrival = time.perf_counter_ns()
        raw_length = request.headers.get("inference-header-content-length")
        header_length = None
        if raw_length is not None:
            try:
                header_length = int(raw_length)
            except ValueError:
                raise InvalidArgumentError(
                    f"Inference-Header-Content-Length '{raw_length}' is not an integer"
                ) from None
        infer_request, options = self._templates.decode(
            name, version, request.body, header_length, self.core.shared_memory
        )
        infer_request.arrival_ns = arrival
        result = self.core.submit(infer_request)
        if isinstance(result, InferResponse):
            return _infer_response(result, options)
        return self._await_infer(result, options)

    async def _await_infer(
        self, pending: Awaitable[InferResponse], options: OutputOptions
    ) -> HttpResponse:
        try:
            response = await pending
        except EnginehouseError as exc:
            return error_response(exc.http_status, exc.message)
        return _infer_response(response, options)

    def _shared_memory(
        self, kind: str, method: str, rest: list[str], request: HttpRequest
    ) -> HttpResponse:
        """``[region/<name>/]status``, ``region/<name>/register`` and
        ``[region/<name>/]unregister`` of the system or CUDA shared-memory extension."""
        regions = self.core.shared_memory
        name = ""
        if len(rest) == 3 and rest[0] == "region":
            name, rest = unquote(rest[1]), rest[2:]
        if rest == ["status"]:
            self._method(method, "GET")
            return _json([region_status(r) for r in regions.status(name, kind)])
        if rest == ["register"] and name:
            self._method(method, "POST")
            body = _body_json(request)
            if kind == CUDA:
                handle = decode_raw_handle(body.get("raw_handle"))
                regions.register_cuda(name, handle, body.get("device_id"), body.get("byte_size"))
            else:
                regions.register(
                    name, body.get("key"), body.get("offset", 0), body.get("byte_size")
                )
            return _EMPTY_OK
        if rest == ["unregister"]:
            self._method(method, "POST")
            regions.unregister(name, kind)
            return _EMPTY_OK
        raise NotFoundError(f"no route for {request.path}")

    def _repository(
        self, method: str, rest: list[str], request: HttpRequest
    ) -> HttpResponse | Awaitable[HttpResponse]:
        control = len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload")
        if rest != ["index"] and not control:
            raise NotFoundError(f"no route for {request.path}")
        self._method(method, "POST")
        if rest == ["index"]:
            body = _body_json(request)
            ready = bool(body.get("ready", False))
            entries = []
            for entry in self.core.repository_index(ready):
                item = {"name": entry.name}
                if entry.version:
                    item["version"] = entry.version
                if entry.state:
                    item["state"] = entry.state
                if entry.reason:
                    item["reason"] = entry.reason
                entries.append(item)
            return _json(entries)
        name = unquote(rest[1])
        body = _body_json(request)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgumentError("'parameters' must be an object")
        if rest[2] == "load":
            return self._load(name, parameters)
        return self._unload(name)

    async def _load(self, name: str, parameters: dict[str, Any]) -> HttpResponse:
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            return error_response(400, "load parameter 'config' must be a JSON string")
        files: dict[str, bytes] = {}
        for key, value in parameters.items():
            if not key.startswith("file:"):
                continue
            try:
                files[key[5:]] = base64.b64decode(value, validate=True)
            except (TypeError, ValueError, binascii.Error):
                return error_response(400, f"load parameter '{key}' must be base64 text")
        try:
            await self.core.load_model(name, config, files or None)
        except EnginehouseError as exc:
            return error_response(exc.http_status, exc.message)
        return _EMPTY_OK

    async def _unload(self, name: str) -> HttpResponse:
        try:
            await self.core.unload_model(name)
        except EnginehouseError as exc:
            return error_response(exc.http_status, exc.message)
        return _EMPTY_OK


def warmup_request(version: ModelVersion) -> HttpRequest:
    """A binary-framed inference request built from a version's warm-up inputs."""
    inputs = []
    buffers = []
    for name, array in version.warmup_inputs.items():
        raw = datatypes.to_wire_bytes(array)
        buffers.append(raw)
        inputs.append(
            {
                "name": name,
                "datatype": version.inputs[name].datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
    header = orjson.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}})
    return HttpRequest(
        method="POST",
        path=f"/v2/models/{version.name}/versions/{version.version}/infer",
        query="",
        headers={"inference-header-content-length": str(len(header))},
        body=header + b"".join(buffers),
    )


class HttpServer:
    """The listening socket and its connections."""

    def __init__(
        self,
        core: ServerCore,
        host: str,
        port: int,
        limits: HttpLimits | None = None,
        restricted: RestrictedApis | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.app = HttpApp(core, restricted)
        self.tls = tls
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections = Connections(limits or HttpLimits())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self.app, self._connections),
            self.host,
            self.port,
            reuse_address=True,
            backlog=1024,
            ssl=self.tls.ssl_context() if self.tls else None,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("HTTP service listening on %s:%d", self.host, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let connections finish their requests, then close them."""
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + grace_s
        while any(not c.idle for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in self._connections:
            connection.close()
        self._connections.stop()
        await self._server.wait_closed()
