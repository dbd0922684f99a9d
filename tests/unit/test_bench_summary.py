"""`python -m bench report` renders the goals and a section for split, scale and gossip from their JSON results,
and still renders where an older JSON lacks some of the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import scale, summary

MACHINE = {
    "cores": 2,
    "cpu": "x86_64",
    "memory_gib": 23.5,
    "load_avg_1m": 1.0,
    "load_avg_1m_at_start": 0.5,
    "python": "3.11.7",
    "versions": {"lanmesh": "0.1.0"},
}


def _case(single: list[float], aggregate: list[float], ranges: list[list[int]], rss: dict[str, float]) -> dict:
    return {
        "ranges": ranges,
        "nodes": {n: ["smollm2"] for n in rss},
        "single_tok_per_s": single[0],
        "ttft_ms": 210.0,
        "aggregate_tok_per_s": aggregate[0],
        "runs": {"single_tok_per_s": single, "aggregate_tok_per_s": aggregate},
        "rss_mib": rss,
        "bytes_per_token_between_stages": 2400.0 if len(rss) > 1 else 0.0,
        "bytes_per_position_per_hop": 1180.0 if len(rss) > 1 else 0.0,
    }


def split_result() -> dict[str, Any]:
    """What bench/split.py writes, in small."""
    return {
        "scenario": "split",
        "when": "2026-12-07T19:00:00Z",
        "machine": MACHINE,
        "quick": False,
        "repetitions": 3,
        "goals": {
            "aggregate_over_whole": 1.6,
            "single_over_whole": 0.8,
            "failed_when_a_stage_is_killed": 0,
            "memory_over_share": 1.15,
        },
        "testbed": {"mode": "netns", "detail": "6 node hosts", "security": "CURVE", "pinning": "each node on a core"},
        "whole": _case([10.0], [20.0], [], {"n1": 400.0}),
        "stages_2": {**_case([9.0], [34.0], [[0, 14], [15, 29]], {"n2": 260.0, "n3": 270.0})},
        "stages_3": {**_case([8.5], [30.0], [[0, 9], [10, 19], [20, 29]], {"n4": 210.0, "n5": 200.0, "n6": 215.0})},
        "empty_node_rss_mib": 120.0,
        "engines": {
            "event": "summary",
            "layers": "0-14",
            "past_tokens": 200,
            "threads": 1,
            "ms_per_step": {
                "batch 1": {"onnx stage graph (the build's int4)": 3.21, "torch fp32 (transformers layers)": 7.5},
                "batch 4": {"onnx stage graph (the build's int4)": 5.02, "torch fp32 (transformers layers)": 11.0},
            },
        },
        "kill": {
            "killed": ["n3"],
            "reference_failed": 0,
            "failed": 0,
            "failures": [],
            "same_text": True,
            "moved": 5,
            "tok_per_s_with_the_kill": 25.0,
        },
        "too_big": {
            "2_nodes": {
                "max_memory": "400M",
                "stages": {"n1": ["smollm2[0-14]"], "n2": ["smollm2[15-29]"]},
                "answered": True,
                "answer": "Paris",
                "rss_mib": {"n1": 250.0, "n2": 260.0},
            },
            "3_nodes": {
                "max_memory": "330M",
                "stages": {"n1": [], "n2": [], "n3": []},
                "answered": False,
                "answer": None,
                "rss_mib": {"n1": 130.0, "n2": 130.0, "n3": 130.0},
            },
        },  # fmt: skip
        "summary": {
            "whole_single_tok_per_s": 10.0,
            "whole_aggregate_tok_per_s": 20.0,
            "aggregate_over_whole": 1.7,
            "single_over_whole": 0.9,
            "three_aggregate_over_whole": 1.5,
            "three_single_over_whole": 0.85,
            "failed_when_a_stage_is_killed": 0,
            "same_text_when_a_stage_is_killed": True,
            "too_big_served_by_2": True,
            "too_big_served_by_3": False,
            "whole_model_mib": 280.0,
            "memory": {
                "2 stages, n2 [0-14]": {
                    "model_mib": 140.0,
                    "share_of_weights": 0.5,
                    "layer_share": 0.5,
                    "over_share": 1.0,
                    "over_layer_share": 1.0,
                },
                "2 stages, n3 [15-29]": {
                    "model_mib": 150.0,
                    "share_of_weights": 0.5,
                    "layer_share": 0.5,
                    "over_share": 1.07,
                    "over_layer_share": 1.07,
                },
            },  # fmt: skip
            "memory_over_share_worst": 1.07,
        },
    }


def scale_result() -> dict[str, Any]:
    """What bench/scale.py writes, in small (12 nodes, the all-see-all goal missed)."""
    spread = {"median": 20.0, "p90": 21.0, "max": 22.0}
    window = {"seconds": 30.0, "nodes": 12, "packets_in_per_s": spread, "packets_out_per_s": spread,
              "kb_in_per_s": spread, "kb_out_per_s": spread, "cpu_percent": {"median": 0.77, "p90": 0.8, "max": 0.9},
              "rss_mib": {"median": 57.8, "p90": 58.0, "max": 59.0}}  # fmt: skip
    load = {"count": 300, "ok": 300, "failed": 0, "failures": [], "p50_ms": 5.9, "p99_ms": 744.0, "retried": 0}
    fault = {"victim": "n12", "survivors": 11, "not_alive_all_s": 0.11, "not_alive_median_s": 0.04,
             "dead_all_s": 0.11, "dead_median_s": 0.04, "missed_by": []}  # fmt: skip
    return {
        "scenario": "scale",
        "when": "2026-12-07T18:22:02Z",
        "machine": MACHINE,
        "quick": True,
        "nodes": 12,
        "model": "echo",
        "see_all": {
            "after_last_start_s": 9.76,
            "after_last_ready_s": 3.54,
            "median_node_s": 9.58,
            "not_converged": None,
        },  # fmt: skip
        "idle": window,
        "light": {**window, "load": load},
        "kill -9": fault,
        "SIGSTOP": {**fault, "victim": "n11", "dead_all_s": 2.58, "dead_median_s": 2.55},
        "churn": {"killed_and_restarted": ["n11", "n10"], "entries": 10, "load": load, "see_all_after_s": 7.3},
        "goals": dict(scale.GOALS),
        "summary": {
            "idle_packets_in_per_s": 20.0,
            "idle_cpu_percent": 0.77,
            "idle_rss_mib": 57.8,
            "see_all_s": 9.76,
            "kill_detected_s": 0.11,
            "sigstop_detected_s": 2.58,
            "churn_failed": 0,
            "met": {
                "idle_packets_in_per_s": True,
                "idle_cpu_percent": True,
                "see_all_s": False,
                "kill_detected_s": True,
                "sigstop_detected_s": True,
                "churn_failed": True,
            },  # fmt: skip
        },
        "testbed": {"security": "CURVE", "mode": "netns", "detail": "12 node hosts"},
    }


def gossip_result() -> dict[str, Any]:
    """What bench/gossip.py writes, in small (two sizes)."""

    def point(n: int, rate: float, join: float | None) -> dict[str, Any]:
        return {"nodes": n, "idle_seconds": 20.0, "node_hours": n * 20 / 3600, "messages_per_node_s": rate,
                "bytes_per_node_s": 300.0, "by_type_per_node_s": {"Digest": 0.5, "Ping": 11.5, "Pong": 11.3},
                "dropped_share": 0.01, "false_suspicions": 0, "false_suspicions_per_node_hour": 0.0,
                "suspect_states_seen_of_live_nodes": 0,
                "convergence_s": {"hung_suspect": 0.93, "hung_dead": 2.89, "woke_alive": 3.73, "killed_dead": 0.5,
                                  "join": join}, "wall_s": 10.0}  # fmt: skip

    return {
        "scenario": "gossip",
        "when": "2026-12-07T16:43:49Z",
        "machine": MACHINE,
        "quick": False,
        "network": {"loss": 0.01, "delay_s": 0.0005, "tick_s": 0.05, "model": "each delivery lost on its own"},
        "protocol": {
            "interval_s": 0.25,
            "suspect_after_s": 1.0,
            "dead_after_s": 3.0,
            "watchers": 3,
            "sync_every_s": 2.0,
        },  # fmt: skip
        "goals": {"flat_within": 2.0, "false_suspicions_per_node_hour": 1.0},
        "points": [point(10, 23.19, 0.1), point(10_000, 23.31, None)],
        "summary": {
            "sizes": [10, 10_000],
            "messages_per_node_s": [23.19, 23.31],
            "flatness": 1.005,
            "false_suspicions_per_node_hour": 0.0,
            "hung_dead_s": [2.89, 2.89],
            "killed_dead_s": [0.5, 0.5],
            "join_s": [0.1, None],
            "join_over_log_n": [0.043, None],
            "met": {"flat_within_2x": True, "false_suspicions_below_1_per_node_hour": True},
        },
    }


def _render(folder: Path, results: list[dict[str, Any]]) -> str:
    for result in results:
        (folder / f"{result['scenario']}.json").write_text(json.dumps(result))
    return summary.render(folder).read_text()


def _goal_row(readme: str, starts: str) -> list[str]:
    """The cells (goal, measured, met) of the goal row that starts with `starts`."""
    rows = [line for line in readme.splitlines() if line.startswith(f"| {starts}")]
    assert len(rows) == 1, f"one goal row starting {starts!r} expected, found {rows}"
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def test_split_scale_and_gossip_goals_and_sections_are_rendered(tmp_path: Path) -> None:
    readme = _render(tmp_path, [split_result(), scale_result(), gossip_result()])

    assert _goal_row(readme, "split: 8 streams over 2 stages")[1:] == [
        "1.70x (34.0 vs 20.0 tok/s; the ratio is the median of each round's)",
        "yes",
    ]
    assert _goal_row(readme, "split: one stream over 2 stages")[2] == "yes"
    assert _goal_row(readme, "split: a stage node killed")[1:] == ["0 failed; same text: yes", "yes"]
    assert _goal_row(readme, "split: a stage node's memory")[1:] == ["worst 1.07x", "yes"]
    assert _goal_row(readme, "split: SmolLM2, refused whole by every node (--max-memory 400M), served by 2")[2] == "yes"
    assert _goal_row(readme, "split: SmolLM2, refused whole by every node (--max-memory 330M), served by 3")[1:] == [
        "no answer",
        "**no**",
    ]
    assert _goal_row(readme, "scale, 12 nodes: idle, <= 60 packets/s")[1:] == ["20.0 packets/s (median node)", "yes"]
    assert _goal_row(readme, "scale, 12 nodes: every node sees every other within 5 s")[1:] == ["9.76 s", "**no**"]
    assert _goal_row(readme, "scale, 12 nodes: 0 failed requests")[1:] == ["0 of 300", "yes"]
    assert _goal_row(readme, "gossip: messages per node per second flat within 2x from 10 to 10,000 nodes")[1:] == [
        "1.00x (23.2 to 23.3 msg/s)",
        "yes",
    ]
    assert _goal_row(readme, "gossip: false suspicions < 1 per node-hour at 1% loss")[2] == "yes"

    for title in ("## One model over several nodes", "## Scale: a mesh of idle nodes", "## Membership protocol"):
        assert title in readme
    assert "| 2 stages | 0-14, 15-29 | 9.0 tok/s | 210 ms | 34.0 tok/s | 0.90x | 1.70x | 260, 270 MiB |" in readme
    assert "| 2 stages, n3 [15-29] | 150 MiB | 50.0% | 1.07x | 1.07x |" in readme
    assert "| batch 4 | 5.02 | 11.00 |" in readme
    assert "| packets/s in | 20.0 | 21.0 | 22.0 | 20.0 | 21.0 | 22.0 |" in readme
    assert "| SIGSTOP | n11 | 0.11 s | 0.04 s | 2.58 s | 2.55 s | 0 of 11 |" in readme
    assert "| 10,000 | 23.3 | 300 | Digest 0.5, Ping 11.5, Pong 11.3 |" in readme
    assert "| 0.50 s | — |" in readme  # the newcomer at 10,000 nodes never converged: shown as —
    assert "Not run yet: overhead," in readme


def test_results_missing_figures_render_with_dashes(tmp_path: Path) -> None:
    split, scale, gossip = split_result(), scale_result(), gossip_result()
    for key in ("stages_3", "engines", "kill", "too_big", "empty_node_rss_mib"):
        del split[key]
    del split["summary"]["memory_over_share_worst"], split["summary"]["too_big_served_by_2"]
    del split["stages_2"]["bytes_per_position_per_hop"]
    del scale["churn"], scale["SIGSTOP"], scale["light"], scale["summary"]["met"]
    scale["summary"]["kill_detected_s"] = None  # some survivor never saw the kill
    del gossip["summary"]["flatness"], gossip["summary"]["met"], gossip["network"], gossip["points"][0]["convergence_s"]

    readme = _render(tmp_path, [split, scale, gossip])

    assert _goal_row(readme, "split: a stage node's memory")[1:] == ["worst —", "n/a"]
    assert _goal_row(readme, "split: SmolLM2, refused whole by every node (--max-memory ?), served by 2")[1:] == [
        "—",
        "n/a",
    ]
    assert _goal_row(readme, "split: a stage node killed")[1:] == ["0 failed; same text: —", "n/a"]
    assert _goal_row(readme, "scale, 12 nodes: a kill -9 seen dead")[1:] == ["not every node", "**no**"]
    assert _goal_row(readme, "scale, 12 nodes: every node sees every other")[2] == "**no**"  # judged from the goals
    assert _goal_row(readme, "gossip: messages per node per second")[1:] == ["— (23.2 to 23.3 msg/s)", "n/a"]
    assert "| 2 stages | 0-14, 15-29 |" in readme and "| 2400 (—) |" in readme
    assert "| packets/s in | 20.0 | 21.0 | 22.0 | — | — | — |" in readme
    assert "| 10 | 23.2 | 300 |" in readme
