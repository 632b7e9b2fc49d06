//! The admin subcommands: each maps to one admin API call.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::admin_client::AdminClient;
use crate::output::{self, Format};

#[derive(Args)]
pub struct AdminArgs {
    /// Base URL of the admin listener.
    #[arg(long, env = "TOLLGATE_ADMIN_URL", default_value = "http://127.0.0.1:8081", global = true)]
    admin_url: String,
    /// Admin token (the bootstrap token or one issued by the admin API).
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Format,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<AdminClient> {
        let token = self.admin_token.as_deref().ok_or_else(|| {
            anyhow::anyhow!("an admin token is required: pass --admin-token or set TOLLGATE_ADMIN_TOKEN")
        })?;
        AdminClient::new(&self.admin_url, token)
    }
}

const TENANT_COLUMNS: &[&str] = &["id", "display_name", "status", "created_at"];
const KEY_COLUMNS: &[&str] = &["id", "tenant_id", "name", "status", "allowed_models", "expires_at", "last_used_at"];

#[derive(Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant.
    Create {
        id: String,
        #[arg(long)]
        name: String,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// Limits and caps as JSON, e.g. '{"limits":{"rpm":600},"max_output_tokens":4096}'.
        #[arg(long)]
        policy: Option<String>,
    },
    /// List tenants (one page; pass --cursor for the next).
    List {
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Get {
        id: String,
    },
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        metadata: Option<String>,
        /// Replaces the whole policy (JSON).
        #[arg(long)]
        policy: Option<String>,
    },
    Suspend {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Delete a tenant and revoke all of its keys.
    Delete {
        id: String,
    },
}

#[derive(Args, Default)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    max_concurrent: Option<u64>,
}

impl LimitArgs {
    fn to_json(&self) -> Option<Value> {
        let mut limits = Map::new();
        for (name, value) in [("rpm", self.rpm), ("tpm", self.tpm), ("max_concurrent", self.max_concurrent)] {
            if let Some(v) = value {
                limits.insert(name.to_owned(), json!(v));
            }
        }
        (!limits.is_empty()).then_some(Value::Object(limits))
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key under a tenant; prints the secret once.
    Create {
        tenant: String,
        #[arg(long)]
        name: String,
        /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// Allowed models, comma-separated names or globs (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    List {
        tenant: String,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    Get {
        key_id: String,
    },
    Update {
        key_id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// Remove the expiry.
        #[arg(long)]
        no_expiry: bool,
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    Revoke {
        key_id: String,
    },
    /// Issue a successor key; the old one works until the grace period ends.
    Rotate {
        key_id: String,
        #[arg(long, default_value = "24h")]
        grace_period: String,
    },
}

#[derive(Args)]
pub struct AuditCommand {
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    cursor: Option<String>,
}

fn parse_json(field: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).map_err(|e| anyhow::anyhow!("--{field} is not valid JSON: {e}"))
}

fn page_query(limit: Option<u32>, cursor: Option<&str>) -> String {
    let mut params = Vec::new();
    if let Some(l) = limit {
        params.push(format!("limit={l}"));
    }
    if let Some(c) = cursor {
        params.push(format!("cursor={c}"));
    }
    if params.is_empty() { String::new() } else { format!("?{}", params.join("&")) }
}

/// Prints a listing and, when there is more, how to get it.
fn print_page(format: Format, page: &Value, columns: &[&str]) -> anyhow::Result<()> {
    match format {
        Format::Json => output::print(format, page, columns),
        Format::Table => {
            output::print(format, &page["data"], columns)?;
            if let Some(next) = page["next_cursor"].as_str() {
                eprintln!("more: --cursor {next}");
            }
            Ok(())
        }
    }
}

pub async fn tenants(args: AdminArgs, command: TenantsCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    let (method, path, body) = match command {
        TenantsCommand::Create { id, name, metadata, policy } => {
            let mut body = json!({"id": id, "display_name": name});
            if let Some(m) = metadata {
                body["metadata"] = parse_json("metadata", &m)?;
            }
            if let Some(p) = policy {
                body["policy"] = parse_json("policy", &p)?;
            }
            (Method::POST, "/admin/v1/tenants".to_owned(), Some(body))
        }
        TenantsCommand::List { limit, cursor } => {
            let page = client
                .call(Method::GET, &format!("/admin/v1/tenants{}", page_query(limit, cursor.as_deref())), None)
                .await?;
            return print_page(args.output, &page, TENANT_COLUMNS);
        }
        TenantsCommand::Get { id } => (Method::GET, format!("/admin/v1/tenants/{id}"), None),
        TenantsCommand::Update { id, name, metadata, policy } => {
            let mut body = Map::new();
            if let Some(n) = name {
                body.insert("display_name".into(), json!(n));
            }
            if let Some(m) = metadata {
                body.insert("metadata".into(), parse_json("metadata", &m)?);
            }
            if let Some(p) = policy {
                body.insert("policy".into(), parse_json("policy", &p)?);
            }
            (Method::PATCH, format!("/admin/v1/tenants/{id}"), Some(Value::Object(body)))
        }
        TenantsCommand::Suspend { id } => (Method::POST, format!("/admin/v1/tenants/{id}/suspend"), None),
        TenantsCommand::Resume { id } => (Method::POST, format!("/admin/v1/tenants/{id}/resume"), None),
        TenantsCommand::Delete { id } => (Method::DELETE, format!("/admin/v1/tenants/{id}"), None),
    };
    let tenant = client.call(method, &path, body).await?;
    output::print(args.output, &tenant, TENANT_COLUMNS)
}

pub async fn keys(args: AdminArgs, command: KeysCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    let (method, path, body) = match command {
        KeysCommand::Create { tenant, name, expires_at, models, limits } => {
            let mut body = json!({"name": name, "allowed_models": models});
            if let Some(t) = expires_at {
                body["expires_at"] = json!(t);
            }
            if let Some(l) = limits.to_json() {
                body["limits"] = l;
            }
            let created = client.call(Method::POST, &format!("/admin/v1/tenants/{tenant}/keys"), Some(body)).await?;
            return print_secret(args.output, &created);
        }
        KeysCommand::List { tenant, limit, cursor } => {
            let path = format!("/admin/v1/tenants/{tenant}/keys{}", page_query(limit, cursor.as_deref()));
            let page = client.call(Method::GET, &path, None).await?;
            return print_page(args.output, &page, KEY_COLUMNS);
        }
        KeysCommand::Get { key_id } => (Method::GET, format!("/admin/v1/keys/{key_id}"), None),
        KeysCommand::Update { key_id, name, expires_at, no_expiry, models, limits } => {
            let mut body = Map::new();
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if let Some(t) = expires_at {
                body.insert("expires_at".into(), json!(t));
            }
            if no_expiry {
                body.insert("expires_at".into(), Value::Null);
            }
            if let Some(m) = models {
                body.insert("allowed_models".into(), json!(m));
            }
            if let Some(l) = limits.to_json() {
                body.insert("limits".into(), l);
            }
            (Method::PATCH, format!("/admin/v1/keys/{key_id}"), Some(Value::Object(body)))
        }
        KeysCommand::Revoke { key_id } => (Method::POST, format!("/admin/v1/keys/{key_id}/revoke"), None),
        KeysCommand::Rotate { key_id, grace_period } => {
            let rotated = client
                .call(
                    Method::POST,
                    &format!("/admin/v1/keys/{key_id}/rotate"),
                    Some(json!({"grace_period": grace_period})),
                )
                .await?;
            return print_secret(args.output, &rotated);
        }
    };
    let key = client.call(method, &path, body).await?;
    output::print(args.output, &key, KEY_COLUMNS)
}

/// A new key: the secret on standard output (so `$(tollgate keys create …)`
/// captures it), the key's details on standard error.
fn print_secret(format: Format, created: &Value) -> anyhow::Result<()> {
    match format {
        Format::Json => output::print(format, created, &[]),
        Format::Table => {
            let key = &created["key"];
            eprintln!(
                "created key {} for tenant {} (shown once; store it now)",
                key["id"].as_str().unwrap_or("?"),
                key["tenant_id"].as_str().unwrap_or("?")
            );
            output::write_stdout(created["secret"].as_str().unwrap_or_default())
        }
    }
}

pub async fn audit(args: AdminArgs, command: AuditCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    let path = format!("/admin/v1/audit{}", page_query(command.limit, command.cursor.as_deref()));
    let page = client.call(Method::GET, &path, None).await?;
    print_page(args.output, &page, &["id", "at", "actor", "action", "target_type", "target_id"])
}

/// The routes in force: one row per target, in the order they are tried.
pub async fn routes(args: AdminArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let list = client.call(Method::GET, "/admin/v1/routes", None).await?;
    if matches!(args.output, Format::Json) {
        return output::print(args.output, &list, &[]);
    }
    let mut rows = Vec::new();
    for route in list["data"].as_array().into_iter().flatten() {
        for (g, group) in route["groups"].as_array().into_iter().flatten().enumerate() {
            for target in group.as_array().into_iter().flatten() {
                rows.push(json!({
                    "route": route["model"], "group": g, "target": target["label"], "upstream": target["upstream"],
                    "model": target["model"], "weight": target["weight"], "breaker": target["breaker"],
                }));
            }
        }
    }
    output::print(
        args.output,
        &Value::Array(rows),
        &["route", "group", "target", "upstream", "model", "weight", "breaker"],
    )
}

/// The upstreams and the health of the route targets that use them.
pub async fn upstreams(args: AdminArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let list = client.call(Method::GET, "/admin/v1/upstreams", None).await?;
    print_page(args.output, &list, &["name", "base_url", "targets", "targets_not_closed"])
}

/// Which requests a usage report covers.
#[derive(Args)]
pub struct UsageFilter {
    /// Start: a day (YYYY-MM-DD) for summaries, an RFC 3339 time for records.
    #[arg(long)]
    from: Option<String>,
    /// End: the last day (inclusive) for summaries, an RFC 3339 time
    /// (exclusive) for records.
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    model: Option<String>,
}

impl UsageFilter {
    fn params(self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("from", self.from),
            ("to", self.to),
            ("tenant_id", self.tenant),
            ("key_id", self.key),
            ("model", self.model),
        ]
    }
}

#[derive(Subcommand)]
pub enum UsageCommand {
    /// Totals and breakdowns over whole UTC days (default: the last 30).
    Summary {
        #[command(flatten)]
        filter: UsageFilter,
        /// Comma-separated: tenant, key, model, day, hour, route, target, upstream, served_model, api.
        #[arg(long)]
        group_by: Option<String>,
    },
    /// Per-request records, newest first.
    Records {
        #[command(flatten)]
        filter: UsageFilter,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Per-request records as CSV on standard output.
    Export {
        #[command(flatten)]
        filter: UsageFilter,
    },
}

fn query_string(params: &[(&str, Option<String>)]) -> String {
    let pairs: Vec<String> =
        params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v)))).collect();
    if pairs.is_empty() { String::new() } else { format!("?{}", pairs.join("&")) }
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const SUMMARY_COLUMNS: &[&str] = &[
    "tenant_id",
    "key_id",
    "model",
    "day",
    "hour",
    "route",
    "target",
    "upstream",
    "served_model",
    "api",
    "requests",
    "errors",
    "prompt_tokens",
    "billed_output_tokens",
    "cost_usd",
    "average_cost_micros",
];
const RECORD_COLUMNS: &[&str] = &[
    "at",
    "request_id",
    "tenant_id",
    "requested_model",
    "status",
    "prompt_tokens",
    "billed_output_tokens",
    "cost_micros",
];

pub async fn usage(args: AdminArgs, command: UsageCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    match command {
        UsageCommand::Summary { filter, group_by } => {
            let mut params = filter.params();
            params.push(("group_by", group_by.clone()));
            let q = query_string(&params);
            let summary = client.call(Method::GET, &format!("/admin/v1/usage/summary{q}"), None).await?;
            match args.output {
                Format::Json => output::print(args.output, &summary, &[]),
                Format::Table => {
                    // Only the grouping columns asked for, then the figures.
                    let groups: Vec<&str> = group_by.as_deref().unwrap_or("").split(',').map(str::trim).collect();
                    let columns: Vec<&str> = SUMMARY_COLUMNS
                        .iter()
                        .copied()
                        .filter(|c| match *c {
                            "tenant_id" => groups.contains(&"tenant"),
                            "key_id" => groups.contains(&"key"),
                            "model" => groups.contains(&"model"),
                            "target" => groups.contains(&"target") || groups.contains(&"variant"),
                            "day" | "hour" | "route" | "upstream" | "served_model" | "api" => groups.contains(c),
                            _ => true,
                        })
                        .collect();
                    output::print(args.output, &summary["data"], &columns)
                }
            }
        }
        UsageCommand::Records { filter, limit, cursor } => {
            let mut params = filter.params();
            params.extend([("limit", limit.map(|l| l.to_string())), ("cursor", cursor)]);
            let q = query_string(&params);
            let page = client.call(Method::GET, &format!("/admin/v1/usage/records{q}"), None).await?;
            print_page(args.output, &page, RECORD_COLUMNS)
        }
        UsageCommand::Export { filter } => {
            let q = query_string(&filter.params());
            let csv = client.text(&format!("/admin/v1/usage/records.csv{q}")).await?;
            output::write_stdout(csv.trim_end())
        }
    }
}

#[derive(Subcommand)]
pub enum BudgetsCommand {
    /// Create a budget for a tenant (or one of its keys).
    Create {
        tenant: String,
        /// daily, weekly, monthly or lifetime.
        #[arg(long)]
        period: String,
        /// USD, e.g. 500 or 12.50.
        #[arg(long)]
        amount_usd: String,
        /// Alert only; never refuse requests.
        #[arg(long)]
        soft: bool,
        /// Alert thresholds in percent, comma-separated (default 50,80,100).
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<u32>>,
        #[arg(long)]
        key: Option<String>,
    },
    List {
        tenant: String,
    },
    Update {
        budget_id: String,
        #[arg(long)]
        amount_usd: Option<String>,
        #[arg(long)]
        hard: Option<bool>,
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<u32>>,
    },
    Delete {
        budget_id: String,
    },
    /// Budget alerts and their delivery.
    Alerts {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
}

const BUDGET_COLUMNS: &[&str] =
    &["id", "tenant_id", "key_id", "period", "amount_usd", "hard", "spent_micros", "remaining_micros"];
const ALERT_COLUMNS: &[&str] =
    &["created_at", "tenant_id", "budget_id", "kind", "threshold", "spent_micros", "delivered_at", "attempts"];

pub async fn budgets(args: AdminArgs, command: BudgetsCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    let (method, path, body, columns, list) = match command {
        BudgetsCommand::Create { tenant, period, amount_usd, soft, thresholds, key } => {
            let mut body = json!({"period": period, "amount_usd": amount_usd, "hard": !soft});
            if let Some(t) = thresholds {
                body["thresholds"] = json!(t);
            }
            if let Some(k) = key {
                body["key_id"] = json!(k);
            }
            (Method::POST, format!("/admin/v1/tenants/{tenant}/budgets"), Some(body), BUDGET_COLUMNS, false)
        }
        BudgetsCommand::List { tenant } => {
            (Method::GET, format!("/admin/v1/tenants/{tenant}/budgets"), None, BUDGET_COLUMNS, true)
        }
        BudgetsCommand::Update { budget_id, amount_usd, hard, thresholds } => {
            let mut body = Map::new();
            if let Some(a) = amount_usd {
                body.insert("amount_usd".into(), json!(a));
            }
            if let Some(h) = hard {
                body.insert("hard".into(), json!(h));
            }
            if let Some(t) = thresholds {
                body.insert("thresholds".into(), json!(t));
            }
            (Method::PATCH, format!("/admin/v1/budgets/{budget_id}"), Some(Value::Object(body)), BUDGET_COLUMNS, false)
        }
        BudgetsCommand::Delete { budget_id } => {
            (Method::DELETE, format!("/admin/v1/budgets/{budget_id}"), None, BUDGET_COLUMNS, false)
        }
        BudgetsCommand::Alerts { tenant, limit } => {
            let q = query_string(&[("tenant_id", tenant), ("limit", limit.map(|l| l.to_string()))]);
            (Method::GET, format!("/admin/v1/alerts{q}"), None, ALERT_COLUMNS, true)
        }
    };
    let answer = client.call(method, &path, body).await?;
    match (args.output, list) {
        (Format::Table, true) => output::print(args.output, &answer["data"], columns),
        _ => output::print(args.output, &answer, columns),
    }
}
