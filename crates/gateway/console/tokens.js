// Admin tokens: who can use the admin API, the CLI and this console.
// Revoking one ends its console sessions at once.

import * as api from "./api.js";
import { h, table, badge, when, form, field, notify, dialog, errorText, reload } from "./dom.js";
import { showSecret } from "./tenant.js";

export async function tokensPage() {
  const tokens = await api.get("/admin/v1/admin-tokens");
  const rows = tokens.data.map((t) => [
    t.name,
    h("code", {}, t.id),
    when(t.created_at),
    t.revoked_at ? badge(`revoked ${when(t.revoked_at)}`, "bad") : badge("active", "ok"),
    t.revoked_at ? "" : h("button", { type: "button", class: "danger small", onclick: () => revoke(t) }, "Revoke"),
  ]);
  const create = form({ class: "card", "aria-labelledby": "new-token" }, [
    h("h2", { id: "new-token" }, "New admin token"),
    field("Name", h("input", { name: "name", required: true, maxlength: 200, placeholder: "e.g. ops laptop, CI deploy" })),
  ], "Create admin token", async (data) => {
    const created = await api.post("/admin/v1/admin-tokens", { name: data.get("name") });
    showSecret("Admin token created", created.secret, created.token.name);
  });
  return h("section", {},
    h("h1", {}, "Admin tokens"),
    h("p", { class: "muted" },
      "Each token can use the admin API, the CLI and this console. The bootstrap token comes from the gateway's environment and is not listed."),
    table(["Name", "Id", "Created", "Status", ""], rows, "No admin tokens issued: only the bootstrap token can sign in."),
    create);
}

function revoke(token) {
  const d = dialog(`Revoke admin token ${token.name}?`,
    h("p", {}, "It stops working at once, on every replica, and console sessions opened with it end."),
    h("div", { class: "actions" },
      h("button", { type: "button", class: "danger", onclick: async () => {
        try {
          await api.post(`/admin/v1/admin-tokens/${encodeURIComponent(token.id)}/revoke`);
          d.close();
          notify(`Admin token ${token.name} revoked.`);
          reload();
        } catch (e) {
          notify(errorText(e), "bad");
        }
      } }, "Revoke admin token"),
      h("button", { type: "button", class: "secondary", onclick: () => d.close() }, "Cancel")));
}
