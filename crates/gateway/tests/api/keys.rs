//! The tenant key lifecycle through HTTP: create, use, restrict, expire,
//! revoke, rotate through and after the grace period; suspended and deleted
//! tenants. Run on SQLite and on Postgres. Expiry is reached by moving the
//! gateway's clock, not by waiting for it.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Db, PATIENCE, TestGateway, client_with_key, envelope, wait_until};

const CHAT: &str = r#"{"model":"gemini-2.5-flash","messages":[]}"#;

async fn chat(key: &str, gw: &TestGateway, body: &str) -> reqwest::Response {
    client_with_key(key).post(gw.url("/v1/chat/completions")).body(body.to_owned()).send().await.unwrap()
}

fn key_id(secret: &str) -> String {
    secret.split('-').nth(1).unwrap().to_owned()
}

async fn start(db: Db) -> TestGateway {
    TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), db, |_| {}).await
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::start(super::Db::Sqlite).await).await; })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::start(super::Db::Postgres).await).await; })*
        }
    };
}

on_both_backends!(
    requests_without_a_valid_key_are_refused,
    a_revoked_key_is_refused_at_once_with_a_message_saying_so,
    an_expired_key_is_refused_with_a_message_saying_so,
    model_restrictions_apply_to_requests_and_the_model_list,
    rotation_keeps_the_old_key_until_the_grace_period_ends,
    suspended_tenants_get_403_and_resumed_ones_work_again,
    deleting_a_tenant_revokes_its_keys,
);

async fn requests_without_a_valid_key_are_refused(gw: TestGateway) {
    let anonymous = gw.anonymous.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(envelope(anonymous).await["error"]["code"], "invalid_api_key");

    let well_formed_unknown = format!("tg-aaaaaaaaaaaa-{}", "b".repeat(40));
    // The key with its last character changed (to one it is not).
    let last = if gw.key.ends_with('X') { 'Y' } else { 'X' };
    let wrong_secret = format!("{}{last}", &gw.key[..gw.key.len() - 1]);
    for key in [well_formed_unknown.as_str(), "tg-garbage", wrong_secret.as_str(), "sk-openai-style"] {
        let response = chat(key, &gw, CHAT).await;
        assert_eq!(response.status(), 401, "{key}");
        let body = envelope(response).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(!body.to_string().contains(key), "the error does not echo the key");
    }
    // The other headers clients use for keys.
    for header in ["api-key", "x-api-key"] {
        let response =
            gw.anonymous.post(gw.url("/v1/chat/completions")).header(header, &gw.key).body(CHAT).send().await.unwrap();
        assert_eq!(response.status(), 200, "{header}");
    }
    let models = gw.anonymous.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401, "every /v1 route needs a key");
    assert_eq!(gw.fake.requests().len(), 2, "refused requests never reach the upstream");
}

async fn a_revoked_key_is_refused_at_once_with_a_message_saying_so(gw: TestGateway) {
    let key = gw.create_key("test", json!({"name": "doomed"})).await;
    assert_eq!(chat(&key, &gw, CHAT).await.status(), 200);
    let (status, revoked) = gw.admin(Method::POST, &format!("/admin/v1/keys/{}/revoke", key_id(&key)), None).await;
    assert_eq!(status, 200);
    assert_eq!(revoked["status"], "revoked");
    let response = chat(&key, &gw, CHAT).await;
    assert_eq!(response.status(), 401);
    let body = envelope(response).await;
    assert_eq!(body["error"]["code"], "api_key_revoked");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"));
    assert_eq!(chat(&gw.key, &gw, CHAT).await.status(), 200, "other keys are unaffected");
}

async fn an_expired_key_is_refused_with_a_message_saying_so(gw: TestGateway) {
    let expires = gw.clock.now() + chrono::Duration::hours(1);
    let key = gw.create_key("test", json!({"name": "short-lived", "expires_at": expires})).await;
    assert_eq!(chat(&key, &gw, CHAT).await.status(), 200);
    let (_, view) = gw.admin(Method::GET, &format!("/admin/v1/keys/{}", key_id(&key)), None).await;
    assert_eq!(view["status"], "active");

    gw.clock.advance(Duration::from_secs(3600));
    let response = chat(&key, &gw, CHAT).await;
    assert_eq!(response.status(), 401, "refused from its expiry on");
    assert_eq!(envelope(response).await["error"]["code"], "api_key_expired");
    let (_, view) = gw.admin(Method::GET, &format!("/admin/v1/keys/{}", key_id(&key)), None).await;
    assert_eq!(view["status"], "expired");

    // Clearing the expiry brings it back.
    let (status, _) =
        gw.admin(Method::PATCH, &format!("/admin/v1/keys/{}", key_id(&key)), Some(json!({"expires_at": null}))).await;
    assert_eq!(status, 200);
    assert_eq!(chat(&key, &gw, CHAT).await.status(), 200);
}

async fn model_restrictions_apply_to_requests_and_the_model_list(gw: TestGateway) {
    let key = gw.create_key("test", json!({"name": "gemini", "allowed_models": ["gemini-2.5-*", "gpt-4.1"]})).await;
    assert_eq!(chat(&key, &gw, r#"{"model":"gemini-2.5-pro","messages":[]}"#).await.status(), 200);
    assert_eq!(chat(&key, &gw, r#"{"model":"gpt-4.1","messages":[]}"#).await.status(), 200);
    let refused = chat(&key, &gw, r#"{"model":"gpt-4.1-mini","messages":[]}"#).await;
    assert_eq!(refused.status(), 403);
    let body = envelope(refused).await;
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(body["error"]["param"], "model");

    let client = client_with_key(&key);
    let list: Value = client.get(gw.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gemini-2.5-flash-lite", "gemini-2.5-flash", "gemini-2.5-pro", "gpt-4.1"]);
    assert_eq!(client.get(gw.url("/v1/models/gemini-2.5-pro")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(gw.url("/v1/models/claude-sonnet-4-20250514")).send().await.unwrap().status(), 403);

    // Lifting the restriction applies at once.
    let (status, _) =
        gw.admin(Method::PATCH, &format!("/admin/v1/keys/{}", key_id(&key)), Some(json!({"allowed_models": []}))).await;
    assert_eq!(status, 200);
    assert_eq!(chat(&key, &gw, r#"{"model":"gpt-4.1-mini","messages":[]}"#).await.status(), 200);
}

async fn rotation_keeps_the_old_key_until_the_grace_period_ends(gw: TestGateway) {
    let old = gw.create_key("test", json!({"name": "rotating", "allowed_models": ["gemini-*"]})).await;
    let (status, rotated) = gw
        .admin(Method::POST, &format!("/admin/v1/keys/{}/rotate", key_id(&old)), Some(json!({"grace_period": "1h"})))
        .await;
    assert_eq!(status, 201, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(rotated["key"]["allowed_models"], json!(["gemini-*"]), "the new key inherits the old one's settings");
    assert_eq!(rotated["previous_key"]["rotated_to"], rotated["key"]["id"]);

    // Both work during the grace period, up to its last moment.
    assert_eq!(chat(&old, &gw, CHAT).await.status(), 200);
    assert_eq!(chat(&new, &gw, CHAT).await.status(), 200);
    gw.clock.advance(Duration::from_secs(3600 - 60));
    assert_eq!(chat(&old, &gw, CHAT).await.status(), 200, "a minute before the grace period ends");
    gw.clock.advance(Duration::from_secs(60));
    let response = chat(&old, &gw, CHAT).await;
    assert_eq!(response.status(), 401);
    assert_eq!(envelope(response).await["error"]["code"], "api_key_expired");
    let (_, view) = gw.admin(Method::GET, &format!("/admin/v1/keys/{}", key_id(&old)), None).await;
    assert_eq!(view["status"], "expired");
    assert_eq!(chat(&new, &gw, CHAT).await.status(), 200);

    // A rotated key cannot be rotated again.
    let (status, _) = gw
        .admin(Method::POST, &format!("/admin/v1/keys/{}/rotate", key_id(&old)), Some(json!({"grace_period": "1h"})))
        .await;
    assert_eq!(status, 409);
}

async fn suspended_tenants_get_403_and_resumed_ones_work_again(gw: TestGateway) {
    let (status, _) = gw.admin(Method::POST, "/admin/v1/tenants/test/suspend", None).await;
    assert_eq!(status, 200);
    let response = chat(&gw.key, &gw, CHAT).await;
    assert_eq!(response.status(), 403);
    assert_eq!(envelope(response).await["error"]["code"], "tenant_suspended");
    let (status, _) = gw.admin(Method::POST, "/admin/v1/tenants/test/resume", None).await;
    assert_eq!(status, 200);
    assert_eq!(chat(&gw.key, &gw, CHAT).await.status(), 200);
}

async fn deleting_a_tenant_revokes_its_keys(gw: TestGateway) {
    gw.ensure_tenant("other").await;
    let other = gw.create_key("other", json!({"name": "x"})).await;
    let (status, deleted) = gw.admin(Method::DELETE, "/admin/v1/tenants/test", None).await;
    assert_eq!(status, 200);
    assert_eq!(deleted["status"], "deleted");
    let response = chat(&gw.key, &gw, CHAT).await;
    assert_eq!(response.status(), 401);
    assert_eq!(envelope(response).await["error"]["code"], "api_key_revoked");
    assert_eq!(chat(&other, &gw, CHAT).await.status(), 200, "other tenants are untouched");
    let (status, _) = gw.admin(Method::GET, "/admin/v1/tenants/test", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn last_use_is_recorded_in_the_background() {
    let gw = TestGateway::start_with(|c| c.auth.last_used_flush_interval = Duration::from_millis(100)).await;
    let id = key_id(&gw.key);
    let (_, before) = gw.admin(Method::GET, &format!("/admin/v1/keys/{id}"), None).await;
    assert!(before["last_used_at"].is_null());
    assert_eq!(chat(&gw.key, &gw, CHAT).await.status(), 200);
    wait_until("last_used_at to be written", PATIENCE, async || {
        let (_, view) = gw.admin(Method::GET, &format!("/admin/v1/keys/{id}"), None).await;
        view["last_used_at"].is_string()
    })
    .await;
}
