// A small hand-drawn SVG line chart: one line per series, scaled to the largest value, time left to right.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 130;
const PAD = { left: 44, right: 8, top: 10, bottom: 18 };

function svgElement(name, attributes, text) {
  const el = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** 1, 2 or 5 times a power of ten, at least `value`: round numbers on the axis. */
function roundUp(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((v) => v >= value);
}

const formatValue = (v) => (v >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(2))));

/**
 * Draw `series` ([{values, className}], equal lengths, one value per second, oldest first) into `svg`.
 * `unit` labels the axis; the x axis spans the series' length in seconds.
 */
export function drawLines(svg, series, unit) {
  const count = Math.max(2, ...series.map((s) => s.values.length));
  const top = roundUp(Math.max(0, ...series.flatMap((s) => s.values)));
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (i / (count - 1)) * plotWidth;
  const y = (v) => PAD.top + plotHeight - (Math.min(v, top) / top) * plotHeight;

  const parts = [];
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    parts.push(svgElement("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value) }));
    const label = fraction === 0 ? "0" : `${formatValue(value)}${unit}`;
    parts.push(svgElement("text", { class: "axis", x: PAD.left - 4, y: y(value) + 4, "text-anchor": "end" }, label));
  }
  const minutes = Math.round(count / 60);
  parts.push(svgElement("text", { class: "axis", x: PAD.left, y: HEIGHT - 4 }, `${minutes} min ago`));
  parts.push(svgElement("text", { class: "axis", x: WIDTH - PAD.right, y: HEIGHT - 4, "text-anchor": "end" }, "now"));
  for (const { values, className } of series) {
    const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    parts.push(svgElement("polyline", { class: `line ${className}`, points }));
  }
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.replaceChildren(...parts);
}
