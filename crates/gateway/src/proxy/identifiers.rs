//! Bounds on the identifiers a client supplies that the gateway stores,
//! labels, logs or puts into an upstream URL: model names above all.
//!
//! A model name is at most [`MAX_MODEL_LEN`] bytes of ASCII letters, digits
//! and `. _ - : / @ +`, which every provider's names fit (`gemini-2.5-pro`,
//! `google/gemini-2.5-flash`, `claude-3-5-sonnet@20240620`,
//! `accounts/fireworks/models/llama-v3p1-70b`). Anything else is refused
//! with 400 before it is forwarded, recorded or logged, so no client can
//! make a ledger row, a log line or a metric label of arbitrary size or
//! content.

use crate::error::GatewayError;

pub const MAX_MODEL_LEN: usize = 256;

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/' | b'@' | b'+')
}

/// Checks a model name from a request body.
pub fn check_model(model: &str) -> Result<(), GatewayError> {
    if model.is_empty() {
        return Err(GatewayError::InvalidModel("`model` must not be empty"));
    }
    if model.len() > MAX_MODEL_LEN {
        return Err(GatewayError::InvalidModel("`model` is longer than 256 characters"));
    }
    if !model.bytes().all(allowed) {
        return Err(GatewayError::InvalidModel("`model` may contain only ASCII letters, digits and . _ - : / @ +"));
    }
    Ok(())
}

/// Checks a model id taken from a URL path (already percent-decoded): a
/// model name that is also a safe path for the upstream, so no dot segment
/// and no empty segment (`..`, `a/../b`, `a//b`).
pub fn check_model_path(id: &str) -> Result<(), GatewayError> {
    check_model(id)?;
    if id.split('/').any(|segment| segment.is_empty() || segment == "." || segment == "..") {
        return Err(GatewayError::InvalidModel("the model id in the path must not contain empty or dot segments"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_model_names_pass() {
        for name in [
            "gemini-2.5-flash-lite",
            "google/gemini-2.5-pro",
            "claude-3-5-sonnet@20240620",
            "accounts/fireworks/models/llama-v3p1-70b",
            "gpt-4o-2024-08-06",
            "ft:gpt-4.1-mini:acme::abc123",
        ] {
            assert!(check_model(name).is_ok(), "{name}");
            assert!(check_model_path(name).is_ok() || name.contains("::"), "{name}");
        }
    }

    #[test]
    fn oversized_or_strange_names_are_refused() {
        assert!(check_model(&"a".repeat(MAX_MODEL_LEN)).is_ok());
        assert!(check_model(&"a".repeat(MAX_MODEL_LEN + 1)).is_err());
        for bad in ["", "gpt 4", "gpt\u{0}4", "gpt\n4", "gemini%2F..", "модель", "a\"b", "a?b", "a#b", "a\\b"] {
            assert!(check_model(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn path_ids_refuse_dot_and_empty_segments() {
        for bad in ["..", ".", "a/../b", "../stats", "a//b", "/a", "a/", "gemini-x/../../stats"] {
            assert!(check_model_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_model_path("google/gemini-2.5-pro").is_ok());
        assert!(check_model_path("gemini-2.5..pro").is_ok(), "dots inside a segment are fine");
    }
}
