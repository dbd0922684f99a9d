"""lanmesh wire protocol: messages (`_messages.py`), the codec (`_encode.py`, `_decode.py`, with what they share in
`_wire.py`) and error codes (`_errors.py`). Pure code: no I/O."""

from ._decode import decode, error_code_name
from ._encode import encode, restamp_reply, restamp_request
from ._errors import RETRYABLE, DecodeError, ErrorCode
from ._messages import (
    Admin,
    Cancel,
    Chunk,
    Data,
    Error,
    Fetch,
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
from ._names import NAME_MAX, NAME_RULE, check_name, is_name, is_version, name_problem
from ._wire import DEFAULT_LIMITS, MAX_CHUNK_BYTES, MAX_DEADLINE_MS, MAX_HOPS, VERSION, Limits

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_CHUNK_BYTES",
    "MAX_DEADLINE_MS",
    "MAX_HOPS",
    "NAME_MAX",
    "NAME_RULE",
    "RETRYABLE",
    "VERSION",
    "Admin",
    "Cancel",
    "Chunk",
    "Data",
    "DecodeError",
    "Error",
    "ErrorCode",
    "Fetch",
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
    "check_name",
    "decode",
    "encode",
    "error_code_name",
    "is_name",
    "is_version",
    "name_problem",
    "restamp_reply",
    "restamp_request",
]
