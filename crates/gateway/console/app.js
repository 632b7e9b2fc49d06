// The console's shell: sign-in, the session, navigation between pages
// (`#/section/...` in the address, so pages can be bookmarked and the
// browser's back button works).

import * as api from "./api.js";
import { h, show, notify, errorText, clearStaleNotice } from "./dom.js";
import { tenantsPage } from "./tenants.js";
import { tenantPage } from "./tenant.js";
import { usagePage } from "./usage.js";
import { alertsPage, auditPage, upstreamsPage } from "./activity.js";
import { tokensPage } from "./tokens.js";

const main = document.getElementById("main");
const top = document.getElementById("top");
let session = null;
let expiryTimer = null;

function signedOut(message) {
  session = null;
  clearTimeout(expiryTimer);
  top.hidden = true;
  signInPage(message);
}

api.whenSignedOut((message) => signedOut(message));

function signInPage(message) {
  document.title = "Sign in · Tollgate";
  const token = h("input", { type: "password", name: "token", autocomplete: "current-password", required: true });
  const error = h("p", { class: "error", role: "alert" }, message || "");
  const button = h("button", { type: "submit" }, "Sign in");
  const formEl = h("form", { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Tollgate console"),
    h("p", {}, "Sign in with an admin token: the bootstrap token or one issued by the admin API."),
    h("div", { class: "field" }, h("label", { for: "token" }, "Admin token"), token),
    h("div", { class: "actions" }, button),
    error);
  token.id = "token";
  formEl.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    show(error);
    try {
      started(await api.signIn(token.value));
      if (!location.hash || location.hash === "#/signin") location.hash = "#/tenants";
      else route();
    } catch (e) {
      show(error, e.status === 401 ? "That token is not valid." : errorText(e));
      token.select();
    } finally {
      button.disabled = false;
    }
  });
  show(main, formEl);
  token.focus();
}

function started(s) {
  session = s;
  top.hidden = false;
  document.getElementById("actor").textContent = `Signed in as ${s.actor}`;
  clearTimeout(expiryTimer);
  const left = new Date(s.expires_at).getTime() - Date.now();
  // Timers cap at about 24.8 days; sessions are shorter than that.
  expiryTimer = setTimeout(() => signedOut("Your session has expired: sign in again."), Math.max(0, left));
}

document.getElementById("sign-out").addEventListener("click", async () => {
  try {
    await api.signOut();
  } catch (e) {
    notify(errorText(e), "bad");
  }
  signedOut("Signed out.");
});

const pages = {
  tenants: (rest, params) => (rest.length ? tenantPage(decodeURIComponent(rest[0])) : tenantsPage(params)),
  usage: (_, params) => usagePage(params),
  alerts: () => alertsPage(),
  audit: () => auditPage(),
  upstreams: () => upstreamsPage(),
  tokens: () => tokensPage(),
};

let generation = 0;

async function route() {
  if (!session) return;
  const [path, queryText] = (location.hash.replace(/^#\/?/, "") || "tenants").split("?");
  const [section, ...rest] = path.split("/");
  const page = pages[section];
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!page) {
    show(main, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "#/tenants" }, "Go to tenants.")));
    return;
  }
  const mine = ++generation;
  clearStaleNotice();
  show(main, h("p", { class: "loading" }, "Loading…"));
  try {
    const content = await page(rest, new URLSearchParams(queryText || ""));
    // A later navigation has replaced this page already.
    if (mine !== generation || !session) return;
    show(main, content);
    document.title = `${main.querySelector("h1")?.textContent || "Console"} · Tollgate`;
  } catch (e) {
    if (mine !== generation || !session) return;
    show(main, h("h1", {}, "Cannot show this page"), h("p", { class: "error", role: "alert" }, errorText(e)));
  }
}

window.addEventListener("hashchange", route);

(async () => {
  try {
    started(await api.currentSession());
    route();
  } catch (e) {
    signInPage(e.status === 401 ? "" : errorText(e));
  }
})();
