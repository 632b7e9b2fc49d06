//! A small client for the admin REST API, used by the `tenants`, `keys` and
//! `audit` subcommands.

use reqwest::Method;
use serde_json::Value;

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        tollgate_gateway::upstream::install_crypto_provider();
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// A GET whose answer is not JSON (the CSV export).
    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            return Err(anyhow::anyhow!("request failed ({status}): {body}"));
        }
        Ok(body)
    }

    /// Calls the API; a non-2xx answer becomes an error carrying the
    /// envelope's message, code and field.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response =
            request.send().await.map_err(|e| anyhow::anyhow!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        let mut message = format!("{} ({status})", error["message"].as_str().unwrap_or("request failed"));
        if let Some(code) = error["code"].as_str() {
            message.push_str(&format!(", code {code}"));
        }
        if let Some(param) = error["param"].as_str() {
            message.push_str(&format!(", field {param}"));
        }
        Err(anyhow::anyhow!(message))
    }
}
