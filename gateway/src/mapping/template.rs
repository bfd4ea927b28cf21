//! Topic templates: `fieldmq/{gateway}/{node}` and the like.
//!
//! A template is parsed once, when the config is loaded, into literal text
//! and placeholders, so rendering a topic per reading is a few string pushes
//! and an unknown placeholder is a config error, never a surprise topic.

use std::fmt;

/// The template a device gets when its config names none.
pub const DEFAULT_TOPIC: &str = "fieldmq/{gateway}/{node}";

/// The node name that would publish onto `fieldmq/{gateway}/status`.
pub const RESERVED_NODE: &str = "status";

/// Why `name` cannot be one level of a topic (a gateway id, a node name),
/// or `None` when it can.
pub fn topic_level_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.contains(['/', '+', '#']) {
        Some("must not contain /, + or # (it is one level of a topic)")
    } else if name.contains(|c: char| c.is_control()) {
        Some("must not contain control characters")
    } else if name.starts_with('$') {
        Some("must not start with $ (reserved for broker topics)")
    } else {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Gateway,
    Node,
    Attribute,
    Kind,
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<Part>,
}

/// What a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct TopicValues<'a> {
    pub gateway: &'a str,
    pub node: &'a str,
    pub kind: &'a str,
    pub attribute: Option<&'a str>,
}

impl TopicTemplate {
    /// Parses a template; the error says which placeholder or character is wrong.
    pub fn parse(source: &str) -> Result<Self, String> {
        if source.is_empty() {
            return Err("a topic template must not be empty".into());
        }
        if source.contains(['+', '#']) {
            return Err("a topic template must not contain the MQTT wildcards + or #".into());
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("unclosed `{{` in topic template `{source}`"));
            };
            parts.push(match &rest[open + 1..open + close] {
                "gateway" => Part::Gateway,
                "node" => Part::Node,
                "attribute" => Part::Attribute,
                "kind" => Part::Kind,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}`, expected {{gateway}}, {{node}}, {{attribute}} or {{kind}}"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in topic template `{source}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(TopicTemplate { source: source.to_owned(), parts })
    }

    /// Whether the template names the attribute itself (then every
    /// attribute has its own topic whatever the format).
    pub fn has_attribute(&self) -> bool {
        self.parts.contains(&Part::Attribute)
    }

    /// Renders the topic. An `{attribute}` placeholder with no attribute
    /// renders empty; a template without the placeholder but given an
    /// attribute gets `/attribute` appended (the `value` format's topics).
    pub fn render(&self, values: TopicValues<'_>) -> String {
        let mut topic = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            topic.push_str(match part {
                Part::Text(text) => text,
                Part::Gateway => values.gateway,
                Part::Node => values.node,
                Part::Kind => values.kind,
                Part::Attribute => values.attribute.unwrap_or_default(),
            });
        }
        if let (Some(attribute), false) = (values.attribute, self.has_attribute()) {
            topic.push('/');
            topic.push_str(attribute);
        }
        topic
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUES: TopicValues<'static> =
        TopicValues { gateway: "pi-01", node: "meter-1", kind: "modbus-tcp", attribute: None };

    #[test]
    fn the_default_template_names_gateway_and_node() {
        let t = TopicTemplate::parse(DEFAULT_TOPIC).unwrap();
        assert_eq!(t.render(VALUES), "fieldmq/pi-01/meter-1");
        assert_eq!(
            t.render(TopicValues { attribute: Some("voltage"), ..VALUES }),
            "fieldmq/pi-01/meter-1/voltage"
        );
    }

    #[test]
    fn every_placeholder_renders() {
        let t = TopicTemplate::parse("site/{kind}/{gateway}-{node}/{attribute}/raw").unwrap();
        assert!(t.has_attribute());
        assert_eq!(
            t.render(TopicValues { attribute: Some("voltage"), ..VALUES }),
            "site/modbus-tcp/pi-01-meter-1/voltage/raw"
        );
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert_eq!(
            TopicTemplate::parse("a/{nod}").unwrap_err(),
            "unknown placeholder `{nod}`, expected {gateway}, {node}, {attribute} or {kind}"
        );
        assert!(TopicTemplate::parse("a/{node").unwrap_err().starts_with("unclosed"));
        assert!(TopicTemplate::parse("a/node}").unwrap_err().starts_with("unmatched"));
        assert!(TopicTemplate::parse("a/+/b").unwrap_err().contains("wildcards"));
        assert!(TopicTemplate::parse("").is_err());
    }
}
