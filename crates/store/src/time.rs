//! Times are stored as integer milliseconds since the Unix epoch (UTC) on
//! both backends; the API works with `DateTime<Utc>`.

use chrono::{DateTime, Utc};

pub fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

pub fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}
