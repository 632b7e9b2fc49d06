//! The database goes away during traffic and comes back: traffic keeps
//! flowing and the ledger ends with exactly one record per request served.

use std::time::Duration;

use crate::helpers::{
    CuttableLink, Db, PATIENCE, TestGateway, scraped_value, service_addr, through, wait_for, wait_until,
};
use reqwest::Method;
use serde_json::json;

/// A gateway whose database is reached through a link the test can cut,
/// with a short write timeout so a cut shows within the test's patience.
async fn gateway_over_a_cuttable_link(
    configure: impl FnOnce(&mut tollgate_gateway::config::Config),
) -> (tollgate_store::testing::TestDatabase, CuttableLink, TestGateway) {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let link = CuttableLink::start(service_addr(&db.url, 5432).await).await;
    let via_link = through(&db.url, link.addr);
    assert_ne!(via_link, db.url, "the test database URL goes through the link");
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let gw = TestGateway::start_full(fake, Db::Url(via_link), |c| {
        c.accounting.write_timeout = Duration::from_millis(500);
        configure(c);
    })
    .await;
    (db, link, gw)
}

/// Waits for the ledger to hold a record for each of the `served`
/// requests, and checks it holds no more.
async fn assert_one_record_per_request(db: &tollgate_store::testing::TestDatabase, served: i64) {
    let store = tollgate_store::Store::connect(&db.url, 2).await.unwrap();
    let count = wait_for("a record for every request served", PATIENCE, async || {
        let count = store.count_usage_events().await.unwrap();
        (count >= served).then_some(count)
    })
    .await;
    assert_eq!(count, served, "exactly one record per request served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_no_usage_record_and_no_request() {
    let (db, link, gw) = gateway_over_a_cuttable_link(|c| c.auth.refresh_interval = Duration::from_millis(200)).await;

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
    // The writer's batch times out (write_timeout) and goes to the spool.
    let spool_dir = gw.data_dir().join("spool");
    let what = "a failed write counted, records in the spool, and the spool's size exported";
    wait_until(what, PATIENCE, async || {
        let spooled: u64 = std::fs::read_dir(&spool_dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        let failures = scraped_value(&metrics, "tollgate_ledger_write_failures_total").unwrap();
        let exported = scraped_value(&metrics, "tollgate_ledger_spool_bytes").unwrap();
        failures >= 1.0 && spooled > 0 && exported == spooled as f64
    })
    .await;
    send(20).await;
    link.restore().await;
    send(20).await;

    assert_one_record_per_request(&db, served).await;
    let (_, summary) = gw.admin(Method::GET, "/admin/v1/usage/summary", None).await;
    assert_eq!(summary["data"][0]["requests"], served, "rollups count each record once");
    println!("40 requests served in {during_outage:?} while the database was unreachable");
    assert!(during_outage < Duration::from_secs(10), "the outage did not stall traffic: {during_outage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_records_are_replayed_while_traffic_keeps_flowing() {
    let (db, link, gw) =
        gateway_over_a_cuttable_link(|c| c.accounting.flush_interval = Duration::from_millis(20)).await;
    let chat = json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]});
    let send = async |n: usize| {
        for _ in 0..n {
            let response = gw.http.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
        n
    };
    let mut served = send(10).await;
    link.cut();
    served += send(20).await;
    let spool_bytes = async || {
        let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        scraped_value(&metrics, "tollgate_ledger_spool_bytes").unwrap()
    };
    wait_until("records in the spool", PATIENCE, async || spool_bytes().await > 0.0).await;
    link.restore().await;

    // Two clients keep sending while the spool is replayed: the replay
    // must not wait for the traffic to stop (the writer replays a segment
    // at each turn that finds the spool holding records).
    let flowing = std::sync::atomic::AtomicBool::new(true);
    let drained = async {
        wait_until("the spool replayed while requests keep coming", PATIENCE, async || spool_bytes().await == 0.0)
            .await;
        flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    };
    let clients = (0..2).map(|_| async {
        let mut sent = 0;
        while flowing.load(std::sync::atomic::Ordering::Relaxed) {
            sent += send(1).await;
        }
        sent
    });
    let replaying = std::time::Instant::now();
    let (sent, ()) = tokio::join!(futures_util::future::join_all(clients), drained);
    served += sent.iter().sum::<usize>();
    println!(
        "the spool was replayed in {:?}, while {} requests were served",
        replaying.elapsed(),
        sent.iter().sum::<usize>()
    );

    let served = i64::try_from(served).unwrap();
    assert_one_record_per_request(&db, served).await;
}
