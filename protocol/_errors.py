"""The closed set of error codes that travel on the wire, and the codec's own error."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a request failed; every error reply carries exactly one of these."""

    BAD_REQUEST = 1  # malformed frame, wrong types, bad values
    UNKNOWN_MODEL = 2  # no live node serves the model
    OVERLOADED = 3  # queues full everywhere the request could go
    DEADLINE_EXCEEDED = 4  # the request's time budget ran out
    UNAVAILABLE = 5  # no node could be reached / node is shutting down
    UNAUTHORIZED = 6  # missing or wrong credentials
    INTERNAL = 7  # a bug or a model failure on the serving node


# Which failures another node (or another try) may fix: every retry decision in the mesh, its clients and the
# HTTP gateway reads this one table. OVERLOADED: try a less busy node. UNAVAILABLE: the node is leaving, its model
# engine failed as a whole, or it could not be reached. Not INTERNAL: a model that fails on one request (the
# executor isolates it from its batch mates) fails on every node, and retrying would take it around the mesh.
RETRYABLE: frozenset[ErrorCode] = frozenset({ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE})


class DecodeError(ValueError):
    """Raised by the codec for any frame it refuses.

    `request_id` is set when the frame was well-formed enough to tell which
    request it belonged to, so the receiver can answer instead of dropping it.
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = ErrorCode.BAD_REQUEST
