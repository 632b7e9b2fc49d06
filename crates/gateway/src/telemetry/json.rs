//! JSON log lines, written straight into the output buffer.
//!
//! tracing-subscriber's own JSON format stores a span's fields as a JSON
//! string and parses it back into a map for every event logged inside the
//! span, then serialises the event through `serde_json` maps. With one span
//! and one access-log line per request that was about 15 % of the gateway's
//! CPU per request (callgrind). Here span fields are stored as a ready JSON
//! fragment that every event copies as it is, and event fields are escaped
//! into the line directly. The shape of a line is the same:
//!
//! `{"timestamp":…,"level":"INFO","fields":{"message":…,…},"target":…,"span":{…,"name":"request"}}`

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The most a thread keeps of its span-field scratch buffer.
const MAX_SCRATCH_BYTES: usize = 16 * 1024;

/// Formats span fields as a JSON fragment: `"a":1,"b":"x"` (no braces).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonFragment;

impl<'writer> FormatFields<'writer> for JsonFragment {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        // A new span's fields go into an empty `String` that would grow
        // (and reallocate) several times over; they are written into a
        // per-thread scratch buffer that keeps its capacity instead, and
        // copied over once.
        thread_local! {
            static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
        }
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Formatting a field opened a span of its own (a global
                // dispatcher does not guard against re-entry): write directly.
                let mut visitor = FieldWriter { out: writer.by_ref(), first: true, result: Ok(()) };
                fields.record(&mut visitor);
                return visitor.result;
            };
            scratch.clear();
            let mut visitor = FieldWriter { out: Writer::new(&mut *scratch), first: true, result: Ok(()) };
            fields.record(&mut visitor);
            visitor.result?;
            let written = writer.write_str(&scratch);
            // An unusually large span is not kept around for good.
            if scratch.capacity() > MAX_SCRATCH_BYTES {
                *scratch = String::new();
            }
            written
        })
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut visitor = FieldWriter { out: current.as_writer(), first, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// One JSON object per event, on one line.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut out: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        out.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut out, SystemTime::now())?;
        out.write_str("\",\"level\":\"")?;
        out.write_str(meta.level().as_str())?;
        out.write_str("\",\"fields\":{")?;
        let mut visitor = FieldWriter { out: out.by_ref(), first: true, result: Ok(()) };
        event.record(&mut visitor);
        visitor.result?;
        out.write_str("},\"target\":")?;
        write_str_value(&mut out, meta.target())?;
        if let Some(span) = ctx.lookup_current() {
            out.write_str(",\"span\":{")?;
            let extensions = span.extensions();
            if let Some(fields) = extensions.get::<FormattedFields<N>>()
                && !fields.fields.is_empty()
            {
                out.write_str(&fields.fields)?;
                out.write_char(',')?;
            }
            out.write_str("\"name\":")?;
            write_str_value(&mut out, span.name())?;
            out.write_char('}')?;
        }
        out.write_str("}\n")
    }
}

/// Writes `"name":value` pairs, comma-separated.
struct FieldWriter<'a> {
    out: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl FieldWriter<'_> {
    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            write_str_value(&mut self.out, field.name())?;
            self.out.write_char(':')?;
            value(&mut self.out)
        })();
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field, |out| write_str_value(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field, |out| {
            out.write_char('"')?;
            write!(Escaping(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.pair(field, |out| {
            out.write_char('"')?;
            write!(Escaping(&mut *out), "{value}")?;
            out.write_char('"')
        });
    }

    // Numbers through `itoa` and `ryu` rather than `fmt`: the access line
    // carries a status and a latency on every request, and `fmt`'s float
    // formatting alone cost about a thousand instructions per line.
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.pair(field, |out| out.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pair(field, |out| out.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.pair(field, |out| out.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.pair(field, |out| {
            if value.is_finite() {
                out.write_str(ryu::Buffer::new().format_finite(value))
            } else {
                out.write_str("null")
            }
        });
    }
}

fn write_str_value(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaping(&mut *out).write_str(value)?;
    out.write_char('"')
}

/// `2026-12-06T09:41:00.123456Z`: UTC, microseconds. The part up to the
/// seconds is formatted once per second per thread and kept; only the
/// microseconds are written for each line.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (seconds, micros) = (since_epoch.as_secs(), since_epoch.subsec_micros());
    SECOND.with_borrow_mut(|(cached_second, text)| {
        if *cached_second != seconds {
            let time = chrono::DateTime::<chrono::Utc>::from(now);
            text.clear();
            write!(text, "{}", time.format("%Y-%m-%dT%H:%M:%S"))?;
            *cached_second = seconds;
        }
        out.write_str(text)
    })?;
    // `.{micros:06}Z` without the formatting machinery.
    let mut fraction = *b".000000Z";
    let mut rest = micros;
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.write_str(std::str::from_utf8(&fraction).map_err(|_| fmt::Error)?)
}

/// Bytes that cannot appear as they are inside a JSON string: `"`, `\` and
/// the control characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Escapes what it is given as the inside of a JSON string.
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Almost nothing logged needs escaping: one pass without an early
        // exit (which the compiler turns into wide comparisons) decides,
        // and the common case is copied whole.
        let needs_escape = s.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
        if !needs_escape {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, byte) in s.bytes().enumerate() {
            // One table lookup per byte; the rare escape takes the slow path.
            if !NEEDS_ESCAPE[usize::from(byte)] {
                continue;
            }
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                _ => "",
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_str_value(&mut out, s).unwrap();
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds_across_second_boundaries() {
        let at = |secs: u64, micros: u32| {
            let mut out = String::new();
            write_timestamp(&mut out, UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000)).unwrap();
            out
        };
        // 2026-12-06T09:41:00Z
        let base = 1_796_550_060;
        assert_eq!(at(base, 7), "2026-12-06T09:41:00.000007Z");
        assert_eq!(at(base, 999_999), "2026-12-06T09:41:00.999999Z", "same second, cached prefix");
        assert_eq!(at(base + 1, 0), "2026-12-06T09:41:01.000000Z", "the next second is formatted anew");
        assert_eq!(at(base - 60, 5), "2026-12-06T09:40:00.000005Z", "and so is an earlier one");
        let parsed = chrono::DateTime::parse_from_rfc3339(&at(base, 123_456)).unwrap();
        assert_eq!(parsed.timestamp_subsec_micros(), 123_456);
    }

    #[test]
    fn every_control_character_and_quote_is_escaped_and_nothing_else() {
        for byte in 0u8..0x80 {
            let text = char::from(byte).to_string();
            let out = escaped(&text);
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, text);
            let needs = byte < 0x20 || byte == b'"' || byte == b'\\';
            assert_eq!(out.len() > 3, needs, "byte {byte:#x}: {out}");
        }
    }

    #[test]
    fn strings_are_escaped_as_json() {
        let nasty = "a\"b\\c\nd\u{1}é\t";
        let out = escaped(nasty);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, nasty);
        assert_eq!(escaped("plain"), "\"plain\"");
    }

    #[test]
    fn lines_are_json_with_event_and_span_fields() {
        use std::sync::{Arc, Mutex};
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let subscriber = || {
            let sink = buf.clone();
            tracing_subscriber::fmt()
                .fmt_fields(JsonFragment)
                .event_format(JsonLine)
                .with_writer(move || SinkWriter(sink.clone()))
                .finish()
        };
        tracing::subscriber::with_default(subscriber(), || {
            let span = tracing::info_span!("request", request_id = %"r\"1", path = "/v1/x");
            let _entered = span.enter();
            tracing::info!(status = 200_u16, latency_ms = 0.5, ok = true, detail = ?Some("x"), "response \"done\"");
        });
        tracing::subscriber::with_default(subscriber(), || tracing::warn!(value = f64::NAN, "outside"));
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["fields"]["message"], "response \"done\"");
        assert_eq!(first["fields"]["status"], 200);
        assert_eq!(first["fields"]["latency_ms"], 0.5);
        assert_eq!(first["fields"]["ok"], true);
        assert_eq!(first["fields"]["detail"], "Some(\"x\")");
        assert_eq!(first["span"]["request_id"], "r\"1");
        assert_eq!(first["span"]["path"], "/v1/x");
        assert_eq!(first["span"]["name"], "request");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'), "{first}");
        assert!(first["target"].as_str().unwrap().contains("json"));
        assert_eq!(lines[1]["fields"]["value"], serde_json::Value::Null);
        assert!(lines[1].get("span").is_none());
    }

    #[test]
    fn a_span_whose_field_opens_another_span_keeps_its_own_fields() {
        // Formatting this value opens and enters a span of its own while the
        // outer span's fields are being written into the per-thread buffer.
        struct OpensSpan;
        impl fmt::Debug for OpensSpan {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let inner = tracing::info_span!("inner", inner_field = "in");
                let _entered = inner.enter();
                tracing::info!("from inside");
                f.write_str("outer value")
            }
        }
        let text = logged(|| {
            let outer = tracing::info_span!("outer", first = "a", value = ?OpensSpan, last = 7_u64);
            let _entered = outer.enter();
            tracing::info!("from outside");
        });
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let outside = lines.iter().find(|l| l["fields"]["message"] == "from outside").expect(&text);
        assert_eq!(outside["span"]["first"], "a");
        assert_eq!(outside["span"]["value"], "outer value");
        assert_eq!(outside["span"]["last"], 7);
        assert_eq!(outside["span"]["name"], "outer");
        // A scoped dispatcher drops what is logged inside its own callbacks;
        // should one ever arrive, it is a line of its own with its own span.
        for inside in lines.iter().filter(|l| l["fields"]["message"] == "from inside") {
            assert_eq!(inside["span"]["inner_field"], "in");
        }
    }

    #[test]
    fn whole_tiny_and_large_numbers_are_json_numbers() {
        let text = logged(|| {
            tracing::info!(whole = 3.0, tiny = 1e-7, large = 1234.5678, negative = -12_i64, max = u64::MAX, "n");
        });
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        let fields = &line["fields"];
        assert_eq!(fields["whole"], 3.0);
        assert_eq!(fields["tiny"], 1e-7);
        assert_eq!(fields["large"], 1234.5678);
        assert_eq!(fields["negative"], -12);
        assert_eq!(fields["max"], u64::MAX);
    }

    /// What `log` logs through the JSON format, as text.
    fn logged(log: impl FnOnce()) -> String {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFragment)
            .event_format(JsonLine)
            .with_writer(move || SinkWriter(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(buf.lock().unwrap().clone()).unwrap()
    }

    struct SinkWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
