// The mesh view: every node this node knows with its state, models, load and labels; this node's request rate
// and latency; the requests that came through this node's HTTP API and who served them.

import { drawLines } from "./chart.js";
import { byId, el, seconds } from "./dom.js";

const SOURCES = { self: "itself", mdns: "mDNS", seed: "seed (--peer)", gossip: "gossip", hello: "hello" };
const FIRST_LABELS = ["gpu", "accelerator", "cores", "memory_gib"];
const RECENT_SHOWN = 30;
const SUMMARY_WINDOW_S = 10;

const byName = (a, b) => a.localeCompare(b, undefined, { numeric: true }); // sleep:50 before sleep:3000
const stateOf = (row) => (row.state === "self" ? "alive" : row.state);
const isLive = (row) => row.state === "self" || row.state === "alive";

/** A model's load as [inflight, queued, capacity, version, tasks] or as a map with those keys. `tasks`: the tasks
 * it serves (chat, complete, embed, infer), or null where its node did not say (an older node). */
export function modelLoad(value) {
  const tasksOf = (t) => (Array.isArray(t) && t.length ? t : null);
  if (Array.isArray(value)) {
    const [inflight = 0, queued = 0, capacity = 0] = value;
    const version = typeof value[3] === "string" ? value[3] : "";
    return { inflight, queued, capacity, version, tasks: tasksOf(value[4]) };
  }
  const v = value || {};
  return {
    inflight: v.inflight || 0,
    queued: v.queued || 0,
    capacity: v.capacity || 0,
    version: v.version || "",
    tasks: tasksOf(v.tasks),
  };
}

/** The models at least one live node serves, sorted by name, each with the tasks it serves (null: not known). A
 * model split into stages (`smollm2[0-14]`, shown as such in the table) is offered once, by its own name. */
export function liveModels(view) {
  const tasks = new Map();
  for (const row of view.nodes) {
    if (!isLive(row)) continue;
    for (const [served, value] of Object.entries(row.models || {})) {
      const name = served.replace(/\[\d+-\d+\]$/, "");
      const said = modelLoad(value).tasks;
      const known = tasks.has(name) ? tasks.get(name) : said;
      tasks.set(name, known && said ? [...new Set([...known, ...said])] : null);
    }
  }
  return [...tasks.keys()].sort(byName).map((name) => ({ name, tasks: tasks.get(name) }));
}

/** What a node's prefix cache does for `name`: its own share of prompt tokens reused, or what a peer's gossip says. */
function cacheText(row, name) {
  const reused = (row.prefix_reused || {})[name];
  if (reused !== undefined) return `prefix cache: ${(reused * 100).toFixed(0)}% of prompt tokens reused`;
  const chains = (row.prefix_chains || {})[name];
  return chains ? `prefix cache: ${chains} conversation links` : "";
}

function modelCell(row) {
  const models = row.models;
  const cell = el("td", { className: "models" });
  for (const name of Object.keys(models || {}).sort(byName)) {
    const load = modelLoad(models[name]);
    const busy = load.inflight + load.queued;
    const fraction = load.capacity ? Math.min(1, busy / load.capacity) : 0;
    const fill = el("span", { className: load.queued ? "fill queued" : "fill" });
    fill.style.width = `${(fraction * 100).toFixed(0)}%`;
    const text = `${load.inflight}/${load.capacity} running` + (load.queued ? `, ${load.queued} queued` : "");
    cell.append(
      el(
        "div",
        { className: "model", data: { model: name } },
        el("span", { className: "model-name", text: name }),
        load.version ? el("span", { className: "version", text: load.version }) : null,
        el("span", { className: "meter", title: text }, fill),
        el("span", { className: "load", text }),
        cacheText(row, name) ? el("div", { className: "cache", text: cacheText(row, name) }) : null,
      ),
    );
  }
  return cell;
}

function labelCell(labels) {
  const entries = Object.entries(labels || {});
  const rank = (k) => (FIRST_LABELS.includes(k) ? FIRST_LABELS.indexOf(k) : FIRST_LABELS.length);
  entries.sort(([a], [b]) => rank(a) - rank(b) || a.localeCompare(b));
  const chips = entries.map(([key, value]) => {
    let text = `${key}=${value}`;
    if (key === "memory_gib") text = `${value} GiB`;
    else if (key === "cores") text = `${value} cores`;
    else if (key === "gpu") text = value === "true" ? "GPU" : "no GPU";
    return el("span", { className: key === "gpu" && value === "true" ? "chip gpu" : "chip", text, title: key });
  });
  return el("td", { className: "labels" }, ...chips);
}

function nodeRow(row) {
  const state = stateOf(row);
  const self = row.state === "self" || row.source === "self";
  const name = el("td", { className: "node" }, el("strong", { text: row.node }));
  if (self) name.append(el("span", { className: "chip you", text: "this node" }));
  name.append(el("div", { className: "address", text: row.address }));
  return el(
    "tr",
    { data: { node: row.node, state } },
    name,
    el("td", {}, el("span", { className: `state state-${state}`, text: state })),
    modelCell(row),
    labelCell(row.labels),
    el("td", { className: "heard", text: self ? "—" : `${seconds(row.last_heard_s || 0)} ago` }),
    el("td", { text: SOURCES[row.source] || row.source || "" }),
  );
}

function lastSeconds(values, n) {
  return values.slice(-n - 1, -1); // whole seconds only: the current one is still filling
}

function summary(view) {
  const live = view.nodes.filter(isLive);
  const counts = {};
  for (const row of view.nodes) counts[stateOf(row)] = (counts[stateOf(row)] || 0) + 1;
  const others = Object.entries(counts)
    .filter(([s]) => s !== "alive")
    .map(([s, n]) => `${n} ${s}`)
    .join(", ");
  let busy = 0;
  let capacity = 0;
  for (const row of live) {
    for (const value of Object.values(row.models || {})) {
      const load = modelLoad(value);
      busy += load.inflight + load.queued;
      capacity += load.capacity;
    }
  }
  const t = view.timeline;
  const entered = lastSeconds(t.entered, SUMMARY_WINDOW_S).reduce((a, b) => a + b, 0);
  const weighted = lastSeconds(t.mean_ms, SUMMARY_WINDOW_S).reduce(
    (sum, ms, i) => sum + ms * lastSeconds(t.entered, SUMMARY_WINDOW_S)[i],
    0,
  );
  const stats = view.nodes[0]?.stats || {};
  const cards = [
    ["Nodes", `${live.length} alive`, others || "none suspect or dead"],
    ["Models", String(liveModels(view).length), "served by live nodes"],
    ["Load", `${busy} / ${capacity}`, "running + queued / capacity"],
    ["Requests here", `${(entered / SUMMARY_WINDOW_S).toFixed(1)}/s`, `last ${SUMMARY_WINDOW_S} s`],
    ["Latency here", entered ? `${Math.round(weighted / entered)} ms` : "—", `mean, last ${SUMMARY_WINDOW_S} s`],
    ["Retries", String(stats.retries ?? 0), "re-sent by this node"],
  ];
  byId("summary").replaceChildren(
    ...cards.map(([title, value, note]) =>
      el(
        "div",
        { className: "card" },
        el("div", { className: "card-title", text: title }),
        el("div", { className: "card-value", text: value }),
        el("div", { className: "card-note", text: note }),
      ),
    ),
  );
}

const ENDPOINTS = { "/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embeddings" };

function requestRow(r) {
  const time = new Date(r.at * 1000).toLocaleTimeString([], { hour12: false });
  const ok = r.status >= 200 && r.status < 300 && !r.error;
  const amount = r.tokens ? `${r.tokens} tokens` : r.pieces ? `${r.pieces} chunks` : "";
  return el(
    "tr",
    { data: { id: r.id }, title: r.error || "" },
    el("td", { text: time }),
    el("td", { text: ENDPOINTS[r.endpoint] || r.endpoint }, r.stream ? el("span", { className: "chip", text: "stream" }) : null),
    el("td", { text: r.model }),
    el("td", { className: "caller", text: r.caller || "" }),
    el("td", {}, el("span", { className: ok ? "status ok" : "status failed", text: r.status })),
    el("td", { className: "served-by", text: r.node || "—" }),
    el("td", {}, el("code", { className: "route", text: r.route || "" })),
    el("td", { className: "num", text: r.tries || "" }),
    el("td", { className: "num", text: `${Math.round(r.ms)} ms` }),
    el("td", { className: "note", text: r.error || amount }),
  );
}

/** Show one poll's view (the JSON of /console/api/mesh). */
export function renderMesh(view) {
  byId("node-name").textContent = view.node;
  const mode = view.nodes[0]?.security?.mode;
  const badge = byId("mesh-mode");
  badge.hidden = !mode;
  const closed = mode === "curve" || mode === "identities";
  badge.textContent = mode === "identities" ? "encrypted, a key per member" : closed ? "encrypted (CURVE)" : "OPEN MESH (--insecure)";
  badge.className = closed ? "chip" : "chip warn";
  summary(view);
  byId("nodes-body").replaceChildren(...view.nodes.map(nodeRow));
  const t = view.timeline;
  drawLines(
    byId("chart-rate"),
    [
      { values: t.entered, className: "entered" },
      { values: t.for_peers, className: "for-peers" },
    ],
    "/s",
  );
  drawLines(
    byId("chart-latency"),
    [
      { values: t.max_ms, className: "max" },
      { values: t.mean_ms, className: "mean" },
    ],
    " ms",
  );
  const recent = view.requests.slice(0, RECENT_SHOWN);
  byId("requests-body").replaceChildren(...recent.map(requestRow));
  byId("requests-empty").hidden = recent.length > 0;
}

/** Forget everything shown (the key was refused: nothing may stay readable). */
export function clearMesh() {
  for (const id of ["summary", "nodes-body", "requests-body", "chart-rate", "chart-latency"]) byId(id).replaceChildren();
  byId("node-name").textContent = "";
  byId("mesh-mode").hidden = true;
}
