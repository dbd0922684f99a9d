"""Operators see stages: `lanmesh status` lists a node's stage as `smollm2[0-14]` with its load, and a node that wants
a stage of a model (the automatic split) says so."""

from __future__ import annotations

import pytest

from nodes.cli.main import format_status

ROWS = [
    {"node": "a", "address": "10.0.0.1:7000", "state": "self", "source": "self",
     "models": {"smollm2[0-14]": [2, 0, 16, "3f7583b1"]}, "labels": {}},
    {"node": "b", "address": "10.0.0.2:7000", "state": "alive", "source": "mdns", "last_heard_s": 0.1,
     "models": {"smollm2[15-29]": [1, 0, 16, "3f7583b1"]}, "labels": {}},
    {"node": "c", "address": "10.0.0.3:7000", "state": "alive", "source": "mdns", "last_heard_s": 0.2,
     "models": {}, "labels": {}, "wants": {"smollm2": {"budget_mib": 300, "cores": 1.0}}},
]  # fmt: skip


def test_status_lists_each_nodes_stage_and_what_a_node_waits_to_hold() -> None:
    text = format_status(ROWS)
    assert "smollm2[0-14]:2/0/16" in text and "smollm2[15-29]:1/0/16" in text
    assert "(smollm2:wanted)" in text


def test_the_live_table_shows_them_too() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    from nodes.cli.console import status_table

    console = Console(width=200, record=True)
    console.print(status_table(ROWS, "a"))
    text = console.export_text()
    assert "smollm2[0-14] 2/0/16" in text and "(smollm2: a stage, when split)" in text


def test_the_http_api_lists_a_split_model_under_its_own_name_served_by_its_stage_holders() -> None:
    pytest.importorskip("fastapi")
    from nodes.api.mesh_api import live_servers, model_names

    assert model_names(ROWS) == ["smollm2"]
    assert live_servers(ROWS, "smollm2") == (True, ["a", "b"])
    assert live_servers(ROWS, "smollm2@3f7583b1") == (True, ["a", "b"])
    assert live_servers(ROWS, "smollm2@00000000") == (False, [])
