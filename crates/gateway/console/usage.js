// Usage: cost and requests over time by tenant, model, key, route, variant,
// upstream or API; totals per group; average cost per request per model;
// the per-request records as CSV. Daily figures come from the rollups;
// hourly ones from the per-request records (so at most a week at a time).

import * as api from "./api.js";
import { h, table, usd, usdShort, int, field } from "./dom.js";
import { stackedBars } from "./charts.js";

const GROUPS = [
  ["tenant", "Tenant"], ["model", "Model"], ["key", "Key"], ["route", "Route"],
  ["target", "Variant"], ["upstream", "Upstream"], ["api", "API"],
];
const HOURLY_DAYS = 7;

const isoDay = (d) => d.toISOString().slice(0, 10);

function daysBetween(from, to) {
  const out = [];
  for (let d = new Date(`${from}T00:00:00Z`); isoDay(d) <= to; d.setUTCDate(d.getUTCDate() + 1)) out.push(isoDay(d));
  return out;
}

function hoursBetween(from, to) {
  return daysBetween(from, to).flatMap((day) => Array.from({ length: 24 }, (_, hr) => `${day}T${String(hr).padStart(2, "0")}:00`));
}

export async function usagePage(params) {
  const today = isoDay(new Date());
  const monthAgo = isoDay(new Date(Date.now() - 29 * 86400e3));
  const granularity = params.get("granularity") === "hour" ? "hour" : "day";
  const to = params.get("to") || today;
  let from = params.get("from") || (granularity === "hour" ? to : monthAgo);
  let note = null;
  if (granularity === "hour" && (new Date(to) - new Date(from)) / 86400e3 >= HOURLY_DAYS) {
    from = isoDay(new Date(new Date(`${to}T00:00:00Z`).getTime() - (HOURLY_DAYS - 1) * 86400e3));
    note = `Hourly figures cover at most ${HOURLY_DAYS} days: showing ${from} to ${to}.`;
  }
  const group = GROUPS.some(([g]) => g === params.get("group")) ? params.get("group") : "tenant";
  const filters = { tenant_id: params.get("tenant_id") || "", key_id: params.get("key_id") || "", model: params.get("model") || "" };
  const summary = (groupBy) => api.get(`/admin/v1/usage/summary${api.query({ from, to, group_by: groupBy, ...filters })}`);
  // One query over time; the totals per group are its sums (and, grouped
  // by model, the per-model table too): fewer reads of a large ledger.
  const [overTime, perModel] = await Promise.all([
    summary(`${granularity},${group}`), group === "model" ? null : summary("model"),
  ]);
  const byGroup = totalsBy(overTime.data, groupField(group));
  const byModel = perModel ? perModel : byGroup;

  const categories = granularity === "hour" ? hoursBetween(from, to) : daysBetween(from, to);
  const index = new Map(categories.map((c, i) => [c, i]));
  const names = [...new Set(byGroup.data.map((r) => r[groupField(group)] ?? ""))];
  // Largest spenders first, so the chart's colours and "other" follow cost.
  names.sort((a, b) => total(byGroup, group, b) - total(byGroup, group, a));
  const seriesOf = (metric) => names.map((name) => {
    const values = categories.map(() => 0);
    for (const r of overTime.data) {
      if ((r[groupField(group)] ?? "") !== name) continue;
      const i = index.get(r[granularity]);
      if (i !== undefined) values[i] += Number(r[metric]);
    }
    return { name: name || "(none)", values };
  });

  const totals = byGroup.data.reduce((t, r) => ({ cost: t.cost + r.cost_micros, requests: t.requests + r.requests, errors: t.errors + r.errors }),
    { cost: 0, requests: 0, errors: 0 });
  const groupLabel = GROUPS.find(([g]) => g === group)[1];
  const csv = `/admin/v1/usage/records.csv${api.query({
    from: `${from}T00:00:00Z`, to: new Date(new Date(`${to}T00:00:00Z`).getTime() + 86400e3).toISOString(), ...filters,
  })}`;

  return h("section", {},
    h("h1", {}, "Usage"),
    filterForm({ from, to, granularity, group, ...filters }),
    note ? h("p", { class: "notice warn" }, note) : null,
    h("div", { class: "stats" },
      stat("Cost", usd(totals.cost)), stat("Requests", int(totals.requests)), stat("Errors", int(totals.errors)),
      stat("Average per request", usd(totals.requests ? Math.round(totals.cost / totals.requests) : 0))),
    totals.requests === 0
      ? h("p", { class: "empty" }, "No requests in this range.")
      : h("div", { class: "charts" },
        stackedBars({ title: `Cost per ${granularity} by ${groupLabel.toLowerCase()}`, categories, series: seriesOf("cost_micros"), format: usdShort }),
        stackedBars({ title: `Requests per ${granularity} by ${groupLabel.toLowerCase()}`, categories, series: seriesOf("requests"), format: (v) => int(Math.round(v)) })),
    h("section", { class: "card", "aria-labelledby": "by-group" },
      h("div", { class: "section-head" }, h("h2", { id: "by-group" }, `By ${groupLabel.toLowerCase()}`),
        h("a", { class: "button secondary", href: csv, download: "usage.csv" }, "Download records (CSV)")),
      table([groupLabel, "Requests", "Errors", "Input tokens", "Output tokens", "Cost", "Average cost"],
        byGroup.data.slice().sort((a, b) => b.cost_micros - a.cost_micros).map((r) => [
          groupCell(group, r[groupField(group)]), int(r.requests), int(r.errors), int(r.prompt_tokens),
          int(r.completion_tokens), usd(r.cost_micros), usd(r.average_cost_micros),
        ]), "No requests in this range.")),
    h("section", { class: "card", "aria-labelledby": "per-model" },
      h("h2", { id: "per-model" }, "Average cost per request by model"),
      table(["Model", "Requests", "Average cost", "Total cost"],
        byModel.data.slice().sort((a, b) => b.average_cost_micros - a.average_cost_micros).map((r) => [
          r.model, int(r.requests), usd(r.average_cost_micros), usd(r.cost_micros),
        ]), "No requests in this range.")));
}

/** Sums summary rows per value of `key`, as the API's own totals are. */
function totalsBy(rows, key) {
  const sums = new Map();
  for (const r of rows) {
    const name = r[key] ?? "";
    const t = sums.get(name) || { [key]: name, requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0, cost_micros: 0 };
    for (const k of ["requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros"]) t[k] += Number(r[k]);
    sums.set(name, t);
  }
  const data = [...sums.values()];
  // Rounded half up, as the API rounds its averages.
  for (const t of data) t.average_cost_micros = t.requests ? Math.floor((t.cost_micros + Math.floor(t.requests / 2)) / t.requests) : 0;
  return { data };
}

function groupField(group) {
  return { tenant: "tenant_id", key: "key_id" }[group] || group;
}

function total(summary, group, name) {
  return summary.data.filter((r) => (r[groupField(group)] ?? "") === name).reduce((s, r) => s + r.cost_micros, 0);
}

function groupCell(group, value) {
  if (group === "tenant" && value) return h("a", { href: `#/tenants/${encodeURIComponent(value)}` }, value);
  return value || "(none)";
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("span", { class: "muted" }, label), h("strong", {}, value));
}

function filterForm(v) {
  const input = (name, attrs = {}) => h("input", { name, value: v[name], ...attrs });
  const f = h("form", { class: "inline filters", "aria-label": "Filters" },
    field("From", input("from", { type: "date" })),
    field("To", input("to", { type: "date" })),
    field("Per", h("select", { name: "granularity" },
      [["day", "day"], ["hour", "hour"]].map(([val, t]) => h("option", { value: val, selected: v.granularity === val }, t)))),
    field("By", h("select", { name: "group" },
      GROUPS.map(([val, t]) => h("option", { value: val, selected: v.group === val }, t)))),
    field("Tenant", input("tenant_id", { placeholder: "any" })),
    field("Key id", input("key_id", { placeholder: "any" })),
    field("Model", input("model", { placeholder: "any" })),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Show")));
  f.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(f));
    location.hash = `#/usage${api.query(data)}`;
  });
  return f;
}
