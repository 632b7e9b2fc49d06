// Tenants: search, filter by status, create.

import * as api from "./api.js";
import { h, show, table, badge, when, form, field, notify } from "./dom.js";

function statusBadge(status) {
  return badge(status, status === "active" ? "ok" : "warn");
}

export async function tenantsPage(params) {
  const q = params.get("q") || "";
  const status = params.get("status") || "";
  const list = h("div", { id: "tenant-list" });

  async function load(cursor, into) {
    const page = await api.get(`/admin/v1/tenants${api.query({ q, status, limit: 50, cursor })}`);
    const rows = page.data.map((t) => [
      h("a", { href: `#/tenants/${encodeURIComponent(t.id)}` }, t.id),
      t.display_name,
      statusBadge(t.status),
      when(t.created_at),
    ]);
    if (!cursor) {
      show(into, table(["Id", "Name", "Status", "Created"], rows,
        q || status ? "No tenant matches this search." : "No tenants yet: create the first one below."));
    } else {
      into.querySelector("tbody")?.append(...rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c)))));
    }
    into.querySelector(".more")?.remove();
    if (page.next_cursor) {
      into.append(h("button", { type: "button", class: "secondary more", onclick: () => load(page.next_cursor, into) },
        "Show more"));
    }
  }
  await load(null, list);

  const search = h("form", { class: "inline", role: "search", onsubmit: (e) => {
    e.preventDefault();
    const data = new FormData(e.target);
    location.hash = `#/tenants${api.query({ q: data.get("q"), status: data.get("status") })}`;
  } },
  field("Search", h("input", { type: "search", name: "q", value: q, placeholder: "id or name" })),
  field("Status", h("select", { name: "status" },
    [["", "any"], ["active", "active"], ["suspended", "suspended"]].map(([v, t]) =>
      h("option", { value: v, selected: v === status }, t)))),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Filter")));

  const create = form({ class: "card", "aria-labelledby": "new-tenant" }, [
    h("h2", { id: "new-tenant" }, "New tenant"),
    field("Id", h("input", { name: "id", required: true, placeholder: "e.g. search-team" }),
      "Lowercase letters, digits and dashes; it cannot change later."),
    field("Display name", h("input", { name: "display_name", required: true, maxlength: 200 })),
  ], "Create tenant", async (data) => {
    const tenant = await api.post("/admin/v1/tenants", { id: data.get("id").trim(), display_name: data.get("display_name") });
    notify(`Tenant ${tenant.id} created.`);
    location.hash = `#/tenants/${encodeURIComponent(tenant.id)}`;
  });

  return h("section", {}, h("h1", {}, "Tenants"), search, list, create);
}
