"""What the lanmesh client raises: one exception type per wire error code, plus the client's own failures.

Errors travel on the wire as `protocol.Error` values; `error_from_wire` is the one place that turns them into these.
"""

from __future__ import annotations

from typing import Any, ClassVar

from protocol import Error, ErrorCode


class LanmeshError(Exception):
    """Base of every error the lanmesh client raises.

    `code` is the wire error code this error stands for (None when the client itself failed, e.g. an undecodable
    reply); `node` names the node that answered with it, when one did.
    """

    default_code: ClassVar[ErrorCode | None] = None

    def __init__(self, message: str, *, node: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.code: ErrorCode | None = code if code is not None else self.default_code

    def __str__(self) -> str:
        return f"{self.message} (node {self.node})" if self.node else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields would be lost by Exception's default pickling (it replays only `args`).
        return (type(self), (self.message,), self.__dict__.copy())


class BadRequest(LanmeshError):
    """The mesh refused the request as malformed (wrong types, bad values, too large)."""

    default_code = ErrorCode.BAD_REQUEST


class ModelNotFound(LanmeshError):
    """No live node serves the requested model."""

    default_code = ErrorCode.UNKNOWN_MODEL


class Overloaded(LanmeshError):
    """Every node the request could go to is full; `queue` is the queue length the last one reported."""

    default_code = ErrorCode.OVERLOADED

    def __init__(self, message: str, *, node: str = "", code: ErrorCode | None = None, queue: int = 0) -> None:
        super().__init__(message, node=node, code=code)
        self.queue = queue


class DeadlineExceeded(LanmeshError):
    """The request's time budget ran out before an answer came."""

    default_code = ErrorCode.DEADLINE_EXCEEDED


class MeshUnavailable(LanmeshError):
    """No node could be reached (or every reachable one is shutting down), or the client was closed."""

    default_code = ErrorCode.UNAVAILABLE


class Unauthorized(LanmeshError):
    """The mesh refused this client's credentials."""

    default_code = ErrorCode.UNAUTHORIZED


class InternalError(LanmeshError):
    """A bug or a model failure on the serving node (or inside the client)."""

    default_code = ErrorCode.INTERNAL


class ProtocolError(LanmeshError):
    """A node sent a reply this client cannot decode or that does not fit the request."""


_BY_CODE: dict[ErrorCode, type[LanmeshError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNKNOWN_MODEL: ModelNotFound,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.UNAVAILABLE: MeshUnavailable,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_wire(error: Error) -> LanmeshError:
    """The exception that stands for an `Error` reply (the set of codes is closed, so every code has one)."""
    cls = _BY_CODE[error.code]
    if cls is Overloaded:
        return Overloaded(error.message, node=error.node, code=error.code, queue=error.queue)
    return cls(error.message, node=error.node, code=error.code)


__all__ = [
    "BadRequest",
    "DeadlineExceeded",
    "InternalError",
    "LanmeshError",
    "MeshUnavailable",
    "ModelNotFound",
    "Overloaded",
    "ProtocolError",
    "Unauthorized",
    "error_from_wire",
]
