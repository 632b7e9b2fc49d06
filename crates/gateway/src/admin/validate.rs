//! Field validation for admin input. Each check names its field.

use super::error::AdminError;

pub fn tenant_id(id: &str) -> Result<(), AdminError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AdminError::invalid(
            "id",
            "must be 1-63 lowercase letters, digits or dashes, not starting or ending with a dash",
        ))
    }
}

pub fn name(field: &'static str, value: &str) -> Result<(), AdminError> {
    if value.trim().is_empty() || value.chars().count() > 200 || value.chars().any(char::is_control) {
        return Err(AdminError::invalid(field, "must be 1-200 printable characters"));
    }
    Ok(())
}

pub fn metadata(value: &serde_json::Value) -> Result<(), AdminError> {
    if !value.is_object() {
        return Err(AdminError::invalid("metadata", "must be a JSON object"));
    }
    if value.to_string().len() > 16 * 1024 {
        return Err(AdminError::invalid("metadata", "must be at most 16 KiB of JSON"));
    }
    Ok(())
}

pub fn limits(limits: &tollgate_store::Limits) -> Result<(), AdminError> {
    limits_at("limits", limits)
}

/// Largest count a limit or cap may hold: what the document promises
/// (`int64`), what SQL and Redis counters and upstream JSON parsers hold.
const MAX_COUNT: u64 = i64::MAX as u64;

fn at_most_max(field: impl Into<String>, value: Option<u64>) -> Result<(), AdminError> {
    if value.is_some_and(|v| v > MAX_COUNT) {
        return Err(AdminError::invalid(field, format!("must be at most {MAX_COUNT}")));
    }
    Ok(())
}

fn limits_at(prefix: &str, limits: &tollgate_store::Limits) -> Result<(), AdminError> {
    for (field, value) in [("rpm", limits.rpm), ("tpm", limits.tpm), ("max_concurrent", limits.max_concurrent)] {
        if value == Some(0) {
            return Err(AdminError::invalid(
                format!("{prefix}.{field}"),
                "must be greater than 0 (omit it for no limit)",
            ));
        }
        at_most_max(format!("{prefix}.{field}"), value)?;
    }
    Ok(())
}

pub fn policy(policy: &tollgate_store::TenantPolicy) -> Result<(), AdminError> {
    limits_at("policy.limits", &policy.limits)?;
    for (field, value) in [
        ("policy.max_output_tokens", policy.max_output_tokens),
        ("policy.default_max_output_tokens", policy.default_max_output_tokens),
    ] {
        if value == Some(0) {
            return Err(AdminError::invalid(field, "must be greater than 0"));
        }
    }
    for (field, value) in [
        ("policy.max_output_tokens", policy.max_output_tokens),
        ("policy.default_max_output_tokens", policy.default_max_output_tokens),
        ("policy.max_thinking_budget", policy.max_thinking_budget),
        ("policy.default_thinking_budget", policy.default_thinking_budget),
    ] {
        at_most_max(field, value)?;
    }
    if let (Some(cap), Some(default)) = (policy.max_output_tokens, policy.default_max_output_tokens)
        && default > cap
    {
        return Err(AdminError::invalid("policy.default_max_output_tokens", "must not exceed max_output_tokens"));
    }
    if let (Some(cap), Some(default)) = (policy.max_thinking_budget, policy.default_thinking_budget)
        && default > cap
    {
        return Err(AdminError::invalid("policy.default_thinking_budget", "must not exceed max_thinking_budget"));
    }
    Ok(())
}

pub fn models(patterns: &[String]) -> Result<(), AdminError> {
    crate::auth::models::validate_patterns(patterns).map_err(|m| AdminError::invalid("allowed_models", m))
}

pub fn page_limit(limit: Option<u32>) -> Result<u32, AdminError> {
    match limit {
        None => Ok(50),
        Some(n @ 1..=200) => Ok(n),
        Some(_) => Err(AdminError::invalid("limit", "must be between 1 and 200")),
    }
}

/// Splits a page fetched with `limit + 1` rows into the page and the cursor
/// of its last row, when there is more.
pub fn paginate<T>(mut rows: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        let next = rows.last().map(cursor);
        (rows, next)
    } else {
        (rows, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_end_with_the_cursor_of_their_last_row_only_when_there_is_more() {
        assert_eq!(paginate(vec![1, 2, 3], 2, i32::to_string), (vec![1, 2], Some("2".to_owned())));
        assert_eq!(paginate(vec![1, 2], 2, i32::to_string), (vec![1, 2], None));
    }

    #[test]
    fn counts_fit_a_signed_64_bit_integer() {
        let limits = tollgate_store::Limits { tpm: Some(MAX_COUNT + 1), ..Default::default() };
        assert_eq!(super::limits(&limits).unwrap_err().param.as_deref(), Some("limits.tpm"));
        let limits = tollgate_store::Limits { tpm: Some(MAX_COUNT), ..Default::default() };
        assert!(super::limits(&limits).is_ok());
        let policy = tollgate_store::TenantPolicy { max_thinking_budget: Some(u64::MAX), ..Default::default() };
        assert_eq!(super::policy(&policy).unwrap_err().param.as_deref(), Some("policy.max_thinking_budget"));
    }

    #[test]
    fn tenant_ids_are_slugs() {
        for good in ["acme", "a", "team-42"] {
            assert!(tenant_id(good).is_ok(), "{good}");
        }
        for bad in ["", "Acme", "-a", "a-", "a_b", "a b", &"a".repeat(64)] {
            assert_eq!(tenant_id(bad).unwrap_err().param.as_deref(), Some("id"), "{bad}");
        }
    }
}
