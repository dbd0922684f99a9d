"""`rollout`: every node of a 4-node mesh moves to a new version of a model under steady load.

`lanmesh rollout` (run from the client host) takes the nodes one at a time: load the new version beside the old,
switch the name's requests to it, drain and close the old. Measured: failed requests (the goal is none), each
step's duration, and what every node serves at the end.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from .model_files import make_lookup_embedder
from .plots import plot_rollout
from .report import percentile, write
from .testbed import Testbed, read_events

NODES = 4
NAME = "emb"
IN_FLIGHT = 8


def run(quick: bool = False, mode: str = "auto") -> dict[str, Any]:
    megabytes = 8.0 if quick else 32.0
    pre, duration = (3.0, 20.0) if quick else (5.0, 40.0)
    with Testbed(NODES, mode) as bed:
        old = make_lookup_embedder(bed.log_dir / "v1", megabytes=megabytes, seed=1)
        new = make_lookup_embedder(bed.log_dir / "v2", megabytes=megabytes, seed=2)
        for i in range(1, NODES + 1):
            bed.start_node(i, ["--model", f"name={NAME},path={old}", "--cache-dir", str(bed.log_dir / f"cache-{i}")])
        bed.converge()
        spec = f"name={NAME},path={new}"
        started: list[float] = []
        events: list[dict[str, Any]] = []
        tool: list[Any] = []

        def read(proc: Any) -> None:
            for event in read_events(proc):
                events.append(event)

        def start_rollout(event: dict[str, Any]) -> None:
            if event["event"] == "tick" and not started and event["second"] + 1 >= pre:
                argv = [sys.executable, "-m", "bench.modeltool", "rollout", "--node", bed.nodes["n1"].address,
                        "--name", NAME, "--spec", spec]  # fmt: skip
                proc = bed.spawn_client(argv)
                reader = threading.Thread(target=read, args=(proc,), daemon=True)
                reader.start()
                tool.extend([proc, reader])
                started.append(event["t"])

        print(f"rollout: {NODES} nodes of {NAME} ({megabytes:g} MB), {IN_FLIGHT} requests in flight, "
              f"rollout at {pre:g} s")  # fmt: skip
        summary, samples = bed.run_load(NAME, IN_FLIGHT, duration, on_event=start_rollout, label="load + rollout",
                                        task="embed")  # fmt: skip
        if not tool:
            raise RuntimeError("the load ended before the rollout started")
        tool[0].wait(300)
        tool[1].join(10)
        where = bed.describe()
    done = next((e for e in events if e["event"] == "summary"), None)
    if done is None or "error" in done:
        raise RuntimeError(f"the rollout failed: {done}")
    t0 = summary["t0"]
    says = [e for e in events if e["event"] == "say"]
    steps = []
    for step, said in zip(done["steps"], says, strict=False):
        end = said["t"] - t0
        total = step["load_s"] + step["switch_s"] + step["drain_s"]
        steps.append({**step, "start_s": end - total, "end_s": end})
    new_short = steps[0]["new"] if steps else ""
    on_new = [
        row["node"]
        for row in done["after"]
        if [(n, v) for n, v, _state in row["models"] if n == NAME] == [(NAME, new_short)]
    ]
    lat = [(e - s) * 1000 for s, e, ok, _ in samples if ok]
    result = {
        "nodes": NODES,
        "model": {"name": NAME, "megabytes": megabytes, "kind": "onnx-embed (a lookup table)"},
        "load": {"kind": "closed loop, embeddings", "in_flight": IN_FLIGHT, "seconds": duration},
        "testbed": where,
        "quick": quick,
        "repetitions": 1,
        "steps": steps,
        "after": done["after"],
        "timeline": summary["timeline"],
        "failures": summary["failures"],
        "summary": {
            "requests": summary["ok"] + summary["failed"],
            "failed": summary["failed"],
            "nodes_moved": len(steps),
            "nodes_on_new_version": len(on_new),
            "rollout_s": done["seconds"],
            "step_s_max": max((s["end_s"] - s["start_s"] for s in steps), default=None),
            "p99_ms": percentile(lat, 99) if lat else None,
        },
    }
    path = write("rollout", result, plot_rollout)
    s = result["summary"]
    print(f"  {s['failed']} failed of {s['requests']}; {s['nodes_on_new_version']}/{NODES} nodes on {new_short}; "
          f"rollout took {s['rollout_s']:.1f}s")  # fmt: skip
    for st in steps:
        print(f"  {st['node']}: load {st['load_s']:.2f}s, switch {st['switch_s'] * 1000:.0f} ms, "
              f"drain {st['drain_s']:.2f}s ({st['handed_back']} handed back)")  # fmt: skip
    print(f"written to {path}")
    return result
