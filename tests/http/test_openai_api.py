"""The gateway as an OpenAI client sees it: the official `openai` package, unmodified, against a node."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_nodes import FAST, GatewayNode, scrape, start_gateway_node, value, wait_until

from bench.procs import ROOT, Cluster
from tests.conftest import LOOPBACK

HELLO = [{"role": "user", "content": "hello mesh"}]


def test_chat_completion_answers_in_openais_shape_and_names_the_serving_node(echo_node: GatewayNode) -> None:
    raw = echo_node.openai().chat.completions.with_raw_response.create(model="echo", messages=HELLO)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "echo"
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == "hello mesh"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 0  # echo reports no usage
    assert raw.headers["x-lanmesh-node"] == "http-echo"
    assert raw.headers["x-lanmesh-route"] == "local"


def test_streamed_chat_arrives_piece_by_piece_then_finishes(echo_node: GatewayNode) -> None:
    text = "one two three four"
    stream = echo_node.openai().chat.completions.create(
        model="sleep:200",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 4 and "".join(pieces) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(echo_node: GatewayNode) -> None:
    body = {"model": "echo", "prompt": "a b", "stream": True}
    with httpx.stream("POST", f"{echo_node.url}/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-lanmesh-node"] == "http-echo"
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"lanmesh":{"node":"http-echo","route":"local"}' in events[-2]  # the route travels in the last chunk


def test_completions_take_one_prompt_or_several(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    one = client.completions.create(model="echo", prompt="continue this")
    assert one.object == "text_completion" and one.choices[0].text == "continue this"
    many = client.completions.create(model="echo", prompt=["first", "second", "third"])
    assert [c.text for c in many.choices] == ["first", "second", "third"]
    assert [c.index for c in many.choices] == [0, 1, 2]
    streamed = client.completions.create(model="sleep:200", prompt="x y z", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "x y z"


def test_models_lists_what_the_node_serves_with_the_node_ids(echo_node: GatewayNode) -> None:
    models = {m.id: m for m in echo_node.openai().models.list()}
    assert set(models) == {"echo", "sleep:200", "sleep:2000"}
    assert models["echo"].object == "model"
    assert (models["echo"].model_extra or {})["nodes"] == ["http-echo"]


def test_embeddings_from_a_model_that_cannot_embed_are_a_clear_400(echo_node: GatewayNode) -> None:
    # echo hands its input back instead of vectors: that is the caller's choice of model, not a server fault.
    with pytest.raises(openai.BadRequestError) as err:
        echo_node.openai().embeddings.create(model="echo", input=["a", "b"])
    assert err.value.code == "not_an_embedding_model" and err.value.param == "model"
    assert "embedding" in err.value.message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(echo_node: GatewayNode, change: dict[str, object], param: str) -> None:
    args: dict[str, object] = {"model": "echo", "messages": HELLO, **change}
    with pytest.raises(openai.BadRequestError) as err:
        echo_node.openai().chat.completions.create(**args)  # type: ignore[call-overload]
    assert err.value.status_code == 400
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"


def test_invalid_json_is_a_400_in_openais_error_shape(echo_node: GatewayNode) -> None:
    r = httpx.post(
        f"{echo_node.url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "JSON" in error["message"]


def test_unknown_model_is_a_404(echo_node: GatewayNode) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        echo_node.openai().chat.completions.create(model="no-such-model", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_a_passed_deadline_is_a_504(echo_node: GatewayNode) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        echo_node.openai().chat.completions.create(
            model="sleep:2000",
            messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"X-Lanmesh-Timeout": "0.3"},
        )
    assert err.value.status_code == 504 and err.value.code == "deadline_exceeded"
    assert time.monotonic() - t0 < 1.8  # answered at the deadline, not when the model would have finished


def test_oversized_body_is_refused_with_413(echo_node: GatewayNode) -> None:
    big = {"model": "echo", "prompt": "x" * (9 * 1024 * 1024)}
    r = httpx.post(f"{echo_node.url}/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_a_full_model_answers_429_with_retry_after(cluster: Cluster) -> None:
    node = start_gateway_node(cluster, "busy", ["sleep:1500"], ["--max-queue", "1"])
    client = node.openai()
    background = [
        threading.Thread(target=client.chat.completions.create, kwargs={"model": "sleep:1500", "messages": HELLO})
        for _ in range(2)
    ]
    for t in background:
        t.start()
        time.sleep(0.2)  # in order: the first takes the slot, the second the one queue place
    wait_until(lambda: node.proc.status()[0]["models"]["sleep:1500"][:2] == [1, 1], what="one running, one queued")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="sleep:1500", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 429 and err.value.code == "overloaded"
    assert err.value.response.headers["retry-after"] == "1"
    for t in background:
        t.join(10)


def test_requests_are_routed_across_the_mesh_and_503_once_no_live_node_serves(cluster: Cluster) -> None:
    entry = start_gateway_node(cluster, "entry", ["echo"], FAST)
    cluster.add("worker", [*LOOPBACK, "--http-port", "0", "--model", "sleep:50", "--peer", entry.proc.address, *FAST])
    cluster.wait_converged()
    client = entry.openai()

    def listed() -> dict[str, list[str]]:
        return {m.id: (m.model_extra or {})["nodes"] for m in client.models.list()}

    # The gateway answers /v1/models from a mesh view up to 0.5 s old: give it that long to catch up.
    wait_until(lambda: "sleep:50" in listed(), what="the worker's model listed")
    assert listed() == {"echo": ["entry"], "sleep:50": ["worker"]}
    raw = client.chat.completions.with_raw_response.create(model="sleep:50", messages=HELLO)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content == "hello mesh"
    assert raw.headers["x-lanmesh-node"] == "worker" and raw.headers["x-lanmesh-route"] == "only:worker"

    cluster.nodes[1].kill()
    wait_until(lambda: entry.proc.status()[1]["state"] == "dead", what="the worker seen dead")
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="sleep:50", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
    assert time.monotonic() - t0 < 5.0  # told promptly, not at the 300 s default deadline
    assert "sleep:50" not in {m.id for m in client.models.list()}


def test_with_an_api_key_every_route_but_health_needs_it(cluster: Cluster) -> None:
    key = "s3cret-key-of-16+chars"
    node = start_gateway_node(cluster, "keyed", ["echo"], key=key)
    with pytest.raises(openai.AuthenticationError) as err:
        node.openai("wrong-key").chat.completions.create(model="echo", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    answer = node.openai(key).chat.completions.create(model="echo", messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "hello mesh"
    assert httpx.get(f"{node.url}/metrics").status_code == 401
    assert httpx.get(f"{node.url}/v1/models").status_code == 401
    # /health answers anyone, but says who and what only to holders of the key.
    assert httpx.get(f"{node.url}/health").json() == {"status": "ready", "ready": True}
    assert httpx.get(f"{node.url}/health", headers={"Authorization": "Bearer nope"}).json() == {
        "status": "ready",
        "ready": True,
    }
    told = httpx.get(f"{node.url}/health", headers={"Authorization": f"Bearer {key}"}).json()
    assert told == {"status": "ready", "ready": True, "node": "keyed", "models": ["echo"]}


def test_refused_keys_are_logged_with_the_address_once_per_period(cluster: Cluster) -> None:
    key = "another-key-of-16-chars"
    node = start_gateway_node(cluster, "logged", ["echo"], key=key)
    for _ in range(5):
        assert httpx.get(f"{node.url}/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
    metrics = scrape(node, key)
    assert value(metrics, "lanmesh_http_unauthorized_total") == 5
    lines = [line for line in node.proc.log_path.read_text().splitlines() if "http_unauthorized" in line]
    assert len(lines) == 1, lines  # the rest are counted, and said with the next line after the quiet period
    assert "wrong API key for GET /v1/models from 127.0.0.1" in lines[0] and "guess" not in lines[0]


def test_keys_per_caller_are_named_in_logs_metrics_and_console_and_revoked_live(
    cluster: Cluster, tmp_path: Path
) -> None:

    def apikey(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nodes.cli", "apikey", *args, "--state-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)  # fmt: skip

    added = apikey("add", "alice")
    assert added.returncode == 0, added.stderr
    alice = next(w for w in added.stdout.split() if w.startswith("lm-"))
    assert alice not in (tmp_path / "api-keys.json").read_text()  # kept as its sha256 only
    single = "the-single-key-of-old"
    node = start_gateway_node(cluster, "callers", ["echo"], ["--state-dir", str(tmp_path)], key=single)
    answer = node.openai(alice).chat.completions.create(model="echo", messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "hello mesh"
    node.openai(single).chat.completions.create(model="echo", messages=HELLO)  # type: ignore[arg-type]
    bob = next(w for w in apikey("add", "bob").stdout.split() if w.startswith("lm-"))  # while it runs
    wait_until(lambda: httpx.get(f"{node.url}/v1/models", headers={"Authorization": f"Bearer {bob}"}).status_code
               == 200, 5, "bob's new key to count")  # fmt: skip
    metrics = scrape(node, alice)
    assert value(metrics, "lanmesh_http_caller_requests_total", caller="alice") >= 1
    assert value(metrics, "lanmesh_http_caller_requests_total", caller="default") >= 1
    feed = httpx.get(f"{node.url}/console/api/mesh", headers={"Authorization": f"Bearer {alice}"}).json()
    assert {"alice", "default"} <= {r.get("caller") for r in feed["requests"]}, feed
    assert "HTTP caller alice from 127.0.0.1" in node.proc.log_path.read_text()
    assert apikey("revoke", "alice").returncode == 0
    wait_until(lambda: httpx.get(f"{node.url}/v1/models", headers={"Authorization": f"Bearer {alice}"}).status_code
               == 401, 5, "alice's key to be refused")  # fmt: skip
    assert "revoked API key of alice" in node.proc.log_path.read_text()
    listed = apikey("list").stdout
    assert "alice" in listed and "revoked" in listed and "bob" in listed
