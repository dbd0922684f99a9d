"""The web console at `/`, in a real browser (headless Chromium from Debian's packages, driven over DevTools)
against a two-node mesh serving echo and sleep:50: the mesh view, a node killed, the request feed, the
playground's streamed chat and stop button, embeddings, and the API key prompt.

`LANMESH_CONSOLE_SCREENSHOTS=docs scripts/test tests/http/test_web_console.py` refreshes the README's screenshots.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from chromium import Chromium, Page, find_chromium
from gateway_nodes import GatewayNode, start_gateway_node, wait_until

from bench.procs import ROOT, Cluster
from mesh import INSECURE_ENV, KEY_ENV
from nodes.api.metrics import RequestTimeline
from tests.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(180)

CONSOLE_FILES = ROOT / "nodes" / "api" / "console_web"
CHROMIUM = find_chromium()
KEY = "console-test-key"


# ---------------------------------------------------------------- the mesh, the browser


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, mesh_key_file: Path) -> Iterator[tuple[GatewayNode, GatewayNode]]:
    """Two nodes with the mesh key, both serving echo and sleep:50 (the first also sleep:3000, for the stop
    button), each with its gateway; B joins through A."""
    with pytest.MonkeyPatch.context() as env, Cluster(tmp_path_factory.mktemp("console-logs"), mesh_key_file) as c:
        env.delenv(INSECURE_ENV, raising=False)  # the nodes' own gateways speak CURVE with the key
        env.setenv(KEY_ENV, str(mesh_key_file))
        a = start_gateway_node(c, "node-a", ["echo", "sleep:50", "sleep:3000"])
        b = start_gateway_node(c, "node-b", ["echo", "sleep:50"], extra=["--peer", a.proc.address])
        c.wait_converged(15.0)
        yield a, b


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    chromium = Chromium(CHROMIUM)
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def open_page(browser: Chromium) -> Iterator[list[Page]]:
    """Pages a test opens; after it, none may have thrown a JavaScript error."""
    pages: list[Page] = []
    yield pages
    for page in pages:
        errors = page.errors()
        page.close()
        assert not errors, f"the page threw: {errors}"


def console(open_page: list[Page], browser: Chromium, node: GatewayNode, tab: str = "mesh") -> Page:
    page = browser.open(f"{node.url}/#{tab}")
    open_page.append(page)
    return page


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: the test's folder, or the folder LANMESH_CONSOLE_SCREENSHOTS names (docs/)."""
    wanted = os.environ.get("LANMESH_CONSOLE_SCREENSHOTS")
    return (ROOT / wanted) if wanted else tmp_path


def row_of(node: str) -> str:
    """JavaScript: the mesh view's table row of `node`."""
    return f"document.querySelector('#nodes-body tr[data-node={json.dumps(node)}]')"


def state_of(node: str) -> str:
    """JavaScript: the state the page shows for `node` (alive, suspect, dead, leaving, left)."""
    return f"{row_of(node)}?.dataset.state"


def both_alive(page: Page) -> None:
    page.wait_for(f"{state_of('node-a')} === 'alive' && {state_of('node-b')} === 'alive'", what="both nodes alive")


def chat_through(node: GatewayNode, model: str, text: str, parallel: int = 1) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": f"{text} {i}"}]}
        return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=30)

    with ThreadPoolExecutor(parallel) as pool:
        responses = list(pool.map(one, range(parallel * 3)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return responses


# ---------------------------------------------------------------- without a browser


def test_console_comes_from_the_node_alone_and_stays_small(mesh: tuple[GatewayNode, GatewayNode]) -> None:
    a, _ = mesh
    page = httpx.get(f"{a.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser may fetch nothing else
    for name in re.findall(r'(?:src|href)="/console/([^"]+)"', page.text):
        assert httpx.get(f"{a.url}/console/{name}", timeout=10).status_code == 200
    assert httpx.get(f"{a.url}/console/../gateway.py", timeout=10).status_code == 404

    files = [p for p in CONSOLE_FILES.iterdir() if p.is_file()]
    for path in files:
        urls = set(re.findall(r"https?://[^\s\"'`)]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, f"{path.name} names an outside address: {urls}"
    total = sum(p.stat().st_size for p in files)
    assert total < 200 * 1024, f"the console is {total / 1024:.0f} KB"


def test_console_view_is_not_in_the_openai_schema(mesh: tuple[GatewayNode, GatewayNode]) -> None:
    paths = httpx.get(f"{mesh[0].url}/openapi.json", timeout=10).json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]


def test_request_timeline_counts_each_second_and_forgets_old_ones() -> None:
    now = [1000.0]
    timeline = RequestTimeline(seconds=5, clock=lambda: now[0])
    timeline.add("local", True, 0.010)
    timeline.add("forwarded", False, 0.030)
    timeline.add("peer", True, 0.5)
    now[0] += 1
    timeline.add("local", True, 0.020)
    series = timeline.series()
    assert series["entered"] == [0, 0, 0, 2, 1]
    assert series["failed"] == [0, 0, 0, 1, 0]
    assert series["mean_ms"][-2:] == [20.0, 20.0]
    assert series["max_ms"][-2:] == [30.0, 20.0]
    assert series["for_peers"] == [0, 0, 0, 1, 0]
    now[0] += 5  # everything above is older than the window now
    assert timeline.series()["entered"] == [0, 0, 0, 0, 0]


# ---------------------------------------------------------------- in the browser


def test_mesh_view_lists_every_node_with_its_models_labels_and_load(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page], screenshots: Path
) -> None:
    a, b = mesh
    page = console(open_page, browser, a)
    both_alive(page)

    row_b = row_of("node-b")
    models = page.evaluate(f"[...{row_b}.querySelectorAll('.model')].map(m => m.innerText.replace(/\\s+/g, ' '))")
    # Each model with its version (the content hash's first 8 hex digits; of the spec for synthetic models).
    assert [re.sub(r" [0-9a-f]{8} ", " V ", m) for m in models] == ["echo V 0/64 running", "sleep:50 V 0/1 running"]
    assert re.search(r"\d+ cores", page.evaluate(f"{row_b}.cells[3].innerText"))  # its labels
    assert page.evaluate(f"{row_b}.cells[5].innerText") == "hello"  # it joined by saying hello to node-a
    assert "this node" in page.text("#nodes-body tr[data-node='node-a']")
    assert "encrypted (CURVE)" in page.text("header")

    chat_through(a, "sleep:50", "load", parallel=4)  # enough at once that both nodes serve some
    page.wait_for("document.querySelectorAll('#requests-body tr').length >= 12", what="the requests in the feed")
    page.wait_for("!document.querySelector('#summary').innerText.includes('0.0/s')", what="the request rate")
    page.screenshot(screenshots / "console-mesh.png")
    outside = [u for u in page.requested_urls() if not u.startswith(a.url)]
    assert outside == [], "the page fetched something from elsewhere"


def test_request_feed_names_the_node_and_route_of_each_request(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page]
) -> None:
    a, _ = mesh
    page = console(open_page, browser, a)
    both_alive(page)
    served = {(r.headers["x-lanmesh-node"], r.headers["x-lanmesh-route"]) for r in chat_through(a, "sleep:50", "x", 4)}
    assert {node for node, _ in served} == {"node-a", "node-b"}, "p2c spread four at a time over both nodes"

    rows = "[...document.querySelectorAll('#requests-body tr')].map(r => [r.cells[5].innerText, r.cells[6].innerText])"
    page.wait_for(f"{rows}.length >= 12", what="the requests in the feed")
    shown = {tuple(row) for row in page.evaluate(rows)}
    assert served <= shown
    assert any(route.startswith("p2c:") for _, route in shown)


def test_a_killed_node_shows_as_dead_within_5_seconds(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page], keyed: Path, tmp_path: Path
) -> None:
    a, _ = mesh
    page = console(open_page, browser, a)
    with Cluster(tmp_path, keyed) as extra:
        doomed = extra.add("node-c", [*LOOPBACK, "--model", "echo", "--peer", a.proc.address])
        # Alive with its models: node-a has had node-c's own gossip, not just its hello.
        gossiped = f"{state_of('node-c')} === 'alive' && !!{row_of('node-c')}.querySelector('[data-model=echo]')"
        page.wait_for(gossiped, timeout=15, what="node-c alive with its model")

        doomed.kill()
        killed = time.monotonic()
        page.wait_for(f"{state_of('node-c')} === 'dead'", timeout=5.0, what="node-c dead")
        took = time.monotonic() - killed
    assert took < 5.0
    print(f"kill -9 to 'dead' on the page: {took:.2f} s")


def test_chat_streams_an_answer_and_says_which_node_served_it(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page], screenshots: Path
) -> None:
    a, _ = mesh
    page = console(open_page, browser, a, "playground")
    page.wait_for("[...document.querySelector('#chat-model').options].some(o => o.value === 'sleep:50')")
    page.select("#chat-model", "sleep:50")
    answers = "document.querySelectorAll('.message.assistant[data-done]')"
    for n, question in enumerate(["Which machine answers this?", "Whichever p2c picks: two sampled, less loaded."]):
        page.fill("#chat-input", question)
        page.click("#chat-send")
        page.wait_for(f"{answers}.length === {n + 1}", what="the answer")

    last = f"{answers}[1]"
    assert page.evaluate(f"{last}.dataset.done") == "complete"
    assert page.evaluate(f"{last}.querySelector('.text').innerText") == "Whichever p2c picks: two sampled, less loaded."
    meta = page.evaluate(f"{last}.querySelector('.meta').innerText")
    assert re.search(r"served by node-[ab] · route \S+ · 7 chunks in [\d.]+ s = [\d.]+ chunks/s · first \d+ ms", meta)
    page.screenshot(screenshots / "console-playground.png")


def test_stop_ends_a_streaming_answer_and_keeps_what_came(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page]
) -> None:
    a, _ = mesh
    page = console(open_page, browser, a, "playground")
    page.wait_for("[...document.querySelector('#chat-model').options].some(o => o.value === 'sleep:3000')")
    page.select("#chat-model", "sleep:3000")
    words = "one two three four five six seven eight nine ten eleven twelve"
    page.fill("#chat-input", words)  # sleep:3000 streams a word every 250 ms
    page.click("#chat-send")
    answer = "document.querySelector('.message.assistant')"
    page.wait_for(f"{answer}.querySelector('.text').innerText.length > 0", what="the first words")
    assert page.evaluate("document.querySelector('#chat-send').disabled")

    page.click("#chat-stop")
    stopped = time.monotonic()
    page.wait_for(f"{answer}.dataset.done === 'stopped'", timeout=2.0, what="the answer stopped")
    assert time.monotonic() - stopped < 1.0
    kept = page.evaluate(f"{answer}.querySelector('.text').innerText")
    assert kept and words.startswith(kept.strip()) and len(kept) < len(words)
    assert not page.evaluate("document.querySelector('#chat-send').disabled")
    page.evaluate("location.hash = 'mesh'")
    feed = "[...document.querySelectorAll('#requests-body tr')]"
    note = page.wait_for(f"{feed}.find(r => r.cells[2].innerText === 'sleep:3000')?.cells[9].innerText",
                         what="the stopped request in the feed")  # fmt: skip
    assert note == "the client went away before the end"


def test_embeddings_try_out_shows_what_the_mesh_answered(
    mesh: tuple[GatewayNode, GatewayNode], browser: Chromium, open_page: list[Page]
) -> None:
    # The synthetic models are no embedding models: the gateway says so, and the page shows it.
    page = console(open_page, browser, mesh[0], "playground")
    page.wait_for("document.querySelector('#embed-model').options.length > 0")
    page.select("#embed-model", "echo")
    page.fill("#embed-input", "a sentence to embed")
    page.click("#embed-form button")
    shown = page.wait_for("document.querySelector('#embed-result.failed')?.innerText", what="the answer")
    assert "is it an embedding model?" in shown


def test_the_chat_picker_offers_chat_models_only_so_a_first_question_gets_an_answer(
    browser: Chromium, open_page: list[Page], keyed: Path, tmp_path: Path
) -> None:
    """As a newcomer's mesh: an embedding model named minilm (sorted first) on one node, a chat model (echo, named
    smollm2) on another; the embedding model's tasks reach the page by gossip."""
    pytest.importorskip("onnx", reason="the embedding model is built with onnx (pip install 'lanmesh[models]')")
    from bench.model_files import make_lookup_embedder

    embedder = make_lookup_embedder(tmp_path / "minilm", megabytes=1.0)
    with Cluster(tmp_path, keyed) as cluster:
        chat = start_gateway_node(cluster, "node-chat", ["name=smollm2,kind=echo"])
        start_gateway_node(cluster, "node-embed", [f"name=minilm,path={embedder}"], extra=["--peer", chat.proc.address])
        cluster.wait_converged(15.0)
        page = console(open_page, browser, chat, "playground")
        options = "id => [...document.querySelector(id).options].map(o => o.value)"
        page.wait_for(f"({options})('#embed-model').includes('minilm')", what="minilm offered for embeddings")
        assert page.evaluate(f"({options})('#chat-model')") == ["smollm2"]  # before: ["minilm", "smollm2"]
        assert page.evaluate("document.querySelector('#chat-model').value") == "smollm2"
        assert page.evaluate(f"({options})('#embed-model')") == ["minilm", "smollm2"]  # echo answers any task

        page.fill("#chat-input", "What is the capital of France?")
        page.click("#chat-send")
        answer = "document.querySelector('.message.assistant[data-done]')"
        page.wait_for(f"!!{answer}", what="the answer")
        assert page.evaluate(f"{answer}.dataset.done") == "complete"
        assert page.evaluate(f"{answer}.querySelector('.text').innerText") == "What is the capital of France?"


def test_with_an_api_key_the_page_shows_nothing_until_given_the_key(
    browser: Chromium, open_page: list[Page], keyed: Path, tmp_path: Path
) -> None:
    with Cluster(tmp_path, keyed) as cluster:
        node = start_gateway_node(cluster, "node-keyed", ["echo"], key=KEY)
        assert httpx.get(f"{node.url}/", timeout=10).status_code == 200  # the page holds no data
        assert httpx.get(f"{node.url}/console/api/mesh", timeout=10).status_code == 401
        with_key = httpx.get(f"{node.url}/console/api/mesh", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert with_key.status_code == 200 and with_key.json()["node"] == "node-keyed"

        page = console(open_page, browser, node)
        page.wait_for("document.querySelector('#key-prompt').checkVisibility()", what="the key prompt")
        assert not page.visible("#mesh") and not page.visible("#playground")
        assert page.evaluate("document.querySelectorAll('#nodes-body tr').length") == 0

        page.fill("#key-input", "not-the-key")
        page.click("#key-form button")
        page.wait_for("document.querySelector('#key-error').innerText.includes('refused')", what="the refusal")
        assert not page.visible("#mesh")

        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for(f"{state_of('node-keyed')} === 'alive'", what="the mesh, once unlocked")
        assert not page.visible("#key-prompt")
        assert page.evaluate("sessionStorage.getItem('lanmesh.apiKey')") == KEY

        page.goto(f"{node.url}/#playground")  # a reload in the same tab keeps the key
        page.wait_for("document.querySelector('#chat-model').options.length > 0", what="the playground's models")
        assert not page.visible("#key-prompt")
        wait_until(lambda: page.visible("#playground"), 5.0, "the playground")
