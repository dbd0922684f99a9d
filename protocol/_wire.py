"""What both directions of the codec share: the protocol version, the message type tags on the wire, and the hard
limits on ids, names, deadlines and frames."""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1

# Type tags on the wire. Never reuse a number.
T_REQUEST, T_REPLY, T_CHUNK, T_ERROR, T_REJECT = 1, 2, 3, 4, 5
T_LOAD, T_HELLO, T_LEAVE, T_PING, T_PONG = 6, 7, 8, 9, 10
T_CANCEL, T_ADMIN, T_FETCH, T_DATA = 11, 12, 13, 14
T_STAGE = 15  # stage-to-stage traffic of a split model
T_SUSPICION, T_DIGEST = 16, 17  # membership gossip
T_CREDENTIALS, T_JOIN, T_REVOCATIONS = 20, 21, 22  # member identities (18-19 left to other work in flight)
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # a revocation list of ~20,000 entries; a certificate is ~170 bytes
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # the most one Fetch may ask for (one Data frame, well under the frame limit)

MAX_DEADLINE_MS = 86_400_000  # one day; anything longer is a bug on the caller's side
MAX_HOPS = 8
ID_LEN = 128
NAME_LEN = 256
MAX_MODEL_TASKS = 8  # tasks one model may say it serves in a load report
# A LoadReport's prefix-cache summaries (`LoadReport.prefixes`): 8-byte chain digests, at most this many bytes in all.
PREFIX_DIGEST_BYTES = 8
PREFIX_REPORT_BYTES = 4096
MAX_STAGES = 16  # nodes in one pipeline
STAGE_KINDS = ("run", "token", "close")
STAGE_DTYPES = {"float32": 4, "float16": 2}  # what a Stage's tensor frame may hold, and bytes per number


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard bounds applied before and while decoding one frame."""

    max_frame_bytes: int = 8 * 1024 * 1024
    max_array_len: int = 100_000
    max_map_len: int = 10_000
    max_str_len: int = 4 * 1024 * 1024
    max_depth: int = 32


DEFAULT_LIMITS = Limits()
