// Alerts across tenants, the audit log, and the health of upstreams and routes.

import * as api from "./api.js";
import { h, table, badge, when } from "./dom.js";
import { alertRows } from "./tenant.js";

export async function alertsPage() {
  const alerts = await api.get("/admin/v1/alerts?limit=200");
  return h("section", {},
    h("h1", {}, "Budget alerts"),
    h("p", { class: "muted" }, "Sent when spend crosses a budget's thresholds or its forecast exceeds the amount; delivered to the configured webhooks, retried until they answer."),
    table(["When", "Tenant", "Alert", "Spend", "Delivery", "Last error"], alertRows(alerts.data), "No alerts have been raised."));
}

export async function auditPage() {
  const body = h("div", {});
  const rows = [];
  async function load(cursor) {
    const page = await api.get(`/admin/v1/audit${api.query({ limit: 100, cursor })}`);
    rows.push(...page.data.map((e) => [
      when(e.at), e.actor, h("code", {}, e.action), `${e.target_type} ${e.target_id}`,
      h("code", { class: "details" }, JSON.stringify(e.details)),
    ]));
    body.replaceChildren(table(["When", "Actor", "Action", "Target", "Details"], rows, "No changes recorded yet."));
    if (page.next_cursor) {
      body.append(h("button", { type: "button", class: "secondary more", onclick: () => load(page.next_cursor) }, "Show older"));
    }
  }
  await load(null);
  return h("section", {}, h("h1", {}, "Audit log"),
    h("p", { class: "muted" }, "Every change made through the admin API, the CLI or this console, newest first."), body);
}

function breakerBadge(state) {
  return badge(state.replace("_", " "), state === "closed" ? "ok" : state === "open" ? "bad" : "warn");
}

export async function upstreamsPage() {
  const [upstreams, routes] = await Promise.all([api.get("/admin/v1/upstreams"), api.get("/admin/v1/routes")]);
  const upstreamRows = upstreams.data.map((u) => [
    h("strong", {}, u.name), h("code", {}, u.base_url), String(u.targets),
    u.targets_not_closed ? badge(`${u.targets_not_closed} target${u.targets_not_closed === 1 ? "" : "s"} failing`, "bad") : badge("healthy", "ok"),
  ]);
  const routeRows = routes.data.flatMap((r) => r.groups.flatMap((group, g) => group.map((t) => [
    h("code", {}, r.model), g === 0 ? "primary" : `fallback ${g}`, t.upstream, t.model || "(as asked)",
    String(t.weight), breakerBadge(t.breaker), `${(t.weight_factor_per_mille / 10).toFixed(1)}%`,
  ])));
  return h("section", {},
    h("h1", {}, "Upstreams and routes"),
    h("section", { class: "card", "aria-labelledby": "up-title" }, h("h2", { id: "up-title" }, "Upstreams"),
      table(["Name", "Base URL", "Route targets", "Health"], upstreamRows, "No upstreams configured.")),
    h("section", { class: "card", "aria-labelledby": "routes-title" }, h("h2", { id: "routes-title" }, "Routes"),
      table(["Model", "Group", "Upstream", "Sends model", "Weight", "Breaker", "Share of weight"], routeRows,
        "No routes: every model goes to the default upstream.")));
}
