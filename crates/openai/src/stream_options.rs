//! Asking the upstream for stream usage on the client's behalf.

/// The request body with `stream_options.include_usage` set to `true`, or
/// `None` if the client already asked for it. Every other member keeps its
/// original bytes: when `stream_options` is absent (the common case) the
/// member is spliced in after the opening brace; otherwise only
/// `stream_options` is rewritten.
pub fn with_include_usage(body: &[u8], has_stream_options: bool, already_asked: bool) -> Option<Vec<u8>> {
    if already_asked {
        return None;
    }
    if !has_stream_options {
        let open = body.iter().position(|b| *b == b'{')?;
        let rest = &body[open + 1..];
        let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let member: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(member);
        out.extend_from_slice(rest);
        return Some(out);
    }
    crate::rewrite::rewrite(body, &[], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn splices_the_option_in_and_keeps_the_rest_byte_for_byte() {
        let body = br#"{ "model" : "x", "stream":true, "messages":[{"role":"user","content":"hi"}] }"#;
        let out = with_include_usage(body, false, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            r#"{"stream_options":{"include_usage":true}, "model" : "x", "stream":true, "messages":[{"role":"user","content":"hi"}] }"#
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rewrites_existing_stream_options_keeping_other_members() {
        let body = br#"{"model":"x","stream_options":{"include_usage":false,"other":1},"extra":{"a": [1, 2]}}"#;
        let out = with_include_usage(body, true, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""extra":{"a": [1, 2]}"#), "raw members untouched: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true, "other": 1}));
        assert!(text.find("\"model\"").unwrap() < text.find("\"stream_options\"").unwrap(), "order kept");
    }

    #[test]
    fn a_null_stream_options_is_replaced_not_duplicated() {
        let body = br#"{"model":"x","stream":true,"stream_options":null}"#;
        let out = with_include_usage(body, true, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("stream_options").count(), 1, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stream_options"], serde_json::json!({"include_usage": true}));
    }

    #[test]
    fn leaves_the_body_alone_when_the_client_asked() {
        assert!(with_include_usage(b"{}", true, true).is_none());
    }
}
