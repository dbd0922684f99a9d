"""The HTTP API key: what a good one is (checked when the node starts), and comparing a caller's in constant time.

Light on purpose (no web stack): the node's configuration checks the key before anything loads."""

from __future__ import annotations

import hmac

MIN_API_KEY_CHARS = 16  # a shorter HTTP API key is refused at start: the gateway may face the whole LAN


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def check_api_key(key: str, where: str) -> str:
    """`key`, or a ValueError saying it is too short to guess safely (the message never shows the key)."""
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(
            f"{where} has {len(key)} characters; an API key needs at least {MIN_API_KEY_CHARS} so it cannot be "
            "guessed (make one: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return key
