"""One PNG per scenario, drawn from its result dict (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _subtitle(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    where = result.get("testbed", {}).get("mode", "?")
    return f"{m.get('cores', '?')} cores, load {m.get('load_avg_1m', 0):.1f}, {where}, reps {result.get('repetitions')}"


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_overhead(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    s, ray = result["summary"], result.get("ray_serve", {})
    names = ["lanmesh direct", "lanmesh one hop"]
    sync = [s["direct"]["sync_p50_us"], s["one_hop"]["sync_p50_us"]]
    thr = [s["direct"]["pipelined_req_per_s"], s["one_hop"]["pipelined_req_per_s"]]
    if "raw_pyzmq" in s:
        names.insert(0, "raw pyzmq echo")
        sync.insert(0, s["raw_pyzmq"]["sync_p50_us"])
        thr.insert(0, s["raw_pyzmq"]["pipelined_req_per_s"])
    if "handle_pipelined_req_per_s" in ray:
        names += ["Ray Serve handle", "Ray Serve HTTP"]
        sync += [ray["handle_sync_p50_us"], ray["http_sync_p50_us"]]
        thr += [ray["handle_pipelined_req_per_s"], ray["http_concurrent_req_per_s"]]
    colors = (["#9aa5b1"] if "raw_pyzmq" in s else []) + ["#2b7bba", "#5aa6dd", "#d9822b", "#f0b36e"]
    colors = colors[: len(names)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [x / 1000 for x in sync], color=colors)
    a.set_ylabel("ms (p50, one request at a time)")
    a.set_title("sync latency, no-op request")
    b.bar(names, thr, color=colors)
    b.set_yscale("log")
    b.set_ylabel("requests/s (64 in flight; Ray HTTP: 16 clients)")
    b.set_title("throughput, no-op request")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"overhead — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    pts = result["summary"]["points"]
    n = [p["nodes"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(n, [p["req_per_s"] for p in pts], "o-", label="measured")
    a.plot(n, [p["ideal_req_per_s"] for p in pts], "--", color="grey", label="N x one node")
    a.plot(n, [p["capacity_req_per_s"] for p in pts], ":", color="black", label="N x nominal capacity")
    a.set_xlabel("nodes")
    a.set_ylabel("requests/s")
    a.set_xticks(n)
    a.legend()
    a.set_title(f"throughput, {result['model']['spec']} per node, saturated")
    b.bar([str(x) for x in n], [p["efficiency"] * 100 for p in pts], color="#2b7bba")
    b.axhline(95, color="red", linestyle="--", label="goal 95%")
    b.set_ylim(0, 110)
    b.set_xlabel("nodes")
    b.set_ylabel("% of N x one node")
    b.legend(loc="lower left")
    b.set_title("scaling efficiency")
    fig.suptitle(f"scaling — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_heterogeneous(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    pol = result["summary"]["policies"]
    names = list(pol)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [pol[k]["p50_ms"] for k in names], w, label="p50", color="#5aa6dd")
    ax.bar([i + w / 2 for i in x], [pol[k]["p99_ms"] for k in names], w, label="p99", color="#2b7bba")
    for i, k in enumerate(names):
        ax.annotate(f"{pol[k]['p99_ms']:.0f}", (i + w / 2, pol[k]["p99_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    t = result["trace"]
    load = f"{t['rate']:.0f} req/s = {t['utilisation'] * 100:.0f}% of capacity"
    ax.set_title(f"the same Poisson trace for each, {load}; node speeds 1x/2x/4x")
    ax.legend()
    fig.suptitle(f"heterogeneous — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_failover(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for ax, (fault, r) in zip(axes[:, 0], runs.items(), strict=True):
        tl = r["timeline"]
        t = [row["t"] for row in tl]
        ax.plot(t, [row["req_per_s"] for row in tl], color="#2b7bba", label="requests/s (1 s window)")
        ax.set_ylabel("requests/s")
        ax.set_xlabel("seconds from the fault")
        ax2 = ax.twinx()
        ax2.plot(t, [row["p99_ms"] for row in tl], color="#d9822b", label="p99 ms (1 s window)")
        ax2.set_ylabel("p99 ms")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        ax.axvline(0, color="red", label=f"{fault}")
        d = r["detection"]
        if d.get("suspect_s") is not None:
            ax.axvline(d["suspect_s"], color="purple", linestyle="--", label=f"all suspect {d['suspect_s']:.2f}s")
        if d.get("dead_s") is not None:
            ax.axvline(d["dead_s"], color="black", linestyle=":", label=f"all dead {d['dead_s']:.2f}s")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
        ax.set_title(f"{fault} of one of {result['nodes']} nodes: {r['lost']} lost of {r['requests']}")
    fig.suptitle(f"failover — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_soak(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    tl = result["timeline"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.plot([r["second"] for r in tl], [r["ok"] for r in tl], color="#2b7bba", label="served per second")
    failed = [(r["second"], r["failed"]) for r in tl if r["failed"]]
    if failed:
        ax.scatter(*zip(*failed, strict=True), color="red", marker="x", label="failed per second")
    colors = {"kill -9": "red", "SIGSTOP": "purple", "loss": "orange", "slow link": "green", "delay": "brown"}
    seen: set[str] = set()
    for f in result["faults"]:
        kind = f["kind"]
        label = None if kind in seen else kind
        seen.add(kind)
        end = f.get("cleared_at") or f["at"] + 0.5
        ax.axvspan(f["at"], end, color=colors.get(kind, "grey"), alpha=0.18, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests per second")
    ax.set_ylim(bottom=0)
    s = result["summary"]
    ax.set_title(
        f"soak: {s['ok']}/{s['requests']} served ({s['success_rate'] * 100:.3f}%), {len(result['faults'])} faults"
    )
    ax.legend(loc="lower left", fontsize=8, ncol=3)
    fig.suptitle(f"soak — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_models(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    s = result["summary"]
    anchors = result.get("anchors", {})
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    llama = anchors.get("llama_cpp", {})
    labels = ["lanmesh\n1 stream", "lanmesh\n8 streams"]
    values = [s["chat_single_tok_per_s"], s["chat_aggregate_tok_per_s"]]
    colors = ["#2b7bba", "#2b7bba"]
    for key, name, color in (("onnxruntime_genai", "ort-genai", "#9aa5b1"),
                             ("onnxruntime_genai_default_int4", "ort-genai\ndefault int4", "#5f6b77")):  # fmt: skip
        raw = anchors.get(key, {})
        if "single_tok_per_s" in raw:
            labels += [f"{name}\n1 stream", f"{name}\n{raw['batch']} batched"]
            values += [raw["single_tok_per_s"], raw["batch_tok_per_s"]]
            colors += [color, color]
    if "single_tok_per_s" in llama:
        labels.append("llama.cpp\n1 stream")
        values.append(llama["single_tok_per_s"])
        colors.append("#d9822b")
    a.bar(labels, values, color=colors)
    a.set_ylabel("tokens/s")
    a.set_title(f"chat, SmolLM2 ({result.get('build', {}).get('precision', '?')}); first token {s['ttft_ms']:.0f} ms")
    a.tick_params(axis="x", labelsize=8)
    emb = dict(s["embed"])
    raw_embed = anchors.get("onnxruntime_embed", {})
    if "sentences_per_s" in raw_embed:
        emb["onnxruntime alone, batches of 32"] = {"sentences_per_s": raw_embed["sentences_per_s"]}
    b.bar(list(emb), [v["sentences_per_s"] for v in emb.values()], color=["#5aa6dd"] * len(s["embed"]) + ["#9aa5b1"])
    b.set_ylabel("sentences/s")
    b.set_title("embeddings, one node")
    b.tick_params(axis="x", labelrotation=10, labelsize=7)
    starts = {"cold": s["cold_start_s"], "warm": s["warm_start_s"]}
    c.bar(list(starts), list(starts.values()), color=["#d9822b", "#f0b36e"])
    c.set_ylabel("seconds")
    c.set_title(f"node start (warm: until it serves); memory {s.get('rss_mib', float('nan')):.0f} MiB")
    fig.suptitle(f"models — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_transfer(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    runs, s = result["runs"], result["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    colors = {"clean": "#2b7bba", "sender killed": "#d9822b", "corrupted chunks": "#7b3294"}
    for name, r in runs.items():
        curve = r.get("curve") or []
        if curve:
            a.plot([t for t, _ in curve], [d / 1e6 for _, d in curve], color=colors.get(name), label=name)
    if s.get("link_mbit"):
        top = s["bytes"] / 1e6
        a.plot([0, top * 8 / s["link_mbit"]], [0, top], color="grey", linestyle=":", label=f"{s['link_mbit']} Mbit/s")
    a.set_xlabel("seconds from the pull's start")
    a.set_ylabel("MB fetched and checked")
    a.set_title(f"{s['bytes'] / 1e6:.0f} MB model; clean {s['clean_mbit_per_s'] or 0:.0f} Mbit/s")
    a.legend(fontsize=8)
    load = runs["clean"]["load"]
    tl = load["timeline"]
    b.plot([r["second"] for r in tl], [r["p99_ms"] for r in tl], color="#2b7bba", label="p99 ms (1 s)")
    lo, hi = load["pull_window_s"]
    b.axvspan(lo, hi, color="#f0b36e", alpha=0.3, label="the sources send the model")
    b.set_xlabel("seconds")
    b.set_ylabel("ms")
    b.set_ylim(bottom=0)
    ratio = s.get("sender_p99_ratio")
    b.set_title(f"sources' serving p99 while sending: {ratio or 0:.2f}x before")
    b.legend(fontsize=8)
    fig.suptitle(f"transfer — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_rollout(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    tl, s = result["timeline"], result["summary"]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.plot([r["second"] for r in tl], [r["ok"] for r in tl], color="#2b7bba", label="served per second")
    failed = [(r["second"], r["failed"]) for r in tl if r["failed"]]
    if failed:
        ax.scatter(*zip(*failed, strict=True), color="red", marker="x", label="failed per second")
    palette = ["#d9822b", "#7b3294", "#1a9850", "#b2182b", "#4d4d4d"]
    for i, st in enumerate(result["steps"]):
        ax.axvspan(st["start_s"], st["end_s"], color=palette[i % len(palette)], alpha=0.2,
                   label=f"{st['node']}: {st['old']} -> {st['new']}")  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests per second")
    ax.set_ylim(bottom=0)
    ax.set_title(f"rollout under load: {s['failed']} failed of {s['requests']}, {s['nodes_on_new_version']}/"
                 f"{result['nodes']} nodes on the new version, {s['rollout_s']:.1f} s in all")  # fmt: skip
    ax.legend(fontsize=8, loc="lower left", ncol=3)
    fig.suptitle(f"rollout — {_subtitle(result)}", fontsize=9)
    _save(fig, path)


def plot_scale(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    phases = [("idle", result["idle"]), ("light load", result["light"])]
    x = range(len(phases))
    a.bar([i - 0.2 for i in x], [p["packets_in_per_s"]["median"] for _, p in phases], 0.4, label="in", color="#2b7bba")
    a.bar([i + 0.2 for i in x], [p["packets_out_per_s"]["median"] for _, p in phases], 0.4, label="out",
          color="#5aa6dd")  # fmt: skip
    a.axhline(result["goals"]["idle_packets_in_per_s"], color="#c0392b", ls="--", lw=1, label="goal (idle, in)")
    a.set_xticks(list(x), [name for name, _ in phases])
    a.set_ylabel("packets/s per node (median)")
    a.legend(fontsize=8)
    b.bar([name for name, _ in phases], [p["cpu_percent"]["median"] for _, p in phases], color="#d9822b")
    b.axhline(result["goals"]["idle_cpu_percent"], color="#c0392b", ls="--", lw=1, label="goal (idle)")
    b.set_ylabel("CPU % per node (median)")
    b.legend(fontsize=8)
    faults = [("kill -9", "kill_detected_s"), ("SIGSTOP", "sigstop_detected_s")]
    c.bar([f"{f}\nnot alive" for f, _ in faults] + [f"{f}\ndead" for f, _ in faults],
          [result[f]["not_alive_all_s"] or 0 for f, _ in faults] + [result[f]["dead_all_s"] or 0 for f, _ in faults],
          color=["#9aa5b1", "#9aa5b1", "#2b7bba", "#2b7bba"])  # fmt: skip
    for i, (_, goal) in enumerate(faults):
        c.plot([i + 1.6, i + 2.4], [result["goals"][goal]] * 2, color="#c0392b", ls="--", lw=1)
    c.set_ylabel("seconds until every other node saw it")
    see = result["see_all"]["after_last_start_s"]
    fig.suptitle(f"scale: {result['nodes']} echo nodes; all saw all {see if see is None else round(see, 1)} s "
                 f"after the last start — {_subtitle(result)}", fontsize=9)  # fmt: skip
    _save(fig, path)


def plot_gossip(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    points = result["points"]
    n = [p["nodes"] for p in points]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    kinds = sorted({k for p in points for k in p["by_type_per_node_s"]})
    bottom = [0.0] * len(n)
    for kind in kinds:
        vals = [p["by_type_per_node_s"].get(kind, 0.0) for p in points]
        a.bar([str(x) for x in n], vals, bottom=bottom, label=kind)
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    a.set_xlabel("nodes")
    a.set_ylabel("messages per node per second (out; as many in)")
    a.set_title("idle traffic per node", fontsize=9)
    a.legend(fontsize=7)
    conv = [("hung: all suspect", "hung_suspect"), ("hung: all dead", "hung_dead"), ("kill -9: all dead",
            "killed_dead"), ("join: all see all", "join"), ("woke: all alive", "woke_alive")]  # fmt: skip
    for label, key in conv:
        b.plot(n, [p["convergence_s"][key] or float("nan") for p in points], marker="o", label=label)
    ref = points[0]["convergence_s"]["hung_dead"] or 3.0
    b.plot(n, [ref * math.log(x) / math.log(n[0]) for x in n], ls=":", color="#999", label="log n (from 10)")
    b.set_xscale("log")
    b.set_xlabel("nodes")
    b.set_ylabel("seconds until every node knew")
    b.set_title("convergence at 1% loss", fontsize=9)
    b.legend(fontsize=7)
    bars = c.bar([str(x) for x in n], [p["false_suspicions_per_node_hour"] for p in points], color="#d9822b")
    for bar, p in zip(bars, points, strict=True):
        c.annotate(f"{p['false_suspicions']} in\n{p['node_hours']:.0f} node-h", (bar.get_x() + bar.get_width() / 2,
                   bar.get_height()), ha="center", va="bottom", fontsize=7)  # fmt: skip
    c.axhline(result["goals"]["false_suspicions_per_node_hour"], color="#c0392b", ls="--", lw=1, label="goal")
    c.set_xlabel("nodes")
    c.set_ylabel("false suspicions per node-hour")
    c.set_title(f"at {result['network']['loss'] * 100:g}% loss", fontsize=9)
    c.legend(fontsize=8)
    m = result.get("machine", {})
    fig.suptitle(f"gossip simulated (the nodes' own Gossip on a simulated LAN) — {m.get('cores', '?')} cores",
                 fontsize=9)  # fmt: skip
    _save(fig, path)


def plot_prefix(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    runs = result["runs"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"a": "#1a9850", "b": "#2b7bba", "c": "#d9822b"}
    for key, run in runs.items():
        turns = [int(t) for t in run["per_turn"]]
        label = f"({key}) {run['label']}"
        p50 = [run["per_turn"][str(t)]["ttft_p50_ms"] for t in turns]
        a.plot(turns, p50, marker="o", color=colors.get(key), label=label)
        hits = [(run["per_turn"][str(t)]["hit_rate"] or 0) * 100 for t in turns]
        b.plot(turns, hits, marker="o", color=colors.get(key), label=label)
    a.set_xlabel("turn")
    a.set_ylabel("time to first token, p50 (ms)")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    b.set_xlabel("turn")
    b.set_ylabel("prompt tokens reused (%)")
    b.set_ylim(0, 100)
    nodes = sorted({n for run in runs.values() for n in run["served"]})
    width = 0.8 / max(1, len(runs))
    for i, (key, run) in enumerate(runs.items()):
        c.bar([j + i * width for j in range(len(nodes))], [run["served"].get(n, 0) for n in nodes], width,
              color=colors.get(key), label=f"({key}) {run['tok_per_s'] or 0:.1f} tok/s")  # fmt: skip
    c.set_xticks([j + width for j in range(len(nodes))], nodes)
    c.set_ylabel("turns served")
    c.legend(fontsize=8)
    w = result["workload"]
    fig.suptitle(f"prefix — {w['conversations']} conversations x {w['turns']} turns, 3 nodes — {_subtitle(result)}",
                 fontsize=9)  # fmt: skip
    _save(fig, path)
