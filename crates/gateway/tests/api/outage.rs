//! The database goes away during traffic and comes back: traffic keeps
//! flowing and the ledger ends with exactly one record per request served.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{Db, TestGateway};

/// A TCP forwarder to Postgres that the test can cut and restore, so the
/// database becomes unreachable for this gateway only.
struct CuttableLink {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CuttableLink {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = Self { addr: listener.local_addr().unwrap(), target, tasks: Arc::default() };
        link.serve(listener);
        link
    }

    fn serve(&self, listener: TcpListener) {
        let tasks = self.tasks.clone();
        let target = self.target;
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stops accepting and kills every open connection.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    async fn restore(&self) {
        let mut listener = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        self.serve(listener.expect("the link's port can be bound again"));
    }
}

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
