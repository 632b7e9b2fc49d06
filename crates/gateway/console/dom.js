// Small DOM helpers. Everything shown goes through text nodes (never
// innerHTML), so names and ids from the database cannot inject markup.

/** Creates an element: h("a", {href: "#/x", class: "y", onclick: f}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "value" || name === "checked") {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces an element's contents. */
export function show(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** Micro-dollars as dollars, exactly (integer arithmetic, no rounding). */
export function usd(micros) {
  const n = Number(micros || 0);
  const sign = n < 0 ? "-" : "";
  const abs = Math.abs(n);
  const whole = Math.floor(abs / 1e6);
  let frac = String(abs % 1e6).padStart(6, "0").replace(/0+$/, "");
  if (frac.length < 2) frac = frac.padEnd(2, "0");
  return `${sign}$${whole.toLocaleString("en-US")}.${frac}`;
}

/** Dollars for chart axes: rounded to what the axis shows. */
export function usdShort(micros) {
  const d = Number(micros || 0) / 1e6;
  if (d === 0) return "$0";
  if (Math.abs(d) >= 1000) return `$${(d / 1000).toFixed(1)}k`;
  if (Math.abs(d) >= 1) return `$${d.toFixed(2)}`;
  return `$${d.toPrecision(2)}`;
}

export function int(n) {
  return Number(n || 0).toLocaleString("en-US");
}

/** An RFC 3339 time as `2026-12-04 17:05 UTC`. */
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

/** A labelled form field; `input` is the control. */
export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("small", {}, hint) : null);
}

/** A table with a header row, or an empty state when there are no rows. */
export function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
    ),
  );
}

/** Shows a message in the page's status area. */
export function notify(message, kind = "ok") {
  const area = document.getElementById("notice");
  area.dataset.shownAt = String(Date.now());
  show(area, h("div", { class: `notice ${kind}` }, message, h("button", {
    type: "button", class: "link", "aria-label": "Dismiss", onclick: () => show(area),
  }, "×")));
}

/** The error to show for a failed call: the API's own message and field. */
export function errorText(error) {
  if (error && error.param) return `${error.message} (${error.param})`;
  return error && error.message ? error.message : String(error);
}

/** Opens a modal dialog; returns it (closed and removed on Escape or close()). */
export function dialog(title, ...children) {
  const d = h("dialog", { "aria-label": title }, h("h2", {}, title), ...children);
  d.addEventListener("close", () => d.remove());
  document.body.append(d);
  d.showModal();
  return d;
}

/** A form that calls `submit(values)`, disables itself while it runs and
 *  shows the error next to its button. */
export function form(attrs, fields, buttonText, submit) {
  const error = h("p", { class: "error", role: "alert" });
  const button = h("button", { type: "submit" }, buttonText);
  const el = h("form", attrs, fields, h("div", { class: "actions" }, button, error));
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    show(error);
    button.disabled = true;
    try {
      await submit(new FormData(el));
    } catch (e) {
      show(error, errorText(e));
    } finally {
      button.disabled = false;
    }
  });
  return el;
}

/** A non-negative integer from a form field, or null when left empty. */
export function optionalInt(value, name) {
  const text = String(value ?? "").trim();
  if (text === "") return null;
  if (!/^\d+$/.test(text)) throw new Error(`${name} must be a whole number`);
  return Number(text);
}

/** Clears the status area when moving to another page, unless a change
 *  just put its outcome there (a change often moves to the page it made). */
export function clearStaleNotice() {
  const area = document.getElementById("notice");
  if (Date.now() - Number(area.dataset.shownAt || 0) > 1000) show(area);
}

/** Re-renders the current page (after a change). */
export function reload() {
  window.dispatchEvent(new HashChangeEvent("hashchange"));
}
