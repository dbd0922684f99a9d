"""The automatic split as a node carries it out: for each chat model this node wants but cannot hold whole (or was
told `--layers auto`), it gossips the want (`StageWant`: the build's version, the bytes it can give, its cores),
derives the plan from the wants of every live node that wants the same build (`nodes/models/stage_plan.py`, the
same on every node), and holds the stage the plan gives it: loads it, and unloads the one it held before.

A plan is acted on once it has stayed the same for `SETTLE_S` (gossip reaches the nodes a few hundred milliseconds
apart); while the wanters together cannot hold the model, the node says so once and waits for more of them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol import StageWant, parse_stage

from ..models.cache import content_digest
from ..models.memory import MIB, stage_kv_cache, stage_need, whole_build
from ..models.specs import DEFAULT_PRECISION, ModelSpec, resolve_path, spec_text, with_layers
from ..models.stage_plan import Member, StagePlan, plan_stages
from .memory_budget import ModelTooBig

if TYPE_CHECKING:
    from ..models.backends.onnx_stage_graph import LayerCosts


class PlannerHost(Protocol):
    """What the planner needs of its node: its id, executor (gossiped wants), mesh (peers' wants) and admin (load
    and unload a stage)."""

    node_id: str
    executor: Any
    mesh: Any
    admin: Any


log = logging.getLogger("lanmesh.node")

SETTLE_S = 1.5  # a plan is acted on once it has held this long
POLL_S = 0.5


@dataclass
class Want:
    """A model this node would hold a stage of."""

    spec: ModelSpec  # the chat model's spec (no range)
    budget: int  # bytes this node can give a stage of it
    speed: float  # relative to a one-core node: its cores
    version: str = ""
    costs: LayerCosts | None = None
    vocab: int = 0
    kv_per_token: int = 0  # the whole model's key/value bytes per cached token
    plan: StagePlan | None = None
    since: float = 0.0
    held: tuple[int, int] | None = None
    held_name: str = ""
    said: str = ""  # the last plan (or its absence) logged

    @property
    def name(self) -> str:
        return str(self.spec.options.get("model", self.spec.name))


def cores() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class StagePlanner:
    """Runs the automatic split for a node's wants in a thread of its own (see the module docstring)."""

    def __init__(self, node: PlannerHost, wants: list[Want]) -> None:
        self.node = node
        self.wants = wants
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lanmesh-stage-plan", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        ready = []
        for want in self.wants:
            try:
                self._prepare(want)
                ready.append(want)
            except Exception:  # a model that cannot be built or cut is not split; the node serves on
                log.exception("model %s: cannot take part in a split", want.name)
        failed: dict[str, str] = {}  # model -> the last failure logged (said once, not every POLL_S)
        while not self._stop.wait(POLL_S):
            for want in ready:
                try:
                    self._plan(want, time.monotonic())
                    failed.pop(want.name, None)
                except ModelTooBig as exc:  # keyed by kind, not text: the text's MiB figures move with memory use
                    if failed.get(want.name) != "too big":
                        log.error("model %s: cannot hold the stage the split gives this node: %s", want.name, exc)
                    failed[want.name] = "too big"
                except Exception as exc:
                    if failed.get(want.name) != type(exc).__name__:
                        log.exception("model %s: the split plan failed (trying again every %g s)", want.name, POLL_S)
                    failed[want.name] = type(exc).__name__

    def _prepare(self, want: Want) -> None:
        """The whole build (built now if it is not yet: minutes, once), its version and its layers' costs; then the
        want is gossiped."""
        from ..models.backends.onnx_build import build_in_child
        from ..models.backends.onnx_stage_graph import layer_costs

        built = whole_build(want.spec)
        if built is None:
            log.info("model %s: building it once, to serve a stage of it", want.name)
            built = build_in_child(want.name, resolve_path(want.spec), want.spec.options.get(
                "precision", DEFAULT_PRECISION), "cpu", None, lambda stage, fraction: None)  # fmt: skip
        want.version = content_digest(built)
        want.costs = layer_costs(built)
        model = json.loads((Path(built) / "genai_config.json").read_text())["model"]
        decoder = model["decoder"]
        want.vocab = int(model["vocab_size"])
        want.kv_per_token = 2 * want.costs.layers * int(decoder["num_key_value_heads"]) * int(decoder["head_size"]) * 4
        assert self.node.executor is not None
        self.node.executor.set_want(want.name, StageWant(want.version, want.budget, want.speed))
        log.info("model %s: wants a stage of it (%d layers; %d MiB to give, %g cores), planned with the other nodes "
                 "that want it", want.name, want.costs.layers, want.budget // MIB, want.speed)  # fmt: skip

    def need(self, want: Want) -> Any:
        """Bytes a stage needs, as the plan counts them: with the smallest cache it may be cut to (once loaded it
        takes what its node has left, up to the default)."""
        costs = want.costs
        assert costs is not None
        slots = int(want.spec.max_batch or 16)

        @functools.lru_cache(maxsize=4096)
        def need(first: int, last: int) -> int:
            kv = stage_kv_cache(want.spec, first, last, costs.layers, want.kv_per_token)
            return stage_need(costs, first, last, kv, want.vocab, slots).total

        return need

    def _plan(self, want: Want, now: float) -> None:
        mesh = self.node.mesh
        assert mesh is not None and want.costs is not None
        members = [Member(self.node.node_id, want.budget, want.speed, want.held)]
        for node, theirs, held in mesh.membership.stage_view(want.name):
            if theirs is None or theirs.version != want.version:
                continue
            holds = None
            for stage, version in held:
                parsed = parse_stage(stage)
                if parsed is not None and version and want.version.startswith(version):
                    holds = (parsed.first, parsed.last)
            members.append(Member(node, theirs.budget, theirs.speed, holds))
        plan = plan_stages(want.costs, members, self.need(want))
        if plan != want.plan:
            want.plan, want.since = plan, now
            return
        if now - want.since < SETTLE_S:
            return
        said = plan.describe() if plan is not None else f"{len(members)} nodes cannot hold it together"
        if said != want.said:
            want.said = said
            if plan is None:
                total = sum(m.budget for m in members) // MIB
                log.warning(
                    "model %s: the %d nodes that want it can give %d MiB together, too little for its %d layers; "
                    "waiting for more nodes", want.name, len(members), total, want.costs.layers,
                )  # fmt: skip
            else:
                log.info("model %s: split %s", want.name, said)
        target = plan.range_of(self.node.node_id) if plan is not None else None
        if target is None or target == want.held:
            return
        self._hold(want, target)

    def _hold(self, want: Want, target: tuple[int, int]) -> None:
        """Serve layers `target` of the model, giving back the stage held before (first: memory is what binds)."""
        admin = self.node.admin
        assert admin is not None
        if want.held_name:
            admin.handle_unload(want.held_name)
            want.held, want.held_name = None, ""
        spec = with_layers(replace(want.spec, options={k: v for k, v in want.spec.options.items() if k != "layers"}),
                           f"{target[0]}-{target[1]}")  # fmt: skip
        admin.handle_load(spec_text(spec))
        want.held, want.held_name = target, spec.name
