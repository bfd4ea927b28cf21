//! The two payload formats, byte for byte as DESIGN.md specifies them.
//!
//! `json`: `{"node":"meter-1","ts":"2026-11-23T10:15:00.123Z","attributes":{"voltage":230.4},"units":{"voltage":"V"}}`
//! with attributes in the order the device reported them, and `units` left
//! out when no attribute has one. `value`: the bare value as text.
//!
//! The JSON is written by hand rather than through a serializer: the shape is
//! fixed, the key order is part of the contract, and it runs once per reading.

use std::fmt::Write;
use std::time::SystemTime;

use adapters::{Attribute, Value};

/// The `json` payload of a reading (or of the attributes selected from it).
pub fn json(node: &str, ts: SystemTime, attributes: &[&Attribute]) -> String {
    let mut out = String::with_capacity(64 + attributes.len() * 24);
    out.push_str("{\"node\":");
    push_string(&mut out, node);
    out.push_str(",\"ts\":\"");
    let _ = write!(out, "{}", humantime::format_rfc3339_millis(ts));
    out.push_str("\",\"attributes\":{");
    for (i, attribute) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(&mut out, &attribute.name);
        out.push(':');
        push_value(&mut out, &attribute.value);
    }
    out.push('}');
    let mut with_unit = attributes.iter().filter_map(|a| Some((&a.name, a.unit.as_deref()?))).peekable();
    if with_unit.peek().is_some() {
        out.push_str(",\"units\":{");
        for (i, (name, unit)) in with_unit.enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_string(&mut out, name);
            out.push(':');
            push_string(&mut out, unit);
        }
        out.push('}');
    }
    out.push('}');
    out
}

/// The `value` payload of one attribute: `230.4`, `42`, `true`, `abc`.
pub fn value(value: &Value) -> String {
    value.to_string()
}

fn push_value(out: &mut String, value: &Value) {
    match value {
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        // JSON has no NaN or infinity; null says "no number" honestly.
        Value::Float(f) if !f.is_finite() => out.push_str("null"),
        Value::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Text(s) => push_string(out, s),
    }
}

/// A JSON string literal (RFC 8259 section 7).
fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-11-23T10:15:00.123Z
    fn ts() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_795_428_900_123)
    }

    #[test]
    fn json_is_exactly_the_documented_shape() {
        let voltage = Attribute::new("voltage", 230.4, Some("V"));
        let breaker = Attribute::new("breaker", true, None);
        assert_eq!(
            json("meter-1", ts(), &[&voltage, &breaker]),
            r#"{"node":"meter-1","ts":"2026-11-23T10:15:00.123Z","attributes":{"voltage":230.4,"breaker":true},"units":{"voltage":"V"}}"#
        );
    }

    #[test]
    fn json_leaves_out_units_when_there_are_none() {
        let count = Attribute::new("count", 42i64, None);
        assert_eq!(
            json("n", ts(), &[&count]),
            r#"{"node":"n","ts":"2026-11-23T10:15:00.123Z","attributes":{"count":42}}"#
        );
    }

    #[test]
    fn json_escapes_text_and_writes_null_for_non_finite_numbers() {
        let text = Attribute::new("fw", "v1 \"beta\"\n\\x\u{1}", None);
        let nan = Attribute::new("t", f64::NAN, Some("°C"));
        assert_eq!(
            json("a\"b", ts(), &[&text, &nan]),
            "{\"node\":\"a\\\"b\",\"ts\":\"2026-11-23T10:15:00.123Z\",\"attributes\":{\"fw\":\"v1 \\\"beta\\\"\\n\\\\x\\u0001\",\"t\":null},\"units\":{\"t\":\"°C\"}}"
        );
    }

    #[test]
    fn json_timestamps_keep_milliseconds_even_when_zero() {
        let a = Attribute::new("x", 1i64, None);
        let whole_second = UNIX_EPOCH + Duration::from_secs(1_795_428_900);
        assert!(json("n", whole_second, &[&a]).contains(r#""ts":"2026-11-23T10:15:00.000Z""#));
    }

    #[test]
    fn value_payloads_are_bare_text() {
        assert_eq!(value(&Value::Float(230.4)), "230.4");
        assert_eq!(value(&Value::Bool(true)), "true");
        assert_eq!(value(&Value::Integer(7)), "7");
    }
}
