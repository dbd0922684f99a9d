"""Chat streams as a process of their own (e.g. inside the client host's network namespace): `--streams` callers,
each streaming its share of `--count` chats one after another, greedy, through one entry node.

    python -m bench.chatload chat --nodes 10.213.0.2:7000 --model smollm2 --streams 8 --count 16 \
        --max-tokens 128 --prompts prompts.json
    python -m bench.chatload status --nodes 10.213.0.2:7000,10.213.0.3:7000

JSON lines on stdout: `chunks` every 25 streamed pieces (for a harness that faults the mesh mid-stream), `done` per
finished chat (time to first piece, seconds, completion tokens, its text, the node and route), one `summary`.
`status` asks each node for its own status row (its models, counters) and prints them as the summary.
Times are time.monotonic(), which network namespaces share.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from mesh import Client, client_security

from .procs import ping

_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _lock:
        sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
        sys.stdout.flush()


def run(nodes: list[str], model: str, prompts: list[str], streams: int, count: int, max_tokens: int,
        timeout: float, require: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    client = Client(nodes, timeout=timeout, security=client_security())
    results: list[dict[str, Any]] = []
    pieces = [0]
    t0 = time.monotonic()

    def caller(worker: int) -> None:
        for i in range(worker, count, streams):
            prompt = prompts[i % len(prompts)]
            start = time.monotonic()
            first = None
            text: list[str] = []
            row: dict[str, Any] = {"i": i, "prompt": i % len(prompts), "start": start - t0}
            try:
                messages = [{"role": "user", "content": prompt}]
                stream = client.chat(model, messages, stream=True, max_tokens=max_tokens, temperature=0,
                                     timeout=timeout, require=require)  # fmt: skip
                for piece in stream:
                    first = first or time.monotonic()
                    text.append(piece)
                    with _lock:
                        pieces[0] += 1
                        if pieces[0] % 25 == 0:
                            sys.stdout.write(json.dumps({"event": "chunks", "t": time.monotonic(),
                                                         "pieces": pieces[0]}) + "\n")  # fmt: skip
                            sys.stdout.flush()
                end = time.monotonic()
                result = stream.result
                assert result is not None
                row |= {"ok": True, "seconds": end - start, "ttft_ms": ((first or end) - start) * 1000,
                        "tokens": int(result.usage.get("completion_tokens", 0)), "text": "".join(text),
                        "prompt_tokens": int(result.usage.get("prompt_tokens", 0)),
                        "node": result.node, "route": result.route}  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - every failure is a result the harness counts
                row |= {"ok": False, "seconds": time.monotonic() - start, "error": f"{type(exc).__name__}: {exc}"}
            with _lock:
                results.append(row)
            emit("done", **row)

    threads = [threading.Thread(target=caller, args=(w,), daemon=True) for w in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    client.close()
    ok = [r for r in results if r["ok"]]
    summary = {
        "streams": streams, "count": count, "ok": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "tokens": sum(r["tokens"] for r in ok), "tok_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "failures": [r["error"] for r in results if not r["ok"]][:20],
        "results": sorted(results, key=lambda r: r["i"]),
    }  # fmt: skip
    emit("summary", **summary)
    return summary


def status(nodes: list[str]) -> dict[str, Any]:
    rows = {}
    for node in nodes:
        pong = ping(node, 2.0, want_status=True, security=client_security())
        rows[node] = pong.status[0] if pong is not None and pong.status else None
    emit("summary", rows=rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chatload", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("chat", help="chat streams: --streams callers, --count chats in all")
    p.add_argument("--nodes", required=True, help="comma-separated host:port of entry nodes")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="a JSON file with a list of prompts")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128, dest="max_tokens")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--require", action="append", default=[], metavar="KEY=VALUE", help="node labels to match")
    st = sub.add_parser("status", help="each node's own status row")
    st.add_argument("--nodes", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "status":
        status(args.nodes.split(","))
        return 0
    with open(args.prompts) as f:
        prompts = json.load(f)
    require = dict(r.split("=", 1) for r in args.require) or None
    s = run(args.nodes.split(","), args.model, prompts, args.streams, args.count, args.max_tokens, args.timeout,
            require)  # fmt: skip
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
