//! OpenTelemetry traces, exported to a real OTLP receiver over gRPC and
//! HTTP/protobuf: the spans of a streamed request, of one that retried and
//! fell back, and of refused ones; the caller's trace continued and sent
//! upstream; sampling; and a collector that is down or slow changing
//! nothing for clients.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tollgate_fake_upstream::{ErrorStyle, FakeUpstream, Fault, Scenario};
use tollgate_gateway::Config;
use tollgate_gateway::routing::config::{BreakerConfig, GroupConfig, Overrides, RetryOn, RouteConfig, TargetConfig};
use tollgate_gateway::telemetry::traces::config::{ExportHeader, OtlpConfig, OtlpProtocol};
use tollgate_otlp_sink::{Sink, Span, Transport};

use crate::helpers::{PATIENCE, TestGateway, scraped_value, wait_until};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_UNSET: i32 = 0;
const STATUS_ERROR: i32 = 2;

fn export_to(sink: &Sink) -> OtlpConfig {
    let protocol = match sink.transport() {
        Transport::Grpc => OtlpProtocol::Grpc,
        Transport::HttpProtobuf => OtlpProtocol::HttpProtobuf,
    };
    let mut otlp = OtlpConfig::new(sink.endpoint(), protocol);
    otlp.export_interval = Duration::from_millis(20);
    otlp.resource_attributes.insert("deployment.environment".to_owned(), "test".to_owned());
    otlp
}

async fn traced_gateway(sink: &Sink) -> TestGateway {
    gateway_exporting(export_to(sink)).await
}

async fn gateway_exporting(otlp: OtlpConfig) -> TestGateway {
    TestGateway::start_with(move |c: &mut Config| c.telemetry.otlp = Some(otlp)).await
}

/// One plain chat completion, answered.
async fn chat(gw: &TestGateway) {
    let response = gw.post_json("/v1/chat/completions", r#"{"model":"gpt-4.1","messages":[]}"#).await;
    assert_eq!(response.status(), 200);
}

/// The spans of the trace `trace_id`, once its server span and `more`
/// other spans have arrived.
async fn trace_of(sink: &Sink, trace_id: &str, more: usize) -> Vec<Span> {
    let spans = sink
        .wait_for(PATIENCE, |spans| {
            let of_trace: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
            of_trace.iter().any(|s| s.kind == SERVER) && of_trace.len() > more
        })
        .await;
    spans.into_iter().filter(|s| s.trace_id == trace_id).collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
}

fn server_span(spans: &[Span]) -> &Span {
    spans.iter().find(|s| s.kind == SERVER).unwrap_or_else(|| panic!("no server span in {spans:#?}"))
}

fn caller_traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

#[tokio::test]
async fn a_streamed_request_continues_the_callers_trace_with_a_span_per_stage() {
    let sink = Sink::start(Transport::Grpc).await.unwrap();
    let gw = traced_gateway(&sink).await;
    // A budget, so admission has its budget check to show.
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "5"})))
        .await;
    assert_eq!(status, 201);
    let body = json!({"model": "gemini-2.5-flash", "stream": true, "messages": [{"role": "user", "content": "secret prompt"}]});
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", caller_traceparent())
        .header("tracestate", "vendor=opaque")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");

    // The server span, admission, the attempt and the relay.
    let spans = trace_of(&sink, CALLER_TRACE, 3).await;
    let server = server_span(&spans);
    assert_eq!(server.name, "POST /v1/chat/completions");
    assert_eq!(server.parent_span_id, CALLER_SPAN, "the caller's span is the parent");
    assert_eq!(server.str_attr("http.route"), Some("/v1/chat/completions"));
    assert_eq!(server.int_attr("http.response.status_code"), Some(200));
    assert_eq!(server.str_attr("tollgate.tenant.id"), Some("test"));
    assert_eq!(server.str_attr("tollgate.request_id"), Some(request_id.as_str()));
    assert_eq!(server.str_attr("gen_ai.request.model"), Some("gemini-2.5-flash"));
    assert!(server.str_attr("tollgate.key.id").is_some_and(|id| !id.is_empty() && id != gw.key));
    assert_eq!(server.resource.get("service.name").and_then(|v| v.as_str()), Some("tollgate"));
    assert_eq!(server.resource.get("deployment.environment").and_then(|v| v.as_str()), Some("test"));

    // The usage on the span is the ledger's, to the token and micro-dollar.
    let record = crate::accounting::ledger_record(&gw, &request_id).await;
    assert_eq!(server.int_attr("gen_ai.usage.input_tokens"), record["prompt_tokens"].as_i64());
    assert_eq!(server.int_attr("gen_ai.usage.output_tokens"), record["billed_output_tokens"].as_i64());
    assert_eq!(server.int_attr("tollgate.cost_micros"), record["cost_micros"].as_i64());
    assert!(server.int_attr("tollgate.cost_micros").unwrap() > 0);
    assert_eq!(server.attr("tollgate.stream").and_then(|v| v.as_bool()), Some(true));
    assert_eq!(server.attr("tollgate.usage.estimated").and_then(|v| v.as_bool()), Some(false));

    let admission = named(&spans, "admission");
    assert_eq!(admission.parent_span_id, server.span_id);
    assert_eq!(admission.str_attr("tollgate.admission.result"), Some("admitted"));
    assert_eq!(admission.status_code, STATUS_UNSET);
    // The checks are the admission span's attributes, not spans of their own.
    assert_eq!(admission.int_attr("tollgate.budgets"), Some(1));
    assert!(admission.int_attr("tollgate.budgets.worst_case_micros").unwrap() > 0);
    assert!(admission.attr("error.type").is_none());
    assert!(spans.iter().all(|s| s.parent_span_id != admission.span_id), "{spans:#?}");
    assert_eq!(spans.len(), 4, "{spans:#?}");

    let attempt = named(&spans, "chat gemini-2.5-flash");
    assert_eq!(attempt.kind, CLIENT);
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(attempt.str_attr("gen_ai.operation.name"), Some("chat"));
    assert_eq!(attempt.str_attr("tollgate.upstream"), Some("default"));
    assert_eq!(attempt.str_attr("tollgate.attempt.reason"), Some("first"));
    assert_eq!(attempt.int_attr("http.response.status_code"), Some(200));
    assert_eq!(attempt.str_attr("server.address"), Some("127.0.0.1"));

    let relay = named(&spans, "relay");
    assert_eq!(relay.parent_span_id, server.span_id);
    assert_eq!(relay.int_attr("gen_ai.usage.output_tokens"), server.int_attr("gen_ai.usage.output_tokens"));
    assert!(relay.end_unix_nano <= server.end_unix_nano, "the request's span ends with the stream");

    // The upstream joined the trace under the attempt's span; the caller's
    // trace state went with it.
    let sent = gw.fake.requests().into_iter().last().unwrap();
    assert_eq!(sent.headers["traceparent"], format!("00-{CALLER_TRACE}-{}-01", attempt.span_id).as_str());
    assert_eq!(sent.headers["tracestate"], "vendor=opaque");

    // Counts and ids only: no prompt text, no key, anywhere in any span.
    for span in &spans {
        for (key, value) in &span.attributes {
            let text = format!("{value:?}");
            assert!(!text.contains("secret prompt"), "{key} carries the prompt");
            assert!(!text.contains(&gw.key), "{key} carries the key");
        }
    }
}

fn target(upstream: &str, model: &str) -> TargetConfig {
    TargetConfig {
        upstream: upstream.to_owned(),
        model: Some(model.to_owned()),
        weight: 1,
        overrides: Overrides::default(),
    }
}

#[tokio::test]
async fn a_retry_and_a_fallback_are_attempt_spans_with_their_reasons() {
    let sink = Sink::start(Transport::HttpProtobuf).await.unwrap();
    let backup = FakeUpstream::start().await.unwrap();
    let backup_url = backup.base_url();
    let otlp = export_to(&sink);
    let gw = TestGateway::start_with(move |c: &mut Config| {
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        c.upstreams = vec![extra];
        c.routes = vec![RouteConfig {
            model: "chat-default".to_owned(),
            api: Default::default(),
            groups: vec![
                GroupConfig { targets: vec![target("default", "gemini-2.5-flash-lite")] },
                GroupConfig { targets: vec![target("backup", "gemini-2.5-pro")] },
            ],
            sticky: None,
            retry_on: vec![RetryOn::ServerError],
            attempts_per_target: 2,
            deadline: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
        }];
        c.telemetry.otlp = Some(otlp);
    })
    .await;
    gw.fake.set_defaults(Scenario {
        fault: Some(Fault::Status { status: 503, style: ErrorStyle::OpenAi }),
        ..Scenario::default()
    });
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({"model": "chat-default", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-attempts"], "3");

    let spans = trace_of(&sink, trace_id, 4).await;
    let server = server_span(&spans);
    assert_eq!(server.int_attr("tollgate.attempts"), Some(3));
    assert_eq!(server.str_attr("tollgate.route"), Some("chat-default"));
    assert_eq!(server.str_attr("tollgate.upstream"), Some("backup"));
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.int_attr("tollgate.attempt"));
    let seen: Vec<[Option<&str>; 4]> = attempts
        .iter()
        .map(|s| {
            ["tollgate.upstream", "gen_ai.request.model", "tollgate.attempt.reason", "tollgate.attempt.outcome"]
                .map(|key| s.str_attr(key))
        })
        .collect();
    assert_eq!(
        seen,
        [
            [Some("default"), Some("gemini-2.5-flash-lite"), Some("first"), Some("server_error")],
            [Some("default"), Some("gemini-2.5-flash-lite"), Some("retry:server_error"), Some("server_error")],
            [Some("backup"), Some("gemini-2.5-pro"), Some("fallback:server_error"), Some("ok")],
        ]
    );
    assert_eq!(attempts[0].name, "chat gemini-2.5-flash-lite");
    assert_eq!(attempts[0].status_code, STATUS_ERROR);
    assert_eq!(attempts[0].int_attr("http.response.status_code"), Some(503));
    assert!(attempts.iter().all(|a| a.parent_span_id == server.span_id));
    // Each upstream saw the span of the attempt that reached it.
    let to_backup = backup.requests().into_iter().last().unwrap();
    assert_eq!(to_backup.headers["traceparent"], format!("00-{trace_id}-{}-01", attempts[2].span_id).as_str());
}

#[tokio::test]
async fn refused_requests_are_traced_with_their_refusal() {
    let sink = Sink::start(Transport::Grpc).await.unwrap();
    let gw = traced_gateway(&sink).await;
    let (status, _) = gw
        .admin(
            Method::POST,
            "/admin/v1/tenants/test/budgets",
            Some(json!({"period": "monthly", "amount_usd": "0.000001"})),
        )
        .await;
    assert_eq!(status, 201);
    let trace_id = "11111111111111111111111111111111";
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{trace_id}-2222222222222222-01"))
        .json(
            &json!({"model": "gemini-2.5-pro", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let code = body["error"]["code"].as_str().unwrap().to_owned();
    assert!(status == 402 || status == 429, "{status} {body}");
    let spans = trace_of(&sink, trace_id, 1).await;
    let server = server_span(&spans);
    assert_eq!(server.int_attr("http.response.status_code"), Some(i64::from(status)));
    assert_eq!(server.str_attr("error.type"), Some(code.as_str()));
    assert_eq!(server.str_attr("tollgate.tenant.id"), Some("test"));
    let admission = named(&spans, "admission");
    assert_eq!(admission.str_attr("tollgate.admission.result"), Some(code.as_str()));
    assert_eq!(admission.str_attr("error.type"), Some(code.as_str()));
    assert_eq!(admission.status_code, STATUS_ERROR);
    assert_eq!(admission.int_attr("tollgate.budgets"), Some(1));
    assert!(spans.iter().all(|s| s.kind != CLIENT), "nothing was sent upstream");
    assert!(gw.fake.requests().is_empty());

    // A key the gateway does not know: traced too, with no tenant.
    let trace_id = "33333333333333333333333333333333";
    let response = gw
        .anonymous
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("tg-not-a-real-key")
        .header("traceparent", format!("00-{trace_id}-4444444444444444-01"))
        .json(&json!({"model": "gemini-2.5-pro", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let spans = trace_of(&sink, trace_id, 0).await;
    let server = server_span(&spans);
    assert_eq!(server.int_attr("http.response.status_code"), Some(401));
    assert_eq!(server.str_attr("error.type"), Some("invalid_api_key"));
    assert!(server.str_attr("tollgate.tenant.id").is_none());
}

#[tokio::test]
async fn sampling_keeps_the_ratio_asked_but_follows_a_sampled_caller() {
    let sink = Sink::start(Transport::HttpProtobuf).await.unwrap();
    let mut otlp = export_to(&sink);
    otlp.sampling_ratio = 0.0;
    let gw = gateway_exporting(otlp).await;
    let chat = json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]});
    // Started here: not sampled, yet the upstream still gets a traceparent
    // (unsampled), so its own sampling can follow.
    let response = gw.http.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let sent = gw.fake.requests().into_iter().last().unwrap();
    let traceparent = sent.headers["traceparent"].to_str().unwrap().to_owned();
    assert!(traceparent.starts_with("00-") && traceparent.ends_with("-00"), "{traceparent}");
    // A sampled caller: its trace is kept whatever the ratio.
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", caller_traceparent())
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = trace_of(&sink, CALLER_TRACE, 2).await;
    assert!(spans.iter().any(|s| s.kind == CLIENT));
    let unsampled_trace = &traceparent[3..35];
    assert!(sink.spans().iter().all(|s| s.trace_id != unsampled_trace), "the unsampled trace was not exported");
}

#[tokio::test]
async fn without_telemetry_the_callers_trace_context_passes_untouched() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", caller_traceparent())
        .json(&json!({"model": "gemini-2.5-flash", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = gw.fake.requests().into_iter().last().unwrap();
    assert_eq!(sent.headers["traceparent"], caller_traceparent().as_str());
}

async fn scrape(gw: &TestGateway, series: &str) -> f64 {
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    scraped_value(&metrics, series).unwrap_or(0.0)
}

#[tokio::test]
async fn a_collector_that_is_down_changes_nothing_for_clients() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw = TestGateway::start_with(move |c: &mut Config| {
        let mut otlp = OtlpConfig::new(endpoint, OtlpProtocol::Grpc);
        otlp.export_interval = Duration::from_millis(10);
        otlp.timeout = Duration::from_millis(500);
        c.telemetry.otlp = Some(otlp);
    })
    .await;
    for _ in 0..20 {
        let response = gw
            .http
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "gemini-2.5-flash", "stream": true, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("[DONE]"));
    }
    wait_until("a failed export is counted", PATIENCE, async || {
        scrape(&gw, "tollgate_trace_exports_total{result=\"error\"}").await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn a_slow_collector_costs_dropped_spans_not_slower_requests() {
    let sink = Sink::start(Transport::HttpProtobuf).await.unwrap();
    sink.set_delay(Duration::from_secs(30));
    let mut otlp = export_to(&sink);
    otlp.queue_size = 8;
    otlp.batch_size = 4;
    otlp.timeout = Duration::from_secs(5);
    let gw = gateway_exporting(otlp).await;
    let requests = (0..40).map(|_| {
        gw.http
            .post(gw.url("/v1/chat/completions"))
            .json(&json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    });
    // Every request is answered while the collector still holds the first
    // batch (for 30 s): none waited for it.
    let answered = tokio::time::timeout(PATIENCE, futures_util::future::join_all(requests))
        .await
        .expect("answered before the collector's first answer");
    assert!(answered.into_iter().all(|r| r.unwrap().status() == 200));
    assert_eq!(sink.spans().len(), 0, "the collector has not answered yet");
    wait_until("dropped spans are counted", PATIENCE, async || {
        scrape(&gw, "tollgate_trace_spans_dropped_total").await > 0.0
    })
    .await;
}

#[tokio::test]
async fn gemini_and_anthropic_calls_are_traced_like_openai_ones() {
    let sink = Sink::start(Transport::HttpProtobuf).await.unwrap();
    let gw = traced_gateway(&sink).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client
        .post(gw.url("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", &gw.key)
        .header("traceparent", caller_traceparent())
        .json(&json!({"contents": [{"parts": [{"text": "secret prompt"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    let spans = trace_of(&sink, CALLER_TRACE, 3).await;
    let server = server_span(&spans);
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert!(!server.str_attr("url.path").unwrap_or_default().contains("key"), "{server:?}");
    let attempt = named(&spans, "generate_content gemini-2.5-flash");
    assert_eq!(attempt.kind, CLIENT);
    assert_eq!(attempt.str_attr("gen_ai.request.model"), Some("gemini-2.5-flash"));
    named(&spans, "relay");
    let traceparent = gw.fake.requests()[0].headers["traceparent"].to_str().unwrap().to_owned();
    assert!(traceparent.contains(&attempt.span_id), "the attempt is the upstream's parent: {traceparent}");

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &gw.key)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = trace_of(&sink, trace_id, 2).await;
    assert_eq!(named(&spans, "chat claude-sonnet-4").kind, CLIENT);
    let all = format!("{spans:?}");
    assert!(!all.contains("secret prompt") && !all.contains(&gw.key), "no prompt text or key on spans");
}

/// The configured export headers (a collector's credentials) arrive with
/// every export: as gRPC metadata, or as HTTP headers.
#[tokio::test]
async fn export_headers_reach_the_collector_over_either_protocol() {
    for transport in [Transport::Grpc, Transport::HttpProtobuf] {
        let sink = Sink::start(transport).await.unwrap();
        let mut otlp = export_to(&sink);
        otlp.headers.push(ExportHeader {
            name: "X-Collector-Token".to_owned(),
            value: Some("token-1".to_owned()),
            value_env: None,
            value_file: None,
        });
        let gw = gateway_exporting(otlp).await;
        chat(&gw).await;
        sink.wait_for(PATIENCE, |spans| spans.iter().any(|s| s.kind == SERVER)).await;
        let headers = sink.last_headers();
        assert_eq!(headers.get("x-collector-token").map(String::as_str), Some("token-1"), "{transport:?}: {headers:?}");
    }
}

#[tokio::test]
async fn spans_a_collector_rejects_are_counted_over_either_protocol() {
    for transport in [Transport::Grpc, Transport::HttpProtobuf] {
        let sink = Sink::start(transport).await.unwrap();
        sink.set_rejecting(Some((2, "span too large")));
        let otlp = export_to(&sink);
        let gw = gateway_exporting(otlp).await;
        chat(&gw).await;
        // All four of the request's spans exported: no batch comes after.
        sink.wait_for(PATIENCE, |spans| spans.len() >= 4).await;
        // Every batch the sink answered, answered as a partial success.
        wait_until("each partial success is counted", PATIENCE, async || {
            let partial = scrape(&gw, "tollgate_trace_exports_total{result=\"partial\"}").await;
            partial >= 1.0 && partial == sink.exports() as f64
        })
        .await;
        let rejected = scrape(&gw, "tollgate_trace_spans_rejected_total").await;
        let partial = scrape(&gw, "tollgate_trace_exports_total{result=\"partial\"}").await;
        // Two spans a batch, or one from a batch of one.
        assert!((partial..=2.0 * partial).contains(&rejected), "{transport:?}: {rejected} rejected in {partial}");
        assert_eq!(scrape(&gw, "tollgate_trace_exports_total{result=\"error\"}").await, 0.0, "{transport:?}");

        // A full success again: counted as ok, nothing more rejected.
        sink.set_rejecting(None);
        chat(&gw).await;
        wait_until("a full success is counted", PATIENCE, async || {
            scrape(&gw, "tollgate_trace_exports_total{result=\"ok\"}").await >= 1.0
        })
        .await;
        assert_eq!(scrape(&gw, "tollgate_trace_spans_rejected_total").await, rejected, "{transport:?}");
    }
}

#[tokio::test]
async fn exports_overlap_while_the_collector_is_slow_to_answer() {
    for transport in [Transport::Grpc, Transport::HttpProtobuf] {
        let sink = Sink::start(transport).await.unwrap();
        sink.set_delay(Duration::from_secs(2));
        let mut otlp = export_to(&sink);
        // A batch per span: two requests' spans are eight exports.
        otlp.batch_size = 1;
        otlp.timeout = Duration::from_secs(20);
        let gw = gateway_exporting(otlp).await;
        for _ in 0..2 {
            chat(&gw).await;
        }
        // The sink counts an export when it arrives, then holds its answer.
        wait_until("four exports are in flight at once", PATIENCE, async || sink.exports() >= 4).await;
        let answered = scrape(&gw, "tollgate_trace_exports_total{result=\"ok\"}").await;
        assert_eq!((sink.exports(), answered), (4, 0.0), "{transport:?}: four at most, none answered yet");
        // Each answer frees a place: all eight arrive.
        let spans = sink.wait_for(PATIENCE, |spans| spans.len() >= 8).await;
        assert_eq!(spans.len(), 8, "{transport:?}");
    }
}

#[tokio::test]
async fn spans_queued_or_in_flight_at_shutdown_reach_the_collector() {
    let sink = Sink::start(Transport::Grpc).await.unwrap();
    // Slow answers keep exports in flight while more spans queue behind them.
    sink.set_delay(Duration::from_secs(1));
    let mut otlp = export_to(&sink);
    otlp.batch_size = 1;
    otlp.timeout = Duration::from_secs(20);
    let mut gw = gateway_exporting(otlp).await;
    for _ in 0..3 {
        chat(&gw).await;
    }
    wait_until("exports are in flight", PATIENCE, async || sink.exports() >= 1).await;
    assert!(sink.spans().len() < 12, "not all exported before the shutdown");
    gw.begin_shutdown().await.unwrap().unwrap();
    let spans = sink.spans();
    assert_eq!(spans.len(), 12, "four spans a request, none lost at shutdown");
    assert_eq!(spans.iter().filter(|s| s.kind == SERVER).count(), 3);
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_ends_its_trace_as_disconnected() {
    let sink = Sink::start(Transport::Grpc).await.unwrap();
    let gw = traced_gateway(&sink).await;
    let left = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("traceparent", caller_traceparent())
        .header("x-fake-latency-ms", "2000")
        .timeout(Duration::from_millis(200))
        .json(&json!({"model": "gpt-4.1", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(left.is_err(), "the client gave up first");
    // Server, admission and the abandoned attempt.
    let spans = trace_of(&sink, CALLER_TRACE, 2).await;
    let server = server_span(&spans);
    assert_eq!(server.int_attr("tollgate.status"), Some(499), "{server:#?}");
    assert_eq!(server.str_attr("tollgate.error_class"), Some("client:disconnected"));
    let attempt = spans.iter().find(|s| s.kind == CLIENT).expect("the attempt's span ended too");
    assert_eq!(attempt.parent_span_id, server.span_id);
}

#[tokio::test]
async fn the_admission_span_carries_the_rate_limits_it_checked_and_their_refusal() {
    let sink = Sink::start(Transport::Grpc).await.unwrap();
    let gw = traced_gateway(&sink).await;
    let client = gw.tenant_with_policy("one-a-minute", json!({"limits": {"rpm": 1}})).await;
    gw.clock.to_next_minute();
    let mut admissions = Vec::new();
    for (trace_id, expected) in [("55555555555555555555555555555555", 200), ("66666666666666666666666666666666", 429)] {
        let response = client
            .post(gw.url("/v1/chat/completions"))
            .header("traceparent", format!("00-{trace_id}-7777777777777777-01"))
            .body(r#"{"model":"gpt-4.1","max_tokens":10,"messages":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
        let spans = trace_of(&sink, trace_id, 1).await;
        admissions.push(named(&spans, "admission").clone());
    }
    let [admitted, refused] = &admissions[..] else { unreachable!() };
    assert_eq!(admitted.str_attr("tollgate.admission.result"), Some("admitted"));
    assert!(admitted.int_attr("tollgate.limits.checks").unwrap() >= 1);
    // A quarter of the forwarded bytes plus the output limit.
    assert!(admitted.int_attr("tollgate.limits.estimated_tokens").unwrap() >= 10);
    assert!(admitted.attr("tollgate.budgets").is_none(), "no budget to check");
    assert_eq!(admitted.status_code, STATUS_UNSET);
    assert_eq!(refused.str_attr("tollgate.admission.result"), Some("rate_limit_exceeded"));
    assert_eq!(refused.str_attr("error.type"), Some("rate_limit_exceeded"));
    assert_eq!(refused.status_code, STATUS_ERROR);
}
