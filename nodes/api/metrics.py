"""Prometheus metrics of one node: request counts fed by the mesh loop and the gateway, mesh state read at scrape.

Counters and histograms are updated as requests end (`RequestObserver`, on the mesh loop, so kept cheap). Queue
depth, in-flight, batches, mesh counters and peers come from the node's own status view, taken on the mesh loop
through a `Ping(want_status)` when `/metrics` is scraped, so no other thread reads the loop's dicts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "NodeMetrics", "PEER_STATES", "RequestTimeline"]

# No `*_created` series: they double the output and Prometheus derives resets without them. (Process-wide; the
# node process has no other prometheus-client user.)
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PEER_STATES = ("alive", "suspect", "dead", "left", "leaving", "unverified")
# Model names come from clients: unknown ones, and any past this many, share one label value so a client
# sending random names cannot grow the series without bound.
MAX_MODEL_LABELS = 64
OTHER_MODEL = "_other"
_UNSERVED = frozenset({"unknown_model", "bad_request"})
# The MeshNode.stats counters that get a metric of their own (everything else: lanmesh_mesh_events_total).
_NAMED_STATS = {
    "retries": ("lanmesh_retries", "Forwarded requests re-sent to another node (failover, reject, timeout)."),
    "rejects_sent": ("lanmesh_rejects_sent", "Forwarded requests this node refused (queue full or leaving)."),
    "rejects_received": ("lanmesh_rejects_received", "Refusals this node got from peers it forwarded to."),
    "bad_frames": ("lanmesh_bad_frames", "Frames dropped or answered BAD_REQUEST: undecodable, unexpected type."),
}


class NodeMetrics:
    """The metrics of one node, in a registry of its own (several nodes may share a process in tests).

    It is the mesh's `RequestObserver`: `completed` and `first_chunk` run on the mesh loop. `render(rows)` takes
    the status rows fetched for this scrape and returns the exposition text.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "lanmesh_requests",
            "Requests this node answered, by model, outcome (ok or the error code) and where they were served: "
            "local (entry here, served here), forwarded (entry here, served by a peer), peer (served here for "
            "another entry node).",
            ["model", "outcome", "where"],
            registry=r,
        )
        self.latency = Histogram(
            "lanmesh_request_duration_seconds",
            "Seconds from a request's arrival at this node to its answer.",
            ["model", "where"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lanmesh_time_to_first_token_seconds",
            "Seconds from a streamed request's arrival to its first chunk.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "lanmesh_tokens",
            "Tokens of requests that entered through this node's HTTP gateway, as the serving model reported them "
            "(kind: prompt or completion). Models that report no usage (echo, sleep) add nothing.",
            ["model", "kind"],
            registry=r,
        )
        self.http_requests = Counter(
            "lanmesh_http_requests",
            "HTTP requests the gateway answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "lanmesh_http_request_duration_seconds",
            "Seconds from an HTTP request's arrival to the end of its response (streams: the last event).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_connections = Gauge(
            "lanmesh_http_connections", "HTTP connections open at the gateway now.", registry=r
        )
        self.http_connections_dropped = Counter(
            "lanmesh_http_connections_dropped",
            "HTTP connections the gateway closed or refused before a request was answered, by reason: "
            "per_ip_limit (that address holds its share), full (every connection busy), shed (a connection "
            "that had sent no request, closed to make room), header_timeout (no complete headers in time).",
            ["reason"],
            registry=r,
        )
        self.http_unauthorized = Counter(
            "lanmesh_http_unauthorized",
            "HTTP requests refused for a missing or wrong API key (logged with the address, rate-limited).",
            registry=r,
        )
        self.http_callers = Counter(
            "lanmesh_http_caller_requests",
            "HTTP requests let in, by the name of the API key they came with (`lanmesh apikey add NAME`; the "
            "single --api-key is `default`).",
            ["caller"],
            registry=r,
        )
        self.schema_checks = Counter(
            "lanmesh_http_schema_checks",
            "JSON answers checked after generation against schema keywords the grammar cannot enforce, by "
            "result: passed (the first answer held), drawn_again (a later one did), failed (none of them: 500).",
            ["result"],
            registry=r,
        )
        self._state = _MeshState(node_id)
        r.register(self._state)
        self.timeline = RequestTimeline()
        self._render_lock = threading.Lock()
        # Label children cached per thread that uses them: the mesh loop (observer) and the gateway loop.
        self._done: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._first: dict[str, Any] = {}
        self._models_seen: set[str] = set()
        self._models_lock = threading.Lock()

    # ------------------------------------------------------------ RequestObserver (mesh loop)

    def completed(self, model: str, outcome: str, where: str, seconds: float) -> None:
        # Unserved names (unknown model, bad request) share one key, so random names do not grow this cache.
        key = (OTHER_MODEL if outcome in _UNSERVED else model, outcome, where)
        children = self._done.get(key)
        if children is None:
            label = key[0] if key[0] == OTHER_MODEL else self.model_label(model)
            children = (self.requests.labels(label, outcome, where), self.latency.labels(label, where))
            self._done[key] = children
        children[0].inc()
        children[1].observe(seconds)
        self.timeline.add(where, outcome == "ok", seconds)

    def first_chunk(self, model: str, seconds: float) -> None:
        child = self._first.get(model)
        if child is None:
            child = self._first[model] = self.ttft.labels(self.model_label(model))
        child.observe(seconds)

    # ------------------------------------------------------------ gateway side

    def model_label(self, model: str) -> str:
        """`model` as a label value, or `_other` once MAX_MODEL_LABELS names are in use."""
        with self._models_lock:
            if model in self._models_seen:
                return model
            if len(self._models_seen) >= MAX_MODEL_LABELS:
                return OTHER_MODEL
            self._models_seen.add(model)
            return model

    def count_tokens(self, model: str, usage: dict[str, Any]) -> None:
        """Add a reply's `usage` (prompt_tokens, completion_tokens) to the token counters."""
        label = self.model_label(model)
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self.tokens.labels(label, kind).inc(n)

    def http_caller(self, name: str) -> None:
        self.http_callers.labels(name).inc()

    def http_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()
        self.http_latency.labels(endpoint).observe(seconds)

    def render(self, rows: list[dict[str, Any]] | None) -> bytes:
        """The exposition text, with the mesh state from `rows` (None: the mesh loop did not answer)."""
        with self._render_lock:
            self._state.rows = rows
            return generate_latest(self.registry)


TIMELINE_SECONDS = 300


class RequestTimeline:
    """Requests this node answered, per second, for the last `seconds` (the web console's chart).

    Written on the mesh loop by `NodeMetrics.completed`, read by the gateway: the lock keeps one second's numbers
    together. A ring of one slot per second, so memory and cost per request stay constant.
    """

    def __init__(self, seconds: int = TIMELINE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        # Per slot: [second stamp, entered here, of which failed, latency sum, latency max, served for peers]
        self._slots: list[list[float]] = [[-1.0, 0, 0, 0.0, 0.0, 0] for _ in range(seconds)]

    def add(self, where: str, ok: bool, seconds: float) -> None:
        now = int(self._clock())
        with self._lock:
            slot = self._slots[now % self.seconds]
            if slot[0] != now:
                slot[:] = [now, 0, 0, 0.0, 0.0, 0]
            if where == "peer":
                slot[5] += 1
                return
            slot[1] += 1
            slot[2] += 0 if ok else 1
            slot[3] += seconds
            slot[4] = max(slot[4], seconds)

    def series(self) -> dict[str, list[float]]:
        """One value per second, oldest first, ending with the current (partial) second.

        `entered`: requests that entered the mesh here (served here or forwarded), `failed`: of those, answered
        with an error, `mean_ms`/`max_ms`: their latency, `for_peers`: requests served here for other entry nodes.
        """
        now = int(self._clock())
        out: dict[str, list[float]] = {k: [] for k in ("entered", "failed", "mean_ms", "max_ms", "for_peers")}
        with self._lock:
            for second in range(now - self.seconds + 1, now + 1):
                slot = self._slots[second % self.seconds]
                live = slot[0] == second
                entered = slot[1] if live else 0
                out["entered"].append(entered)
                out["failed"].append(slot[2] if live else 0)
                out["mean_ms"].append(round(slot[3] / entered * 1000, 2) if entered else 0.0)
                out["max_ms"].append(round(slot[4] * 1000, 2) if live else 0.0)
                out["for_peers"].append(slot[5] if live else 0)
        return out


class _MeshState(Collector):
    """Gauges and counters taken from the status rows of the current scrape."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.rows: list[dict[str, Any]] | None = None

    def collect(self) -> Iterator[Metric]:
        rows = self.rows
        up = GaugeMetricFamily("lanmesh_mesh_up", "1 when the mesh loop answered this scrape's status ping.")
        up.add_metric([], 1.0 if rows else 0.0)
        yield up
        info = GaugeMetricFamily("lanmesh_node_info", "This node's id (always 1).", labels=["node"])
        info.add_metric([self.node_id], 1.0)
        yield info
        me: dict[str, Any] = rows[0] if rows else {}
        yield from _model_gauges(me)
        yield from _executor_counters(me.get("executor") or {})
        yield from _mesh_counters(me.get("stats") or {})
        yield from _peer_gauges(rows[1:] if rows else [])
        yield _mesh_load(rows or [])


def _model_gauges(me: dict[str, Any]) -> Iterator[Metric]:
    inflight = GaugeMetricFamily("lanmesh_model_inflight", "Requests running on this node's model.", labels=["model"])
    queued = GaugeMetricFamily("lanmesh_model_queued", "Requests queued for this node's model.", labels=["model"])
    capacity = GaugeMetricFamily(
        "lanmesh_model_capacity", "Requests this node's model runs at once (max_batch x concurrency).", labels=["model"]
    )
    for model, load in sorted((me.get("models") or {}).items()):
        inflight.add_metric([model], float(load[0]))
        queued.add_metric([model], float(load[1]))
        capacity.add_metric([model], float(load[2]))
    yield from (inflight, queued, capacity)


def _executor_counters(executor: dict[str, dict[str, int]]) -> Iterator[Metric]:
    batches = CounterMetricFamily("lanmesh_batches", "Batches this node's model ran.", labels=["model"])
    batched = CounterMetricFamily(
        "lanmesh_batched_requests",
        "Requests run in those batches (rate of this / rate of lanmesh_batches_total = mean batch size).",
        labels=["model"],
    )
    max_batch = GaugeMetricFamily("lanmesh_model_max_batch", "Largest batch the model takes.", labels=["model"])
    for model, s in sorted(executor.items()):
        batches.add_metric([model], float(s.get("batches", 0)))
        batched.add_metric([model], float(s.get("batched_requests", 0)))
        max_batch.add_metric([model], float(s.get("max_batch", 0)))
    yield from (batches, batched, max_batch)
    yield from _prefix_cache(executor)


# A chat engine's prefix cache: (stats key, metric name, help, is a counter).
_PREFIX_CACHE = (
    ("prefix_lookups", "lanmesh_prefix_cache_lookups", "Requests that looked for a cached prefix.", True),
    ("prefix_hits", "lanmesh_prefix_cache_hits", "Requests that reused a cached prefix (at least one block).", True),
    ("prefix_prompt_tokens", "lanmesh_prefix_cache_prompt_tokens", "Prompt tokens of the requests that looked.", True),
    ("prefix_reused_tokens", "lanmesh_prefix_cache_reused_tokens",
     "Prompt tokens taken from the prefix cache instead of read again (/ prompt tokens = the hit rate).", True),
    ("prefix_evictions", "lanmesh_prefix_cache_evictions", "Cached blocks dropped to make room (LRU).", True),
    ("prefix_cache_bytes", "lanmesh_prefix_cache_bytes", "Bytes of keys and values the prefix cache holds.", False),
    ("prefix_cache_capacity_bytes", "lanmesh_prefix_cache_capacity_bytes", "The prefix cache's size.", False),
)  # fmt: skip


def _prefix_cache(executor: dict[str, dict[str, int]]) -> Iterator[Metric]:
    for key, name, doc, counter in _PREFIX_CACHE:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, doc, labels=["model"])
        for model, s in sorted(executor.items()):
            if key in s:
                family.add_metric([model], float(s[key]))
        yield family


def _mesh_counters(stats: dict[str, int]) -> Iterator[Metric]:
    for key, (name, doc) in _NAMED_STATS.items():
        family = CounterMetricFamily(name, doc)
        family.add_metric([], float(stats.get(key, 0)))
        yield family
    events = CounterMetricFamily(
        "lanmesh_mesh_events",
        "Every counter of the mesh loop (MeshNode.stats): requests_in, forwarded, served_local, errors_<code>, "
        "peer_<state>, duplicate_replies, gossip_dropped, ...",
        labels=["event"],
    )
    for key, value in sorted(stats.items()):
        events.add_metric([key], float(value))
    yield events


def _peer_gauges(peers: list[dict[str, Any]]) -> Iterator[Metric]:
    counts = dict.fromkeys(PEER_STATES, 0)
    age = GaugeMetricFamily(
        "lanmesh_peer_last_heard_seconds",
        "Seconds since this node last heard from the peer itself (peers it neither probes nor sends work to stay "
        "quiet while healthy: their watchers vouch for them).",
        labels=["peer"],
    )
    sent = GaugeMetricFamily("lanmesh_peer_inflight", "Requests this node has in flight at the peer.", labels=["peer"])
    for row in peers:
        state = str(row.get("state", "unknown"))
        counts[state] = counts.get(state, 0) + 1
        peer = str(row.get("node", ""))
        age.add_metric([peer], float(row.get("last_heard_s", 0.0)))
        sent.add_metric([peer], float(row.get("inflight_to", 0)))
    by_state = GaugeMetricFamily("lanmesh_peers", "Peers this node knows, by state.", labels=["state"])
    for state, n in counts.items():
        by_state.add_metric([state], float(n))
    yield from (by_state, age, sent)


def _mesh_load(rows: list[dict[str, Any]]) -> Metric:
    load = GaugeMetricFamily(
        "lanmesh_mesh_model_load",
        "In flight + queued per node and model as this node sees it (its own exactly, peers' as gossiped).",
        labels=["node", "model"],
    )
    for row in rows:
        if row.get("state") not in ("self", "alive"):
            continue
        for model, v in sorted((row.get("models") or {}).items()):
            load.add_metric([str(row.get("node", "")), model], float(v[0] + v[1]))
    return load
