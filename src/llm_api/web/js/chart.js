// Two small hand-drawn SVG charts (no charting library: no CDN here, and ~100 lines cover a
// stacked bar chart and a sparkline). Labels are set with textContent like everything else.

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#4f7cff", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899"];

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

export const colorFor = (index) => COLORS[index % COLORS.length];

function niceMax(value) {
  if (value <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= value) return m * p;
  return 10 * p;
}

/**
 * A stacked bar chart: one bar per category (e.g. day), one stacked segment per series (e.g.
 * model). `series` is [{ name, values: number[] }] aligned with `categories`.
 */
export function stackedBars(categories, series, { title = "", width = 640, height = 240 } = {}) {
  const pad = { left: 56, right: 12, top: 12, bottom: 40 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const totals = categories.map((_, i) => series.reduce((sum, x) => sum + (x.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "chart",
    role: "img",
    "aria-label": title,
  });
  svg.append(s("title", {}, title));
  for (let t = 0; t <= 4; t += 1) {
    const value = (max * t) / 4;
    const y = pad.top + plotH - (plotH * t) / 4;
    svg.append(s("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    svg.append(
      s("text", { x: pad.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, fmt(value)),
    );
  }
  const slot = plotW / Math.max(1, categories.length);
  const barW = Math.max(2, Math.min(48, slot * 0.7));
  const labelEvery = Math.ceil(categories.length / 10);
  categories.forEach((category, i) => {
    const x = pad.left + slot * i + (slot - barW) / 2;
    let y = pad.top + plotH;
    series.forEach((serie, j) => {
      const value = serie.values[i] || 0;
      if (value <= 0) return;
      const hgt = (plotH * value) / max;
      y -= hgt;
      const rect = s("rect", { x, y, width: barW, height: hgt, fill: colorFor(j), class: "bar" });
      rect.append(s("title", {}, `${category} · ${serie.name}: ${value.toLocaleString("en-US")}`));
      svg.append(rect);
    });
    const last = i === categories.length - 1;
    if (last || (i % labelEvery === 0 && categories.length - 1 - i >= labelEvery)) {
      svg.append(
        s(
          "text",
          { x: x + barW / 2, y: height - pad.bottom + 16, "text-anchor": "middle", class: "tick" },
          String(category).slice(5),
        ),
      );
    }
  });
  return svg;
}

/** A legend for the series of a chart. */
export function legend(names) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  names.forEach((name, i) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colorFor(i); // CSSOM, not an inline style attribute: CSP-safe
    li.append(swatch, document.createTextNode(name));
    ul.append(li);
  });
  return ul;
}

/** A sparkline of recent values (e.g. tokens/s polled every few seconds). */
export function sparkline(values, { width = 320, height = 60, label = "" } = {}) {
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "spark",
    role: "img",
    preserveAspectRatio: "none", // stretch to the panel's width
  });
  svg.setAttribute("aria-label", label);
  if (values.length < 2) return svg;
  const max = niceMax(Math.max(...values));
  const step = width / (values.length - 1);
  const points = values
    .map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - ((height - 4) * v) / max).toFixed(1)}`)
    .join(" ");
  svg.append(s("polyline", { points, class: "line" }));
  return svg;
}

function fmt(value) {
  if (value >= 1e6) return `${(value / 1e6).toFixed(1)}M`;
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)}k`;
  if (value > 0 && value < 1) return String(Number(value.toPrecision(2))); // USD: 0.0025
  return String(Math.round(value * 10) / 10);
}
