"""`lanmesh request`: send one request to a node (it routes it in the mesh) and print the answer.

A node that does not answer at all is given up within seconds (`reach.py`); an answer that takes long on a live node
gets the whole deadline. Ctrl-C cancels the request where it runs and exits 130, as a shell expects.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..runtime.config import DEFAULT_PORT, parse_labels

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
DEFAULT_REQUEST_MAX_TOKENS = 256  # what a chat model generates when a request does not say (textgen.py)


def add_parser(sub: Any, add_key_file: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "request",
        help="send one request to a node and print the reply",
        description=(
            "Send one request to a node (it routes it to the best node of the mesh that serves MODEL) and print "
            "the answer on stdout; who served it goes to stderr. A node that does not answer at all is given up "
            "after 3 s, saying what to check; a slow answer from a live node gets the whole --timeout. Ctrl-C "
            "cancels the request where it runs."
        ),
        epilog=(
            "examples:\n"
            "  lanmesh request smollm2 'What is the capital of France?'\n"
            "  lanmesh request smollm2 'Tell me a story' --stream --max-tokens 512\n"
            "  lanmesh request minilm 'a sentence to embed' --task embed --node 192.168.1.20:5555"
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("model", help="model name, e.g. smollm2, minilm, echo (`lanmesh models` lists them)")
    p.add_argument("input", help="prompt text (chat/complete), text to embed, or JSON for infer")
    p.add_argument(
        "--node", help=f"a node of the mesh, HOST:PORT (default: 127.0.0.1:{DEFAULT_PORT}, or a client's node)"
    )
    p.add_argument("--task", default="chat", choices=["chat", "complete", "embed", "infer"], help="what to ask")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (chat/complete)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds the answer may take (its deadline, in the whole mesh)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        dest="max_tokens",
        help=f"most tokens to generate (the model's default: {DEFAULT_REQUEST_MAX_TOKENS}; a node accepts up to its "
        "own --max-tokens, 4096 unless set)",
    )
    p.add_argument("--temperature", type=float, help="sampling temperature (0: always the likeliest token)")
    p.add_argument("--seed", type=int, help="random seed, for answers that repeat")
    p.add_argument("--require", action="append", metavar="KEY=VALUE", help="only nodes with this label, repeatable")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON (node, route, meta)")
    add_key_file(p)
    p.set_defaults(func=cmd_request)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        worth_saying = action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text
        return text + " (default: %(default)s)" if action.option_strings and worth_saying else text


def cut_short_note(meta: dict[str, Any], asked: int | None) -> str | None:
    """One line for stderr when the answer stopped at its token limit (finish_reason length), else None."""
    if meta.get("finish_reason") != "length":
        return None
    usage = meta.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    limit = asked or tokens or DEFAULT_REQUEST_MAX_TOKENS
    after = f" after {tokens} tokens" if tokens else ""
    return (
        f"(the answer was cut at max_tokens{after}, finish_reason length: ask for more with --max-tokens "
        f"{max(2 * limit, 64)}; a node accepts up to its own --max-tokens, 4096 unless set)"
    )


def cmd_request(args: argparse.Namespace) -> int:
    from mesh import Client, LanmeshError, load_key

    from .reach import ANSWER_TIMEOUT_S, NodeUnreachable, check_answers

    gen = {k: getattr(args, k) for k in ("max_tokens", "temperature", "seed") if getattr(args, k) is not None}
    try:
        require = parse_labels(",".join(args.require)) if args.require else None
        security = load_key(args.key_file) if args.key_file else None
        with Client(args.node, timeout=args.timeout, security=security) as client:
            check_answers(client, args.node, min(ANSWER_TIMEOUT_S, args.timeout))
            if args.task in ("chat", "complete") and args.stream:
                return _print_stream(client, args, require, gen)
            result = _ask(client, args, require, gen)
    except NodeUnreachable as exc:
        print(f"lanmesh request: {exc}", file=sys.stderr)
        return 1
    except LanmeshError as exc:
        print(f"lanmesh request: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"lanmesh request: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the client has cancelled the request on the node serving it
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps({"output": result.output, "node": result.node, "route": result.route, "meta": result.meta}))
        return 0
    out = result.output
    if isinstance(out, dict) and "content" in out:
        out = out["content"]
    print(out if isinstance(out, str) else json.dumps(out))
    print(f"(served by {result.node}, route {result.route})", file=sys.stderr)
    note = cut_short_note(result.meta, args.max_tokens)
    if note:
        print(note, file=sys.stderr)
    return 0


def _ask(client: Any, args: argparse.Namespace, require: dict[str, str] | None, gen: dict[str, Any]) -> Any:
    if args.task == "chat":
        return client.chat(args.model, [{"role": "user", "content": args.input}], require=require, **gen)
    if args.task == "complete":
        return client.complete(args.model, args.input, require=require, **gen)
    payload: Any = args.input
    if args.task == "infer":
        try:
            payload = json.loads(args.input)
        except json.JSONDecodeError:
            payload = args.input
    return client.request(args.model, args.task, payload, params=gen or None, require=require)


def _print_stream(client: Any, args: argparse.Namespace, require: dict[str, str] | None, gen: dict[str, Any]) -> int:
    fn = client.chat if args.task == "chat" else client.complete
    prompt: Any = [{"role": "user", "content": args.input}] if args.task == "chat" else args.input
    stream = fn(args.model, prompt, stream=True, require=require, **gen)
    line_open = False
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
            line_open = True
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        stream.close()  # unless it ended: a Cancel to the node generating it, so the work stops there
        if line_open or stream.result is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
    result = stream.result
    note = cut_short_note(result.meta, args.max_tokens) if result is not None else None
    if note:
        print(note, file=sys.stderr)
    return 0
