//! The storage contract: the same assertions on Postgres and on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{Duration, Utc};
use serde_json::json;
use tollgate_store::testing::TestDatabase;
use tollgate_store::{KeyPatch, Limits, NewKey, NewTenant, Store, StoreError, TenantPatch, TenantStatus};

async fn open(db: &TestDatabase) -> Store {
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    // Migrations are idempotent.
    store.migrate().await.unwrap();
    store
}

fn new_tenant(id: &str) -> NewTenant {
    NewTenant {
        id: id.into(),
        display_name: format!("Tenant {id}"),
        metadata: json!({"team": "x"}),
        policy: tollgate_store::TenantPolicy {
            limits: Limits { rpm: Some(600), ..Limits::default() },
            max_output_tokens: Some(4096),
            ..Default::default()
        },
    }
}

fn new_key(id: &str, tenant: &str) -> NewKey {
    NewKey {
        id: id.into(),
        tenant_id: tenant.into(),
        name: "svc".into(),
        secret_hash: format!("hash-{id}"),
        expires_at: None,
        allowed_models: vec!["gemini-*".into()],
        limits: Limits { rpm: Some(60), ..Limits::default() },
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(&super::open(&tollgate_store::testing::TestDatabase::postgres().await).await).await; })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(&super::open(&tollgate_store::testing::TestDatabase::sqlite()).await).await; })*
        }
    };
}

contract!(
    tenants_are_created_listed_updated_and_paginated,
    duplicate_tenants_conflict,
    suspending_and_deleting_tenants,
    keys_lifecycle,
    rotation_links_keys_and_bounds_the_old_one,
    every_change_is_audited_newest_first,
    admin_tokens_lifecycle,
    touching_keys_records_last_use,
    usage_inserts_are_idempotent_and_roll_up,
    usage_events_page_newest_first_with_filters,
    retention_drops_old_usage_but_keeps_rollups,
    the_auth_fingerprint_moves_with_every_key_or_tenant_change_only,
    client_text_with_nul_characters_cannot_block_the_ledger,
    a_batch_partly_stored_already_adds_only_its_new_records,
    client_text_reads_back_exactly_whatever_it_holds,
    concurrent_changes_wait_for_each_other,
    usage_groups_by_utc_hour_within_the_days_asked,
    tenants_are_searched_by_text_and_status,
);

fn usage_event(id: &str, at: i64, tenant: &str, model: &str, cost: i64) -> tollgate_store::UsageEvent {
    tollgate_store::UsageEvent {
        id: id.into(),
        at,
        request_id: format!("req-{id}"),
        tenant_id: tenant.into(),
        key_id: format!("key-{tenant}"),
        endpoint: "/v1/chat/completions".into(),
        requested_model: model.into(),
        upstream_model: Some(model.into()),
        stream: true,
        prompt_tokens: 10,
        completion_tokens: 5,
        reasoning_tokens: 1,
        cached_tokens: 2,
        total_tokens: 15,
        billed_output_tokens: 5,
        cost_micros: cost,
        estimated: false,
        unpriced: false,
        modified: false,
        status: 200,
        error_class: None,
        latency_ms: 12,
        ttft_ms: Some(3),
        route: None,
        target: None,
        upstream: None,
        attempts: 1,
        cache_write_tokens: 0,
        api: "openai".into(),
    }
}

const DAY_MS: i64 = 86_400_000;
// 2026-03-01T12:00:00Z
const T0: i64 = 1_772_366_400_000;

async fn usage_inserts_are_idempotent_and_roll_up(store: &Store) {
    store.ensure_usage_partitions(T0, 3).await.unwrap();
    let mut events: Vec<_> = (0..5).map(|i| usage_event(&format!("e{i}"), T0 + i, "acme", "m1", 100)).collect();
    events.push(usage_event("e5", T0 + DAY_MS, "acme", "m2", 7));
    let mut failed = usage_event("e6", T0, "beta", "m1", 0);
    failed.status = 502;
    failed.error_class = Some("upstream:upstream_unavailable".into());
    events.push(failed);
    assert_eq!(store.insert_usage(&events).await.unwrap(), 7);
    // Replaying (a spool after an outage) inserts and counts nothing twice.
    assert_eq!(store.insert_usage(&events).await.unwrap(), 0);
    assert_eq!(store.count_usage_events().await.unwrap(), 7);
    let got = store.list_usage_events(&Default::default(), None, 100).await.unwrap();
    let e0 = got.iter().find(|e| e.id == "e0").unwrap();
    assert_eq!(e0, &events[0], "a record reads back exactly as written");

    let day0 = tollgate_store::usage::day_of(T0);
    let day1 = tollgate_store::usage::day_of(T0 + DAY_MS);
    let all = store.usage_totals(&day0, &day1, &Default::default(), &[]).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].requests, all[0].errors, all[0].cost_micros), (7, 1, 507));
    assert_eq!(all[0].prompt_tokens, 70);
    let by_model =
        store.usage_totals(&day0, &day1, &Default::default(), &[tollgate_store::GroupBy::Model]).await.unwrap();
    let models: Vec<(Option<String>, i64)> = by_model.iter().map(|t| (t.model.clone(), t.requests)).collect();
    assert_eq!(models, [(Some("m1".to_owned()), 6), (Some("m2".to_owned()), 1)]);
    let acme_by_day = store
        .usage_totals(
            &day0,
            &day1,
            &tollgate_store::UsageFilter { tenant_id: Some("acme".into()), ..Default::default() },
            &[tollgate_store::GroupBy::Day, tollgate_store::GroupBy::Tenant],
        )
        .await
        .unwrap();
    assert_eq!(acme_by_day.len(), 2);
    assert_eq!(acme_by_day[0].day.as_deref(), Some(day0.as_str()));
    assert_eq!(acme_by_day[0].cost_micros, 500);
}

async fn usage_events_page_newest_first_with_filters(store: &Store) {
    store.ensure_usage_partitions(T0, 1).await.unwrap();
    let events: Vec<_> = (0..5)
        .map(|i| usage_event(&format!("e{i}"), T0 + i, if i % 2 == 0 { "acme" } else { "beta" }, "m", 1))
        .collect();
    store.insert_usage(&events).await.unwrap();
    let page1 = store.list_usage_events(&Default::default(), None, 2).await.unwrap();
    assert_eq!(page1.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e4", "e3"]);
    let last = page1.last().unwrap();
    let page2 = store.list_usage_events(&Default::default(), Some((last.at, last.id.clone())), 2).await.unwrap();
    assert_eq!(page2.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e2", "e1"]);
    let acme = tollgate_store::UsageFilter { tenant_id: Some("acme".into()), ..Default::default() };
    let only = store.list_usage_events(&acme, None, 10).await.unwrap();
    assert_eq!(only.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e4", "e2", "e0"]);
    let window = tollgate_store::UsageFilter { from_ms: Some(T0 + 1), to_ms: Some(T0 + 3), ..Default::default() };
    assert_eq!(store.list_usage_events(&window, None, 10).await.unwrap().len(), 2);
}

async fn retention_drops_old_usage_but_keeps_rollups(store: &Store) {
    store.ensure_usage_partitions(T0, 3).await.unwrap();
    let events = vec![usage_event("old", T0, "acme", "m", 1), usage_event("new", T0 + 2 * DAY_MS, "acme", "m", 1)];
    store.insert_usage(&events).await.unwrap();
    store.drop_usage_before(tollgate_store::usage::day_start_ms(T0 + DAY_MS)).await.unwrap();
    let left = store.list_usage_events(&Default::default(), None, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["new"]);
    let day0 = tollgate_store::usage::day_of(T0);
    let totals = store.usage_totals(&day0, &day0, &Default::default(), &[]).await.unwrap();
    assert_eq!(totals[0].requests, 1, "rollups outlive the raw rows");
}

async fn tenants_are_created_listed_updated_and_paginated(store: &Store) {
    for id in ["acme", "beta", "gamma"] {
        store.create_tenant(&new_tenant(id), "bootstrap").await.unwrap();
    }
    let t = store.get_tenant("acme").await.unwrap();
    assert_eq!(t.status, TenantStatus::Active);
    assert_eq!(t.metadata, json!({"team": "x"}));

    let first = store.list_tenants(None, 2, &Default::default()).await.unwrap();
    assert_eq!(first.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["acme", "beta"]);
    let second = store.list_tenants(Some("beta"), 2, &Default::default()).await.unwrap();
    assert_eq!(second.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["gamma"]);

    assert_eq!(t.policy.max_output_tokens, Some(4096));
    assert_eq!(t.policy.limits.rpm, Some(600));
    let patch = TenantPatch { display_name: Some("ACME Corp".into()), metadata: None, policy: None };
    let updated = store.update_tenant("acme", &patch, "bootstrap").await.unwrap();
    assert_eq!(updated.display_name, "ACME Corp");
    assert_eq!(updated.metadata, json!({"team": "x"}), "unpatched fields are kept");
    assert_eq!(updated.policy, t.policy);
    assert!(updated.updated_at >= t.updated_at);

    assert!(matches!(store.get_tenant("nope").await, Err(StoreError::NotFound)));
}

async fn duplicate_tenants_conflict(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    let err = store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

async fn suspending_and_deleting_tenants(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    store.create_key(&new_key("k1", "acme"), "bootstrap").await.unwrap();
    store.create_key(&new_key("k2", "acme"), "bootstrap").await.unwrap();

    let s = store.set_tenant_status("acme", TenantStatus::Suspended, "bootstrap").await.unwrap();
    assert_eq!(s.status, TenantStatus::Suspended);
    let r = store.set_tenant_status("acme", TenantStatus::Active, "bootstrap").await.unwrap();
    assert_eq!(r.status, TenantStatus::Active);

    let d = store.delete_tenant("acme", "bootstrap").await.unwrap();
    assert_eq!(d.status, TenantStatus::Deleted);
    assert!(matches!(store.get_tenant("acme").await, Err(StoreError::NotFound)));
    assert!(store.list_tenants(None, 10, &Default::default()).await.unwrap().is_empty());
    for k in ["k1", "k2"] {
        assert!(store.get_key(k).await.unwrap().revoked_at.is_some(), "{k} revoked with its tenant");
    }
    assert!(store.all_live_keys().await.unwrap().is_empty());
    // A deleted tenant gets no new keys.
    assert!(matches!(store.create_key(&new_key("k3", "acme"), "bootstrap").await, Err(StoreError::NotFound)));
}

async fn keys_lifecycle(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    store.create_tenant(&new_tenant("beta"), "bootstrap").await.unwrap();
    let k = store.create_key(&new_key("k1", "acme"), "bootstrap").await.unwrap();
    assert_eq!(k.allowed_models, vec!["gemini-*".to_owned()]);
    assert_eq!(k.limits.rpm, Some(60));
    assert_eq!(k.secret_hash, "hash-k1");
    store.create_key(&new_key("k2", "beta"), "bootstrap").await.unwrap();
    assert!(matches!(store.create_key(&new_key("k1", "beta"), "bootstrap").await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.create_key(&new_key("k9", "nope"), "bootstrap").await, Err(StoreError::NotFound)));

    let acme_keys = store.list_keys("acme", None, 10).await.unwrap();
    assert_eq!(acme_keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k1"], "tenant isolation");

    let expiry = Utc::now() + Duration::hours(1);
    let patch = KeyPatch {
        name: Some("renamed".into()),
        expires_at: Some(Some(expiry)),
        allowed_models: Some(vec![]),
        limits: Some(Limits::default()),
    };
    let u = store.update_key("k1", &patch, "bootstrap").await.unwrap();
    assert_eq!(u.name, "renamed");
    assert_eq!(u.expires_at.map(|t| t.timestamp_millis()), Some(expiry.timestamp_millis()));
    assert!(u.allowed_models.is_empty());
    let cleared =
        store.update_key("k1", &KeyPatch { expires_at: Some(None), ..KeyPatch::default() }, "x").await.unwrap();
    assert_eq!(cleared.expires_at, None);
    assert_eq!(cleared.name, "renamed");

    let r = store.revoke_key("k1", "bootstrap").await.unwrap();
    assert!(r.revoked_at.is_some());
    let again = store.revoke_key("k1", "bootstrap").await.unwrap();
    assert_eq!(again.revoked_at, r.revoked_at, "revoking twice keeps the first time");
    let live: Vec<String> = store.all_live_keys().await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(live, ["k2"]);
}

async fn rotation_links_keys_and_bounds_the_old_one(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    store.create_key(&new_key("old", "acme"), "bootstrap").await.unwrap();
    let deadline = Utc::now() + Duration::minutes(10);
    let (old, new) = store.rotate_key("old", &new_key("new", "acme"), deadline, "bootstrap").await.unwrap();
    assert_eq!(old.rotated_to.as_deref(), Some("new"));
    assert_eq!(new.rotated_from.as_deref(), Some("old"));
    assert_eq!(old.expires_at.map(|t| t.timestamp_millis()), Some(deadline.timestamp_millis()));
    assert!(old.revoked_at.is_none());
    assert!(matches!(
        store.rotate_key("old", &new_key("newer", "acme"), deadline, "bootstrap").await,
        Err(StoreError::Conflict(_))
    ));
    // An earlier expiry is kept: rotation never extends a key's life.
    let soon = Utc::now() + Duration::minutes(1);
    store.update_key("new", &KeyPatch { expires_at: Some(Some(soon)), ..KeyPatch::default() }, "x").await.unwrap();
    let (bounded, _) =
        store.rotate_key("new", &new_key("third", "acme"), Utc::now() + Duration::hours(5), "x").await.unwrap();
    assert_eq!(bounded.expires_at.map(|t| t.timestamp_millis()), Some(soon.timestamp_millis()));
    store.revoke_key("third", "x").await.unwrap();
    assert!(matches!(
        store.rotate_key("third", &new_key("fourth", "acme"), deadline, "x").await,
        Err(StoreError::Conflict(_))
    ));
}

async fn every_change_is_audited_newest_first(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "admin-1").await.unwrap();
    store.create_key(&new_key("k1", "acme"), "admin-2").await.unwrap();
    store.revoke_key("k1", "admin-2").await.unwrap();
    let entries = store.list_audit(None, 10).await.unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["key.revoke", "key.create", "tenant.create"]);
    assert_eq!(entries[2].actor, "admin-1");
    assert_eq!(entries[1].target_id, "k1");
    let older = store.list_audit(Some(entries[1].id), 10).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].action, "tenant.create");
}

async fn admin_tokens_lifecycle(store: &Store) {
    let t = store.create_admin_token("a1", "ops", "h1", "bootstrap").await.unwrap();
    assert_eq!(t.name, "ops");
    assert_eq!(store.list_admin_tokens().await.unwrap().len(), 1);
    let r = store.revoke_admin_token("a1", "bootstrap").await.unwrap();
    assert!(r.revoked_at.is_some());
    assert!(matches!(store.revoke_admin_token("zz", "bootstrap").await, Err(StoreError::NotFound)));
}

async fn touching_keys_records_last_use(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    store.create_key(&new_key("k1", "acme"), "bootstrap").await.unwrap();
    let at = Utc::now();
    store.touch_keys(&["k1".to_owned(), "missing".to_owned()], at).await.unwrap();
    let k = store.get_key("k1").await.unwrap();
    assert_eq!(k.last_used_at.map(|t| t.timestamp_millis()), Some(at.timestamp_millis()));
    // An older touch never moves it back.
    store.touch_keys(&["k1".to_owned()], at - Duration::hours(1)).await.unwrap();
    assert_eq!(store.get_key("k1").await.unwrap().last_used_at, k.last_used_at);
}

async fn the_auth_fingerprint_moves_with_every_key_or_tenant_change_only(store: &Store) {
    let empty = store.auth_fingerprint().await.unwrap();
    store.create_tenant(&new_tenant("acme"), "bootstrap").await.unwrap();
    let with_tenant = store.auth_fingerprint().await.unwrap();
    assert_ne!(with_tenant, empty);
    store.create_key(&new_key("k1", "acme"), "bootstrap").await.unwrap();
    let with_key = store.auth_fingerprint().await.unwrap();
    assert_ne!(with_key, with_tenant);
    assert_eq!(store.auth_fingerprint().await.unwrap(), with_key, "stable while nothing changes");
    // Last-use times are not part of what a cache holds.
    store.touch_keys(&["k1".to_owned()], Utc::now()).await.unwrap();
    assert_eq!(store.auth_fingerprint().await.unwrap(), with_key);
    // updated_at is in milliseconds: the revocation must land in a later one
    // than the key's creation, or the sum could not move.
    let created = store.get_key("k1").await.unwrap().updated_at;
    while Utc::now().timestamp_millis() <= created.timestamp_millis() {
        tokio::task::yield_now().await;
    }
    store.revoke_key("k1", "bootstrap").await.unwrap();
    assert_ne!(store.auth_fingerprint().await.unwrap(), with_key, "a revocation moves it");
}

/// Model names come from client JSON, where `\u0000` is legal; Postgres text
/// cannot hold NUL. A record with one must still be stored (else its batch
/// would be spooled and replayed forever, holding back every later record).
async fn client_text_with_nul_characters_cannot_block_the_ledger(store: &Store) {
    store.ensure_usage_partitions(T0, 1).await.unwrap();
    let mut odd = usage_event("nul", T0, "acme", "gpt\u{0}4", 10);
    odd.upstream_model = Some("up\u{0}stream".into());
    let fine = usage_event("fine", T0 + 1, "acme", "m1", 5);
    assert_eq!(store.insert_usage(&[odd, fine]).await.unwrap(), 2);
    let page = store.list_usage_events(&Default::default(), None, 10).await.unwrap();
    let stored = page.iter().find(|e| e.id == "nul").unwrap();
    assert_eq!(stored.requested_model, "gpt\u{fffd}4");
    assert_eq!(stored.upstream_model.as_deref(), Some("up\u{fffd}stream"));
}

/// A replay after a write whose outcome was unknown can hold records that
/// did reach the database and records that did not: the new ones are stored
/// and rolled up, the known ones neither stored nor counted twice.
async fn a_batch_partly_stored_already_adds_only_its_new_records(store: &Store) {
    store.ensure_usage_partitions(T0, 1).await.unwrap();
    let first: Vec<_> = (0..3).map(|i| usage_event(&format!("e{i}"), T0 + i, "acme", "m1", 100)).collect();
    assert_eq!(store.insert_usage(&first).await.unwrap(), 3);
    let mut replay = first.clone();
    replay.extend((3..5).map(|i| usage_event(&format!("e{i}"), T0 + i, "acme", "m1", 10)));
    let mut failed = usage_event("e5", T0 + 5, "acme", "m2", 0);
    failed.status = 429;
    replay.push(failed);
    assert_eq!(store.insert_usage(&replay).await.unwrap(), 3, "the three new records");
    assert_eq!(store.count_usage_events().await.unwrap(), 6);
    let day = tollgate_store::usage::day_of(T0);
    let by_model =
        store.usage_totals(&day, &day, &Default::default(), &[tollgate_store::GroupBy::Model]).await.unwrap();
    let got: Vec<(Option<String>, i64, i64, i64, i64)> =
        by_model.iter().map(|t| (t.model.clone(), t.requests, t.errors, t.cost_micros, t.prompt_tokens)).collect();
    assert_eq!(got, [(Some("m1".to_owned()), 5, 0, 320, 50), (Some("m2".to_owned()), 1, 1, 0, 10)]);
}

/// Ids, models and error classes pass through from clients and upstreams:
/// tabs, newlines, backslashes, quotes and non-ASCII text are stored as they
/// are (the bulk write path has its own escaping to get right).
async fn client_text_reads_back_exactly_whatever_it_holds(store: &Store) {
    store.ensure_usage_partitions(T0, 1).await.unwrap();
    let mut odd = usage_event("odd", T0, "acme", "tab\there\\N\\", 10);
    odd.request_id = "line\nbreak\r\n\\N \"quoted\" 'single' \u{e9}\u{1f600}".into();
    odd.upstream_model = Some("\\N".into());
    odd.error_class = Some("client:bad_request\\".into());
    odd.ttft_ms = None;
    odd.route = Some(",;|".into());
    assert_eq!(store.insert_usage(std::slice::from_ref(&odd)).await.unwrap(), 1);
    let page = store.list_usage_events(&Default::default(), None, 10).await.unwrap();
    assert_eq!(page, [odd.clone()]);
    let day = tollgate_store::usage::day_of(T0);
    let by_model =
        store.usage_totals(&day, &day, &Default::default(), &[tollgate_store::GroupBy::Model]).await.unwrap();
    assert_eq!(by_model[0].model.as_deref(), Some(odd.requested_model.as_str()));
}

/// Each change reads, then writes, in one transaction. On SQLite a deferred
/// transaction whose read predates another's commit cannot take the write
/// lock and fails at once ("database is locked"): two admin calls at the
/// same moment were enough. Changes must queue instead.
async fn concurrent_changes_wait_for_each_other(store: &Store) {
    store.create_tenant(&new_tenant("acme"), "test").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.create_key(&new_key(&format!("k{i}"), "acme"), "test").await?;
            store.create_tenant(&new_tenant(&format!("t{i}")), "test").await?;
            store.revoke_key(&format!("k{i}"), "test").await.map(|_| ())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.list_keys("acme", None, 100).await.unwrap().len(), 16);
}

async fn usage_groups_by_utc_hour_within_the_days_asked(store: &Store) {
    use tollgate_store::GroupBy;
    store.ensure_usage_partitions(T0 - DAY_MS, 4).await.unwrap();
    const MINUTE: i64 = 60_000;
    let events = vec![
        usage_event("h0", T0 - 2 * 60 * MINUTE + 15 * MINUTE, "acme", "m1", 10), // 10:15
        usage_event("h1", T0 - 2 * 60 * MINUTE + 45 * MINUTE, "acme", "m2", 20), // 10:45
        usage_event("h2", T0 + 65 * MINUTE, "acme", "m1", 40),                   // 13:05
        usage_event("h3", T0 + 12 * 60 * MINUTE + 30 * MINUTE, "beta", "m1", 80), // next day 00:30
        usage_event("h4", T0 - DAY_MS, "acme", "m1", 1_000),                     // the day before
    ];
    store.insert_usage(&events).await.unwrap();
    let day0 = tollgate_store::usage::day_of(T0);
    let day1 = tollgate_store::usage::day_of(T0 + DAY_MS);
    let hours = store.usage_totals(&day0, &day1, &Default::default(), &[GroupBy::Hour]).await.unwrap();
    let got: Vec<(String, i64, i64)> =
        hours.iter().map(|t| (t.hour.clone().unwrap(), t.requests, t.cost_micros)).collect();
    assert_eq!(
        got,
        [
            ("2026-03-01T10:00".to_owned(), 2, 30),
            ("2026-03-01T13:00".to_owned(), 1, 40),
            ("2026-03-02T00:00".to_owned(), 1, 80),
        ],
        "UTC hours, in order, the day before left out"
    );
    let by_model =
        store.usage_totals(&day0, &day0, &Default::default(), &[GroupBy::Hour, GroupBy::Model]).await.unwrap();
    let got: Vec<(String, String, i64)> =
        by_model.iter().map(|t| (t.hour.clone().unwrap(), t.model.clone().unwrap(), t.requests)).collect();
    assert_eq!(
        got,
        [
            ("2026-03-01T10:00".to_owned(), "m1".to_owned(), 1),
            ("2026-03-01T10:00".to_owned(), "m2".to_owned(), 1),
            ("2026-03-01T13:00".to_owned(), "m1".to_owned(), 1),
        ]
    );
    let filter = tollgate_store::UsageFilter { tenant_id: Some("beta".into()), ..Default::default() };
    let beta = store.usage_totals(&day0, &day1, &filter, &[GroupBy::Hour]).await.unwrap();
    assert_eq!(beta.len(), 1);
    assert_eq!(beta[0].hour.as_deref(), Some("2026-03-02T00:00"));
}

async fn tenants_are_searched_by_text_and_status(store: &Store) {
    use tollgate_store::{TenantSearch, TenantStatus};
    for (id, name) in [("alpha", "Alpha Team"), ("beta", "Payments 50%_off"), ("gamma", "gamma TEAM")] {
        store
            .create_tenant(
                &NewTenant {
                    id: id.into(),
                    display_name: name.into(),
                    metadata: json!({}),
                    policy: Default::default(),
                },
                "test",
            )
            .await
            .unwrap();
    }
    store.set_tenant_status("gamma", TenantStatus::Suspended, "test").await.unwrap();
    let ids = |tenants: Vec<tollgate_store::Tenant>| tenants.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let search = |text: &str, status: Option<TenantStatus>| TenantSearch { text: Some(text.into()), status };
    assert_eq!(ids(store.list_tenants(None, 10, &search("team", None)).await.unwrap()), ["alpha", "gamma"]);
    assert_eq!(ids(store.list_tenants(None, 10, &search("ALP", None)).await.unwrap()), ["alpha"]);
    assert_eq!(ids(store.list_tenants(None, 10, &search("%_", None)).await.unwrap()), ["beta"]);
    assert_eq!(ids(store.list_tenants(None, 10, &search("_", None)).await.unwrap()), ["beta"], "_ matches only itself");
    assert!(store.list_tenants(None, 10, &search("team", Some(TenantStatus::Active))).await.unwrap().len() == 1);
    let suspended = TenantSearch { text: None, status: Some(TenantStatus::Suspended) };
    assert_eq!(ids(store.list_tenants(None, 10, &suspended).await.unwrap()), ["gamma"]);
    assert_eq!(ids(store.list_tenants(Some("alpha"), 10, &search("team", None)).await.unwrap()), ["gamma"], "pages on");
}
