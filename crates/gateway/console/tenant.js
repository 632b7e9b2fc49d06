// One tenant: its policy, keys and budgets, and the alerts its budgets sent.

import * as api from "./api.js";
import { h, show, table, badge, when, usd, int, form, field, notify, dialog, errorText, optionalInt, reload } from "./dom.js";

const base = (id) => `/admin/v1/tenants/${encodeURIComponent(id)}`;

export async function tenantPage(id) {
  const [tenant, keys, budgets, alerts] = await Promise.all([
    api.get(base(id)),
    api.all(`${base(id)}/keys`),
    api.get(`${base(id)}/budgets`),
    api.get(`/admin/v1/alerts${api.query({ tenant_id: id, limit: 50 })}`),
  ]);
  return h("section", {},
    header(tenant),
    h("div", { class: "columns" }, policySection(tenant), budgetSection(tenant, budgets.data, keys)),
    keySection(tenant, keys),
    alertSection(alerts.data),
  );
}

function header(tenant) {
  const suspended = tenant.status === "suspended";
  const toggle = h("button", { type: "button", class: "secondary", onclick: async () => {
    try {
      await api.post(`${base(tenant.id)}/${suspended ? "resume" : "suspend"}`);
      notify(suspended ? `Tenant ${tenant.id} resumed.` : `Tenant ${tenant.id} suspended: its keys are refused.`);
      reload();
    } catch (e) {
      notify(errorText(e), "bad");
    }
  } }, suspended ? "Resume" : "Suspend");
  const remove = h("button", { type: "button", class: "danger", onclick: () => confirmDelete(tenant) }, "Delete…");
  return h("div", { class: "page-head" },
    h("div", {},
      h("p", { class: "crumbs" }, h("a", { href: "#/tenants" }, "Tenants"), " / ", tenant.id),
      h("h1", {}, tenant.display_name, " ", badge(tenant.status, suspended ? "warn" : "ok")),
      h("p", { class: "muted" }, `Created ${when(tenant.created_at)} · `,
        h("a", { href: `#/usage${api.query({ tenant_id: tenant.id })}` }, "Usage"))),
    h("div", { class: "actions" }, toggle, remove));
}

function confirmDelete(tenant) {
  const d = dialog(`Delete tenant ${tenant.id}?`,
    h("p", {}, "Its keys stop working at once. Its usage records are kept. This cannot be undone."),
    form({}, [field(`Type ${tenant.id} to confirm`, h("input", { name: "confirm", required: true, autocomplete: "off" }))],
      "Delete tenant", async (data) => {
        if (data.get("confirm") !== tenant.id) throw new Error(`Type ${tenant.id} exactly to delete it.`);
        await api.del(base(tenant.id));
        d.close();
        notify(`Tenant ${tenant.id} deleted.`);
        location.hash = "#/tenants";
      }),
    h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel"));
}

function numberInput(name, value) {
  return h("input", { name, inputmode: "numeric", value: value ?? "", placeholder: "no limit" });
}

function policySection(tenant) {
  const p = tenant.policy || {};
  const limits = p.limits || {};
  const select = (name, options, value, none) => h("select", { name },
    h("option", { value: "" }, none), options.map((o) => h("option", { value: o, selected: o === value }, o)));
  return form({ class: "card", "aria-labelledby": "policy-title" }, [
    h("h2", { id: "policy-title" }, "Policy"),
    field("Display name", h("input", { name: "display_name", value: tenant.display_name, required: true })),
    h("fieldset", {}, h("legend", {}, "Limits for the whole tenant"),
      field("Requests per minute", numberInput("rpm", limits.rpm)),
      field("Tokens per minute", numberInput("tpm", limits.tpm)),
      field("Requests in flight", numberInput("max_concurrent", limits.max_concurrent))),
    h("fieldset", {}, h("legend", {}, "Output and thinking"),
      field("Max output tokens", numberInput("max_output_tokens", p.max_output_tokens)),
      field("Over the cap", select("over_cap", ["clamp", "reject"], p.over_cap, "clamp (default)")),
      field("Default output tokens", numberInput("default_max_output_tokens", p.default_max_output_tokens),
        "Set when a request asks for no limit."),
      field("Highest reasoning effort", select("max_reasoning_effort", ["none", "minimal", "low", "medium", "high"],
        p.max_reasoning_effort, "any")),
      field("Max thinking budget", numberInput("max_thinking_budget", p.max_thinking_budget)),
      field("Default thinking budget", numberInput("default_thinking_budget", p.default_thinking_budget))),
  ], "Save policy", async (data) => {
    const n = (k) => optionalInt(data.get(k), k);
    const policy = {
      limits: Object.fromEntries(["rpm", "tpm", "max_concurrent"].map((k) => [k, n(k)]).filter(([, v]) => v !== null)),
    };
    for (const k of ["max_output_tokens", "default_max_output_tokens", "max_thinking_budget", "default_thinking_budget"]) {
      if (n(k) !== null) policy[k] = n(k);
    }
    for (const k of ["over_cap", "max_reasoning_effort"]) if (data.get(k)) policy[k] = data.get(k);
    await api.patch(base(tenant.id), { display_name: data.get("display_name"), policy });
    notify("Policy saved.");
    reload();
  });
}

function keyStatus(key) {
  return badge(key.status, key.status === "active" ? "ok" : key.status === "revoked" ? "bad" : "warn");
}

function keySection(tenant, keys) {
  const rows = keys.map((k) => [
    h("span", {}, k.name, h("br"), h("code", { class: "muted" }, k.id)),
    keyStatus(k),
    when(k.last_used_at),
    when(k.expires_at),
    k.allowed_models.length ? k.allowed_models.join(", ") : "all",
    limitsText(k.limits),
    k.status === "revoked" ? "" : h("span", { class: "row-actions" },
      h("button", { type: "button", class: "secondary small", onclick: () => editKey(k) }, "Edit"),
      h("button", { type: "button", class: "secondary small", onclick: () => rotateKey(k) }, "Rotate"),
      h("button", { type: "button", class: "danger small", onclick: () => revokeKey(k) }, "Revoke")),
  ]);
  return h("section", { class: "card", "aria-labelledby": "keys-title" },
    h("div", { class: "section-head" }, h("h2", { id: "keys-title" }, "API keys"),
      h("button", { type: "button", onclick: () => createKey(tenant) }, "New key")),
    table(["Name", "Status", "Last used", "Expires", "Models", "Limits", ""], rows,
      "No keys yet: create one for each service that calls the gateway."));
}

function limitsText(limits) {
  const parts = [];
  if (limits?.rpm) parts.push(`${int(limits.rpm)} rpm`);
  if (limits?.tpm) parts.push(`${int(limits.tpm)} tpm`);
  if (limits?.max_concurrent) parts.push(`${int(limits.max_concurrent)} at once`);
  return parts.join(", ") || "tenant's";
}

function keyFields(key) {
  const expires = key?.expires_at ? key.expires_at.slice(0, 16) : "";
  return [
    field("Name", h("input", { name: "name", required: true, value: key?.name ?? "", maxlength: 200 })),
    field("Allowed models", h("input", { name: "allowed_models", value: key ? key.allowed_models.join(", ") : "",
      placeholder: "all models" }), "Comma-separated names or patterns, e.g. gpt-4o-mini, gemini-*"),
    field("Expires (UTC)", h("input", { type: "datetime-local", name: "expires_at", value: expires })),
    field("Requests per minute", numberInput("rpm", key?.limits?.rpm)),
    field("Tokens per minute", numberInput("tpm", key?.limits?.tpm)),
    field("Requests in flight", numberInput("max_concurrent", key?.limits?.max_concurrent)),
  ];
}

function keyBody(data) {
  const limits = {};
  for (const k of ["rpm", "tpm", "max_concurrent"]) {
    const v = optionalInt(data.get(k), k);
    if (v !== null) limits[k] = v;
  }
  const models = String(data.get("allowed_models") || "").split(",").map((m) => m.trim()).filter(Boolean);
  const expires = String(data.get("expires_at") || "");
  return {
    name: data.get("name"),
    allowed_models: models,
    limits,
    expires_at: expires ? new Date(`${expires}:00Z`).toISOString() : null,
  };
}

function createKey(tenant) {
  const d = dialog("New API key", form({}, keyFields(null), "Create key", async (data) => {
    const body = keyBody(data);
    if (body.expires_at === null) delete body.expires_at;
    const created = await api.post(`${base(tenant.id)}/keys`, body);
    d.close();
    showSecret("Key created", created.secret, created.key.name);
  }), h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel"));
}

function editKey(key) {
  const d = dialog(`Edit key ${key.name}`, form({}, keyFields(key), "Save key", async (data) => {
    await api.patch(`/admin/v1/keys/${encodeURIComponent(key.id)}`, keyBody(data));
    d.close();
    notify(`Key ${key.name} saved.`);
    reload();
  }), h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel"));
}

function rotateKey(key) {
  const d = dialog(`Rotate key ${key.name}`,
    h("p", {}, "A new secret replaces this key. The old one keeps working for the grace period, so services can switch."),
    form({}, [field("Grace period", h("input", { name: "grace_period", value: "24h", required: true }),
      "e.g. 0s, 1h, 24h, 7d (at most 30 days)")], "Rotate", async (data) => {
      const rotated = await api.post(`/admin/v1/keys/${encodeURIComponent(key.id)}/rotate`,
        { grace_period: data.get("grace_period") });
      d.close();
      showSecret("Key rotated", rotated.secret, rotated.key.name);
    }),
    h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel"));
}

function revokeKey(key) {
  const d = dialog(`Revoke key ${key.name}?`,
    h("p", {}, "Requests with this key are refused at once, on every replica. This cannot be undone."),
    h("div", { class: "actions" },
      h("button", { type: "button", class: "danger", onclick: async () => {
        try {
          await api.post(`/admin/v1/keys/${encodeURIComponent(key.id)}/revoke`);
          d.close();
          notify(`Key ${key.name} revoked.`);
          reload();
        } catch (e) {
          notify(errorText(e), "bad");
        }
      } }, "Revoke key"),
      h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel")));
}

/** The secret, once: it cannot be shown again. */
export function showSecret(title, secret, name) {
  const value = h("input", { type: "text", readonly: true, value: secret, class: "secret", id: "new-secret",
    "aria-label": `Secret of key ${name}` });
  const copied = h("span", { class: "muted", role: "status" });
  const d = dialog(title,
    h("p", { class: "warning" }, "Copy this secret now: it is shown only once and cannot be retrieved later."),
    h("div", { class: "copy-row" }, value,
      h("button", { type: "button", onclick: async () => {
        value.select();
        try {
          await navigator.clipboard.writeText(secret);
        } catch {
          document.execCommand("copy");
        }
        show(copied, "Copied.");
      } }, "Copy")),
    copied,
    h("div", { class: "actions" }, h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Done")));
  d.addEventListener("close", reload);
  value.select();
}

function budgetSection(tenant, budgets, keys) {
  const keyName = (id) => keys.find((k) => k.id === id)?.name || id;
  const items = budgets.map((b) => {
    const percent = b.amount_micros > 0 ? Math.min(100, (b.spent_micros * 100) / b.amount_micros) : 0;
    const fill = h("span", { class: `fill ${percent >= 100 ? "over" : percent >= 80 ? "near" : ""}` });
    fill.style.width = `${percent}%`;
    return h("li", { class: "budget" },
      h("div", { class: "budget-head" },
        h("strong", {}, `${b.period} ${b.hard ? "hard" : "soft"} budget`),
        h("span", { class: "muted" }, b.key_id ? ` · key ${keyName(b.key_id)}` : " · whole tenant"),
        h("button", { type: "button", class: "link", onclick: () => deleteBudget(b) }, "Delete")),
      h("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
        "aria-valuenow": Math.round(percent), "aria-label": "Spend against amount" }, fill),
      h("p", { class: "muted" }, `${usd(b.spent_micros)} of ${usd(b.amount_micros)} spent · ${usd(b.remaining_micros)} left`,
        b.forecast_micros !== null && b.forecast_micros !== undefined
          ? ` · forecast ${usd(b.forecast_micros)}${b.forecast_micros > b.amount_micros ? " (over)" : ""}` : "",
        ` · alerts at ${b.thresholds.join("%, ")}%`));
  });
  const create = form({ class: "compact" }, [
    field("Period", h("select", { name: "period" }, ["monthly", "weekly", "daily", "lifetime"].map((p) => h("option", { value: p }, p)))),
    field("Amount (USD)", h("input", { name: "amount_usd", required: true, inputmode: "decimal", placeholder: "100.00" })),
    field("Scope", h("select", { name: "key_id" }, h("option", { value: "" }, "whole tenant"),
      keys.filter((k) => k.status !== "revoked").map((k) => h("option", { value: k.id }, `key ${k.name}`)))),
    field("Alert at (%)", h("input", { name: "thresholds", value: "50, 80, 100" })),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "hard", checked: true }),
      " Hard: refuse requests that could exceed it"),
  ], "Add budget", async (data) => {
    const thresholds = String(data.get("thresholds") || "").split(",").map((t) => t.trim()).filter(Boolean)
      .map((t) => optionalInt(t, "thresholds"));
    const body = { period: data.get("period"), amount_usd: String(data.get("amount_usd")).trim(), hard: data.get("hard") === "on", thresholds };
    if (data.get("key_id")) body.key_id = data.get("key_id");
    await api.post(`${base(tenant.id)}/budgets`, body);
    notify("Budget added.");
    reload();
  });
  return h("section", { class: "card", "aria-labelledby": "budgets-title" },
    h("h2", { id: "budgets-title" }, "Budgets"),
    items.length ? h("ul", { class: "budgets" }, items) : h("p", { class: "empty" }, "No budgets: this tenant can spend without limit."),
    h("details", {}, h("summary", {}, "Add a budget"), create));
}

async function deleteBudget(b) {
  if (!window.confirm(`Delete this ${b.period} budget of ${usd(b.amount_micros)}?`)) return;
  try {
    await api.del(`/admin/v1/budgets/${encodeURIComponent(b.id)}`);
    notify("Budget deleted.");
    reload();
  } catch (e) {
    notify(errorText(e), "bad");
  }
}

export function alertRows(alerts) {
  return alerts.map((a) => [
    when(a.created_at),
    h("a", { href: `#/tenants/${encodeURIComponent(a.tenant_id)}` }, a.tenant_id),
    a.kind === "forecast" ? "forecast over budget" : `${a.threshold}% reached`,
    `${usd(a.spent_micros)} of ${usd(a.amount_micros)}`,
    a.delivered_at ? badge(`delivered ${when(a.delivered_at)}`, "ok")
      : badge(a.attempts ? `pending, ${a.attempts} attempt${a.attempts === 1 ? "" : "s"}` : "pending", a.last_error ? "bad" : "warn"),
    a.last_error || "",
  ]);
}

function alertSection(alerts) {
  return h("section", { class: "card", "aria-labelledby": "alerts-title" },
    h("h2", { id: "alerts-title" }, "Budget alerts"),
    table(["When", "Tenant", "Alert", "Spend", "Delivery", "Last error"], alertRows(alerts), "No alerts sent."));
}
