"""The benchmark harness runs end to end in its quick mode: overhead and failover complete and lose nothing; a dozen
idle nodes in namespaces see each other, detect faults and fail no request while nodes are killed and restarted;
the simulated membership protocol stays flat in messages per node as the mesh grows.

Not a timing test: the figures of a quick run on a busy CI machine mean little. Results go to a temporary
folder (`--results-dir`), never over the committed ones in bench/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


def run_bench(results: Path, *args: str, timeout: float = 200) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--results-dir", str(results), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"bench {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return dict(json.loads((results / f"{args[0]}.json").read_text()))


def test_quick_overhead_run_measures_both_paths_and_writes_json_and_plot(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "overhead", "--quick")
    for path in ("direct", "one_hop"):
        assert result["summary"][path]["pipelined_req_per_s"] > 0
        assert all(r["pipelined"]["requests"] == 2000 for r in result["runs"][path])
    assert result["machine"]["cores"] and result["repetitions"] == 1
    assert result["testbed"]["mode"] in ("netns", "loopback")
    assert "skipped" in result["ray_serve"]  # never started in quick mode
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_quick_failover_run_loses_no_request_to_kill_or_sigstop(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "failover", "--quick")
    assert result["summary"]["lost"] == 0, result["all_runs"]
    for fault in ("kill -9", "SIGSTOP"):
        run = result["runs"][fault]
        assert run["requests"] > 0 and run["lost"] == 0, run["failures"]
        assert run["detection"]["complete"], f"not every survivor saw the {fault} victim die: {run['detection']}"
    assert (tmp_path / "failover.png").stat().st_size > 0
    assert "README.md" not in os.listdir(tmp_path)  # only `bench report` writes the summary


def test_quick_transfer_run_arrives_intact_through_a_killed_sender_and_rotten_chunks(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the transfer scenario's model is an ONNX file (pip install 'lanmesh[models]')")
    result = run_bench(tmp_path, "transfer", "--quick")
    runs = result["runs"]
    assert all(r["intact"] for r in runs.values()), {k: (r["state"], r["error"]) for k, r in runs.items()}
    assert "s1" in runs["sender killed"]["dropped"] and runs["sender killed"]["killed_at_progress"] >= 0.5
    assert runs["corrupted chunks"]["corrupt_chunks"] > 0 and "s3" in runs["corrupted chunks"]["dropped"]
    assert runs["clean"]["load"]["failed"] == 0
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_quick_rollout_run_fails_no_request_and_moves_every_node(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the rollout scenario's model is an ONNX file (pip install 'lanmesh[models]')")
    result = run_bench(tmp_path, "rollout", "--quick")
    s = result["summary"]
    assert s["failed"] == 0, result["failures"]
    assert s["nodes_moved"] == s["nodes_on_new_version"] == result["nodes"]
    assert (tmp_path / "rollout.png").stat().st_size > 0


def test_quick_scale_run_sees_every_node_detects_every_fault_and_fails_no_request(tmp_path: Path) -> None:
    from bench.hosts import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the scale scenario runs nodes in network namespaces: {reason}")
    result = run_bench(tmp_path, "scale", "--quick", timeout=280)
    assert result["see_all"]["after_last_start_s"] is not None, result["see_all"]
    for fault in ("kill -9", "SIGSTOP"):
        assert not result[fault]["missed_by"], f"{fault} was never seen by {result[fault]['missed_by']}"
    churn = result["churn"]
    assert churn["load"]["count"] > 0 and churn["load"]["failed"] == 0, churn["load"]["failures"]
    assert churn["see_all_after_s"] is not None
    assert result["idle"]["packets_in_per_s"]["median"] > 0 and (tmp_path / "scale.png").stat().st_size > 0


def test_quick_gossip_simulation_is_flat_in_messages_per_node_and_converges(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "gossip", "--quick", timeout=200)
    s = result["summary"]
    assert s["flatness"] <= 2.0, s["messages_per_node_s"]
    for p in result["points"]:
        assert all(v is not None for v in p["convergence_s"].values()), p["convergence_s"]
    assert (tmp_path / "gossip.png").stat().st_size > 0
