// The playground: chat with any model of the mesh (streamed, with a stop button that aborts the request) and
// try embeddings; each answer says which node served it and how fast.

import { ApiFailure, call, NeedsKey, sseData } from "./api.js";
import { byId, el } from "./dom.js";

let history = []; // the conversation sent with each turn: [{role, content}]
let running = null; // the AbortController of the answer being streamed

const PICKERS = [
  { id: "chat-model", task: "chat", none: "no chat model in the mesh" },
  { id: "embed-model", task: "embed", none: "no embedding model in the mesh" },
];

/** Offer each picker the models live nodes serve for its task ({name, tasks}; tasks null: offered to both), keeping
 * its choice while it is still offered. A chat model never starts out as an embedding model, or the reverse. */
export function offerModels(models) {
  for (const { id, task, none } of PICKERS) {
    const names = models.filter((m) => m.tasks === null || m.tasks.includes(task)).map((m) => m.name);
    const select = byId(id);
    const current = select.value;
    const offered = [...select.options].filter((o) => o.value).map((o) => o.value);
    const same = offered.length === names.length && names.every((n, i) => offered[i] === n);
    if (same && select.options.length) continue;
    const options = names.map((n) => el("option", { text: n }));
    if (!options.length) {
      const placeholder = el("option", { text: none });
      placeholder.value = "";
      placeholder.disabled = true;
      options.push(placeholder);
    }
    select.replaceChildren(...options);
    if (names.includes(current)) select.value = current;
  }
}

function bubble(role, text) {
  const body = el("div", { className: "text", text });
  const meta = el("div", { className: "meta" });
  const box = el("div", { className: `message ${role}`, data: { role } }, body, meta);
  byId("chat-log").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, body, meta };
}

function setRunning(controller) {
  running = controller;
  byId("chat-send").disabled = Boolean(controller);
  byId("chat-stop").disabled = !controller;
}

const rate = (count, secondsTaken) => (secondsTaken > 0 ? (count / secondsTaken).toFixed(1) : "—");

async function sendChat(onNeedsKey) {
  const input = byId("chat-input");
  const model = byId("chat-model").value;
  const text = input.value.trim();
  if (!text || !model || running) return;
  input.value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.box.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);

  const started = performance.now();
  let firstAt = 0;
  let pieces = 0;
  let tokens = 0;
  let node = "";
  let route = "";
  let ended = "";
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      body: { model, messages: history, stream: true, stream_options: { include_usage: true } },
      signal: controller.signal,
    });
    node = response.headers.get("X-Lanmesh-Node") || "";
    for await (const event of sseData(response)) {
      if (event.error) throw new ApiFailure(0, event.error.message);
      if (event.usage) tokens = event.usage.completion_tokens || 0;
      if (event.lanmesh) ({ node, route } = event.lanmesh);
      const piece = event.choices?.[0]?.delta?.content;
      if (piece) {
        if (!firstAt) firstAt = performance.now();
        pieces += 1;
        answer.body.textContent += piece;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") ended = "stopped";
    else if (error instanceof NeedsKey) {
      ended = "the API key was refused";
      onNeedsKey();
    } else ended = `error: ${error.message}`;
  } finally {
    setRunning(null);
    answer.box.classList.remove("streaming");
  }
  const total = (performance.now() - started) / 1000;
  const partial = answer.body.textContent;
  if (partial) history.push({ role: "assistant", content: partial });
  else history.pop(); // nothing came back: the question goes too, so a retry does not send it twice
  const count = tokens || pieces;
  const facts = [];
  if (node) facts.push(`served by ${node}`);
  if (route) facts.push(`route ${route}`);
  if (count) facts.push(`${count} ${tokens ? "tokens" : "chunks"} in ${total.toFixed(2)} s = ${rate(count, total)} ${tokens ? "tok" : "chunks"}/s`);
  if (firstAt) facts.push(`first ${Math.round(firstAt - started)} ms`);
  if (ended) {
    facts.push(ended);
    answer.box.classList.add(ended === "stopped" ? "stopped" : "failed");
  }
  answer.meta.textContent = facts.join(" · ");
  answer.box.dataset.done = ended || "complete";
  answer.box.dataset.node = node;
}

async function sendEmbed(onNeedsKey) {
  const model = byId("embed-model").value;
  const texts = byId("embed-input")
    .value.split("\n")
    .map((t) => t.trim())
    .filter(Boolean);
  const out = byId("embed-result");
  if (!model || !texts.length) return;
  out.className = "embed-result";
  out.textContent = "…";
  const started = performance.now();
  try {
    const response = await call("/v1/embeddings", { method: "POST", body: { model, input: texts } });
    const body = await response.json();
    const ms = Math.round(performance.now() - started);
    const dims = body.data[0]?.embedding.length || 0;
    const node = response.headers.get("X-Lanmesh-Node");
    const route = response.headers.get("X-Lanmesh-Route");
    out.replaceChildren(
      el("div", { text: `${body.data.length} × ${dims} dimensions in ${ms} ms · served by ${node} · route ${route}` }),
      ...body.data.map((d, i) =>
        el("div", { className: "vector", text: `${texts[i]} → [${d.embedding.slice(0, 6).map((x) => x.toFixed(4)).join(", ")}, …]` }),
      ),
    );
  } catch (error) {
    if (error instanceof NeedsKey) onNeedsKey();
    out.className = "embed-result failed";
    out.textContent = error.message;
  }
}

/** Wire the playground's controls; `onNeedsKey` is called when the node refuses the key. */
export function setUpPlayground(onNeedsKey) {
  byId("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sendChat(onNeedsKey);
  });
  byId("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      sendChat(onNeedsKey);
    }
  });
  byId("chat-stop").addEventListener("click", () => running?.abort());
  byId("chat-clear").addEventListener("click", () => {
    running?.abort();
    history = [];
    byId("chat-log").replaceChildren();
  });
  byId("embed-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sendEmbed(onNeedsKey);
  });
  setRunning(null);
}

