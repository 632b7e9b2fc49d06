//! The admin API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations.
//!
//! Each handler documents the answers that are its own (201, 404, 409, ...).
//! The error statuses that come from shared machinery are added here, from
//! the same facts the machinery acts on, so that no handler can forget them:
//! the token check (401) guards every operation, the JSON extractor (400,
//! 413) every operation with a body, the query extractor (400) every
//! operation with query parameters, and the store (500, 503) all of them.
//! Every error is the OpenAI envelope, so every 4xx and 5xx answer gets the
//! `ApiError` schema.

use axum::response::IntoResponse;
use serde_json::Value;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, ContentBuilder, Ref, RefOr};

use super::{audit, budgets, keys, routing, tenants, tokens, usage};

/// Scheme names, as the operations' `security` lists refer to them.
pub const ADMIN_TOKEN: &str = "admin_token";
pub const TENANT_KEY: &str = "tenant_key";
const ERROR_SCHEMA: &str = "ApiError";

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate admin API", description = "Manage tenants, their API keys, budgets and admin tokens; read the audit log and usage reports."),
    paths(
        tenants::create, tenants::list, tenants::get, tenants::update, tenants::suspend, tenants::resume, tenants::delete,
        keys::create, keys::list, keys::get, keys::update, keys::revoke, keys::rotate,
        tokens::create, tokens::list, tokens::revoke,
        budgets::create, budgets::list, budgets::update, budgets::delete, budgets::alerts,
        audit::list,
        routing::routes, routing::upstreams,
        usage::admin_summary, usage::admin_records, usage::admin_csv,
        crate::tenant_usage::summary, crate::tenant_usage::records,
    ),
    modifiers(&SecuritySchemes, &SharedResponses),
    security(("admin_token" = [])),
)]
pub struct AdminApi;

/// The OpenAPI document as served and as checked in (`docs/admin-openapi.json`).
pub fn openapi_json() -> String {
    let Ok(mut doc) = serde_json::to_value(AdminApi::openapi()) else { return "{}".to_owned() };
    camel_case_links(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned())
}

/// utoipa 5.5 writes the members of Link Objects in snake case
/// (`operation_id`), which OpenAPI does not know: spell them as it does.
fn camel_case_links(doc: &mut Value) {
    let links = doc
        .get_mut("paths")
        .and_then(Value::as_object_mut)
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses").and_then(Value::as_object_mut))
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links").and_then(Value::as_object_mut))
        .flat_map(|links| links.values_mut())
        .filter_map(Value::as_object_mut);
    for link in links {
        for (snake, camel) in
            [("operation_id", "operationId"), ("operation_ref", "operationRef"), ("request_body", "requestBody")]
        {
            if let Some(value) = link.remove(snake) {
                link.insert(camel.to_owned(), value);
            }
        }
    }
}

pub async fn serve() -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "application/json")], openapi_json())
}

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The bootstrap admin token, or one issued by `POST /admin/v1/admin-tokens`."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            TENANT_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API key, `tg-<id>-<secret>` (the `/v1` usage endpoints only)."))
                    .build(),
            ),
        );
    }
}

struct SharedResponses;

impl utoipa::Modify for SharedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.insert(ERROR_SCHEMA.to_owned(), RefOr::T(error_schema()));
        for item in openapi.paths.paths.values_mut() {
            for operation in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.patch, &mut item.delete].into_iter().flatten()
            {
                add_shared_responses(operation);
            }
        }
    }
}

fn add_shared_responses(operation: &mut Operation) {
    let has_body = operation.request_body.is_some();
    let has_query = operation.parameters.iter().flatten().any(|p| matches!(p.parameter_in, ParameterIn::Query));
    let tenant_key_only = SecurityRequirement::new(TENANT_KEY, Vec::<String>::new());
    let tenant_key = operation.security.iter().flatten().any(|r| *r == tenant_key_only);
    let mut shared = Vec::new();
    if has_body || has_query {
        shared.push((
            "400",
            "Malformed or invalid input: `invalid_body` (the body does not fit the schema) or \
             `validation_failed` (a value is out of range); `param` names the field.",
        ));
    }
    shared.push(if tenant_key {
        ("401", "No tenant key, or an unknown, expired or revoked one.")
    } else {
        ("401", "No admin token, or an invalid or revoked one (`invalid_admin_token`).")
    });
    if has_body {
        shared.push(("413", "The body is over 64 KiB (`request_too_large`)."));
    }
    shared.push((
        "429",
        "Too many failed authentications from this address this minute: every attempt is refused until \
         the minute ends (`too_many_failed_attempts` for admin tokens, `rate_limit_exceeded` for tenant keys).",
    ));
    shared.push(("500", "An unexpected failure (`internal_error`)."));
    shared.push(("503", "The database is unavailable (`database_unavailable`); try again."));
    let responses = &mut operation.responses.responses;
    for (status, description) in shared {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(ResponseBuilder::new().description(description).build()));
    }
    for (status, response) in responses.iter_mut() {
        let is_error = status.starts_with('4') || status.starts_with('5');
        if let (true, RefOr::T(response)) = (is_error, response)
            && response.content.is_empty()
        {
            response.content.insert("application/json".to_owned(), error_content());
        }
    }
}

fn error_content() -> Content {
    ContentBuilder::new().schema(Some(Ref::from_schema_name(ERROR_SCHEMA))).build()
}

/// `tollgate_openai::ErrorEnvelope` as a schema: every member is always
/// present, `param` and `code` may be null.
fn error_schema() -> Schema {
    let string = |description: &str| ObjectBuilder::new().schema_type(Type::String).description(Some(description));
    let nullable = |description: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
            .description(Some(description))
    };
    let body = ObjectBuilder::new()
        .property("message", string("What went wrong, for people."))
        .property("type", string("`invalid_request_error` or `server_error`."))
        .property("param", nullable("The offending field, for validation errors."))
        .property("code", nullable("A stable code for programs, e.g. `not_found`, `validation_failed`."))
        .required("message")
        .required("type")
        .required("param")
        .required("code");
    ObjectBuilder::new()
        .description(Some("The OpenAI error envelope."))
        .property("error", body)
        .required("error")
        .into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                out.push((path.clone(), method.clone(), operation.clone()));
            }
        }
        out
    }

    fn document() -> Value {
        serde_json::from_str(&openapi_json()).unwrap()
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc = document();
        let mut seen = HashSet::new();
        for (path, method, operation) in operations(&doc) {
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no id"));
            assert!(seen.insert(id.to_owned()), "{id} is used twice");
        }
    }

    #[test]
    fn path_templates_and_path_parameters_match() {
        let doc = document();
        for (path, method, operation) in operations(&doc) {
            let in_template: HashSet<&str> =
                path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
            let params = operation["parameters"].as_array().cloned().unwrap_or_default();
            let declared: HashSet<&str> =
                params.iter().filter(|p| p["in"] == "path").map(|p| p["name"].as_str().unwrap()).collect();
            assert_eq!(in_template, declared, "{method} {path}");
            for p in &params {
                let required = p["required"].as_bool().unwrap_or(false);
                match p["in"].as_str() {
                    Some("path") => assert!(required, "{method} {path}: {p}"),
                    Some("query") => assert!(!required, "{method} {path}: every query parameter is optional: {p}"),
                    other => panic!("{method} {path}: unexpected location {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_operation_documents_its_shared_errors_with_the_envelope() {
        let doc = document();
        for (path, method, operation) in operations(&doc) {
            let responses = operation["responses"].as_object().unwrap();
            for status in ["401", "500", "503"] {
                assert!(responses.contains_key(status), "{method} {path} lacks {status}");
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ApiError",
                        "{method} {path} {status}"
                    );
                }
            }
            if operation.get("requestBody").is_some() {
                assert!(responses.contains_key("400") && responses.contains_key("413"), "{method} {path}");
            }
        }
        assert!(doc["components"]["securitySchemes"][ADMIN_TOKEN].is_object());
        assert_eq!(doc["security"], serde_json::json!([{ADMIN_TOKEN: []}]));
    }

    #[test]
    fn links_name_existing_operations_in_openapi_spelling() {
        let doc = document();
        let ids: HashSet<String> =
            operations(&doc).iter().map(|(_, _, o)| o["operationId"].as_str().unwrap().to_owned()).collect();
        let mut links = 0;
        for (path, method, operation) in operations(&doc) {
            for response in operation["responses"].as_object().unwrap().values() {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    links += 1;
                    let target = link["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: {link}"));
                    assert!(ids.contains(target), "{method} {path} links to unknown {target}");
                }
            }
        }
        assert!(links > 0);
    }
}
