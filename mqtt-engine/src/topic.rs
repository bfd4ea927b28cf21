//! Topic names and topic filters, with the rules of MQTT 3.1.1 section 4.7
//! and MQTT 5.0 section 4.7.
//!
//! Both are validated once, when made, so matching never has to re-check:
//! a [`TopicName`] holds no wildcard; a [`TopicFilter`] has `#` only as its
//! whole last level and `+` only as a whole level. Matching walks the levels
//! of both without allocating.

use std::fmt;

/// The longest topic a UTF-8 string in MQTT can hold.
const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty (MQTT-4.7.3-1).
    #[error("a topic must not be empty")]
    Empty,
    /// Longer than 65535 bytes.
    #[error("a topic must be at most 65535 bytes")]
    TooLong,
    /// Holds U+0000 (MQTT-4.7.3-2).
    #[error("a topic must not contain the null character")]
    Null,
    /// A wildcard in a topic name (MQTT-3.3.2-2).
    #[error("a topic name must not contain the wildcards + or #")]
    WildcardInName,
    /// `#` not alone as the last level (MQTT-4.7.1-2).
    #[error("# must be the last level of a filter, alone")]
    MisplacedMultiLevel,
    /// `+` not alone in its level (MQTT-4.7.1-3).
    #[error("+ must occupy a whole level of a filter")]
    MisplacedSingleLevel,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Null);
    }
    Ok(())
}

/// A topic a message is published to: no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicName(String);

impl TopicName {
    /// Validates `s` as a topic name.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        check_common(&s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(s))
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is under `$SYS`, the broker's own statistics.
    pub fn is_sys(&self) -> bool {
        is_sys(&self.0)
    }
}

/// Whether `topic` is under `$SYS`: the broker's own, never written by a
/// client, never saved, not counted as retained.
pub(crate) fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subscription's filter: levels, `+` for one level, `#` for the rest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates `s` as a topic filter.
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        check_common(&s)?;
        let levels = s.split('/').count();
        for (i, level) in s.split('/').enumerate() {
            if level.contains('#') && (level != "#" || i + 1 != levels) {
                return Err(TopicError::MisplacedMultiLevel);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::MisplacedSingleLevel);
            }
        }
        Ok(TopicFilter(s))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a message published to `topic` matches this filter.
    ///
    /// A filter starting with a wildcard does not match a topic starting
    /// with `$` (MQTT-4.7.2-1); `#` also matches its parent level
    /// (`a/#` matches `a`); `+` matches one level, even an empty one.
    pub fn matches(&self, topic: &TopicName) -> bool {
        let topic = topic.as_str();
        if topic.starts_with('$') && self.0.starts_with(['+', '#']) {
            return false;
        }
        let mut filter_levels = self.0.split('/');
        let mut topic_levels = topic.split('/');
        loop {
            match (filter_levels.next(), topic_levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(filter: &str, topic: &str) -> bool {
        TopicFilter::new(filter).unwrap().matches(&TopicName::new(topic).unwrap())
    }

    #[test]
    fn multi_level_wildcard_matches_parent_and_children() {
        // MQTT-4.7.1-2 and the non-normative examples of 4.7.1.2.
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "sport/tennis"));
        assert!(!matches("sport/tennis/#", "sport/football"));
    }

    #[test]
    fn single_level_wildcard_matches_exactly_one_level() {
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
    }

    #[test]
    fn wildcards_at_the_start_do_not_match_dollar_topics() {
        // MQTT-4.7.2-1.
        assert!(!matches("#", "$SYS/broker/load"));
        assert!(!matches("+/broker/load", "$SYS/broker/load"));
        assert!(matches("$SYS/#", "$SYS/broker/load"));
        assert!(matches("$SYS/+/load", "$SYS/broker/load"));
    }

    #[test]
    fn filters_are_case_sensitive_and_exact() {
        assert!(!matches("ACCOUNTS", "Accounts"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn invalid_filters_and_names_are_refused() {
        assert_eq!(TopicFilter::new("sport/tennis#"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(TopicFilter::new("sport/#/ranking"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(TopicFilter::new("sport+"), Err(TopicError::MisplacedSingleLevel));
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new("a/+/b"), Err(TopicError::WildcardInName));
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::Null));
        assert_eq!(TopicName::new("x".repeat(65_536)), Err(TopicError::TooLong));
    }
}
