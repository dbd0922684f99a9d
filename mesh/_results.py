"""What a call ends as: a `Result` (a served request), a `PingReply`, and the text or vectors inside a result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import Pong

from .errors import ProtocolError


@dataclass(frozen=True)
class Result:
    """A served request: the model's `output`, which `node` served it and why it went there (`route`).

    `id` is the wire id of the try that was answered (what that node's logs show); `tries` counts the sends the
    client needed (more than one after a failover or a refusal).
    """

    output: Any
    node: str
    route: str
    meta: dict[str, Any]
    id: str
    tries: int = 1

    @property
    def text(self) -> str:
        """The generated text of a chat or completion result."""
        text = text_of(self.output)
        if text is None:
            raise TypeError(f"this result carries no text (its output is a {type(self.output).__name__})")
        return text

    @property
    def usage(self) -> dict[str, Any]:
        """Token counts as the serving node reported them (empty when it did not)."""
        usage = self.meta.get("usage")
        return dict(usage) if isinstance(usage, dict) else {}


def text_of(output: Any) -> str | None:
    """The text in a chat/completion output: a string, or a map with `content`, `text` or `message.content`."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        for key in ("content", "text"):
            if isinstance(output.get(key), str):
                return str(output[key])
        message = output.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return None


def embeddings_of(result: Result) -> list[list[float]]:
    """The vectors in an embed result (a list of vectors, or a map holding them under `embeddings`)."""
    out = result.output
    if isinstance(out, dict):
        out = out.get("embeddings")
    if isinstance(out, list) and all(isinstance(v, list) for v in out):
        return out
    raise ProtocolError(f"an embed result must hold a list of vectors, got {type(out).__name__}", node=result.node)


@dataclass(frozen=True)
class PingReply:
    """A node's answer to a ping: the Pong and the round trip measured at the socket."""

    pong: Pong
    rtt: float


__all__ = ["PingReply", "Result", "embeddings_of", "text_of"]
