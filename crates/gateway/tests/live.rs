//! Opt-in: the real CometAPI through the gateway. Runs only when
//! `COMETAPI_KEY` is set (`COMETAPI_KEY=sk-... cargo test -p tollgate-gateway --test live`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::sync::oneshot;
use tollgate_gateway::{Application, Config};

#[tokio::test]
async fn chat_and_streaming_work_against_the_real_cometapi() {
    if std::env::var_os("COMETAPI_KEY").is_none() {
        eprintln!("SKIPPED: set COMETAPI_KEY to run the live CometAPI test");
        return;
    }
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let app = Application::build(config).await.unwrap();
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/chat/completions");

    let body = r#"{"model":"gemini-2.5-flash-lite","max_tokens":16,"messages":[{"role":"user","content":"Say OK"}]}"#;
    let response = http.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert!(answer["choices"][0]["message"].is_object(), "{answer}");

    let body = r#"{"model":"gemini-2.5-flash-lite","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"Say OK"}]}"#;
    let text = http.post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
    let text = text.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");

    let models = http.get(format!("http://{addr}/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 200);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
