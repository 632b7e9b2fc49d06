// Stacked bar charts drawn as SVG: a few dozen lines instead of a chart
// library, so the console has no third-party code to vendor or update.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** A "nice" axis maximum at or above `max`. */
function niceMax(max) {
  if (max <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= max) return step * power;
  return 10 * power;
}

/** `2026-12-04` → `12-04`; `2026-12-04T13:00` → `12-04 13h`; anything else as it is. */
function shortLabel(category) {
  if (/^\d{4}-\d\d-\d\dT\d\d/.test(category)) return `${category.slice(5, 10)} ${category.slice(11, 13)}h`;
  if (/^\d{4}-\d\d-\d\d$/.test(category)) return category.slice(5);
  return category.length > 14 ? `${category.slice(0, 13)}…` : category;
}

/**
 * categories: x labels in order; series: [{name, values: [number per category]}];
 * format: number → axis/tooltip text. Series past the ninth are summed as "other".
 */
export function stackedBars({ title, categories, series, format }) {
  const shown = series.slice(0, 9);
  if (series.length > 9) {
    const rest = series.slice(9);
    shown.push({ name: "other", values: categories.map((_, i) => rest.reduce((s, r) => s + r.values[i], 0)) });
  }
  const width = 720, height = 240, left = 64, right = 8, top = 12, bottom = 36;
  const totals = categories.map((_, i) => shown.reduce((s, r) => s + r.values[i], 0));
  const max = niceMax(Math.max(0, ...totals));
  const plotW = width - left - right, plotH = height - top - bottom;
  const slot = plotW / Math.max(categories.length, 1);
  const barW = Math.max(1, Math.min(40, slot * 0.8));
  const y = (v) => top + plotH - (v / max) * plotH;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart", "aria-label": title });
  chart.append(svg("title", {}, title));
  for (let t = 0; t <= 4; t++) {
    const v = (max / 4) * t;
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, format(v)));
  }
  const labelEvery = Math.ceil(categories.length / 12);
  categories.forEach((category, i) => {
    const x = left + slot * i + (slot - barW) / 2;
    let base = 0;
    shown.forEach((s, k) => {
      const v = s.values[i];
      if (v > 0) {
        const rect = svg("rect", {
          x, width: barW, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)), fill: COLORS[k % COLORS.length],
        });
        rect.append(svg("title", {}, `${category} · ${s.name}: ${format(v)}`));
        chart.append(rect);
      }
      base += v;
    });
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: x + barW / 2, y: height - bottom + 16, class: "axis", "text-anchor": "middle" },
        shortLabel(category)));
    }
  });
  const legend = document.createElement("ul");
  legend.className = "legend";
  shown.forEach((s, k) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.dataset.color = String(k % COLORS.length);
    item.append(swatch, document.createTextNode(s.name || "(none)"));
    legend.append(item);
  });
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, chart, legend);
  return figure;
}
