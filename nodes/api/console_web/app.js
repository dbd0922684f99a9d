// The console's entry point: tabs, the API key prompt, and the poll that keeps the mesh view live.

import { apiKey, forgetKey, getJson, NeedsKey, rememberKey } from "./api.js";
import { byId } from "./dom.js";
import { clearMesh, liveModels, renderMesh } from "./mesh.js";
import { offerModels, setUpPlayground } from "./playground.js";

const POLL_MS = 500;
let locked = false; // the node wants a key we do not have: nothing is shown
let pollTimer = 0;

function showTab() {
  const tab = location.hash === "#playground" ? "playground" : "mesh";
  for (const section of document.querySelectorAll("section.tab")) section.hidden = locked || section.id !== tab;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
}

function setConnection(text, healthy) {
  const badge = byId("conn");
  badge.textContent = text;
  badge.className = healthy ? "conn ok" : "conn down";
}

/** Hide everything and ask for the key (again, when one was refused). */
function lock() {
  const refused = Boolean(apiKey());
  forgetKey();
  locked = true;
  clearTimeout(pollTimer);
  clearMesh();
  byId("chat-log").replaceChildren();
  byId("key-prompt").hidden = false;
  byId("key-error").textContent = refused ? "That key was refused." : "";
  byId("forget-key").hidden = true;
  setConnection("API key needed", false);
  showTab();
  byId("key-input").focus();
}

function unlock() {
  locked = false;
  byId("key-prompt").hidden = true;
  byId("forget-key").hidden = !apiKey();
  showTab();
}

async function poll() {
  clearTimeout(pollTimer);
  try {
    const view = await getJson("/console/api/mesh");
    if (locked) unlock();
    renderMesh(view);
    offerModels(liveModels(view));
    setConnection(view.mesh_up ? "live" : "this node's mesh loop does not answer", view.mesh_up);
  } catch (error) {
    if (error instanceof NeedsKey) {
      lock();
      return; // polling again waits for a key
    }
    setConnection(`no answer from this node: ${error.message}`, false);
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

byId("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = byId("key-input").value.trim();
  if (!key) return;
  rememberKey(key);
  byId("key-input").value = "";
  poll();
});
byId("forget-key").addEventListener("click", () => {
  forgetKey();
  lock();
});
window.addEventListener("hashchange", showTab);
setUpPlayground(lock);
showTab();
poll();
