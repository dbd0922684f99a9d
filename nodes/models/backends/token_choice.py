"""Choosing each request's next token from the model's scores: argmax when greedy, else seeded sampling with top-k
and top-p; only tokens its grammar allows; after a healed prefix only tokens that re-produce its end.

Shared by the engines' requests, whatever they hold them in: a request here is anything with `rng`, `heal_ids`,
`matcher` and `text.sampling` (see `onnx_chat._Request`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from .guidance import Matcher


class Choosing(Protocol):
    rng: np.random.Generator | None
    heal_ids: list[int] | None
    matcher: Matcher | None
    text: Any  # a TextRow: its `sampling`


def pick_tokens(requests: list[Any], logits: np.ndarray) -> tuple[list[int | None], dict[int, str]]:
    """The next token of each request (row i of `logits` is request i's), and why each that failed did: a
    grammar that breaks, or one that allows no token the model can write. The others are unaffected."""
    greedy = logits.argmax(axis=-1)
    chosen: list[int | None] = []
    errors: dict[int, str] = {}
    for i, request in enumerate(requests):
        if request.rng is None and request.heal_ids is None and request.matcher is None:
            chosen.append(int(greedy[i]))
            continue
        try:
            chosen.append(pick_one(request, logits[i]))
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            chosen.append(None)
            errors[i] = f"choosing a token failed: {type(exc).__name__}: {exc}"
    return chosen, errors


def pick_one(request: Choosing, scores: np.ndarray) -> int:
    import numpy as np

    scores = scores.astype(np.float64)
    if request.heal_ids is not None:  # the first token after a healed prefix: only those that fit
        allowed = np.full_like(scores, -np.inf)
        allowed[request.heal_ids] = scores[request.heal_ids]
        scores, request.heal_ids = allowed, None
    if request.matcher is not None:
        # The engine's own count of what is left (max_tokens, or what the context leaves), so the grammar closes the
        # answer in time even when the caller set no max_tokens.
        left = request.text.budget - request.text.generated
        scores[~request.matcher.allowed(tokens_left=left)[: len(scores)]] = -np.inf
    if not np.isfinite(scores).any():
        raise ValueError("no token the model can write is allowed here (by its grammar, or the healed prefix)")
    token = choose(request, scores)
    if request.matcher is not None:
        request.matcher.consume([token])
    return token


def choose(request: Choosing, scores: np.ndarray) -> int:
    """Argmax, or a seeded draw from the top-k / top-p head of the distribution at the request's temperature."""
    import numpy as np

    if request.rng is None:
        return int(scores.argmax())
    s = request.text.sampling
    order = np.argsort(-scores, kind="stable")
    order = order[np.isfinite(scores[order])]  # never draw a token the mask forbade
    if s.top_k:
        order = order[: s.top_k]
    top = scores[order] / s.temperature
    probs = np.exp(top - top[0])
    probs /= probs.sum()
    if s.top_p < 1:
        # keep the smallest head of the distribution whose mass reaches top_p
        keep = int((np.cumsum(probs) - probs < s.top_p).sum())
        probs = probs[: max(1, keep)]
        probs /= probs.sum()
    return int(order[request.rng.choice(len(probs), p=probs)])
