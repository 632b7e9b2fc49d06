//! The admin API: authentication, validation, pagination, audit, admin
//! tokens, tenant isolation, and the checked-in OpenAPI document.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Db, TestGateway};

async fn raw(gw: &TestGateway, method: Method, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = gw.anonymous.request(method, gw.admin_url(path)).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.body(body.to_owned()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_api_needs_a_valid_admin_token() {
    let gw = TestGateway::start().await;
    for token in [None, Some("wrong"), Some(gw.key.as_str())] {
        let (status, body) = raw(&gw, Method::GET, "/admin/v1/tenants", token, "").await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["error"]["code"], "invalid_admin_token");
    }
    let (status, _) = raw(&gw, Method::GET, "/admin/v1/tenants", Some(ADMIN_TOKEN), "").await;
    assert_eq!(status, 200);
    // The admin API lives on its own listener, not on the public one.
    let public = gw.anonymous.get(gw.url("/admin/v1/tenants")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(public.status(), 404);
}

#[tokio::test]
async fn bad_admin_input_is_a_400_that_names_the_field() {
    let gw = TestGateway::start().await;
    let cases = [
        (r#"{"id":"acme","display_name":42}"#, "display_name", "invalid_body"),
        (r#"{"id":"acme","display_name":"A","colour":"red"}"#, "", "invalid_body"),
        (r#"{"id":"Not A Slug","display_name":"A"}"#, "id", "validation_failed"),
        (r#"{"id":"acme","display_name":""}"#, "display_name", "validation_failed"),
        (r#"{"id":"acme","display_name":"A","metadata":[1]}"#, "metadata", "validation_failed"),
        (r#"{"id":"acme""#, "", "invalid_body"),
    ];
    for (body, field, code) in cases {
        let (status, answer) = raw(&gw, Method::POST, "/admin/v1/tenants", Some(ADMIN_TOKEN), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        if !field.is_empty() {
            assert_eq!(answer["error"]["param"], field, "{body}: {answer}");
        }
    }
    let (_, unknown) = raw(&gw, Method::POST, "/admin/v1/tenants", Some(ADMIN_TOKEN), cases[1].0).await;
    assert!(unknown["error"]["message"].as_str().unwrap().contains("colour"), "{unknown}");

    let huge = json!({"id": "acme", "display_name": "A", "metadata": {"blob": "x".repeat(20_000)}}).to_string();
    let (status, answer) = raw(&gw, Method::POST, "/admin/v1/tenants", Some(ADMIN_TOKEN), &huge).await;
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("metadata")));
    let too_big = json!({"id": "acme", "display_name": "x".repeat(100_000)}).to_string();
    let (status, _) = raw(&gw, Method::POST, "/admin/v1/tenants", Some(ADMIN_TOKEN), &too_big).await;
    assert_eq!(status, 413);

    let key_cases = [
        (json!({"name": "k", "limits": {"rpm": 0}}), "limits.rpm"),
        (json!({"name": "k", "limits": {"rps": 1}}), "limits"),
        (json!({"name": "k", "allowed_models": ["has space"]}), "allowed_models"),
        (json!({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"name": "k", "expires_at": "tomorrow"}), "expires_at"),
    ];
    for (body, field) in key_cases {
        let (status, answer) = gw.admin(Method::POST, "/admin/v1/tenants/test/keys", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"]["param"].as_str().unwrap_or("").starts_with(field), "{body}: {answer}");
    }
    let (status, answer) = gw.admin(Method::GET, "/admin/v1/tenants?limit=1000", None).await;
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("limit")));
    let (status, _) = gw.admin(Method::POST, "/admin/v1/tenants/nope/keys", Some(json!({"name": "k"}))).await;
    assert_eq!(status, 404);
    let (status, _) =
        gw.admin(Method::POST, "/admin/v1/keys/whatever/rotate", Some(json!({"grace_period": "forever"}))).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn tenants_are_paginated_with_a_cursor() {
    let gw = TestGateway::start().await;
    for i in 0..5 {
        gw.ensure_tenant(&format!("t{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/v1/tenants?limit=2&cursor={c}"),
            None => "/admin/v1/tenants?limit=2".to_owned(),
        };
        let (status, page) = gw.admin(Method::GET, &path, None).await;
        assert_eq!(status, 200);
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4", "test"]);
}

#[tokio::test]
async fn keys_of_one_tenant_are_never_listed_or_usable_as_another() {
    let gw = TestGateway::start().await;
    gw.ensure_tenant("other").await;
    let other = gw.create_key("other", json!({"name": "theirs"})).await;
    let (_, mine) = gw.admin(Method::GET, "/admin/v1/tenants/test/keys", None).await;
    let ids: Vec<&str> = mine["data"].as_array().unwrap().iter().map(|k| k["tenant_id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|t| *t == "test"), "{mine}");
    assert!(!mine.to_string().contains(other.split('-').nth(1).unwrap()));
    assert!(!mine.to_string().contains("secret_hash"), "hashes never leave the store");
    // A tenant key is not an admin credential.
    let (status, _) = raw(&gw, Method::GET, "/admin/v1/tenants/other/keys", Some(&gw.key), "").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn admin_tokens_can_be_issued_used_audited_and_revoked() {
    let gw = TestGateway::start().await;
    let (status, created) = gw.admin(Method::POST, "/admin/v1/admin-tokens", Some(json!({"name": "ci"}))).await;
    assert_eq!(status, 201);
    let token = created["secret"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tga-"));
    let token_id = created["token"]["id"].as_str().unwrap().to_owned();

    let (status, _) =
        raw(&gw, Method::POST, "/admin/v1/tenants", Some(&token), r#"{"id":"byci","display_name":"CI"}"#).await;
    assert_eq!(status, 201);
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit?limit=1", None).await;
    assert_eq!(audit["data"][0]["action"], "tenant.create");
    assert_eq!(audit["data"][0]["actor"], format!("admin_token:{token_id}"));
    assert!(audit["next_cursor"].is_string());

    let (status, _) = gw.admin(Method::POST, &format!("/admin/v1/admin-tokens/{token_id}/revoke"), None).await;
    assert_eq!(status, 200);
    let (status, body) = raw(&gw, Method::GET, "/admin/v1/tenants", Some(&token), "").await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"));
    let (_, list) = gw.admin(Method::GET, "/admin/v1/admin-tokens", None).await;
    assert!(!list.to_string().contains(token.rsplit('-').next().unwrap()));
}

#[tokio::test]
async fn the_served_openapi_document_matches_the_checked_in_one() {
    let gw = TestGateway::start().await;
    let served = gw.anonymous.get(gw.admin_url("/admin/v1/openapi.json")).send().await.unwrap().text().await.unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/admin-openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, format!("{served}\n")).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        checked_in.trim_end(),
        served.trim_end(),
        "docs/admin-openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p tollgate-gateway --test api openapi`"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in
        ["/admin/v1/tenants", "/admin/v1/tenants/{id}/keys", "/admin/v1/keys/{key_id}/rotate", "/admin/v1/audit"]
    {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
}

#[tokio::test]
async fn the_admin_api_shares_the_public_listener_only_when_asked_to() {
    let shared = TestGateway::start_with(|c| c.admin.share_public_listener = true).await;
    assert_eq!(shared.admin_addr, shared.addr, "no admin listener of its own");
    let (status, _) = shared.admin(reqwest::Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, 200);
    let metrics = shared.anonymous.get(shared.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);

    let apart = TestGateway::start().await;
    assert_ne!(apart.admin_addr, apart.addr);
    let on_public = apart.anonymous.get(apart.url("/admin/v1/tenants")).send().await.unwrap();
    assert_eq!(on_public.status(), 404, "not on the public listener by default");

    let mut config = tollgate_gateway::Config::default();
    config.admin.listen = None;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("admin.listen") && error.contains("share_public_listener"), "{error}");
}

/// Found by fuzzing the admin API against its document (tests/api/openapi.rs).
#[tokio::test]
async fn input_no_resource_can_match_is_a_client_error_on_postgres() {
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let gw = TestGateway::start_full(fake, Db::Postgres, |_| {}).await;
    // Postgres text cannot hold NUL: these used to reach the database and
    // come back as 503 database_unavailable. Invalid UTF-8 in a path used to
    // be axum's plain-text 400.
    for (method, path) in [
        (Method::GET, "/admin/v1/tenants/a%00b"),
        (Method::GET, "/admin/v1/tenants/%FF"),
        (Method::GET, "/admin/v1/tenants/a%00b/keys"),
        (Method::GET, "/admin/v1/tenants/a%00b/budgets"),
        (Method::GET, "/admin/v1/keys/%00"),
        (Method::POST, "/admin/v1/keys/%00/revoke"),
        (Method::DELETE, "/admin/v1/budgets/%00"),
        (Method::POST, "/admin/v1/admin-tokens/%00/revoke"),
    ] {
        let (status, body) = raw(&gw, method.clone(), path, Some(ADMIN_TOKEN), "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{method} {path}: {body}");
    }
    for (path, param) in [
        ("/admin/v1/tenants?cursor=a%00", "cursor"),
        ("/admin/v1/usage/records?model=%00", "model"),
        ("/admin/v1/usage/summary?tenant_id=x%00", "tenant_id"),
        ("/admin/v1/alerts?tenant_id=%00", "tenant_id"),
    ] {
        let (status, body) = raw(&gw, Method::GET, path, Some(ADMIN_TOKEN), "").await;
        assert_eq!((status, body["error"]["param"].as_str()), (400, Some(param)), "{path}: {body}");
    }

    // Serde reads a struct from an array of its fields too: this created a
    // tenant, and `[null, null]` cleared a key's limits.
    let (status, body) = raw(&gw, Method::POST, "/admin/v1/tenants", Some(ADMIN_TOKEN), r#"["acme", "Acme"]"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_body")), "{body}");
    let key_id = gw.key.split('-').nth(1).unwrap().to_owned();
    let (status, body) =
        raw(&gw, Method::PATCH, &format!("/admin/v1/keys/{key_id}"), Some(ADMIN_TOKEN), r#"{"limits": [null, null]}"#)
            .await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("limits")), "{body}");

    // The document says int64: larger counts are refused, not stored.
    let (status, body) = raw(
        &gw,
        Method::PATCH,
        &format!("/admin/v1/keys/{key_id}"),
        Some(ADMIN_TOKEN),
        r#"{"limits": {"tpm": 9223372036854775808}}"#,
    )
    .await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("limits.tpm")), "{body}");

    // A tenant that does not exist has no budget list, as it has no key list.
    let (status, _) = gw.admin(Method::GET, "/admin/v1/tenants/nobody/budgets", None).await;
    assert_eq!(status, 404);
    // Parameters the export ignored are refused.
    let (status, body) = gw.admin(Method::GET, "/admin/v1/usage/records.csv?limit=5", None).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("query")), "{body}");
}
