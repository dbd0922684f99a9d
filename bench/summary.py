"""`python -m bench report`: render bench/results/README.md from the scenarios' JSON results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import results_dir
from .summary_cells import figure as _f
from .summary_cells import verdict as _met
from .summary_mesh import MESH_SECTIONS, mesh_goals

# split, scale and gossip (MESH_SECTIONS) are rendered by bench/summary_mesh.py
ORDER = ("overhead", "scaling", "heterogeneous", "failover", "soak", "models", "transfer", "rollout", "prefix",
         *MESH_SECTIONS)  # fmt: skip


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for name in ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def goals(r: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(goal, measured, met) for every goal the scenarios check, from whatever results exist."""
    rows: list[tuple[str, str, str]] = []
    if "overhead" in r:
        ratios = r["overhead"]["summary"].get("ratios")
        if ratios:
            for key, what in (("direct_over_raw_pyzmq", "direct >= {}x raw pyzmq's req/s"),
                              ("one_hop_over_direct", "one hop >= {}x direct req/s")):  # fmt: skip
                goal = ratios["goals"][key]
                rows.append((f"overhead: {what.format(goal)}", f"{ratios[key]:.2f}x", _met(ratios[key] >= goal)))
        vs = r["overhead"]["summary"].get("vs_ray")
        if vs:
            x = vs["one_hop_req_per_s_over_ray_handle"]
            rows.append(
                (
                    "overhead: >= 30x Ray Serve's requests/s",
                    f"{x:.1f}x Ray's handle, {vs['one_hop_req_per_s_over_ray_http']:.1f}x its HTTP (lanmesh one hop,"
                    " 64 in flight)",
                    _met(x >= 30),
                )
            )
        else:
            rows.append(
                (
                    "overhead: >= 30x Ray Serve's requests/s",
                    f"not measured: {r['overhead']['ray_serve'].get('skipped')}",
                    "n/a",
                )
            )
    if "scaling" in r:
        s = r["scaling"]["summary"]
        rows.append(
            (
                "scaling: >= 95% efficiency at 8 nodes",
                f"{s['efficiency_at_max'] * 100:.1f}% at {s['nodes_at_max']} nodes",
                _met(s["efficiency_at_max"] >= 0.95) if s["nodes_at_max"] >= 8 else "n/a (fewer nodes)",
            )
        )
    if "heterogeneous" in r:
        s = r["heterogeneous"]["summary"]
        rows.append(
            (
                "heterogeneous: p2c p99 <= 1.3x the JSQ oracle's",
                f"{s['p2c_p99_over_oracle']:.2f}x",
                _met(s["p2c_p99_over_oracle"] <= 1.3),
            )
        )
        rows.append(
            (
                "heterogeneous: least-loaded-on-gossip p99 >= 2x p2c's",
                f"{s['least_loaded_p99_over_p2c']:.2f}x",
                _met(s["least_loaded_p99_over_p2c"] >= 2.0),
            )
        )
    if "failover" in r:
        s = r["failover"]["summary"]
        lost = s["lost"]
        total = sum(v["requests"] for k, v in s.items() if isinstance(v, dict))
        rows.append(("failover: 0 requests lost", f"{lost} of {total}", _met(lost == 0)))
        for fault in ("kill -9", "SIGSTOP"):
            if fault in s:
                d = s[fault]
                rows.append(
                    (
                        f"failover: {fault} detected within 1.5 s",
                        f"every survivor: suspect {_f(d['suspect_s'], '.2f', ' s')},"
                        f" dead {_f(d['dead_s'], '.2f', ' s')}",
                        _met(d["suspect_s"] is not None and d["suspect_s"] <= 1.5),
                    )
                )
    if "soak" in r:
        s = r["soak"]["summary"]
        rate = s["success_rate"]
        rows.append(
            (
                "soak: 100% of requests succeed",
                f"{s['ok']}/{s['requests']} ({_f(rate * 100 if rate is not None else None, '.3f', '%')}), "
                f"{s['faults']} faults",
                _met(s["failed"] == 0),
            )
        )
    if "models" in r:
        s = r["models"]["summary"]
        goals = r["models"].get("goals", {})
        for key, what in (
            ("over_fastest_single", "chat, one stream >= {}x the fastest anchor"),
            ("over_fastest_batch", "chat, 8 streams >= {}x the fastest anchor"),
            ("over_raw_single", "chat, one stream >= {}x onnxruntime-genai alone"),
            ("over_raw_batch", "chat, 8 streams >= {}x onnxruntime-genai alone"),
            ("over_llama_cpp_single", "chat, one stream >= {}x llama.cpp"),
            ("embed_over_raw", "embeddings, batches of 32 >= {}x onnxruntime alone"),
        ):
            if key in goals:
                value = s.get(key)
                rows.append(
                    (
                        f"models: {what.format(goals[key])}",
                        _f(value, ".2f", "x"),
                        _met(value is not None and value >= goals[key]),
                    )
                )
        if "perplexity_over_fp32" in goals:
            value = s.get("perplexity_over_fp32")
            rows.append((
                f"models: perplexity <= {goals['perplexity_over_fp32']}x the fp32 model it was built from",
                _f(value, ".3f", "x"),
                _met(value is not None and value <= goals["perplexity_over_fp32"]),
            ))  # fmt: skip
        if "aggregate_tok_per_s" in goals:
            for what, shown, ok in (
                (f"8 streams >= {goals['aggregate_tok_per_s']:.0f} tok/s", f"{s['chat_aggregate_tok_per_s']:.0f} tok/s",
                 s["chat_aggregate_tok_per_s"] >= goals["aggregate_tok_per_s"]),
                (f"first token <= {goals['ttft_ms']:.0f} ms", f"{s['ttft_ms']:.0f} ms",
                 s["ttft_ms"] <= goals["ttft_ms"]),
                (f"node with smollm2 + minilm <= {goals['rss_mib']:.0f} MiB", f"{s['rss_mib']:.0f} MiB",
                 s["rss_mib"] <= goals["rss_mib"]),
                (f"warm start <= {goals['warm_start_s']:.0f} s", f"{s['warm_start_s']:.1f} s",
                 s["warm_start_s"] <= goals["warm_start_s"]),
            ):  # fmt: skip
                rows.append((f"models: {what}", shown, _met(ok)))
    if "transfer" in r:
        s, g = r["transfer"]["summary"], r["transfer"]["goals"]
        share = s.get("clean_link_share")
        rows.append((
            f"transfer: a pull reaches >= {g['link_share'] * 100:.0f}% of a {s.get('link_mbit') or '?'} Mbit/s link",
            f"{_f(s['clean_mbit_per_s'], '.0f', ' Mbit/s')} ({_f(share * 100 if share else None, '.0f', '%')})",
            _met(share >= g["link_share"]) if share is not None else "n/a (link not shaped)",
        ))  # fmt: skip
        rows.append((
            "transfer: a sender killed at half way, rotten chunks: the pull completes intact",
            f"killed at {_f((s['killed_at_progress'] or 0) * 100, '.0f', '%')}: intact {s['killed_completed']}; "
            f"{s['corrupt_detected']} rotten chunks refetched: intact {s['corrupt_completed']}",
            _met(s["killed_completed"] and s["corrupt_completed"] and s["corrupt_detected"] > 0),
        ))  # fmt: skip
        ratio = s.get("sender_p99_ratio")
        rows.append((
            f"transfer: senders' serving p99 within {g['sender_p99_ratio']}x while sending",
            _f(ratio, ".2f", "x"),
            _met(ratio is not None and ratio <= g["sender_p99_ratio"]),
        ))  # fmt: skip
    if "rollout" in r:
        s = r["rollout"]["summary"]
        rows.append((
            f"rollout: 0 failed requests while {r['rollout']['nodes']} nodes switch version",
            f"{s['failed']} of {s['requests']}; {s['nodes_on_new_version']}/{r['rollout']['nodes']} on the new version",
            _met(s["failed"] == 0 and s["nodes_on_new_version"] == r["rollout"]["nodes"]),
        ))  # fmt: skip
    if "prefix" in r:
        rows += _prefix_goals(r["prefix"])
    return rows + mesh_goals(r)


def _prefix_goals(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    s, g, met = res["summary"], res["goals"], res["summary"]["met"]
    turns = res["workload"]["turns"]
    ttft_last, ttft_first = s["ttft_last_p50_ms"], s["ttft_first_p50_ms"]
    tok = s["tok_per_s"]
    return [
        (f"prefix: (a) reuses >= {g['hit_rate_after_turn_1']:.0%} of prompt tokens after turn 1",
         _f((s["hit_rate_after_turn_1"]["a"] or 0) * 100, ".1f", "%"), _met(met["hit_rate"])),
        (f"prefix: (a) TTFT p50 at turn {turns} <= {g['ttft_last_over_no_cache']}x (c)'s",
         f"{_f(ttft_last['a'], '.0f', ' ms')} vs {_f(ttft_last['c'], '.0f', ' ms')}: "
         f"{_f(s['ttft_last_over_no_cache'], '.2f', 'x')}", _met(met["ttft_vs_no_cache"])),
        (f"prefix: (a) TTFT p50 at turn {turns} <= {g['ttft_last_over_first']}x its turn 1",
         f"{_f(ttft_last['a'], '.0f', ' ms')} vs {_f(ttft_first['a'], '.0f', ' ms')}: "
         f"{_f(s['ttft_last_over_first'], '.2f', 'x')}", _met(met["ttft_vs_turn_1"])),
        ("prefix: throughput (a) >= (b) and (c)",
         f"{_f(tok['a'], '.1f')} / {_f(tok['b'], '.1f')} / {_f(tok['c'], '.1f')} tok/s", _met(met["throughput"])),
        (f"prefix: p99 latency (a) <= {g['p99_over_p2c_cache']}x (b)'s",
         f"{_f(s['latency_p99_ms']['a'], '.0f', ' ms')} vs {_f(s['latency_p99_ms']['b'], '.0f', ' ms')}: "
         f"{_f(s['p99_over_p2c_cache'], '.2f', 'x')}", _met(met["p99"])),
        (f"prefix: no node serves more than {g['max_share_over_fair']}x its fair share under (a)",
         _f(s["max_share_over_fair"]["a"], ".2f", "x"), _met(met["spread"])),
    ]  # fmt: skip


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    t = res.get("testbed", {})
    v = m.get("versions", {})
    versions = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    quick = " — **quick mode: rough figures**" if res.get("quick") else ""
    start = f" {m['load_avg_1m_at_start']:.2f} at the start," if "load_avg_1m_at_start" in m else ""
    load = f"load average{start} {m['load_avg_1m']:.2f} at the end"
    noisy = "the machine is shared with other developers' tests, so figures are noisy"
    bed = f" {t.get('mode', '?')}: {t.get('detail', '')}; security: {t.get('security', '')};" if t else ""
    reps = f" repetitions: {res['repetitions']};" if res.get("repetitions") is not None else ""
    return (
        f"_{res['when']}; {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {load} ({noisy});{bed}{reps}"
        f" Python {m['python']}; {versions}_{quick}"
    )


def _overhead(res: dict[str, Any]) -> list[str]:
    s, ray = res["summary"], res.get("ray_serve", {})
    lines = [
        "Echo model. *Direct*: the client sends to the node that serves echo. *One hop*: it enters at a node that "
        "does not, which forwards. The client runs on a host of its own.",
        "",
        "| path | sync p50 | sync p99 | 64 in flight: req/s | p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    if "raw_pyzmq" in s:
        x = s["raw_pyzmq"]
        lines.append(
            f"| raw pyzmq echo (same sockets, CURVE) | {x['sync_p50_us']:.0f} µs | {x['sync_p99_us']:.0f} µs |"
            f" {x['pipelined_req_per_s']:.0f} | | |"
        )
    for k, name in (("direct", "direct"), ("one_hop", "one hop")):
        x = s[k]
        lines.append(
            f"| {name} | {x['sync_p50_us']:.0f} µs | {x['sync_p99_us']:.0f} µs | {x['pipelined_req_per_s']:.0f} |"
            f" {x['pipelined_p50_us']:.0f} µs | {x['pipelined_p99_us']:.0f} µs |"
        )
    if "handle_pipelined_req_per_s" in ray:
        lines.append(
            f"| Ray Serve {ray['ray_version']} handle (no-op) | {ray['handle_sync_p50_us']:.0f} µs |"
            f" {ray['handle_sync_p99_us']:.0f} µs | {ray['handle_pipelined_req_per_s']:.0f} |"
            f" {ray['handle_pipelined_p50_us']:.0f} µs | {ray['handle_pipelined_p99_us']:.0f} µs |"
        )
        lines.append(
            f"| Ray Serve HTTP (no-op; 16 clients) | {ray['http_sync_p50_us']:.0f} µs |"
            f" {ray['http_sync_p99_us']:.0f} µs | {ray['http_concurrent_req_per_s']:.0f} | | |"
        )
    else:
        lines += ["", f"Ray Serve anchor: {ray.get('skipped', 'not measured')}."]
    lines += [
        "",
        f"One forwarding hop adds {s['hop_added_sync_p50_us']:.0f} µs at p50 and {s['hop_added_sync_p99_us']:.0f} µs"
        " at p99.",
    ]
    return lines


def _scaling(res: dict[str, Any]) -> list[str]:
    lines = [
        f"`{res['model']['spec']}` on every node; {res['load']['kind']}; {res['measured_window']}.",
        "",
        "| nodes | req/s | N x one node | efficiency | of nominal capacity | p50 | p99 | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["summary"]["points"]:
        lines.append(
            f"| {p['nodes']} | {p['req_per_s']:.1f} | {p['ideal_req_per_s']:.1f} | {p['efficiency'] * 100:.1f}% |"
            f" {p['of_capacity'] * 100:.1f}% | {p['p50_ms']:.0f} ms | {p['p99_ms']:.0f} ms | {p['failed']} |"
        )
    return lines


def _heterogeneous(res: dict[str, Any]) -> list[str]:
    t = res["trace"]
    speeds = ", ".join(f"{n['ms']} ms" for n in res["nodes"])
    lines = [
        f"Six nodes serving one model at {speeds} per request, capacity 2 each ({t['capacity_req_per_s']:.0f} req/s"
        f" in all). {t['kind']}; {t['rate']:.0f} req/s for {t['seconds']:g} s. Oracle: {res['oracle']}.",
        "",
        "| policy | p50 | p99 | mean | req/s | rejected | failed | served by 1x/2x/4x nodes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in res["summary"]["policies"].items():
        by = p["served_by_speed"]
        lines.append(
            f"| {name} | {p['p50_ms']:.0f} ms | {p['p99_ms']:.0f} ms | {p['mean_ms']:.0f} ms |"
            f" {p['throughput_req_per_s']:.1f} | {p['rejected']} | {p['failed']} |"
            f" {by.get('1x', 0)}/{by.get('2x', 0)}/{by.get('4x', 0)} |"
        )
    return lines


def _failover(res: dict[str, Any]) -> list[str]:
    d = res["definitions"]
    lines = [
        f"{res['nodes']} nodes of `{res['model']}`, {res['load']['kind']}, {res['load']['in_flight']} in flight. "
        f"Detection: {d['suspect_s']} (suspect) / {d['dead_s']} (dead). p99 in the fault window: requests completing"
        f" in the {d['window_s']:g} s after the fault. Recovery: {d['recovery_s']}.",
        "",
        "| fault | lost | suspect after | dead after | p99 before | p99 in fault window | req/s before -> after |"
        " recovery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fault, s in res["summary"].items():
        if not isinstance(s, dict):
            continue
        lines.append(
            f"| {fault} | {s['lost']} of {s['requests']} | {_f(s['suspect_s'], '.2f', ' s')} |"
            f" {_f(s['dead_s'], '.2f', ' s')} | {s['p99_before_ms']:.0f} ms | {s['p99_fault_window_ms']:.0f} ms |"
            f" {s['req_per_s_before']:.0f} -> {s['req_per_s_after']:.0f} | {_f(s['recovery_s'], '.2f', ' s')} |"
        )
    return lines


def _soak(res: dict[str, Any]) -> list[str]:
    s = res["summary"]
    kinds = ", ".join(f"{k} x{n}" for k, n in s["faults_by_kind"].items())
    lines = [
        f"{res['load']['seconds'] / 60:g} minutes, {res['nodes']} nodes of `{res['model']}`, {res['load']['kind']},"
        f" {res['load']['in_flight']} in flight, fault schedule seed {res['seed']}.",
        "",
        f"- requests: {s['requests']}, served {s['ok']}, failed {s['failed']}"
        f" (success rate {_f(s['success_rate'] * 100 if s['success_rate'] is not None else None, '.3f', '%')})",
        f"- faults: {s['faults']} ({kinds}); every one is listed in soak.json",
        f"- latency p50 {_f(s['p50_ms'], '.0f', ' ms')}, p99 {_f(s['p99_ms'], '.0f', ' ms')},"
        f" max {_f(s['max_ms'], '.0f', ' ms')}",
    ]
    for note in res.get("skipped_faults", []):
        lines.append(f"- not exercised: {note}")
    return lines


def _models(res: dict[str, Any]) -> list[str]:
    s = res["summary"]
    anchors = res.get("anchors", {})
    threads = f", every anchor with lanmesh's {res['threads']} threads" if "threads" in res else ""
    lines = [
        f"{res['models']['chat']} and {res['models']['embed']} through one node on loopback;"
        f" chat max_tokens {res['chat']['max_tokens']}. Anchors run alone afterwards on the same machine{threads}.",
        "",
        "| figure | lanmesh | anchor | ratio |",
        "|---|---|---|---|",
    ]
    raw_embed = anchors.get("onnxruntime_embed", {})

    def anchor(value: Any, unit: str) -> str:
        return f"{value:.1f} {unit}" if isinstance(value, int | float) else "skipped"

    names = {
        "onnxruntime_genai": "onnxruntime-genai on lanmesh's build",
        "onnxruntime_genai_default_int4": "onnxruntime-genai, its default int4",
        "llama_cpp": "llama.cpp",
    }
    over = s.get("over_anchor") or {  # results from before the anchors were compared one by one
        "onnxruntime_genai": {"single": s.get("over_raw_single"), "batch": s.get("over_raw_batch")},
        "llama_cpp": {"single": s.get("over_llama_cpp_single"), "batch": None},
    }
    for name, what in names.items():
        a = anchors.get(name)
        if a is None:
            continue
        lines.append(
            f"| chat, one stream vs {what} | {s['chat_single_tok_per_s']:.1f} tok/s |"
            f" {anchor(a.get('single_tok_per_s'), 'tok/s')} | {_f(over[name]['single'], '.2f', 'x')} |"
        )
        if "batch_tok_per_s" in a:
            lines.append(
                f"| chat, 8 streams vs {what} (batched) | {s['chat_aggregate_tok_per_s']:.1f} tok/s |"
                f" {anchor(a.get('batch_tok_per_s'), 'tok/s')} | {_f(over[name]['batch'], '.2f', 'x')} |"
            )
        lines.append(f"| time to first token vs {what} | {s['ttft_ms']:.0f} ms |"
                     f" {anchor(a.get('single_ttft_ms'), 'ms')} | |")  # fmt: skip
    quality = res.get("quality", {})
    for name, what in (("lanmesh", "lanmesh's build"), *names.items()):
        q = quality.get(name, {})
        if "over_fp32" in q:
            shown = " / ".join(f"{r:.3f}x" for r in q["over_fp32"])
            lines.append(f"| perplexity / fp32's, {what} | {shown} | | |")
    emb = s["embed"]
    first = next(iter(emb))
    lines.append(
        f"| embeddings, {first} | {emb[first]['sentences_per_s']:.0f}/s |"
        f" {anchor(raw_embed.get('sentences_per_s'), '/s')} | {_f(s.get('embed_over_raw'), '.2f', 'x')} |"
    )
    for k, v in list(emb.items())[1:]:
        lines.append(f"| embeddings, {k} | {v['sentences_per_s']:.0f}/s | | |")
    lines += [
        f"| node memory, smollm2 + minilm | {_f(s.get('rss_mib'), '.0f', ' MiB')} | | |",
        f"| cold start (empty cache, build included) | {s['cold_start_s']:.1f} s | | |",
        f"| warm start (until it serves) | {s['warm_start_s']:.1f} s | | |",
    ]
    return lines


def _transfer(res: dict[str, Any]) -> list[str]:
    s, d = res["summary"], res["definitions"]
    link = f"tbf {s['link_mbit']} Mbit/s" if s.get("link_mbit") else "loopback (not shaped)"
    lines = [
        f"`{res['model']['name']}`, {s['bytes'] / 1e6:.0f} MB ({res['model']['kind']}), served by 3 nodes; each pull "
        f"by a fresh node whose link is {link}. Rate: {d['rate']}. Sender p99: {d['sender_p99']}.",
        "",
        "| run | result | seconds | Mbit/s | dropped sources | chunks fetched again | intact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        dropped = ", ".join(f"{k} ({v})" for k, v in r["dropped"].items()) or "—"
        lines.append(f"| {name} | {r['state']} | {_f(r['seconds'], '.1f')} | {_f(r['mbit_per_s'], '.0f')} |"
                     f" {dropped} | {r['corrupt_chunks']} | {r['intact']} |")  # fmt: skip
    lo = res["runs"]["clean"]["load"]
    lines += ["", f"Sources' serving latency under {lo['rate']:g} embedding requests per second: p99 "
              f"{_f(lo['p99_before_ms'], '.1f', ' ms')} before the pull, {_f(lo['p99_during_ms'], '.1f', ' ms')} "
              f"while sending, {_f(lo['p99_after_ms'], '.1f', ' ms')} after; {lo['failed']} of {lo['requests']} "
              "failed."]  # fmt: skip
    return lines


def _rollout(res: dict[str, Any]) -> list[str]:
    s = res["summary"]
    lines = [
        f"{res['nodes']} nodes of `{res['model']['name']}` ({res['model']['megabytes']:g} MB, {res['model']['kind']}),"
        f" {res['load']['kind']}, {res['load']['in_flight']} in flight; `lanmesh rollout` from the client host.",
        "",
        f"- requests: {s['requests']}, failed {s['failed']}; p99 {_f(s['p99_ms'], '.1f', ' ms')}",
        f"- {s['nodes_on_new_version']} of {res['nodes']} nodes serve only the new version afterwards;"
        f" the rollout took {s['rollout_s']:.1f} s",
        "",
        "| node | old -> new | load beside | switch | drain | handed back |",
        "|---|---|---|---|---|---|",
    ]
    for st in res["steps"]:
        lines.append(f"| {st['node']} | {st['old']} -> {st['new']} | {st['load_s']:.2f} s |"
                     f" {st['switch_s'] * 1000:.0f} ms | {st['drain_s']:.2f} s | {st['handed_back']} |")  # fmt: skip
    return lines


def _prefix(res: dict[str, Any]) -> list[str]:
    w, runs, p = res["workload"], res["runs"], res["summary"]["prediction"]
    lines = [
        f"{res['nodes']} nodes of {w['model']}. {w['conversations']} conversations of {w['turns']} turns sharing a "
        f"{w['system_prompt_chars']}-character system prompt; starts {w['starts']}, think time {w['think_s']} s, "
        f"{w['max_tokens']} tokens an answer, {w['sampling']}; each turn enters at {w['entry']}. The same seed in "
        "every run: (a) cache-aware routing and the prefix cache (the defaults), (b) p2c with the prefix cache, "
        "(c) p2c without it.",
        "",
        "| run | prompt tokens reused, turns 2+ | TTFT p50 turn 1 | TTFT p50 last turn | TTFT p99 last turn |"
        " tok/s | latency p99 | served per node | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        turns = r["per_turn"]
        last = turns[str(w["turns"])]
        served = ", ".join(f"{n} {c}" for n, c in r["served"].items())
        lines.append(
            f"| ({key}) {r['label']} | {_f((r['hit_rate_after_turn_1'] or 0) * 100, '.1f', '%')} |"
            f" {_f(turns['1']['ttft_p50_ms'], '.0f', ' ms')} | {_f(last['ttft_p50_ms'], '.0f', ' ms')} |"
            f" {_f(last['ttft_p99_ms'], '.0f', ' ms')} | {_f(r['tok_per_s'], '.1f')} |"
            f" {_f(r['latency_p99_ms'], '.0f', ' ms')} | {served} ({_f(r['max_share_over_fair'], '.2f', 'x')} fair) |"
            f" {r['failed']} |"
        )
    lines += [
        "",
        "TTFT p50 per turn (ms):",
        "",
        "| run | " + " | ".join(str(t) for t in range(1, w["turns"] + 1)) + " |",
        "|---|" + "---|" * w["turns"],
    ]
    for key, r in runs.items():
        lines.append(f"| ({key}) | " + " | ".join(_f(t["ttft_p50_ms"], ".0f") for t in r["per_turn"].values()) + " |")
    lines += [
        "",
        f"How well the gossiped summaries predicted the engines' reuse under (a): {p['predicted']} turns were routed "
        f"to a node said to hold more than the system prompt; the engine reused more than the system prompt for "
        f"{_f((p['precision'] or 0) * 100, '.0f', '%')} of them (precision), and those are "
        f"{_f((p['recall'] or 0) * 100, '.0f', '%')} of the {p['engine_reused_beyond_system_prompt']} turns where it "
        f"did (recall). Routes under (a): {runs['a']['routes']}.",
    ]
    return lines


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "overhead": ("Overhead of the mesh", _overhead),
    "scaling": ("Scaling out", _scaling),
    "heterogeneous": ("Routing on nodes of different speeds", _heterogeneous),
    "failover": ("Failover", _failover),
    "soak": ("Soak (chaos)", _soak),
    "models": ("Models", _models),
    "transfer": ("Model transfer between members", _transfer),
    "rollout": ("Rollout under load", _rollout),
    "prefix": ("Conversations: prefix cache and cache-aware routing", _prefix),
    **MESH_SECTIONS,
}


def render(folder: Path | None = None) -> Path:
    """Write README.md beside the results; returns its path."""
    folder = folder or results_dir()
    res = load_results(folder)
    out = [
        "# lanmesh benchmark results",
        "",
        "Generated by `python -m bench report` from the JSON files in this folder; every figure is a measurement "
        "from the run named under its section (`python -m bench SCENARIO` reproduces it). Nodes run as separate "
        "processes, each in a network namespace of its own on a private bridge when run as root (else on "
        "127.0.0.1), and the load generator on a host of its own.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    out += [f"| {g} | {m} | {ok} |" for g, m, ok in goals(res)]
    missing = [n for n in ORDER if n not in res]
    if missing:
        out += ["", f"Not run yet: {', '.join(missing)}."]
    for name, data in res.items():
        title, section = SECTIONS[name]
        out += ["", f"## {title}", "", _machine(data), ""]
        out += section(data)
        if (folder / f"{name}.png").exists():
            out += ["", f"![{name}]({name}.png)"]
    path = folder / "README.md"
    path.write_text("\n".join(out) + "\n")
    return path
