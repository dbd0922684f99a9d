"""`split`: SmolLM2 split into pipeline stages over several hosts, against one node holding it whole, in one run.

Every node is pinned to a core (taskset), so one core stands for one machine; this machine has two cores, so the
three-stage case puts its first and third stages on one core, and the kill case its two copies of the last stage on
one core (said in the result). Hosts are network namespaces (root) with the client on a host of its own; without
root, processes on 127.0.0.1. Parts:
- engines: a range of layers as the stage's ONNX graph vs torch, one thread (bench/stage_engines.py);
- whole (one node, one core), 2 stages and 3 stages, all running at once and kept apart by a `set` label the
  requests require, measured in turn round after round (so the machine's other load falls on all alike): one
  stream (tok/s, time to first token), 8 streams (tok/s), each node's resident memory, bytes sent between stages
  per generated token;
- kill: 8 streams over a chain whose last stage has two holders; one of them is killed (kill -9) mid-stream;
- too big: nodes whose --max-memory refuses SmolLM2 whole, two of them and then three, split it by the automatic
  plan and answer;
- memory: each stage node's memory for the model (its resident memory less that of a node serving nothing)
  against its share of the whole model's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .models import PROMPTS, missing_models
from .report import median, progress, write
from .testbed import Testbed, read_events, summary_of

GOALS = {
    "aggregate_over_whole": 1.6,  # 8 streams over 2 stages on 2 cores / one node on one core
    "single_over_whole": 0.8,  # one stream, same
    "failed_when_a_stage_is_killed": 0,
    "memory_over_share": 1.15,  # a stage node's memory for the model / its share of the whole model's
}
MODEL = "smollm2"
TOO_BIG = {2: "400M", 3: "330M"}  # --max-memory under which SmolLM2 whole does not fit one node, for 2 and 3 nodes


def _ranges(stages: int) -> list[tuple[int, int]]:
    """The split the automatic plan makes for equal nodes: the work (multiply-adds, the head's included) balanced."""
    from nodes.models.backends.onnx_stage_graph import layer_costs
    from nodes.models.memory import whole_build
    from nodes.models.specs import parse_model_arg
    from nodes.models.stage_plan import balanced_split

    built = whole_build(parse_model_arg(MODEL))
    if built is None:
        raise RuntimeError("SmolLM2's build is not in the cache; the whole-model node builds it first")
    ranges = balanced_split(layer_costs(built), [2**62] * stages, [1.0] * stages, lambda a, b: 0)
    assert ranges is not None
    return ranges


class Run:
    """The testbed, the prompts file, and the measurements of one case."""

    def __init__(self, bed: Testbed, quick: bool, reps: int) -> None:
        self.bed = bed
        self.quick = quick
        self.reps = reps
        self.max_tokens = 32 if quick else 128
        self.prompts = bed.log_dir / "prompts.json"
        self.prompts.write_text(json.dumps(PROMPTS))

    def start(self, nodes: list[tuple[int, list[str], str]], timeout: float = 600) -> list[str]:
        """Start (host index, model flags, cores) nodes; wait until they converge."""
        names = []
        for index, argv, cpus in nodes:
            name = f"n{index}"
            self.bed.start_node(index, [*argv, "--grace", "3"], name=name, cpus=cpus)
            names.append(name)
        self.bed.converge(timeout=timeout)  # every running node sees every other (the tool checks whole meshes)
        return names

    def stop(self, names: list[str]) -> None:
        for name in names:
            self.bed.nodes[name].stop(timeout=20)
            del self.bed.nodes[name]

    def chats(self, entry: str, streams: int, count: int, on_event: Any = None, require: str = "") -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.chatload", "chat", "--nodes", self.bed.nodes[entry].address, "--model",
                MODEL, "--prompts", str(self.prompts), "--streams", str(streams), "--count", str(count),
                "--max-tokens", str(self.max_tokens), "--timeout", "600"]  # fmt: skip
        argv += ["--require", require] if require else []
        proc = self.bed.spawn_client(argv)
        summary = None
        for event in read_events(proc):
            if on_event is not None:
                on_event(event)
            if event["event"] == "summary":
                summary = event
        proc.wait(60)
        if summary is None:
            raise RuntimeError(f"chatload died: {proc.stderr.read() if proc.stderr else ''}\n{self.bed.logs()}")
        return summary

    def rows(self, names: list[str]) -> dict[str, dict[str, Any]]:
        argv = [sys.executable, "-m", "bench.chatload", "status", "--nodes", ",".join(self.bed.addresses(names))]
        rows = self.bed.run_client(argv, timeout=60)["rows"]
        return {name: rows[self.bed.nodes[name].address] or {} for name in names}

    def rss_mib(self, names: list[str]) -> dict[str, float]:
        import psutil

        return {n: psutil.Process(self.bed.nodes[n].pid).memory_info().rss / 2**20 for n in names}

    def compare(self, sets: dict[str, tuple[list[str], str]]) -> dict[str, dict[str, Any]]:
        """Every set of nodes (kept apart by a `set` label the requests require) measured in turn, round after
        round, so the machine's other load falls on all of them alike: one stream (one chat), then 8 streams (8
        chats at once). Medians over the rounds; memory, and bytes sent between stages per generated token."""
        for label, (_, entry) in sets.items():
            self.chats(entry, 1, 1, require=f"set={label}")  # warm-up: sessions, caches, connections
        before = {label: self.rows(names) for label, (names, _) in sets.items()}
        single: dict[str, list[dict[str, Any]]] = {label: [] for label in sets}
        eight: dict[str, list[float]] = {label: [] for label in sets}
        tokens = dict.fromkeys(sets, 0)
        positions = dict.fromkeys(sets, 0)  # prompt and generated tokens: what crosses each hop
        for rep in range(self.reps):
            progress(rep, self.reps, "one stream, then 8 streams, on each set in turn")
            for label, (_, entry) in sets.items():
                done = self.chats(entry, 1, 1, require=f"set={label}")
                single[label] += [x for x in done["results"] if x["ok"]]
                tokens[label] += done["tokens"]
                positions[label] += sum(x["tokens"] + x["prompt_tokens"] for x in done["results"] if x["ok"])
            for label, (_, entry) in sets.items():
                done = self.chats(entry, 8, 8, require=f"set={label}")
                eight[label].append(done["tok_per_s"])
                tokens[label] += done["tokens"]
                positions[label] += sum(x["tokens"] + x["prompt_tokens"] for x in done["results"] if x["ok"])
        progress(self.reps, self.reps, "one stream, then 8 streams, on each set in turn")
        out = {}
        for label, (names, _) in sets.items():
            after = self.rows(names)
            moved = sum(after[n].get("stats", {}).get("stage_bytes_out", 0) - before[label][n].get("stats", {}).get(
                "stage_bytes_out", 0) for n in names)  # fmt: skip
            out[label] = {
                "nodes": {n: sorted(after[n].get("models", {})) for n in names},
                "single_tok_per_s": median([x["tokens"] / x["seconds"] for x in single[label]]),
                "ttft_ms": median([x["ttft_ms"] for x in single[label]]),
                "aggregate_tok_per_s": median(eight[label]),
                "runs": {
                    "single_tok_per_s": [x["tokens"] / x["seconds"] for x in single[label]],
                    "aggregate_tok_per_s": eight[label],
                },  # fmt: skip
                "rss_mib": self.rss_mib(names),
                "bytes_per_token_between_stages": moved / tokens[label] if tokens[label] else 0.0,
                # each position crosses every hop once (its hidden state), and each generated token comes back once
                "bytes_per_position_per_hop": moved / positions[label] / max(1, len(names) - 1)
                if len(names) > 1
                else 0.0,
            }
        return out


def run(quick: bool = False, mode: str = "auto", reps: int = 3) -> dict[str, Any] | None:
    missing = missing_models()
    if missing:
        print(f"split: skipped, SmolLM2 cannot run here: {missing}")
        return None
    reps = 2 if quick else reps
    result: dict[str, Any] = {"quick": quick, "repetitions": reps, "goals": GOALS}
    with Testbed(6, mode) as bed:
        r = Run(bed, quick, reps)
        pinning = ("each node pinned to one core (taskset): the whole node on core 0; 2 stages on cores 0 and 1; 3 "
                   "stages on cores 0, 1, 0 (this machine has two); kill: the two copies of the last stage both on "
                   "core 1; the client unpinned")  # fmt: skip
        result["testbed"] = {**bed.describe(), "pinning": pinning}
        print("split: SmolLM2 whole on one node (one core), in 2 stages and in 3, all running; measured in turn")
        # The stage engine keeps no prefix cache: the whole node runs without one too (like for like: the bench's
        # prompts repeat, and a cache would read them at once and hold memory the stages do not).
        whole = r.start([(1, ["--model", MODEL, "--prefix-cache", "0", "--label", "set=whole"], "0")])
        ranges = {2: _ranges(2), 3: _ranges(3)}
        sets = {"whole": (whole, whole[0])}
        host = 2
        for stages, label in ((2, "two"), (3, "three")):
            nodes = []
            for i, (a, b) in enumerate(ranges[stages]):
                nodes.append((host, ["--model", MODEL, "--layers", f"{a}-{b}", "--label", f"set={label}"], str(i % 2)))
                host += 1
            names = r.start(nodes)
            sets[label] = (names, names[-1])
        measured = r.compare(sets)
        result["whole"] = measured["whole"]
        for stages, label in ((2, "two"), (3, "three")):
            result[f"stages_{stages}"] = {"ranges": ranges[stages], **measured[label]}
        r.stop([n for names, _ in sets.values() for n in names])
        names = r.start([(1, ["--model", "echo"], "0")])
        result["empty_node_rss_mib"] = r.rss_mib(names)[names[0]]
        r.stop(names)
        result["engines"] = _engines(bed, quick)
        result["kill"] = _kill(r, ranges[2])
        result["too_big"] = _too_big(r)
    result["summary"] = _summary(result)
    path = write("split", result)
    _print(result)
    print(f"written to {path}")
    return result


def _engines(bed: Testbed, quick: bool) -> dict[str, Any]:
    from nodes.models.cache import cache_facts
    from nodes.models.memory import whole_build
    from nodes.models.specs import parse_model_arg

    built = whole_build(parse_model_arg(MODEL))
    assert built is not None
    hf = cache_facts(built).get("hf_folder")
    argv = ["taskset", "-c", "1", sys.executable, "-m", "bench.stage_engines", str(built), "--first", "0", "--last",
            "14", "--reps", "5" if quick else "20", *(["--hf", hf] if hf and Path(hf).exists() else [])]  # fmt: skip
    print("split: layers 0-14 as an ONNX stage graph and in torch, one thread")
    return summary_of(*_run(argv), argv)


def _run(argv: list[str]) -> tuple[str, str]:
    import subprocess

    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    return done.stdout, done.stderr


def _kill(r: Run, ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """8 streams through a chain whose last stage two nodes hold; one is killed mid-stream: nothing may fail, and
    every chat must end with the text the uninterrupted run gave."""
    (a0, a1), (b0, b1) = ranges
    print(f"split: kill -9 of a last-stage node mid-stream ([{a0}-{a1}] on core 0, two [{b0}-{b1}] on core 1)")
    nodes = [(1, ["--model", MODEL, "--layers", f"{a0}-{a1}"], "0")]
    nodes += [(i, ["--model", MODEL, "--layers", f"{b0}-{b1}"], "1") for i in (2, 3)]
    names = r.start(nodes)
    reference = r.chats(names[0], 8, 8)
    expected = {x["i"]: x["text"] for x in reference["results"] if x["ok"]}
    stage = f"{MODEL}[{b0}-{b1}]"
    killed: list[str] = []
    total = sum(x["tokens"] for x in reference["results"] if x["ok"]) or 8 * r.max_tokens

    def kill(event: dict[str, Any]) -> None:
        if event["event"] == "chunks" and not killed and event["pieces"] >= total // 3:
            rows = r.rows(names[1:])
            busy = max(names[1:], key=lambda n: (rows[n].get("models", {}).get(stage) or [0])[0])
            r.bed.nodes[busy].kill()
            killed.append(busy)

    faulted = r.chats(names[0], 8, 8, kill)
    got = {x["i"]: x["text"] for x in faulted["results"] if x["ok"]}
    r.stop([n for n in names if r.bed.nodes[n].alive()])
    for n in killed:
        r.bed.nodes.pop(n, None)
    return {
        "killed": killed,
        "reference_failed": reference["failed"],
        "failed": faulted["failed"],
        "failures": faulted["failures"],
        "same_text": got == expected,
        "moved": sum("retry-after:peer-" in x.get("route", "") for x in faulted["results"]),
        "tok_per_s_with_the_kill": faulted["tok_per_s"],
    }


def _too_big(r: Run) -> dict[str, Any]:
    """Nodes whose memory limit refuses the model whole serve it together (the automatic split)."""
    out: dict[str, Any] = {}
    for count, limit in TOO_BIG.items():
        print(f"split: {count} nodes with --max-memory {limit} (too little for SmolLM2 whole) split it themselves")
        nodes = [(i, ["--model", MODEL, "--max-memory", limit], str((i - 1) % 2)) for i in range(1, count + 1)]
        names = r.start(nodes)
        served: dict[str, list[str]] = {}
        end = time.monotonic() + 300
        while time.monotonic() < end:
            served = {n: [m for m in row.get("models", {}) if m.startswith(MODEL)] for n, row in r.rows(names).items()}
            if all(served.values()):
                break
            time.sleep(1.0)
        answer = r.chats(names[0], 1, 1) if all(served.values()) else {"failed": 1, "results": []}
        ok = [x for x in answer["results"] if x["ok"]]
        out[f"{count}_nodes"] = {
            "max_memory": limit,
            "stages": served,
            "answered": bool(ok),
            "answer": ok[0]["text"][:120] if ok else None,
            "rss_mib": r.rss_mib(names),
        }
        r.stop(names)
    return out


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    from nodes.models.backends.onnx_stage_graph import layer_costs
    from nodes.models.memory import whole_build
    from nodes.models.specs import parse_model_arg

    whole = result["whole"]
    built = whole_build(parse_model_arg(MODEL))
    costs = layer_costs(built) if built is not None else None
    whole_bytes = (built / "model.onnx.data").stat().st_size if built is not None else 0
    empty = result["empty_node_rss_mib"]
    whole_model = next(iter(whole["rss_mib"].values())) - empty
    memory = {}
    for stages in (2, 3):
        case = result[f"stages_{stages}"]
        for (first, last), (node, rss) in zip(case["ranges"], case["rss_mib"].items(), strict=True):
            share = costs.stage_bytes(first, last) / whole_bytes if costs and whole_bytes else math.nan
            memory[f"{stages} stages, {node} [{first}-{last}]"] = {
                "model_mib": rss - empty, "share_of_weights": share, "layer_share": (last - first + 1) / 30,
                "over_share": (rss - empty) / (share * whole_model) if share else math.nan,
                "over_layer_share": (rss - empty) / ((last - first + 1) / 30 * whole_model),
            }  # fmt: skip
    two, three = result["stages_2"], result["stages_3"]

    def per_round(case: dict[str, Any], key: str) -> float:
        """The median over rounds of (this set / the whole node) measured in the same round, minutes apart at most:
        the machine's other load changes from one minute to the next more than between the sets of one round."""
        return median([a / b for a, b in zip(case["runs"][key], whole["runs"][key], strict=True) if b])

    return {
        "whole_single_tok_per_s": whole["single_tok_per_s"],
        "whole_aggregate_tok_per_s": whole["aggregate_tok_per_s"],
        "aggregate_over_whole": per_round(two, "aggregate_tok_per_s"),
        "single_over_whole": per_round(two, "single_tok_per_s"),
        "three_aggregate_over_whole": per_round(three, "aggregate_tok_per_s"),
        "three_single_over_whole": per_round(three, "single_tok_per_s"),
        "failed_when_a_stage_is_killed": result["kill"]["failed"],
        "same_text_when_a_stage_is_killed": result["kill"]["same_text"],
        "too_big_served_by_2": result["too_big"]["2_nodes"]["answered"],
        "too_big_served_by_3": result["too_big"]["3_nodes"]["answered"],
        "whole_model_mib": whole_model,
        "memory": memory,
        "memory_over_share_worst": max(m["over_share"] for m in memory.values()),
    }


def _print(result: dict[str, Any]) -> None:
    s = result["summary"]

    def goal(key: str, value: float, higher: bool = True) -> str:
        target = GOALS[key]
        met = value >= target if higher else value <= target
        return f"{value:.2f} (goal {'>=' if higher else '<='} {target}: {'met' if met else 'NOT met'})"

    w = result["whole"]
    rss = list(w["rss_mib"].values())[0]
    print(f"whole, one node on one core: one stream {w['single_tok_per_s']:.1f} tok/s (first token "
          f"{w['ttft_ms']:.0f} ms), 8 streams {w['aggregate_tok_per_s']:.1f} tok/s, {rss:.0f} MiB")  # fmt: skip
    for stages in (2, 3):
        c = result[f"stages_{stages}"]
        rss = ", ".join(f"{v:.0f}" for v in c["rss_mib"].values())
        print(f"{stages} stages {c['ranges']}: one stream {c['single_tok_per_s']:.1f} tok/s (first token "
              f"{c['ttft_ms']:.0f} ms), 8 streams {c['aggregate_tok_per_s']:.1f} tok/s; RSS {rss} MiB; "
              f"{c['bytes_per_token_between_stages']:.0f} bytes between stages per generated token "
              f"({c['bytes_per_position_per_hop']:.0f} per position and hop)")  # fmt: skip
    print(f"2 stages / whole: 8 streams {goal('aggregate_over_whole', s['aggregate_over_whole'])}, one stream "
          f"{goal('single_over_whole', s['single_over_whole'])}")  # fmt: skip
    k = result["kill"]
    print(f"kill -9 of {k['killed']} mid-stream: {k['failed']} failed, same text: {k['same_text']}, "
          f"{k['moved']} chats moved to another chain")  # fmt: skip
    for count in (2, 3):
        t = result["too_big"][f"{count}_nodes"]
        print(f"too big for one node (--max-memory {t['max_memory']}): {count} nodes hold {t['stages']}, answered: "
              f"{t['answered']}")  # fmt: skip
    print(f"memory for the model per stage node / its share of the whole's: worst "
          f"{goal('memory_over_share', s['memory_over_share_worst'], higher=False)}")  # fmt: skip
    print(f"engines (ms per decode step, layers 0-14, one thread): {json.dumps(result['engines'].get('ms_per_step'))}")
