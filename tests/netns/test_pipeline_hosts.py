"""SmolLM2 split over hosts (network namespaces, mDNS): the first stage on one host, two copies of the last stage on
two others, the client on a host of its own. A last-stage host killed with kill -9 mid-stream loses nothing: every
chat completes, with the text the uninterrupted run gave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hosts import Lan
from bench.procs import NodeProc
from nodes.models.packaged import models_status

pytestmark = [pytest.mark.netns, pytest.mark.models, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PORT = 7000
PROMPTS = [
    "Write the numbers from one to thirty in words, separated by commas.",
    "List ten animals that live in the sea.",
    "Describe a walk through a busy market in the morning.",
    "Explain how rain forms, step by step.",
]


@pytest.fixture
def staged_lan(make_lan: Callable[[int], Lan], tmp_path: Path, keyed: Path) -> Iterator[tuple[Lan, list[NodeProc]]]:
    """Host 0: the client. Host 1: layers 0-18. Hosts 2 and 3: layers 19-29 each."""
    missing = [m["name"] for m in models_status().get("models", []) if not m.get("installed", True)]
    if missing:
        pytest.skip(f"model packages not installed: {missing}")
    lan = make_lan(4)
    cache = os.environ.get("LANMESH_TEST_MODEL_CACHE") or str(tmp_path / "cache")
    nodes: list[NodeProc] = []
    try:
        for index, layers in ((1, "0-18"), (2, "19-29"), (3, "19-29")):
            host, name = lan.hosts[index], f"h{index}"

            def spawn(cmd: list[str], env: dict[str, str], name: str = name, host: Any = host) -> subprocess.Popen[Any]:
                log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
                return lan.spawn(host, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), text=False)

            argv = ["--model", "smollm2", "--layers", layers, "--http-port", "0", "--grace", "5"]
            node = NodeProc(name, argv, host=host.ip, port=PORT, spawn=spawn,
                            env={"LANMESH_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"})  # fmt: skip
            node.log_path = tmp_path / f"{name}.log"
            node.start(wait=0)
            nodes.append(node)
        yield lan, nodes
    finally:
        for node in nodes:
            node.stop(timeout=10)


def _chats(lan: Lan, entry: str, prompts: Path, on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.chatload", "chat", "--nodes", entry, "--model", "smollm2", "--prompts",
            str(prompts), "--streams", "4", "--count", "8", "--max-tokens", "64", "--timeout", "300"]  # fmt: skip
    proc = lan.spawn(lan.hosts[0], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    assert proc.stdout is not None
    summary: dict[str, Any] | None = None
    for line in proc.stdout:
        event = json.loads(line)
        on_event(event)
        if event["event"] == "summary":
            summary = event
    proc.wait(60)
    assert summary is not None, proc.stderr.read() if proc.stderr else ""
    return summary


def _stage_load(lan: Lan, node: NodeProc) -> int:
    """What `node` holds of the last stage, asked from the client's host."""
    probe = ("import json,sys; from bench.procs import ping; p=ping(sys.argv[1], 2.0, want_status=True); "
             "row=p.status[0]['models'].get('smollm2[19-29]') if p and p.status else None; "
             "print(json.dumps(row[0]+row[1] if row else 0))")  # fmt: skip
    done = lan.exec(lan.hosts[0], [sys.executable, "-c", probe, node.address], timeout=30)
    return int(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else 0


def test_a_last_stage_host_killed_mid_stream_loses_no_chat(
    staged_lan: tuple[Lan, list[NodeProc]], tmp_path: Path
) -> None:
    lan, (first, last_a, last_b) = staged_lan
    converge = [sys.executable, "-m", "bench.loadgen", "converge", "--timeout", "300"]
    done = lan.exec(lan.hosts[0], [*converge, "--nodes", ",".join(n.address for n in staged_lan[1])], timeout=400)
    views = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert views and views[-1].get("converged"), f"no convergence: {done.stdout}\n{done.stderr[-2000:]}"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))

    reference = _chats(lan, first.address, prompts, lambda event: None)
    assert reference["failed"] == 0, reference["failures"]
    expected = {r["prompt"]: r["text"] for r in reference["results"]}

    killed: list[str] = []

    def kill_a_busy_last_stage(event: dict[str, Any]) -> None:
        if event["event"] == "chunks" and event["pieces"] >= 50 and not killed:
            busy = next((n for n in (last_a, last_b) if _stage_load(lan, n)), last_a)
            busy.kill()
            killed.append(busy.name)

    faulted = _chats(lan, first.address, prompts, kill_a_busy_last_stage)
    assert killed, "the chats ended before a stage was killed"
    assert faulted["failed"] == 0, faulted["failures"]
    assert {r["prompt"]: r["text"] for r in faulted["results"]} == expected
    assert any("retry-after:peer-" in r["route"] for r in faulted["results"]), "no chat was moved off the killed host"
