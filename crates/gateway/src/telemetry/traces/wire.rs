//! Protobuf's wire format, as much of it as OTLP trace export writes:
//! varints, fixed-width numbers, length-delimited fields, and attributes
//! (`KeyValue` messages holding an `AnyValue`).
//!
//! Lengths are worked out arithmetically before a message is written, so
//! each message is written once, in place, with no intermediate structs.

use opentelemetry::{Array, Value};

/// Protobuf wire types.
pub const VARINT: u32 = 0;
pub const FIXED64: u32 = 1;
pub const LENGTH_DELIMITED: u32 = 2;
pub const FIXED32: u32 = 5;

pub fn varint_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub fn key_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

pub fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

/// A length-delimited field whose contents are `len` bytes long: its whole
/// size.
pub fn delimited_len(field: u32, len: usize) -> usize {
    key_len(field) + varint_len(len as u64) + len
}

pub fn put_delimited_header(out: &mut Vec<u8>, field: u32, len: usize) {
    put_key(out, field, LENGTH_DELIMITED);
    put_varint(out, len as u64);
}

pub fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_delimited_header(out, field, bytes.len());
    out.extend_from_slice(bytes);
}

/// A string or bytes field as proto3 writes it: left out when empty.
pub fn put_nonempty(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_bytes(out, field, bytes);
    }
}

pub fn nonempty_len(field: u32, len: usize) -> usize {
    if len == 0 { 0 } else { delimited_len(field, len) }
}

/// The size of what [`put_uint`] writes.
pub fn uint_len(field: u32, value: u64) -> usize {
    if value == 0 { 0 } else { key_len(field) + varint_len(value) }
}

/// An integer field as proto3 writes it: left out when zero.
pub fn put_uint(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        put_key(out, field, VARINT);
        put_varint(out, value);
    }
}

/// The size of what [`put_fixed64`] writes.
pub fn fixed64_len(field: u32, value: u64) -> usize {
    if value == 0 { 0 } else { key_len(field) + 8 }
}

pub fn put_fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        put_key(out, field, FIXED64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// A span attribute's value: what the gateway's spans record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttributeValue<'a> {
    Str(&'a str),
    I64(i64),
    Bool(bool),
}

impl<'a> From<&'a str> for AttributeValue<'a> {
    fn from(value: &'a str) -> Self {
        Self::Str(value)
    }
}

impl<'a> From<&'a String> for AttributeValue<'a> {
    fn from(value: &'a String) -> Self {
        Self::Str(value)
    }
}

impl From<i64> for AttributeValue<'_> {
    fn from(value: i64) -> Self {
        Self::I64(value)
    }
}

impl From<i32> for AttributeValue<'_> {
    fn from(value: i32) -> Self {
        Self::I64(i64::from(value))
    }
}

impl From<u16> for AttributeValue<'_> {
    fn from(value: u16) -> Self {
        Self::I64(i64::from(value))
    }
}

impl From<u32> for AttributeValue<'_> {
    fn from(value: u32) -> Self {
        Self::I64(i64::from(value))
    }
}

impl From<u64> for AttributeValue<'_> {
    /// Saturating: an attribute is an `int64`.
    fn from(value: u64) -> Self {
        Self::I64(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<usize> for AttributeValue<'_> {
    fn from(value: usize) -> Self {
        Self::I64(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<bool> for AttributeValue<'_> {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

/// The length of an `AnyValue` message holding `value`.
fn attribute_value_len(value: AttributeValue<'_>) -> usize {
    match value {
        AttributeValue::Bool(_) => 2,
        AttributeValue::I64(i) => 1 + varint_len(i as u64),
        AttributeValue::Str(s) => delimited_len(1, s.len()),
    }
}

/// An `AnyValue`'s fields. A oneof member is written even when it holds its
/// type's default (`false`, `0`, `""`): that is what says which it is.
fn put_attribute_value(out: &mut Vec<u8>, value: AttributeValue<'_>) {
    match value {
        AttributeValue::Bool(b) => {
            put_key(out, 2, VARINT);
            out.push(u8::from(b));
        }
        AttributeValue::I64(i) => {
            put_key(out, 3, VARINT);
            put_varint(out, i as u64);
        }
        AttributeValue::Str(s) => put_bytes(out, 1, s.as_bytes()),
    }
}

/// One `KeyValue` message as repeated field `field`.
pub fn put_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: AttributeValue<'_>) {
    let value_len = attribute_value_len(value);
    let key_value_len = nonempty_len(1, key.len()) + delimited_len(2, value_len);
    out.reserve(delimited_len(field, key_value_len));
    if field < 16 && key_value_len < 0x80 {
        // Nearly every attribute: each key and length inside takes one
        // byte, so the heads are written whole rather than varint by
        // varint (this halved the cost of an attribute).
        out.extend_from_slice(&[((field << 3) | LENGTH_DELIMITED) as u8, key_value_len as u8]);
        if !key.is_empty() {
            out.extend_from_slice(&[(1 << 3) | LENGTH_DELIMITED as u8, key.len() as u8]);
            out.extend_from_slice(key.as_bytes());
        }
        out.extend_from_slice(&[(2 << 3) | LENGTH_DELIMITED as u8, value_len as u8]);
        match value {
            AttributeValue::Str(s) => {
                out.extend_from_slice(&[(1 << 3) | LENGTH_DELIMITED as u8, s.len() as u8]);
                out.extend_from_slice(s.as_bytes());
            }
            AttributeValue::Bool(b) => out.extend_from_slice(&[(2 << 3) | VARINT as u8, u8::from(b)]),
            AttributeValue::I64(i) => {
                out.push((3 << 3) | VARINT as u8);
                put_varint(out, i as u64);
            }
        }
        return;
    }
    put_delimited_header(out, field, key_value_len);
    put_nonempty(out, 1, key.as_bytes());
    put_delimited_header(out, 2, value_len);
    put_attribute_value(out, value);
}

/// The length of an `AnyValue` message holding an OpenTelemetry value
/// (resource attributes, which may hold any of them).
fn any_value_len(value: &Value) -> usize {
    match value {
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + varint_len(*i as u64),
        Value::F64(_) => 9,
        Value::String(s) => delimited_len(1, s.as_str().len()),
        Value::Array(array) => delimited_len(5, array_len(array)),
        _ => 0,
    }
}

/// The length of an `ArrayValue` message: each element an `AnyValue`.
fn array_len(array: &Array) -> usize {
    fn sum<T>(values: &[T], one: impl Fn(&T) -> usize) -> usize {
        values.iter().map(|v| delimited_len(1, one(v))).sum()
    }
    match array {
        Array::Bool(values) => sum(values, |_| 2),
        Array::I64(values) => sum(values, |i| 1 + varint_len(*i as u64)),
        Array::F64(values) => sum(values, |_| 9),
        Array::String(values) => sum(values, |s| delimited_len(1, s.as_str().len())),
        _ => 0,
    }
}

fn put_any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(b) => put_attribute_value(out, AttributeValue::Bool(*b)),
        Value::I64(i) => put_attribute_value(out, AttributeValue::I64(*i)),
        Value::F64(f) => {
            put_key(out, 4, FIXED64);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::String(s) => put_attribute_value(out, AttributeValue::Str(s.as_str())),
        Value::Array(array) => {
            put_delimited_header(out, 5, array_len(array));
            match array {
                Array::Bool(values) => values.iter().for_each(|v| put_element(out, &Value::Bool(*v))),
                Array::I64(values) => values.iter().for_each(|v| put_element(out, &Value::I64(*v))),
                Array::F64(values) => values.iter().for_each(|v| put_element(out, &Value::F64(*v))),
                Array::String(values) => values.iter().for_each(|v| {
                    put_delimited_header(out, 1, delimited_len(1, v.as_str().len()));
                    put_bytes(out, 1, v.as_str().as_bytes());
                }),
                _ => {}
            }
        }
        _ => {}
    }
}

/// One `ArrayValue.values` element.
fn put_element(out: &mut Vec<u8>, value: &Value) {
    put_delimited_header(out, 1, any_value_len(value));
    put_any_value(out, value);
}

/// One `KeyValue` message holding an OpenTelemetry value, as repeated
/// field `field`.
pub fn put_otel_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    let value_len = any_value_len(value);
    put_delimited_header(out, field, nonempty_len(1, key.len()) + delimited_len(2, value_len));
    put_nonempty(out, 1, key.as_bytes());
    put_delimited_header(out, 2, value_len);
    put_any_value(out, value);
}

/// One field read from a message: its number and, for the wire types a
/// reader here needs, its value.
enum Field<'a> {
    Varint(u32, u64),
    Delimited(u32, &'a [u8]),
    /// A fixed-width field, read past.
    Other,
}

/// Reads `message`'s fields in order; `None` when it is not well formed.
fn fields(mut message: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut fields = Vec::new();
    while !message.is_empty() {
        let key = read_varint(&mut message)?;
        let number = u32::try_from(key >> 3).ok()?;
        let field = match (key & 7) as u32 {
            VARINT => Field::Varint(number, read_varint(&mut message)?),
            LENGTH_DELIMITED => {
                let len = usize::try_from(read_varint(&mut message)?).ok()?;
                let (contents, rest) = message.split_at_checked(len)?;
                message = rest;
                Field::Delimited(number, contents)
            }
            FIXED64 => {
                message = message.get(8..)?;
                Field::Other
            }
            FIXED32 => {
                message = message.get(4..)?;
                Field::Other
            }
            _ => return None,
        };
        fields.push(field);
    }
    Some(fields)
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0_u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// What a collector's `ExportTraceServiceResponse` says it did not take.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartialSuccess {
    pub rejected_spans: u64,
    pub message: String,
}

/// The `partial_success` of an `ExportTraceServiceResponse`, when the
/// collector reported one (spans rejected, or a warning). An answer that
/// is empty or cannot be read reports none: the export itself succeeded.
pub fn partial_success(response: &[u8]) -> Option<PartialSuccess> {
    let mut partial = None;
    for field in fields(response)? {
        let Field::Delimited(1, contents) = field else { continue };
        let mut found = PartialSuccess::default();
        for inner in fields(contents)? {
            match inner {
                // An int64 as a varint; a negative count means nothing.
                Field::Varint(1, n) => found.rejected_spans = u64::try_from(n as i64).unwrap_or(0),
                Field::Delimited(2, text) => found.message = String::from_utf8_lossy(text).into_owned(),
                _ => {}
            }
        }
        partial = Some(found);
    }
    partial.filter(|p| p.rejected_spans > 0 || !p.message.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_take_the_bytes_protobuf_gives_them() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
            assert_eq!(prost::encoding::decode_varint(&mut out.as_slice()).unwrap(), value);
            assert_eq!(read_varint(&mut out.as_slice()), Some(value));
        }
    }

    #[test]
    fn a_partial_success_is_read_from_the_collectors_answer() {
        use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
        use prost::Message as _;
        let answer = |rejected_spans: i64, error_message: &str| {
            ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans,
                    error_message: error_message.to_owned(),
                }),
            }
            .encode_to_vec()
        };
        assert_eq!(
            partial_success(&answer(3, "span too large")),
            Some(PartialSuccess { rejected_spans: 3, message: "span too large".into() })
        );
        assert_eq!(
            partial_success(&answer(0, "deprecated field")),
            Some(PartialSuccess { rejected_spans: 0, message: "deprecated field".into() }),
            "a warning without rejections"
        );
        assert_eq!(partial_success(&answer(0, "")), None, "an empty partial success is a full one");
        assert_eq!(partial_success(&answer(-1, "")), None);
        assert_eq!(partial_success(&ExportTraceServiceResponse::default().encode_to_vec()), None);
        assert_eq!(partial_success(b""), None);
        // Fields it does not know are read past; a cut-off answer reports nothing.
        let mut with_unknown = vec![0x11, 1, 2, 3, 4, 5, 6, 7, 8, 0x1d, 1, 2, 3, 4];
        with_unknown.extend(answer(2, ""));
        assert_eq!(partial_success(&with_unknown).map(|p| p.rejected_spans), Some(2));
        let full = answer(2, "x");
        assert_eq!(partial_success(&full[..full.len() - 1]), None);
    }
}
