//! Deserializing admin bodies from a parsed JSON value, as `serde_json`
//! would, except that a struct must be a JSON object. Serde's derived
//! structs also accept an array of their fields in order, so without this
//! `["acme", "Acme"]` would create a tenant and `"limits": [1]` would set a
//! rate limit: input the document says is invalid.

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{Error as _, IntoDeserializer, Unexpected, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Error, Value};

/// A JSON value to deserialize, objects only where structs are expected.
#[derive(Clone, Copy)]
pub struct StrictValue<'a>(pub &'a Value);

impl<'de> IntoDeserializer<'de, Error> for StrictValue<'de> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> serde::Deserializer<'de> for StrictValue<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => n.deserialize_any(visitor),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.iter().map(StrictValue));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(members) => {
                let mut map = MapDeserializer::new(members.iter().map(|(k, v)| (k.as_str(), StrictValue(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    /// The admin API's enums are strings (`"monthly"`, `"clamp"`).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use tollgate_store::{Limits, Period, TenantPolicy};

    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, Error> {
        let value: Value = serde_json::from_str(json).unwrap();
        T::deserialize(StrictValue(&value))
    }

    #[test]
    fn structs_must_be_objects() {
        assert!(parse::<Limits>("[null, null]").is_err());
        assert!(parse::<TenantPolicy>(r#"{"limits": [1]}"#).is_err());
        assert_eq!(parse::<Limits>(r#"{"rpm": 5}"#).unwrap().rpm, Some(5));
        let policy = parse::<TenantPolicy>(r#"{"limits": {"tpm": 9}, "over_cap": "reject"}"#).unwrap();
        assert_eq!(policy.limits.tpm, Some(9));
    }

    #[test]
    fn everything_else_reads_as_serde_json_reads_it() {
        assert_eq!(parse::<Period>(r#""monthly""#).unwrap(), Period::Monthly);
        assert!(parse::<Period>(r#"{"monthly": null}"#).is_err());
        assert_eq!(parse::<Vec<u32>>("[50, 80]").unwrap(), [50, 80]);
        assert_eq!(parse::<Option<Option<String>>>("null").unwrap(), None);
        let any: Value = parse(r#"{"a": [1, -2, 3.5, "x", true, null]}"#).unwrap();
        assert_eq!(any, serde_json::json!({"a": [1, -2, 3.5, "x", true, null]}));
        assert!(parse::<Limits>(r#"{"rpm": 5, "colour": 1}"#).is_err(), "unknown fields are still refused");
        assert!(parse::<u32>("-1").is_err());
    }
}
