//! The database goes away during traffic and comes back: traffic keeps
//! flowing and the ledger ends with exactly one record per request served.

use std::time::Duration;

use crate::helpers::{CuttableLink, Db, TestGateway};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_no_usage_record_and_no_request() {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let link = CuttableLink::start("127.0.0.1:5432".parse().unwrap()).await;
    let via_link = db.url.replace("127.0.0.1:5432", &link.addr.to_string());
    assert_ne!(via_link, db.url, "the test database URL goes through the link");
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let gw = TestGateway::start_full(fake, Db::Url(via_link), |c| {
        c.accounting.write_timeout = Duration::from_millis(500);
        c.auth.refresh_interval = Duration::from_millis(200);
    })
    .await;

    let chat = json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]});
    let stream = json!({"model": "gemini-2.5-flash", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut served = 0;
    let mut send = async |n: usize| {
        for i in 0..n {
            let body = if i % 2 == 0 { &chat } else { &stream };
            let response = gw.http.post(gw.url("/v1/chat/completions")).json(body).send().await.unwrap();
            assert_eq!(response.status(), 200, "traffic keeps flowing");
            response.bytes().await.unwrap();
            served += 1;
        }
    };
    send(20).await;
    link.cut();
    let started = std::time::Instant::now();
    send(40).await;
    let during_outage = started.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let spooled: u64 =
        std::fs::read_dir(gw.data_dir().join("spool")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(spooled > 0, "records waited in the spool during the outage");
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("tollgate_ledger_write_failures_total ") >= 1.0, "failed writes are counted");
    assert_eq!(value("tollgate_ledger_spool_bytes ") as u64, spooled, "the spool size is exported");
    send(20).await;
    link.restore().await;
    send(20).await;

    let store = tollgate_store::Store::connect(&db.url, 2).await.unwrap();
    let mut count = 0;
    for _ in 0..200 {
        count = store.count_usage_events().await.unwrap();
        if count == served {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count, served, "exactly one record per request served");
    let (_, summary) = gw.admin(Method::GET, "/admin/v1/usage/summary", None).await;
    assert_eq!(summary["data"][0]["requests"], served, "rollups count each record once");
    println!("40 requests served in {during_outage:?} while the database was unreachable");
    assert!(during_outage < Duration::from_secs(10), "the outage did not stall traffic: {during_outage:?}");
}
