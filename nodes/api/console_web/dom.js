// Building DOM nodes. Text goes in as textContent, never as HTML: node names, labels and model names come from
// peers and clients.

/** `el("td", {className: "x", text: "y", title: "z", data: {node: "a"}}, ...children)` */
export function el(tag, { className, text, title, data } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (title) node.title = title;
  for (const [key, value] of Object.entries(data || {})) node.dataset[key] = String(value);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export const byId = (id) => document.getElementById(id);

export function seconds(s) {
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
