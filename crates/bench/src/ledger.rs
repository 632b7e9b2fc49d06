//! Ledger write throughput: usage records through the gateway's own ledger
//! (channel, batching writer, Postgres with partitions and rollups) into a
//! fresh database, timed until every record is stored; and, as the
//! reference, Postgres's own `COPY` of the same rows into the same table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tollgate_gateway::accounting::ledger::{Ledger, LedgerSettings, Writer};
use tollgate_gateway::accounting::spool::Spool;
use tollgate_store::{Store, UsageEvent};

use crate::stack::BenchDb;

/// Records per second from the first `record` to the last row stored.
pub async fn throughput(server: &str, records: usize) -> anyhow::Result<f64> {
    let db = BenchDb::create(server, "ledger").await?;
    let result = run(&db, records).await;
    db.drop_now().await;
    result
}

async fn run(db: &BenchDb, records: usize) -> anyhow::Result<f64> {
    let store = Store::connect(&db.url, 10).await?;
    store.migrate().await?;
    let spool_dir = tempfile::tempdir()?;
    let spool = Arc::new(Spool::open(spool_dir.path(), 1 << 30)?);
    let (ledger, rx) = Ledger::new(spool);
    // The gateway's defaults.
    let defaults = tollgate_gateway::config::AccountingConfig::default();
    let settings = LedgerSettings {
        batch_size: defaults.batch_size,
        flush_interval: defaults.flush_interval,
        write_timeout: defaults.write_timeout,
        retry_interval: Duration::from_secs(1),
    };
    let cancel = CancellationToken::new();
    let writer = tokio::spawn(Writer::new(&ledger, store.clone(), settings).run(rx, cancel.clone()));
    let events: Vec<UsageEvent> = (0..records).map(event).collect();

    let started = Instant::now();
    for e in events {
        ledger.record(e);
        // The channel holds 100,000; beyond that the ledger spools, which is
        // not what this measures. Real traffic arrives no faster than this.
        while ledger.queue_depth() > 50_000 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stored = store.count_usage_events().await?;
        if usize::try_from(stored).unwrap_or(0) >= records {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {stored} of {records} records stored after 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    writer.await.context("the ledger writer")?;
    anyhow::ensure!(ledger.spool().is_empty(), "records went to the spool: the database refused writes");
    store.close().await;
    Ok(records as f64 / elapsed.as_secs_f64())
}

/// Rows per second Postgres itself takes for the same records, as the
/// reference for the ledger's rate: one `COPY` of identical rows (text
/// format, made beforehand) into `usage_events` of a fresh database, with
/// no rollups, no conflict check and no batching.
pub async fn copy_reference(server: &str, records: usize) -> anyhow::Result<f64> {
    let db = BenchDb::create(server, "ledger_copy").await?;
    let result = copy_rows(&db, records).await;
    db.drop_now().await;
    result
}

async fn copy_rows(db: &BenchDb, records: usize) -> anyhow::Result<f64> {
    use sqlx::Connection;
    let store = Store::connect(&db.url, 1).await?;
    store.migrate().await?;
    store.close().await;
    let mut text = String::with_capacity(records * 300);
    for i in 0..records {
        copy_line(&mut text, &event(i));
    }
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let statement = format!("COPY usage_events ({}) FROM STDIN", tollgate_store::usage::COLUMNS);
    let started = Instant::now();
    let mut copy = conn.copy_in_raw(&statement).await?;
    for chunk in text.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    let rows = copy.finish().await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(usize::try_from(rows)? == records, "COPY stored {rows} of {records} rows");
    conn.close().await?;
    Ok(records as f64 / elapsed.as_secs_f64())
}

/// One row of `COPY … FROM STDIN` (text format) in `COLUMNS` order. The
/// benchmark's own records hold no tab, newline or backslash, so values go
/// unescaped; a column added to `COLUMNS` but not here fails the COPY.
fn copy_line(out: &mut String, e: &UsageEvent) {
    use std::fmt::Write;
    let text = |v: Option<&str>| v.map_or_else(|| "\\N".to_owned(), str::to_owned);
    let number = |v: Option<i64>| v.map_or_else(|| "\\N".to_owned(), |n| n.to_string());
    let fields = [
        e.id.clone(),
        e.at.to_string(),
        e.day(),
        e.request_id.clone(),
        e.tenant_id.clone(),
        e.key_id.clone(),
        e.endpoint.clone(),
        e.requested_model.clone(),
        text(e.upstream_model.as_deref()),
        i32::from(e.stream).to_string(),
        e.prompt_tokens.to_string(),
        e.completion_tokens.to_string(),
        e.reasoning_tokens.to_string(),
        e.cached_tokens.to_string(),
        e.total_tokens.to_string(),
        e.billed_output_tokens.to_string(),
        e.cost_micros.to_string(),
        i32::from(e.estimated).to_string(),
        i32::from(e.unpriced).to_string(),
        i32::from(e.modified).to_string(),
        e.status.to_string(),
        text(e.error_class.as_deref()),
        e.latency_ms.to_string(),
        number(e.ttft_ms),
        text(e.route.as_deref()),
        text(e.target.as_deref()),
        text(e.upstream.as_deref()),
        e.attempts.to_string(),
        e.api.to_string(),
        e.cache_write_tokens.to_string(),
    ];
    let _ = writeln!(out, "{}", fields.join("\t"));
}

/// A record shaped like a real chat completion's, spread over a few
/// tenants, keys and models so rollups see several groups.
fn event(i: usize) -> UsageEvent {
    let now = chrono::Utc::now().timestamp_millis();
    UsageEvent {
        id: uuid::Uuid::now_v7().simple().to_string(),
        at: now,
        request_id: format!("req-{i}"),
        tenant_id: format!("tenant-{}", i % 10),
        key_id: format!("key{:09}", i % 100),
        endpoint: "/v1/chat/completions".to_owned(),
        requested_model: ["gpt-4.1-mini", "gpt-4.1", "gemini-2.5-flash"][i % 3].to_owned(),
        upstream_model: Some("gpt-4.1-mini-2025-04-14".to_owned()),
        stream: i.is_multiple_of(2),
        prompt_tokens: 120,
        completion_tokens: 380,
        reasoning_tokens: 0,
        cached_tokens: 0,
        total_tokens: 500,
        billed_output_tokens: 380,
        cost_micros: 656,
        estimated: false,
        unpriced: false,
        modified: false,
        status: 200,
        error_class: None,
        latency_ms: 840,
        ttft_ms: Some(210),
        route: None,
        target: None,
        upstream: None,
        attempts: 1,
        cache_write_tokens: 0,
        api: "openai".into(),
    }
}
