"""The results README's goal rows and sections for `split` (one model over several nodes), `scale` (a hundred idle
nodes) and `gossip` (the membership protocol simulated to 10,000 nodes). Every key is read with `dig`: a JSON
written by an older version of a scenario renders with "—" where it lacks a figure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .summary_cells import dig
from .summary_cells import figure as _f
from .summary_cells import verdict as _met

Rows = list[tuple[str, str, str]]


def _at_most(value: Any, goal: Any) -> bool | None:
    return None if value is None or goal is None else value <= goal


def _at_least(value: Any, goal: Any) -> bool | None:
    return None if value is None or goal is None else value >= goal


def _times(v: Any, k: float) -> Any:
    return None if v is None else v * k


def _yes(v: Any) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


# ------------------------------------------------------------ split


def _split_goals(res: dict[str, Any]) -> Rows:
    s, g = res.get("summary", {}), res.get("goals", {})
    whole, two = res.get("whole", {}), res.get("stages_2", {})
    rows: Rows = []
    for key, what, tok in (
        ("aggregate_over_whole", "8 streams over 2 stages on 2 cores >= {}x one node on one core", "aggregate"),
        ("single_over_whole", "one stream over 2 stages on 2 cores >= {}x one node on one core", "single"),
    ):
        value = s.get(key)
        rows.append((
            f"split: {what.format(_f(g.get(key), 'g'))}",
            f"{_f(value, '.2f', 'x')} ({_f(dig(two, f'{tok}_tok_per_s'), '.1f')} vs "
            f"{_f(dig(whole, f'{tok}_tok_per_s'), '.1f')} tok/s; the ratio is the median of each round's)",
            _met(_at_least(value, g.get(key))),
        ))  # fmt: skip
    kill = res.get("kill", {})
    failed, same = s.get("failed_when_a_stage_is_killed", kill.get("failed")), kill.get("same_text")
    rows.append((
        f"split: a stage node killed mid-stream (8 streams): {_f(g.get('failed_when_a_stage_is_killed'), 'g')} failed,"
        " the same text as without the kill",
        f"{_f(failed, 'd')} failed; same text: {_yes(same)}",
        _met(None if failed is None or same is None else failed <= g.get("failed_when_a_stage_is_killed", 0) and same),
    ))  # fmt: skip
    worst = s.get("memory_over_share_worst")
    rows.append((
        f"split: a stage node's memory for the model <= {_f(g.get('memory_over_share'), 'g')}x its share of the"
        " whole model's",
        f"worst {_f(worst, '.2f', 'x')}",
        _met(_at_most(worst, g.get("memory_over_share"))),
    ))  # fmt: skip
    for count in (2, 3):
        t = dig(res, "too_big", f"{count}_nodes") or {}
        answered = s.get(f"too_big_served_by_{count}", t.get("answered"))
        rows.append((
            f"split: SmolLM2, refused whole by every node (--max-memory {t.get('max_memory', '?')}), served by {count}"
            " nodes together",
            "answered" if answered else "—" if answered is None else "no answer",
            _met(answered),
        ))  # fmt: skip
    return rows


def _ranges(ranges: Any) -> str:
    return ", ".join(f"{a}-{b}" for a, b in ranges) if ranges else "—"


def _mib(rss: Any) -> str:
    return ", ".join(f"{v:.0f}" for v in rss.values()) + " MiB" if rss else "—"


def _split(res: dict[str, Any]) -> list[str]:
    s = res.get("summary", {})
    lines = [
        "SmolLM2 whole on one node, split in 2 stages and in 3 (the automatic plan's layer ranges), all running at "
        "once and measured in turn, round after round. One core stands for one machine: "
        f"{dig(res, 'testbed', 'pinning') or 'nodes pinned to cores'}. Tokens per second are medians over the "
        "rounds; a stage set's ratio to the whole node is the median of its ratios within each round.",
        "",
        "| setup | layers per node | one stream | first token | 8 streams | one stream / whole | 8 streams / whole "
        "| RSS per node | bytes between stages per generated token (per position and hop) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cases = (
        ("one node, whole", "whole", None, None),
        ("2 stages", "stages_2", "single_over_whole", "aggregate_over_whole"),
        ("3 stages", "stages_3", "three_single_over_whole", "three_aggregate_over_whole"),
    )
    for label, key, single, aggregate in cases:
        c = res.get(key)
        if c is None:
            continue
        moved = (f"{_f(c.get('bytes_per_token_between_stages'), '.0f')}"
                 f" ({_f(c.get('bytes_per_position_per_hop'), '.0f')})") if key != "whole" else "—"  # fmt: skip
        lines.append(
            f"| {label} | {_ranges(c.get('ranges')) if key != 'whole' else 'all'} |"
            f" {_f(c.get('single_tok_per_s'), '.1f', ' tok/s')} | {_f(c.get('ttft_ms'), '.0f', ' ms')} |"
            f" {_f(c.get('aggregate_tok_per_s'), '.1f', ' tok/s')} |"
            f" {_f(s.get(single) if single else 1.0, '.2f', 'x')} |"
            f" {_f(s.get(aggregate) if aggregate else 1.0, '.2f', 'x')} |"
            f" {_mib(c.get('rss_mib'))} | {moved} |"
        )  # fmt: skip
    memory = s.get("memory") or {}
    if memory:
        lines += [
            "",
            f"Memory for the model: a node's resident memory less that of a node serving nothing"
            f" ({_f(res.get('empty_node_rss_mib'), '.0f', ' MiB')}); the whole model's is"
            f" {_f(s.get('whole_model_mib'), '.0f', ' MiB')}.",
            "",
            "| stage node | memory for the model | its share of the weights | / that share of the whole's |"
            " / its share of the layers |",
            "|---|---|---|---|---|",
        ]
        for node, m in memory.items():
            share = m.get("share_of_weights")
            lines.append(
                f"| {node} | {_f(m.get('model_mib'), '.0f', ' MiB')} | {_f(_times(share, 100), '.1f', '%')} |"
                f" {_f(m.get('over_share'), '.2f', 'x')} | {_f(m.get('over_layer_share'), '.2f', 'x')} |"
            )  # fmt: skip
    kill = res.get("kill")
    if kill:
        lines += [
            "",
            f"- kill -9 of {', '.join(kill.get('killed') or []) or 'no node'} (one of the last stage's two holders)"
            f" while 8 streams ran: {_f(kill.get('failed'), 'd')} failed, the same text as the run "
            f"without the kill: {_yes(kill.get('same_text'))}, {_f(kill.get('moved'), 'd')} chats moved to the other "
            f"holder; {_f(kill.get('tok_per_s_with_the_kill'), '.1f', ' tok/s')} in all",
        ]
    for count in (2, 3):
        t = dig(res, "too_big", f"{count}_nodes")
        if not t:
            continue
        held = "; ".join(f"{n} {', '.join(m) or 'nothing'}" for n, m in (t.get("stages") or {}).items()) or "—"
        lines.append(
            f"- {count} nodes with --max-memory {t.get('max_memory', '?')} (too little for SmolLM2 whole): {held};"
            f" answered: {_yes(t.get('answered'))}; RSS {_mib(t.get('rss_mib'))}"
        )
    engines = dig(res, "engines", "ms_per_step")
    if engines:
        names = list(dict.fromkeys(name for row in engines.values() for name in row))
        lines += [
            "",
            f"One decode step of layers {dig(res, 'engines', 'layers') or '?'}, one thread, after"
            f" {dig(res, 'engines', 'past_tokens') or '?'} tokens (bench/stage_engines.py), ms:",
            "",
            "| batch | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for batch, row in engines.items():
            lines.append(f"| {batch} | " + " | ".join(_f(row.get(n), ".2f") for n in names) + " |")
    return lines


# ------------------------------------------------------------ scale

_SCALE_GOALS = (
    ("idle_packets_in_per_s", "idle, <= {} packets/s in per node", ".1f", " packets/s (median node)"),
    ("idle_cpu_percent", "idle, <= {}% CPU per node", ".2f", "% (median node)"),
    ("see_all_s", "every node sees every other within {} s of the last start", ".2f", " s"),
    ("kill_detected_s", "a kill -9 seen dead by every node within {} s", ".2f", " s"),
    ("sigstop_detected_s", "a SIGSTOP seen dead by every node within {} s", ".2f", " s"),
)


def _scale_goals(res: dict[str, Any]) -> Rows:
    s, g, n = res.get("summary", {}), res.get("goals", {}), res.get("nodes", "?")
    met = s.get("met", {})
    rows: Rows = []
    for key, what, fmt, unit in _SCALE_GOALS:
        value = s.get(key)
        # a figure the run looked for and never saw (nobody converged, some node never noticed) misses the goal
        ok = met.get(key, _at_most(value, g.get(key)))
        if ok is None and key in s and value is None:
            ok = False
        shown = _f(value, fmt, unit) if value is not None or key not in s else "not every node"
        rows.append((f"scale, {n} nodes: {what.format(_f(g.get(key), 'g'))}", shown, _met(ok)))
    churn = dig(res, "churn", "load") or {}
    killed = len(dig(res, "churn", "killed_and_restarted") or [])
    failed = s.get("churn_failed", churn.get("failed"))
    rows.append((
        f"scale, {n} nodes: {_f(g.get('churn_failed'), 'g')} failed requests under a light load while {killed} nodes"
        " are killed and restarted",
        f"{_f(failed, 'd')} of {_f(churn.get('count'), 'd')}",
        _met(met.get("churn_failed", _at_most(failed, g.get("churn_failed")))),
    ))  # fmt: skip
    return rows


def _spread(window: Any, key: str, fmt: str) -> str:
    x = dig(window, key) or {}
    return f"{_f(x.get('median'), fmt)} | {_f(x.get('p90'), fmt)} | {_f(x.get('max'), fmt)}"


def _scale(res: dict[str, Any]) -> list[str]:
    idle, light, see = res.get("idle", {}), res.get("light", {}), res.get("see_all", {})
    lines = [
        f"{res.get('nodes', '?')} idle `{res.get('model', 'echo')}` nodes, one network namespace each on one bridge,"
        " finding each other by mDNS. Per node figures across the nodes: packets and bytes from the bridge's port"
        f" counters, CPU and RSS from /proc; {_f(idle.get('seconds'), '.0f', ' s')} idle, then"
        f" {_f(light.get('seconds'), '.0f', ' s')} under a light paced load entering anywhere.",
        "",
        "| per node | idle: median | p90 | max | light load: median | p90 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, what, fmt in (
        ("packets_in_per_s", "packets/s in", ".1f"),
        ("packets_out_per_s", "packets/s out", ".1f"),
        ("kb_in_per_s", "kB/s in", ".2f"),
        ("kb_out_per_s", "kB/s out", ".2f"),
        ("cpu_percent", "CPU %", ".2f"),
        ("rss_mib", "RSS MiB", ".1f"),
    ):
        lines.append(f"| {what} | {_spread(idle, key, fmt)} | {_spread(light, key, fmt)} |")
    load = light.get("load") or {}
    not_yet = see.get("not_converged")
    lines += [
        "",
        f"- the light load: {_f(load.get('ok'), 'd')} of {_f(load.get('count'), 'd')} served, p50"
        f" {_f(load.get('p50_ms'), '.1f', ' ms')}, p99 {_f(load.get('p99_ms'), '.0f', ' ms')}",
        f"- start-up: every node saw every other {_f(see.get('after_last_start_s'), '.2f', ' s')} after the last"
        f" node was started ({_f(see.get('after_last_ready_s'), '.2f', ' s')} after it answered); the median node"
        f" saw all after {_f(see.get('median_node_s'), '.2f', ' s')}"
        + (
            f" (from the nodes' logs; a poller from outside confirmed it by {_f(see['polled_s'], '.2f', ' s')})"
            if "polled_s" in see
            else ""
        )  # fmt: skip
        + (f"; not converged: {', '.join(map(str, not_yet))}" if not_yet else ""),
        "",
        "| fault | victim | not alive for every survivor | median survivor | dead for every survivor |"
        " median survivor | missed by |",
        "|---|---|---|---|---|---|---|",
    ]
    for fault in ("kill -9", "SIGSTOP"):
        d = res.get(fault)
        if not d:
            continue
        missed = d.get("missed_by")
        lines.append(
            f"| {fault} | {d.get('victim', '?')} | {_f(d.get('not_alive_all_s'), '.2f', ' s')} |"
            f" {_f(d.get('not_alive_median_s'), '.2f', ' s')} | {_f(d.get('dead_all_s'), '.2f', ' s')} |"
            f" {_f(d.get('dead_median_s'), '.2f', ' s')} |"
            f" {len(missed) if missed is not None else '—'} of {_f(d.get('survivors'), 'd')} |"
        )
    churn = res.get("churn")
    if churn:
        cl = churn.get("load") or {}
        lines += [
            "",
            f"Churn: {len(churn.get('killed_and_restarted') or [])} nodes killed (kill -9) one after another and"
            f" each restarted a few seconds later, under the light load entering at {_f(churn.get('entries'), 'd')}"
            f" other nodes: {_f(cl.get('failed'), 'd')} of {_f(cl.get('count'), 'd')} requests failed"
            f" ({_f(cl.get('retried'), 'd')} retried), p50 {_f(cl.get('p50_ms'), '.0f', ' ms')}, p99"
            f" {_f(cl.get('p99_ms'), '.0f', ' ms')}; afterwards every node saw every other within"
            f" {_f(churn.get('see_all_after_s'), '.2f', ' s')}.",
        ]
    return lines


# ------------------------------------------------------------ gossip


def _gossip_goals(res: dict[str, Any]) -> Rows:
    s, g = res.get("summary", {}), res.get("goals", {})
    met = s.get("met", {})
    sizes, rates = s.get("sizes") or [], s.get("messages_per_node_s") or []
    span = f"{sizes[0]:,} to {sizes[-1]:,}" if sizes else "?"
    flat, false = s.get("flatness"), s.get("false_suspicions_per_node_hour")
    false_goal = g.get("false_suspicions_per_node_hour")
    false_ok = None if false is None or false_goal is None else false < false_goal
    joins = s.get("join_s") or []
    per_log = ", ".join(_f(j, ".3f") for j in s.get("join_over_log_n") or [])
    shown_joins = f"join {', '.join(_f(j, '.2f', ' s') for j in joins)}; / ln n {per_log}" if joins else "—"
    woke = [dig(p, "convergence_s", "woke_alive") for p in res.get("points") or []]
    woke_log = ", ".join(_f(w, ".3f") for w in s.get("woke_over_log_n") or [])
    shown_woke = f"woke {', '.join(_f(w, '.2f', ' s') for w in woke)}; / ln n {woke_log}" if woke else "—"
    return [
        (
            f"gossip: messages per node per second flat within {_f(g.get('flat_within'), 'g')}x from {span} nodes",
            _f(flat, ".2f", "x") + (f" ({min(rates):.1f} to {max(rates):.1f} msg/s)" if rates else ""),
            _met(met.get("flat_within_2x", _at_most(flat, g.get("flat_within")))),
        ),
        (
            f"gossip: false suspicions < {_f(false_goal, 'g')} per node-hour at"
            f" {_f(_times(dig(res, 'network', 'loss'), 100), 'g', '%')} loss",
            f"{_f(false, '.3f')} (the worst size)",
            _met(met.get("false_suspicions_below_1_per_node_hour", false_ok)),
        ),
        (
            f"gossip: a newcomer's convergence grows no faster than log n ({span} nodes)",
            shown_joins,
            _met(met["join_no_faster_than_log_n"]) if "join_no_faster_than_log_n" in met else "n/a (not checked)",
        ),
        (
            f"gossip: a woken node's convergence grows no faster than log n ({span} nodes)",
            shown_woke,
            _met(met["woke_no_faster_than_log_n"]) if "woke_no_faster_than_log_n" in met else "n/a (not checked)",
        ),
    ]


def _gossip(res: dict[str, Any]) -> list[str]:
    net, proto = res.get("network", {}), res.get("protocol", {})
    loss = net.get("loss")
    lines = [
        "`mesh.Gossip`, the membership protocol the nodes run, driven by a simulated network (bench/gossip_sim.py):"
        f" every delivery {_f(_times(net.get('delay_s'), 1000), 'g', ' ms')} late and lost with"
        f" probability {_f(_times(loss, 100), 'g', '%')} ({net.get('model', '?')}); a tick"
        f" every {_f(net.get('tick_s'), 'g', ' s')}. Protocol: interval {_f(proto.get('interval_s'), 'g', ' s')},"
        f" suspect after {_f(proto.get('suspect_after_s'), 'g', ' s')}, dead after"
        f" {_f(proto.get('dead_after_s'), 'g', ' s')}, {_f(proto.get('watchers'), 'd')} watchers, a digest every"
        f" {_f(proto.get('sync_every_s'), 'g', ' s')}. Times until every node knows: medians over the events of"
        " each size.",
        "",
        "| nodes | msg/s per node | bytes/s per node | by type | idle simulated | false suspicions per node-hour |"
        " hung: suspect | hung: dead | woke: alive | killed: dead | newcomer joined |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res.get("points") or []:
        c = p.get("convergence_s") or {}
        types = ", ".join(f"{k} {v:.1f}" for k, v in (p.get("by_type_per_node_s") or {}).items()) or "—"
        lines.append(
            f"| {_f(p.get('nodes'), ',')} | {_f(p.get('messages_per_node_s'), '.1f')} |"
            f" {_f(p.get('bytes_per_node_s'), '.0f')} | {types} | {_f(p.get('idle_seconds'), '.0f', ' s')}"
            f" ({_f(p.get('node_hours'), '.1f')} node-hours) | {_f(p.get('false_suspicions_per_node_hour'), '.3f')} |"
            f" {_f(c.get('hung_suspect'), '.2f', ' s')} | {_f(c.get('hung_dead'), '.2f', ' s')} |"
            f" {_f(c.get('woke_alive'), '.2f', ' s')} | {_f(c.get('killed_dead'), '.2f', ' s')} |"
            f" {_f(c.get('join'), '.2f', ' s')} |"
        )  # fmt: skip
    lines += ["", "A time shown as — was not reached within the simulation's limit (10 s; 20 s for a join)."]
    return lines


MESH_SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "split": ("One model over several nodes: pipeline stages", _split),
    "scale": ("Scale: a mesh of idle nodes", _scale),
    "gossip": ("Membership protocol simulated to 10,000 nodes", _gossip),
}


def mesh_goals(r: dict[str, dict[str, Any]]) -> Rows:
    """The goal rows of split, scale and gossip, for those of them that have results."""
    rows: Rows = []
    for name, goals in (("split", _split_goals), ("scale", _scale_goals), ("gossip", _gossip_goals)):
        if name in r:
            rows += goals(r[name])
    return rows
