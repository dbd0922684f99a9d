"""Conversations as an office sends them, from the client host: a load generator process for the `prefix` scenario.

    python -m bench.conversations --nodes A,B,C --model smollm2 --conversations 12 --turns 8 --seed 1

Every conversation shares one system prompt (~300 tokens), opens with a long first question (a note pasted in,
~150 tokens) and goes on with short follow-ups, each turn sending the whole history again. Open loop: conversations
start at seeded Poisson times, and each turn is sent a seeded think time after the answer to the one before (a
person reads the answer, then types); each turn enters the mesh at a node drawn at random (seeded). The same seed
gives the same conversations, entry nodes and times, whatever the mesh does, so runs under different settings
compare like with like (greedy answers: the same words, so the same prompts, as long as every turn is answered).

Prints JSON lines: `progress` events, then a `summary` with one row per turn sent and each node's final status.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh import Client, LanmeshError

from .procs import ping

SYSTEM_PROMPT = (
    "You are the assistant of Northwind Traders, a small company of forty people that imports coffee, tea and "
    "spices and sells them to cafes, restaurants and shops. You help the people of the office with their daily "
    "work: answering questions about orders, suppliers, shipments, invoices, the warehouse and the office itself. "
    "Follow these rules. Answer in plain English, briefly, in one to three sentences, unless you are asked for more. "
    "Be polite and direct; do not apologise unless something went wrong. When you do not know something, say so "
    "and suggest who in the office might know: orders and invoices are handled by accounting, shipments and the "
    "warehouse by logistics, prices and customers by sales, computers and the network by the office manager. Never "
    "invent order numbers, prices, dates or names. Amounts are in euros unless stated otherwise. Our suppliers are "
    "in Brazil, Colombia, Ethiopia, Kenya, India, Sri Lanka, Vietnam and Indonesia; shipments take four to eight "
    "weeks by sea and arrive at the port of Rotterdam, from where a truck brings them to our warehouse. The "
    "warehouse is open from seven to four on weekdays. The office is open from eight to six. Orders from customers "
    "placed before noon leave the warehouse the same day. Samples are free for regular customers, and a new "
    "customer pays for the first sample. Remember what was said earlier in the conversation and refer to it when "
    "it helps."
)
_PEOPLE = ["Anna", "Bram", "Chen", "Dara", "Emil", "Fatima", "Greta", "Hugo", "Ines", "Jonas", "Kofi", "Lena"]
_TOPICS = ["a late shipment of Kenyan tea", "an invoice a cafe has not paid", "the new espresso blend",
           "a customer who wants organic cinnamon", "the warehouse inventory count", "a damaged pallet of coffee",
           "the price list for next month", "a new supplier in Vietnam", "the office printer", "a trade fair in May",
           "a complaint about stale cardamom", "the truck booked for Thursday"]  # fmt: skip
_NOTE = [
    "The customer called twice this morning and sounded worried.",
    "According to the tracking page the container is still in the port.",
    "Accounting says the payment terms were thirty days from the invoice date.",
    "The supplier sent a new quote that is about eight percent higher than last year.",
    "Logistics wrote that the pallet was wrapped badly and two bags were torn.",
    "Sales thinks we could offer a small discount if the order is large enough.",
    "The warehouse team counted the stock on Friday and found a few differences.",
    "Last time this happened we asked the shipping company for a written statement.",
    "The customer has been with us for six years and orders every month.",
    "Nobody in the office is sure who agreed to the current delivery dates.",
    "The sample we received last week tasted good, but the beans were small.",
    "There is an email thread about this, but it is long and confusing.",
]
_FOLLOW_UPS = [
    "What should I tell them first?", "Who in the office should I ask about it?", "Can you write that as a short "
    "email?", "How long will that take, roughly?", "What if they do not agree?", "Is there anything I should check "
    "before I answer?", "Should I call them or write?", "What do we usually do in this case?", "Can you make it "
    "friendlier?", "What would you put in the subject line?", "Summarise what we decided, please.", "Thanks. Anything "
    "else I should know?",
]  # fmt: skip


@dataclass
class Turn:
    """One turn as sent and answered."""

    conversation: int
    turn: int
    entry: str
    sent: float  # seconds after the run's start
    ok: bool = False
    node: str = ""
    route: str = ""
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Plan:
    """What one conversation will do, all drawn from the seed before anything is sent."""

    start: float
    first: str
    follow_ups: list[str]
    entries: list[int]
    think: list[float]
    turns: list[Turn] = field(default_factory=list)


def plans(n: int, turns: int, nodes: int, seed: int, rate: float, think: float) -> list[Plan]:
    rng = random.Random(seed)
    out, at = [], 0.0
    for i in range(n):
        at += rng.expovariate(rate) if i else 0.0
        who, topic = _PEOPLE[i % len(_PEOPLE)], _TOPICS[rng.randrange(len(_TOPICS))]
        note = " ".join(rng.sample(_NOTE, 7))
        first = (
            f"Hello, this is {who}. I need help with {topic}. Here is what I know so far. {note} "
            f"What do you think I should do about {topic}, and what should I say to the people involved?"
        )
        follow_ups = [rng.choice(_FOLLOW_UPS) for _ in range(turns - 1)]
        entries = [rng.randrange(nodes) for _ in range(turns)]
        pauses = [rng.expovariate(1 / think) if think > 0 else 0.0 for _ in range(turns)]
        out.append(Plan(at, first, follow_ups, entries, pauses))
    return out


def converse(i: int, plan: Plan, clients: list[Client], names: list[str], model: str, t0: float, args: Any) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    time.sleep(max(0.0, t0 + plan.start - time.monotonic()))
    for n in range(args.turns):
        messages.append({"role": "user", "content": plan.first if n == 0 else plan.follow_ups[n - 1]})
        entry = plan.entries[n]
        sent = time.monotonic()
        row = Turn(i, n + 1, names[entry], round(sent - t0, 4))
        plan.turns.append(row)
        try:
            stream = clients[entry].chat(model, messages, stream=True, max_tokens=args.max_tokens, temperature=0,
                                         timeout=args.timeout)  # fmt: skip
            first = None
            for _ in stream:
                first = first or time.monotonic()
            end = time.monotonic()
            result = stream.result
            assert result is not None
        except LanmeshError as exc:
            row.error = f"{type(exc).__name__}: {exc}"[:300]
            return  # the conversation cannot go on without its answer
        usage = result.meta.get("usage", {})
        row.ok, row.node, row.route = True, result.node, result.route
        row.ttft, row.latency = round((first or end) - sent, 4), round(end - sent, 4)
        row.prompt_tokens = int(usage.get("prompt_tokens", 0))
        row.cached_tokens = int(usage.get("cached_tokens", 0))
        row.completion_tokens = int(usage.get("completion_tokens", 0))
        messages.append({"role": "assistant", "content": result.text})
        time.sleep(plan.think[n])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.conversations", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", required=True, help="entry nodes, host:port,...")
    p.add_argument("--names", default="", help="their node names, in the same order (for the rows)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.2, help="conversations starting per second (Poisson)")
    p.add_argument("--think", type=float, default=4.0, help="mean seconds between an answer and the next turn")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--system", default=SYSTEM_PROMPT, help="the system prompt every conversation shares ('': none)")
    args = p.parse_args(argv)
    addresses = args.nodes.split(",")
    names = args.names.split(",") if args.names else addresses
    todo = plans(args.conversations, args.turns, len(addresses), args.seed, args.rate, args.think)
    clients = [Client(a, timeout=args.timeout, learn=False) for a in addresses]
    t0 = time.monotonic()
    threads = [threading.Thread(target=converse, args=(i, plan, clients, names, args.model, t0, args), daemon=True)
               for i, plan in enumerate(todo)]  # fmt: skip
    for t in threads:
        t.start()
    total = args.conversations * args.turns
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        done = sum(1 for plan in todo for r in plan.turns if r.ok or r.error)
        _emit("progress", done=done, total=total)
    seconds = time.monotonic() - t0
    for c in clients:
        c.close()
    status = {}
    for name, address in zip(names, addresses, strict=True):
        pong = ping(address, 2.0, want_status=True)
        status[name] = pong.status[0] if pong is not None and pong.status else None
    rows = [asdict(r) for plan in todo for r in plan.turns]
    _emit("summary", seconds=seconds, rows=rows, status=status, system_prompt_chars=len(SYSTEM_PROMPT))
    return 0


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
