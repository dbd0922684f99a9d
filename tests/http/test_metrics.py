"""/metrics: Prometheus text that prometheus-client parses, counters that move as requests are served, and a
Grafana dashboard that asks only for metrics a node exports."""

from __future__ import annotations

import json
import re

import httpx
from gateway_nodes import GatewayNode, scrape, value
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "lanmesh.json"


def test_counters_move_when_requests_are_served(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    before = scrape(echo_node)
    for _ in range(3):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "count me"}])
    list(client.chat.completions.create(model="sleep:200", messages=[{"role": "user", "content": "a b"}], stream=True))
    after = scrape(echo_node)

    ok_echo = {"model": "echo", "outcome": "ok", "where": "local"}
    assert value(after, "lanmesh_requests_total", **ok_echo) - value(before, "lanmesh_requests_total", **ok_echo) == 3
    grew = value(after, "lanmesh_time_to_first_token_seconds_count", model="sleep:200") - value(
        before, "lanmesh_time_to_first_token_seconds_count", model="sleep:200"
    )
    assert grew == 1
    chats = {"endpoint": "/v1/chat/completions", "status": "200"}
    http = "lanmesh_http_requests_total"
    assert value(after, http, **chats) - value(before, http, **chats) == 4
    assert value(after, "lanmesh_batches_total", model="echo") > value(before, "lanmesh_batches_total", model="echo")
    assert value(after, "lanmesh_model_capacity", model="sleep:200") == 1
    assert value(after, "lanmesh_mesh_up") == 1
    assert value(after, "lanmesh_peers", state="alive") == 0
    assert value(after, "lanmesh_node_info", node="http-echo") == 1


def test_unknown_model_names_do_not_grow_the_label_set(echo_node: GatewayNode) -> None:
    for i in range(5):
        httpx.post(f"{echo_node.url}/v1/completions", json={"model": f"random-{i}", "prompt": "x"})
    models = {dict(key).get("model") for key in scrape(echo_node)["lanmesh_requests_total"]}
    assert not any(m and m.startswith("random-") for m in models)
    assert "_other" in models


def declared_names(node: GatewayNode) -> set[str]:
    """Every series name /metrics declares, with or without samples yet (a counter no model fed still counts)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    return {f.name + s for f in text_string_to_metric_families(text) for s in suffixes.get(f.type, [""])}


def test_grafana_dashboard_uses_only_exported_metric_names(echo_node: GatewayNode) -> None:
    exported = declared_names(echo_node)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(queries) >= 15
    used = {name for q in queries for name in re.findall(r"\blanmesh_[a-z0-9_]+", q)}
    assert all(re.search(r"\blanmesh_[a-z0-9_]+", q) for q in queries), "every panel queries a lanmesh metric"
    assert used - exported == set()
    core = {
        "lanmesh_requests_total",
        "lanmesh_request_duration_seconds_bucket",
        "lanmesh_time_to_first_token_seconds_bucket",
        "lanmesh_model_queued",
        "lanmesh_peers",
        "lanmesh_peer_last_heard_seconds",
        "lanmesh_retries_total",
        "lanmesh_tokens_total",
    }
    assert core <= used
