// The admin API as the console calls it: same-origin requests carrying the
// session cookie, with the session's CSRF token on every change.

let csrfToken = null;
let onSignedOut = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `the gateway answered ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

/** Called when a call finds the session gone (expired, ended, revoked). */
export function whenSignedOut(callback) {
  onSignedOut = callback;
}

export async function call(method, path, body) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && csrfToken) headers["x-csrf-token"] = csrfToken;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && !path.startsWith("/console/api/session")) onSignedOut(error.message);
    throw error;
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});
export const patch = (path, body) => call("PATCH", path, body);
export const del = (path) => call("DELETE", path);

/** Builds a query string from the non-empty members of `params`. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

export async function signIn(token) {
  const session = await call("POST", "/console/api/session", { token });
  csrfToken = session.csrf_token;
  return session;
}

export async function currentSession() {
  const session = await call("GET", "/console/api/session");
  csrfToken = session.csrf_token;
  return session;
}

export async function signOut() {
  try {
    await call("DELETE", "/console/api/session");
  } finally {
    csrfToken = null;
  }
}

/** Every page of a cursor-paginated listing, up to `max` rows. */
export async function all(path, max = 1000) {
  const rows = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await get(`${path}${sep}limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    rows.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && rows.length < max);
  return rows;
}
