"""What a node says of the mesh it sees: its status rows (for `lanmesh status`, clients learning the mesh, the
console) and its security view, read off its `Membership` (passed as `m`)."""

from __future__ import annotations

import time
from typing import Any

from protocol import StageWant

__all__ = ["model_rows", "security_view", "status_rows"]


def model_rows(models: dict[str, Any]) -> dict[str, list[Any]]:
    """A node's models as status rows show them: `name: [in flight, queued, capacity, version (8 hex), tasks]`, each
    loaded version once (tasks: the ones it serves, [] when its node did not say). Gossip lists the current version
    twice (as `name` and as its pin `name@v8`); the pin is left out here, so loads add up. A version loaded beside
    the current one (a rollout's moment) shows as `name@v8`."""
    out: dict[str, list[Any]] = {}
    for m, v in models.items():
        name, _, pin = m.partition("@")
        current = models.get(name)
        if pin and current is not None and name != m and str(getattr(current, "version", "")).startswith(pin):
            continue
        out[m] = [v.inflight, v.queued, v.capacity, str(getattr(v, "version", ""))[:8], list(getattr(v, "tasks", ()))]
    return out


def _wants_row(wants: dict[str, StageWant]) -> dict[str, Any]:
    """A status row's `wants`: models the node would hold a stage of (the automatic split), when there are any."""
    if not wants:
        return {}
    return {"wants": {m: {"budget_mib": w.budget >> 20, "cores": w.speed} for m, w in wants.items()}}


def status_rows(m: Any) -> list[dict[str, Any]]:
    """The nodes this node sees, itself first."""
    gossip_on = m.bound
    gossip_counts = {f"gossip_{k}": v for k, v in m.gossip.stats().items()} if gossip_on else {}
    now = time.monotonic()
    rows = [
        {
            "node": m.node_id,
            "address": f"{m.addr.host}:{m.addr.port}",
            "state": "leaving" if m.leaving else "self",
            "models": model_rows(m.server.models()),
            "labels": dict(m.server.labels),
            "last_heard_s": 0.0,
            "inflight_to": 0,
            "source": "self",
            "stats": dict(m.stats) | gossip_counts,
            "executor": m.server.stats(),
            "security": security_view(m, now),
            **_wants_row(getattr(m.server, "wants", dict)()),
        }
    ]
    probing = m.gossip.probing() if gossip_on else set()
    for peer in m.links.peers:
        state = m.state(peer.node)
        rows.append(
            {
                "node": peer.node,
                "address": f"{peer.addr.host}:{peer.addr.port}",
                # "unverified": told of it (mDNS, a hello, a digest), but it has not reported to us itself yet
                "state": "leaving" if peer.leaving else (state.value if state else "unverified"),
                "models": model_rows(peer.models),
                "labels": dict(peer.labels),
                "last_heard_s": round(now - peer.last_heard, 3),
                "inflight_to": m.policy.inflight_to(peer.node),
                "source": peer.source,
                "probed": peer.node in probing,
                **_wants_row(peer.wants),
                # member identities: each node's key and certificate (clients learn node keys from them)
                **(m.trust.row(peer.addr.key) if m.trust is not None and peer.verified else {}),
            }
        )
        chains_held = getattr(m.policy, "chains_held", None)  # cache-aware routing: what its gossip says
        if chains_held is not None:
            rows[-1]["prefix_chains"] = chains_held(peer.node)
    if m.trust is not None:
        rows[0].update(m.trust.row(m.addr.key))
    return rows


def security_view(m: Any, now: float) -> dict[str, Any]:
    """This node's security state for `lanmesh status` and `lanmesh doctor`."""
    return {
        "mode": "insecure" if m.s.key is None else "identities" if m.trust is not None else "curve",
        "fingerprint": m.s.fingerprint,
        "auth_rejected": m.stats["auth_rejected"],
        "handshake_failed": m.stats["handshake_failed"],
        "identity_mismatch": m.stats["identity_mismatch"],
        "identity_conflict": m.stats["identity_conflict"],
        "incarnation_refused": m.stats["incarnation_refused"],
        "bad_peer_address": m.stats["bad_peer_address"],
        **(m.trust.view() if m.trust is not None else {}),
        "foreign": [
            {k: v for k, v in e.items() if k != "last_seen"} | {"last_seen_s": round(now - e["last_seen"], 1)}
            for e in m.links.foreign.values()
        ],
    }
