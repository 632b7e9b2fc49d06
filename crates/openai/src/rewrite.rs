//! Changing top-level members of a JSON request body while every other
//! member keeps its exact bytes.

use indexmap::IndexMap;
use serde_json::Value;
use serde_json::value::RawValue;

/// Sets (or, with `None`, removes) top-level members. Members not named
/// keep their original bytes and order; new members go last.
pub fn set_members(body: &[u8], edits: &[(&str, Option<Value>)]) -> Option<Vec<u8>> {
    rewrite(body, edits, false)
}

/// [`set_members`], and with `include_usage` also sets
/// `stream_options.include_usage` to `true` (keeping the member's other
/// options; replacing a `null` or a non-object): one parse, one
/// serialization for every change a request needs.
pub fn rewrite(body: &[u8], edits: &[(&str, Option<Value>)], include_usage: bool) -> Option<Vec<u8>> {
    let mut members: IndexMap<String, Box<RawValue>> = serde_json::from_slice(body).ok()?;
    if include_usage {
        let mut options: serde_json::Map<String, Value> =
            members.get("stream_options").and_then(|raw| serde_json::from_str(raw.get()).ok()).unwrap_or_default();
        options.insert("include_usage".to_owned(), Value::Bool(true));
        let raw = RawValue::from_string(Value::Object(options).to_string()).ok()?;
        members.insert("stream_options".to_owned(), raw);
    }
    for (key, value) in edits {
        match value {
            None => {
                members.shift_remove(*key);
            }
            Some(v) => {
                let raw = RawValue::from_string(v.to_string()).ok()?;
                members.insert((*key).to_owned(), raw);
            }
        }
    }
    serde_json::to_vec(&members).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn edits_only_the_named_members() {
        let body = br#"{"model":"m","messages":[{"content":"a  b"}],"max_tokens":9000,"x":{"k": 1}}"#;
        let out = set_members(body, &[("max_tokens", Some(json!(100))), ("temperature", None)]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m","messages":[{"content":"a  b"}],"max_tokens":100,"x":{"k": 1}}"#
        );
        let added = set_members(br#"{"a":1}"#, &[("b", Some(json!(true)))]).unwrap();
        assert_eq!(added, br#"{"a":1,"b":true}"#);
    }

    #[test]
    fn edits_and_the_usage_option_go_in_one_rewrite() {
        let body = br#"{"model":"m","stream_options":{"x":1},"max_tokens":9000}"#;
        let out = rewrite(body, &[("max_tokens", Some(json!(100)))], true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m","stream_options":{"include_usage":true,"x":1},"max_tokens":100}"#
        );
        let out = rewrite(br#"{"stream_options":null}"#, &[], true).unwrap();
        assert_eq!(out, br#"{"stream_options":{"include_usage":true}}"#);
    }
}
