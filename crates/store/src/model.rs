//! The records the store reads and writes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    Suspended,
    Deleted,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// A slug: lowercase letters, digits and dashes.
    pub id: String,
    pub display_name: String,
    pub status: TenantStatus,
    /// Free-form JSON object for the operator's own use.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// Limits, token and thinking caps for this tenant's requests.
    pub policy: TenantPolicy,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewTenant {
    pub id: String,
    pub display_name: String,
    pub metadata: serde_json::Value,
    pub policy: TenantPolicy,
}

#[derive(Debug, Clone, Default)]
pub struct TenantPatch {
    pub display_name: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub policy: Option<TenantPolicy>,
}

/// What a tenant's requests may do. Every field is optional; the gateway's
/// configuration supplies defaults for limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// Rate limits for the tenant as a whole (keys may set their own, too).
    #[serde(default)]
    pub limits: Limits,
    /// Cap on `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<u64>,
    /// What to do with a request over a cap: `clamp` it (default) or `reject` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_cap: Option<OverCap>,
    /// Injected when a request sets no output limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub default_max_output_tokens: Option<u64>,
    /// Highest `reasoning_effort` allowed: `none`, `minimal`, `low`, `medium`, `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_reasoning_effort: Option<ReasoningEffort>,
    /// Cap on Gemini `thinking_config.thinking_budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_thinking_budget: Option<u64>,
    /// Injected for Gemini models when a request sets no thinking budget and
    /// no `reasoning_effort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_thinking_budget: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    #[default]
    Clamp,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    None,
    Minimal,
    Low,
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "minimal" => Some(Self::Minimal),
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Minimal => "minimal",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// Per-key (or per-tenant) limit overrides; enforced by the limits layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_concurrent: Option<u64>,
}

/// An API key as stored: never the secret, only its keyed hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    /// The public id: the part of `tg-<id>-<secret>` that is safe to show.
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Exact model names or glob patterns (`gemini-*`); empty allows every model.
    pub allowed_models: Vec<String>,
    pub limits: Limits,
    /// The key this one replaced by rotation.
    pub rotated_from: Option<String>,
    /// The key that replaced this one by rotation.
    pub rotated_to: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub secret_hash: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_models: Vec<String>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub allowed_models: Option<Vec<String>>,
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AdminToken {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `bootstrap` or the id of the admin token that made the change.
    pub actor: String,
    /// e.g. `tenant.create`, `key.revoke`.
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// One page of a listing plus the cursor for the next one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}
