//! `[telemetry.otlp]`: where traces go and how many.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (a collector's port 4317).
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (a collector's port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Trace export. Absent (the default): no spans are made at all.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector: `http://collector:4317` (gRPC) or
    /// `http://collector:4318` (HTTP; `/v1/traces` is added unless the URL
    /// already ends with it). `https://` for TLS.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Headers sent with every export (a vendor's API key, say). Values
    /// that are secrets come from the environment or a file.
    #[serde(default)]
    pub headers: Vec<ExportHeader>,
    /// The share of traces started here that are kept, 0.0 to 1.0. A caller
    /// that sends `traceparent` decides for its own trace (sampled or not).
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Further resource attributes, e.g. `"deployment.environment" = "prod"`.
    #[serde(default)]
    pub resource_attributes: BTreeMap<String, String>,
    /// The longest one export may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Spans held for export; past it new spans are dropped (and counted),
    /// so a slow collector never slows a request.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Spans per export.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// The longest a finished span waits for its batch to fill.
    #[serde(default = "default_export_interval", with = "humantime_serde")]
    pub export_interval: Duration,
}

/// One export header: a literal `value`, or `value_env` / `value_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub value_env: Option<String>,
    #[serde(default)]
    pub value_file: Option<PathBuf>,
}

fn default_sampling_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "tollgate".to_owned()
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_queue_size() -> usize {
    8192
}

fn default_batch_size() -> usize {
    512
}

fn default_export_interval() -> Duration {
    Duration::from_secs(1)
}

impl OtlpConfig {
    /// A configuration with every default, sending to `endpoint`.
    pub fn new(endpoint: impl Into<String>, protocol: OtlpProtocol) -> Self {
        Self {
            endpoint: endpoint.into(),
            protocol,
            headers: Vec::new(),
            sampling_ratio: default_sampling_ratio(),
            service_name: default_service_name(),
            resource_attributes: BTreeMap::new(),
            timeout: default_timeout(),
            queue_size: default_queue_size(),
            batch_size: default_batch_size(),
            export_interval: default_export_interval(),
        }
    }

    /// The URL the exporter posts to.
    pub fn export_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        match self.protocol {
            OtlpProtocol::Grpc => base.to_owned(),
            OtlpProtocol::HttpProtobuf if base.ends_with("/v1/traces") => base.to_owned(),
            OtlpProtocol::HttpProtobuf => format!("{base}/v1/traces"),
        }
    }

    /// Checks what start-up would otherwise fail on later: `(key, problem)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = reqwest::Url::parse(&self.endpoint)
            .map_err(|e| ("telemetry.otlp.endpoint", format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(("telemetry.otlp.endpoint", "must be an http or https URL".to_owned()));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(("telemetry.otlp.sampling_ratio", "must be between 0.0 and 1.0".to_owned()));
        }
        if self.service_name.trim().is_empty() {
            return Err(("telemetry.otlp.service_name", "must not be empty".to_owned()));
        }
        if self.queue_size == 0 || self.batch_size == 0 || self.batch_size > self.queue_size {
            return Err((
                "telemetry.otlp.batch_size",
                "and queue_size must be greater than 0, with batch_size at most queue_size".to_owned(),
            ));
        }
        for (key, value) in
            [("telemetry.otlp.timeout", self.timeout), ("telemetry.otlp.export_interval", self.export_interval)]
        {
            if value.is_zero() {
                return Err((key, "must be greater than 0".to_owned()));
            }
        }
        for header in &self.headers {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                return Err(("telemetry.otlp.headers.name", format!("{:?} is not a header name", header.name)));
            }
            let sources = [header.value.is_some(), header.value_env.is_some(), header.value_file.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err((
                    "telemetry.otlp.headers",
                    format!("{:?} needs exactly one of value, value_env or value_file", header.name),
                ));
            }
        }
        Ok(())
    }
}

impl ExportHeader {
    /// The header's value, read from where the configuration says.
    pub fn resolve(&self) -> anyhow::Result<String> {
        if let Some(value) = &self.value {
            return Ok(value.clone());
        }
        if let Some(env) = &self.value_env {
            return std::env::var(env).map(|v| v.trim().to_owned()).map_err(|_| {
                anyhow::anyhow!("telemetry.otlp.headers {:?}: environment variable {env} is not set", self.name)
            });
        }
        if let Some(path) = &self.value_file {
            return std::fs::read_to_string(path).map(|v| v.trim().to_owned()).map_err(|e| {
                anyhow::anyhow!("telemetry.otlp.headers {:?}: cannot read {}: {e}", self.name, path.display())
            });
        }
        Err(anyhow::anyhow!("telemetry.otlp.headers {:?} has no value", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoints_get_the_traces_path_once() {
        let http = |endpoint: &str| OtlpConfig::new(endpoint, OtlpProtocol::HttpProtobuf).export_url();
        assert_eq!(http("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(http("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert_eq!(OtlpConfig::new("http://c:4317", OtlpProtocol::Grpc).export_url(), "http://c:4317");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut config = OtlpConfig::new("collector:4317", OtlpProtocol::Grpc);
        assert_eq!(config.validate().unwrap_err().0, "telemetry.otlp.endpoint");
        config.endpoint = "http://collector:4317".to_owned();
        config.sampling_ratio = 1.5;
        assert_eq!(config.validate().unwrap_err().0, "telemetry.otlp.sampling_ratio");
        config.sampling_ratio = 0.5;
        config.headers.push(ExportHeader {
            name: "x-api-key".to_owned(),
            value: Some("a".to_owned()),
            value_env: Some("B".to_owned()),
            value_file: None,
        });
        assert_eq!(config.validate().unwrap_err().0, "telemetry.otlp.headers");
        config.headers[0].value = None;
        assert!(config.validate().is_ok());
    }
}
