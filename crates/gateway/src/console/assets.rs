//! The console's files, built into the binary: no CDN, no files beside the
//! binary, nothing fetched from the internet (air-gapped deployments).

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// (name, content type, contents) of every file under `/console/assets/`.
const FILES: &[(&str, &str, &str)] = &[
    ("style.css", "text/css; charset=utf-8", include_str!("../../console/style.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("../../console/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_str!("../../console/dom.js")),
    ("charts.js", "text/javascript; charset=utf-8", include_str!("../../console/charts.js")),
    ("tenants.js", "text/javascript; charset=utf-8", include_str!("../../console/tenants.js")),
    ("tenant.js", "text/javascript; charset=utf-8", include_str!("../../console/tenant.js")),
    ("usage.js", "text/javascript; charset=utf-8", include_str!("../../console/usage.js")),
    ("activity.js", "text/javascript; charset=utf-8", include_str!("../../console/activity.js")),
    ("tokens.js", "text/javascript; charset=utf-8", include_str!("../../console/tokens.js")),
    ("favicon.svg", "image/svg+xml", include_str!("../../console/favicon.svg")),
];

const INDEX: &str = include_str!("../../console/index.html");

/// Only the console's own files run, and no other site may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX)
}

pub async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, contents)) => respond(content_type, contents),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

fn respond(content_type: &'static str, contents: &'static str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated each time: a new binary serves new files at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    (headers, contents).into_response()
}
