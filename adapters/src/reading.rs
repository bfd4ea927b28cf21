//! What every adapter yields: one poll of one node.
//!
//! A reading is deliberately small and owned: it crosses a channel from the
//! adapter's task to the gateway's mapping task, and nothing downstream needs
//! to borrow from the device.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

/// One poll of one node: its name, when it was read, and what was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The node (the `name` of a polled device, or a node a push device heard).
    pub node: String,
    /// When the values were read, wall-clock.
    pub ts: SystemTime,
    /// The attributes, in the order the device reports them.
    pub attributes: Vec<Attribute>,
}

/// One named value of a reading, with an optional unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    /// The attribute name, e.g. `voltage`.
    pub name: String,
    /// The value read.
    pub value: Value,
    /// The unit, e.g. `V`, if the attribute has one (shared: adapters keep
    /// one copy per configured attribute, not one per reading).
    pub unit: Option<Arc<str>>,
}

impl Attribute {
    /// An attribute with a unit.
    pub fn new(name: impl Into<String>, value: impl Into<Value>, unit: Option<&str>) -> Self {
        Attribute { name: name.into(), value: value.into(), unit: unit.map(Arc::from) }
    }
}

/// A reading's value: a number, a bool or a string.
///
/// Integers and floats are kept apart so that a counter read as `u32` is
/// published as `42`, never as `42.0` or with float noise.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A whole number.
    Integer(i64),
    /// A real number.
    Float(f64),
    /// An on/off value (coils, flags).
    Bool(bool),
    /// Text (serial numbers, firmware versions, string registers).
    Text(String),
}

impl Value {
    /// The value as a number, for deadband comparisons; `None` for bools and text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(_) | Value::Text(_) => None,
        }
    }
}

/// The bare text form used by `format = "value"` payloads and logs:
/// `230.4`, `42`, `true`, `abc`. Floats print in their shortest exact form.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Integer(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_print_in_their_bare_form() {
        assert_eq!(Value::Float(230.4).to_string(), "230.4");
        assert_eq!(Value::Float(5.0).to_string(), "5");
        assert_eq!(Value::Integer(-42).to_string(), "-42");
        assert_eq!(Value::Bool(true).to_string(), "true");
        assert_eq!(Value::Text("v1.2".into()).to_string(), "v1.2");
    }

    #[test]
    fn only_numbers_have_a_numeric_value() {
        assert_eq!(Value::Integer(3).as_f64(), Some(3.0));
        assert_eq!(Value::Bool(true).as_f64(), None);
        assert_eq!(Value::Text("1".into()).as_f64(), None);
    }
}
