"""Stage engines chained in one process, their `Stage` messages carried through the wire codec (header encoded and
decoded, tensor as the raw bytes a frame would hold): the split answers token for token what the unsplit engine
answers, several requests share the stages at once, and a sequence that ends anywhere is freed everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from model_jobs import Outcome, chat, complete, make_job, requires

from nodes.models.backends.base import Job
from nodes.models.backends.onnx_chat import OnnxChat
from nodes.models.backends.onnx_stage import OnnxStage
from nodes.runtime.executor import ModelLane
from protocol import ErrorCode, Request, Stage, decode, encode, stage_name

LAYERS = 4


@pytest.fixture(scope="module")
def whole(tiny_deep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnnxChat]:
    requires("onnxruntime", "onnxruntime_genai", "onnx", "tokenizers", "jinja2")
    engine = OnnxChat("tiny", tiny_deep_dir, cache_dir=tmp_path_factory.mktemp("whole"), precision="fp32")
    engine.load()
    yield engine
    engine.close()


class Wire:
    """Stage engines on nodes n0, n1, ...; what one sends another receives as a decoded header and raw bytes."""

    def __init__(self, engines: list[OnnxStage]) -> None:
        self.engines = {f"n{i}": e for i, e in enumerate(engines)}
        self.lanes = [ModelLane(e, max_queue=64, batch_wait=0.0) for e in engines]
        self.sent: list[tuple[str, Stage]] = []
        self.drop_to: set[str] = set()  # nodes whose messages are lost (their node is gone)
        for node, engine in self.engines.items():
            engine.attach(node, self._sender(engine))
        for lane in self.lanes:
            lane.start()

    def _sender(self, engine: OnnxStage) -> Any:
        def send(node: str, items: list[tuple[Stage, Any]]) -> None:
            for msg, tensor in items:
                self.sent.append((node, msg))
                if node in self.drop_to:
                    engine.undeliverable(node, msg)
                    continue
                header = decode(encode(msg))
                assert isinstance(header, Stage)
                frame = None if tensor is None else bytes(memoryview(tensor).cast("B"))
                self.engines[node].stage_in(header, frame, wake=False)
            self.engines[node].wake()

        return send

    @property
    def chain(self) -> tuple[tuple[str, str], ...]:
        return tuple((node, e.name) for node, e in self.engines.items())

    def submit(self, req: Request, outcome: Outcome, timeout: float = 60.0) -> Job:
        piped = replace(req, model=self.chain[0][1], stages=self.chain)
        job = self.lanes[0].make_job(piped, time.monotonic() + timeout, *_recorders(outcome))
        assert self.lanes[0].submit(job)
        return job

    def close(self) -> None:
        for lane in self.lanes:
            lane.stop(5.0)


def _recorders(outcome: Outcome) -> tuple[Any, Any]:
    done = threading.Event()
    outcome.done = done  # type: ignore[attr-defined]

    def chunk(job: Job, seq: int, data: Any) -> None:
        outcome.chunks.append(data)

    def finished(job: Job, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        outcome.output, outcome.meta, outcome.code, outcome.message = output, meta, code, message
        outcome.answers += 1
        done.set()

    return chunk, finished


def wait(outcomes: list[Outcome], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    for o in outcomes:
        assert o.done.wait(max(0.0, end - time.monotonic())), "no answer"  # type: ignore[attr-defined]


def stages(whole: OnnxChat, split: list[tuple[int, int]], tmp_path: Path, **options: Any) -> Wire:
    assert whole.model_dir is not None
    engines = []
    for first, last in split:
        engine = OnnxStage(stage_name("tiny", first, last), "tiny", whole.model_dir, first, last,
                           cache_dir=tmp_path, **options)  # fmt: skip
        engine.load()
        engines.append(engine)
    return Wire(engines)


def solo(whole: OnnxChat, req: Request) -> str:
    outcome = Outcome()
    whole.run([make_job(req, outcome)])
    assert outcome.code is None, outcome.message
    return outcome.text


REQUESTS = [
    complete("The quick brown fox", max_tokens=12),
    chat("hello, how are you?", max_tokens=10),
    complete("Once upon a time there was a small model that answered questions about cities.", max_tokens=20),
    chat("Zürich, São Paulo, Kraków and Malmö", max_tokens=8, stop=["a"]),
]


@pytest.mark.parametrize("split", [[(0, 1), (2, 3)], [(0, 0), (1, 2), (3, 3)]], ids=["2 stages", "3 stages"])
def test_a_split_model_answers_token_for_token_what_the_whole_model_answers(
    whole: OnnxChat, tmp_path: Path, split: list[tuple[int, int]]
) -> None:
    expected = [solo(whole, r) for r in REQUESTS]
    wire = stages(whole, split, tmp_path)
    try:
        for req, text in zip(REQUESTS, expected, strict=True):  # one at a time: the same batches as the whole run
            outcome = Outcome()
            wire.submit(replace(req, stream=True), outcome)
            wait([outcome])
            assert outcome.code is None, outcome.message
            assert outcome.text == text and "".join(c["text"] for c in outcome.chunks) == text
        # Every piece said which tokens it came from; and the stages answered nothing to anyone but each other.
        assert all(isinstance(c["tokens"], list) and c["tokens"] for c in outcome.chunks)
    finally:
        wire.close()
    assert all(e.held_for_others == 0 for e in wire.engines.values())


def test_a_grammar_is_followed_by_the_last_stage_as_by_the_whole_model(whole: OnnxChat, tmp_path: Path) -> None:
    req = complete("A number:", max_tokens=8, guidance={"type": "regex", "grammar": "[0-9]{4}"})
    expected = solo(whole, req)
    wire = stages(whole, [(0, 1), (2, 3)], tmp_path)
    try:
        outcome = Outcome()
        wire.submit(replace(req, stream=True), outcome)
        wait([outcome])
        assert outcome.code is None, outcome.message
        assert outcome.text == expected and len(expected) == 4 and expected.isdigit()
    finally:
        wire.close()


def test_requests_share_the_stages_at_once_and_all_are_answered(whole: OnnxChat, tmp_path: Path) -> None:
    wire = stages(whole, [(0, 1), (2, 3)], tmp_path)
    try:
        outcomes = [Outcome() for _ in range(8)]
        for i, o in enumerate(outcomes):
            wire.submit(complete(f"The quick brown fox {i}", max_tokens=16, stream=True), o)
        wait(outcomes)
        assert [o.code for o in outcomes] == [None] * 8
        assert all(o.meta and o.meta["usage"]["completion_tokens"] == 16 for o in outcomes)
        assert max(e.row_steps / max(1, e.steps) for e in wire.engines.values()) > 1.5  # batched, not one by one
    finally:
        wire.close()


def test_a_stream_resumed_from_its_exact_tokens_continues_as_if_never_interrupted(
    whole: OnnxChat, tmp_path: Path
) -> None:
    wire = stages(whole, [(0, 1), (2, 3)], tmp_path)
    try:
        req = complete("Once upon a time there was", max_tokens=20, stream=True)
        full = Outcome()
        wire.submit(req, full)
        wait([full])
        for cut in range(1, len(full.chunks)):  # whichever piece the stage died after
            prefix = "".join(c["text"] for c in full.chunks[:cut])
            ids = tuple(t for c in full.chunks[:cut] for t in c["tokens"])
            resumed = Outcome()
            wire.submit(replace(req, id=f"resumed-{cut}", prefix=prefix, prefix_ids=ids), resumed)
            wait([resumed])
            assert resumed.code is None, resumed.message
            assert prefix + "".join(c["text"] for c in resumed.chunks) == full.text == resumed.text
            assert resumed.meta is not None and resumed.meta["usage"] == full.meta["usage"]  # type: ignore[index]
    finally:
        wire.close()


def test_a_cancelled_request_is_freed_on_every_stage(whole: OnnxChat, tmp_path: Path) -> None:
    wire = stages(whole, [(0, 0), (1, 2), (3, 3)], tmp_path)
    try:
        outcome = Outcome()
        job = wire.submit(complete("The quick brown fox", max_tokens=60, stream=True), outcome)
        end = time.monotonic() + 30
        while len(outcome.chunks) < 3 and time.monotonic() < end:
            time.sleep(0.005)
        job.fail(ErrorCode.UNAVAILABLE, "cancelled: stream closed")  # what the executor does on a Cancel
        end = time.monotonic() + 10
        while any(e.held_for_others or e._seqs for e in wire.engines.values()) and time.monotonic() < end:
            time.sleep(0.01)
        assert not any(e._seqs for e in wire.engines.values())
        closes = {node for node, m in wire.sent if m.kind == "close"}
        assert closes == {"n1", "n2"}
    finally:
        wire.close()


def test_a_stage_that_cannot_hold_a_request_fails_it_with_a_message_naming_it(whole: OnnxChat, tmp_path: Path) -> None:
    assert whole.model_dir is not None
    engines = [
        OnnxStage("tiny[0-1]", "tiny", whole.model_dir, 0, 1, cache_dir=tmp_path),
        OnnxStage("tiny[2-3]", "tiny", whole.model_dir, 2, 3, cache_dir=tmp_path, context=40),  # holds 40 tokens
    ]
    for engine in engines:
        engine.load()
    wire = Wire(engines)
    try:
        outcome = Outcome()
        wire.submit(complete("The quick brown fox", max_tokens=60), outcome)  # fits the first stage, not the second
        wait([outcome])
        assert outcome.code is ErrorCode.BAD_REQUEST and "stage tiny[2-3]" in outcome.message
    finally:
        wire.close()


def test_a_stage_whose_next_node_is_gone_fails_the_request_as_retryable(whole: OnnxChat, tmp_path: Path) -> None:
    wire = stages(whole, [(0, 1), (2, 3)], tmp_path)
    wire.drop_to.add("n1")
    try:
        outcome = Outcome()
        wire.submit(complete("The quick brown fox", max_tokens=8), outcome)
        wait([outcome])
        assert outcome.code is ErrorCode.UNAVAILABLE and "n1" in outcome.message  # the entry composes another chain
    finally:
        wire.close()


def test_a_middle_stage_whose_next_node_is_gone_fails_the_request_as_retryable(whole: OnnxChat, tmp_path: Path) -> None:
    wire = stages(whole, [(0, 0), (1, 2), (3, 3)], tmp_path)
    wire.drop_to.add("n2")  # what n1 sends to the last stage is lost
    try:
        outcome = Outcome()
        wire.submit(complete("The quick brown fox", max_tokens=8), outcome)
        wait([outcome])
        assert outcome.code is ErrorCode.UNAVAILABLE and "n2" in outcome.message
        end = time.monotonic() + 10
        while any(e._seqs for e in wire.engines.values()) and time.monotonic() < end:
            time.sleep(0.01)
        assert not any(e._seqs for e in wire.engines.values())
    finally:
        wire.close()


def test_a_request_for_a_stage_by_name_is_refused_with_the_models_name(whole: OnnxChat, tmp_path: Path) -> None:
    wire = stages(whole, [(0, 1), (2, 3)], tmp_path)
    try:
        outcome = Outcome()
        job = wire.lanes[0].make_job(complete("hi", model="tiny[0-1]"), time.monotonic() + 10, *_recorders(outcome))
        wire.lanes[0].submit(job)
        wait([outcome])
        assert outcome.code is ErrorCode.BAD_REQUEST and "ask for tiny" in outcome.message
    finally:
        wire.close()


_LATER_STAGES = """
import json, sys
import numpy as np
from nodes.models.backends.onnx_stage import OnnxStage

folder, cache = sys.argv[1], sys.argv[2]
seen = {}
for first, last in ((1, 2), (3, 3)):
    stage = OnnxStage(f"tiny[{first}-{last}]", "tiny", folder, first, last, cache_dir=cache)
    stage.load()
    runner = stage._runner
    runner.resize(2, 256)
    out = runner.run(0, np.zeros((2, 3, runner.hidden), np.float32), [0, 0])
    options = runner.session.get_session_options()
    seen[f"{first}-{last}"] = {"arena": options.enable_cpu_mem_arena, "out": list(out.shape)}
seen["tokenizers"] = "tokenizers" in sys.modules
print(json.dumps(seen))
"""


def test_a_later_stage_holds_no_tokenizer_and_no_memory_arena(whole: OnnxChat, tmp_path: Path) -> None:
    """A stage after the first never reads text, and keeps no onnxruntime arena (which would hold the most a run
    ever took, for good): fixed costs a stage of a few layers pays in full, whatever its share of the model. In a
    fresh process, since this one has imported the tokenizers library for the whole model."""
    assert whole.model_dir is not None
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-c", _LATER_STAGES, str(whole.model_dir), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["1-2"]["out"][:2] == [2, 3] and seen["3-3"]["out"][:2] == [2, 3]  # both ran
    assert seen["tokenizers"] is False
    assert seen["1-2"]["arena"] is False and seen["3-3"]["arena"] is False
