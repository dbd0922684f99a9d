"""lanmesh wire protocol: messages, the codec and error codes. Pure code: no I/O."""

from ._codec import DEFAULT_LIMITS, MAX_DEADLINE_MS, MAX_HOPS, VERSION, Limits, decode, encode, error_code_name
from ._errors import DecodeError, ErrorCode
from ._messages import (
    Chunk,
    Error,
    Hello,
    Leave,
    LoadReport,
    Message,
    ModelLoad,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Task,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DEADLINE_MS",
    "MAX_HOPS",
    "VERSION",
    "Chunk",
    "DecodeError",
    "Error",
    "ErrorCode",
    "Hello",
    "Leave",
    "Limits",
    "LoadReport",
    "Message",
    "ModelLoad",
    "PeerAddr",
    "Ping",
    "Pong",
    "Reject",
    "Reply",
    "Request",
    "Task",
    "decode",
    "encode",
    "error_code_name",
]
