"""Errors of enginehouse and the protocol status each one maps to.

Every error a client can provoke is an :class:`EnginehouseError` that carries its
HTTP status and gRPC status code, so that frontends translate and never guess::

    EnginehouseError                       500  INTERNAL
    ├── InvalidArgumentError               400  INVALID_ARGUMENT
    │   ├── PayloadTooLargeError           413  INVALID_ARGUMENT
    │   └── MethodNotAllowedError          405  (HTTP only: a known route, another method)
    ├── NotFoundError                      404  NOT_FOUND
    ├── PermissionDeniedError              403  PERMISSION_DENIED
    ├── UnavailableError                   503  UNAVAILABLE
    ├── UnsupportedError                   400  UNIMPLEMENTED
    ├── AlreadyExistsError                 409  ALREADY_EXISTS
    └── InternalError                      500  INTERNAL
        └── ModelLoadError                 400  INVALID_ARGUMENT (a model that cannot load)
"""

from __future__ import annotations

import grpc


class EnginehouseError(Exception):
    """Base of all errors a client can see; the message is shown to the client as is."""

    http_status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(EnginehouseError):
    """The request is malformed or does not match the model."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLargeError(InvalidArgumentError):
    """The request body is larger than the server accepts."""

    http_status = 413


class MethodNotAllowedError(InvalidArgumentError):
    """An HTTP route that exists, asked with a method it does not take."""

    http_status = 405

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class NotFoundError(EnginehouseError):
    """The model, version or route does not exist (or is not loaded)."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class PermissionDeniedError(EnginehouseError):
    """The request is for a restricted API and lacks the header that opens it."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(EnginehouseError):
    """The target exists but cannot serve now (not ready, draining, queue full)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class UnsupportedError(EnginehouseError):
    """The request asks for a feature this server does not offer (yet)."""

    http_status = 400
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class AlreadyExistsError(EnginehouseError):
    """The thing to create exists already."""

    http_status = 409
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class InternalError(EnginehouseError):
    """The server or a backend failed while handling a valid request."""


class ModelLoadError(InternalError):
    """A model could not be loaded: bad config, bad model file, unsupported platform.

    ``version`` names the version at fault when one is (its file could not be read).
    """

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version
