//! The broker's access-control list, in mosquitto's `acl_file` syntax.
//!
//! The syntax is mosquitto's (`man 5 mosquitto.conf`, "acl_file") so that
//! users moving a LAN from mosquitto to fieldmq can bring their file as it
//! is:
//!
//! ```text
//! # Anonymous clients (no username): the lines before any `user` line.
//! topic read fieldmq/#
//!
//! user dashboard
//! topic readwrite fieldmq/#
//! topic deny fieldmq/secrets/#
//!
//! # Every client, wherever the line is: %c is the client id, %u the username.
//! pattern write devices/%c/#
//! ```
//!
//! # Semantics
//!
//! - A client's rules are the `topic` rules of its user (of the anonymous
//!   block when it has no username) and every `pattern` rule.
//! - **Deny wins**: a matching `deny` rule refuses access whatever allows
//!   it elsewhere, whatever the order of the lines. Otherwise a matching
//!   rule with the right access grants it: `read` or `readwrite` to receive
//!   a message or subscribe, `write` or `readwrite` to publish.
//! - **Default deny**: once an ACL exists, what no rule grants is refused.
//!   An empty [`Acl`] refuses everything.
//! - A topic is matched as a subscription would be: `+` one level, `#` the
//!   rest and the parent level, and a rule starting with a wildcard never
//!   reaches a `$` topic (`#` does not grant `$SYS/...`; `$SYS/#` does).
//! - A subscription is allowed only if a read rule *covers* its filter:
//!   every topic the filter can match is matched by the rule, so that
//!   `fieldmq/#` allows `fieldmq/+/x` and `fieldmq` but not `#`. It is
//!   refused if a deny rule covers it; a deny rule that covers only part of
//!   it leaves it allowed, and the per-message read check withholds the
//!   denied messages. `$share/<group>/<filter>` is checked as `<filter>`.
//!
//! # Patterns
//!
//! `%c` and `%u` may stand anywhere in a level (`dev-%c`). A pattern does not
//! match when what it would substitute is empty or holds `/`, `+` or `#`: a
//! client must not widen its own subtree by choosing its id (`pattern write
//! devices/%c` with the id `#`). For the same reason a substitution never
//! lets a pattern reach a `$` topic its text does not name (`%c/#` with the
//! id `$SYS`). A pattern using `%u` never matches an anonymous client.
//!
//! # Where fieldmq is stricter than mosquitto
//!
//! mosquitto skips what it does not understand; here a line it cannot read
//! is an error, reported with its line and column, since a typo in an ACL is
//! a hole or an outage:
//!
//! - an unknown keyword or an empty `user` line;
//! - `topic deny` with no filter (mosquitto reads it as readwrite on the
//!   topic `deny`);
//! - `topic reed a/b`: more than one word with no access word first
//!   (mosquitto grants readwrite on `reed a/b`). A filter holding spaces
//!   therefore needs its access word: `topic readwrite my topic`;
//! - an invalid filter such as `a/#/b`.

use std::collections::HashMap;

use crate::topic::TopicFilter;

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn from_word(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }

    fn grants(self, want: Want) -> bool {
        matches!(
            (self, want),
            (Access::Read | Access::ReadWrite, Want::Read) | (Access::Write | Access::ReadWrite, Want::Write)
        )
    }
}

/// What a client asks for: subscribing asks for [`Want::Read`].
#[derive(Debug, Clone, Copy)]
enum Want {
    Read,
    Write,
}

/// One level of a rule's filter, split at parse time so a check only walks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Plus,
    Hash,
    /// A `pattern` level holding `%c` or `%u`, matched piece by piece
    /// against a topic level so no substituted string is ever built.
    Template(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    ClientId,
    Username,
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    levels: Vec<Level>,
    /// Whether the rule may match a topic starting with `$`: only when its
    /// first level starts with a literal `$`, so neither a leading wildcard
    /// (MQTT-4.7.2-1) nor a leading substitution reaches `$SYS`.
    reaches_dollar: bool,
    uses_username: bool,
}

/// The client a check is for, with each substitution already vetted:
/// `None` when it must not be substituted (absent, empty, or holding
/// `/`, `+`, `#`), which makes every level using it fail to match.
/// Vetted only when a `pattern` needs it: most checks never substitute,
/// and this runs for every delivery.
struct Who<'a> {
    raw: (Option<&'a str>, &'a str),
    vetted: std::cell::OnceCell<(Option<&'a str>, Option<&'a str>)>,
}

impl<'a> Who<'a> {
    fn new(user: Option<&'a str>, client_id: &'a str) -> Self {
        Who { raw: (user, client_id), vetted: std::cell::OnceCell::new() }
    }

    /// (user, client id), each `None` unless it may be substituted.
    fn substitutes(&self) -> (Option<&'a str>, Option<&'a str>) {
        *self.vetted.get_or_init(|| {
            let usable = |s: &&str| !s.is_empty() && !s.contains(['/', '+', '#']);
            (self.raw.0.filter(usable), Some(self.raw.1).filter(usable))
        })
    }
}

impl Rule {
    fn new(access: Access, filter: &str, pattern: bool) -> Rule {
        let levels: Vec<Level> = filter
            .split('/')
            .map(|level| match level {
                "+" => Level::Plus,
                "#" => Level::Hash,
                _ if pattern => template(level),
                _ => Level::Literal(level.to_string()),
            })
            .collect();
        let reaches_dollar = match levels.first() {
            Some(Level::Literal(text)) => text.starts_with('$'),
            Some(Level::Template(pieces)) => {
                matches!(pieces.first(), Some(Piece::Text(t)) if t.starts_with('$'))
            }
            _ => false,
        };
        let uses_username =
            levels.iter().any(|l| matches!(l, Level::Template(pieces) if pieces.contains(&Piece::Username)));
        Rule { access, levels, reaches_dollar, uses_username }
    }

    /// Whether the rule matches a message published to `topic`.
    fn matches_topic(&self, topic: &str, who: &Who) -> bool {
        if topic.starts_with('$') && !self.reaches_dollar {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            let Some(t) = topic_levels.next() else {
                // `a/#` matches `a`: only a `#` may outlast the topic.
                return *level == Level::Hash;
            };
            let ok = match level {
                Level::Hash => return true,
                Level::Plus => true,
                Level::Literal(text) => text == t,
                Level::Template(pieces) => template_matches(pieces, t, who),
            };
            if !ok {
                return false;
            }
        }
        topic_levels.next().is_none()
    }

    /// Whether every topic the subscription `filter` can match is matched
    /// by this rule.
    fn covers(&self, filter: &str, who: &Who) -> bool {
        // A filter starting with `$` only matches `$` topics; one starting
        // with a wildcard matches none, so the rule needs no `$` for it.
        if filter.starts_with('$') && !self.reaches_dollar {
            return false;
        }
        let mut sub_levels = filter.split('/');
        let mut parent_is_empty = true;
        for (index, level) in self.levels.iter().enumerate() {
            let sub = sub_levels.next();
            // A subscription's `#` matches its parent level too, unless that
            // parent is the empty topic, which no publish can have (`#`,
            // `/#`): then `+/#` in the rule covers it all the same.
            if sub == Some("#")
                && parent_is_empty
                && *level == Level::Plus
                && self.levels.get(index + 1) == Some(&Level::Hash)
            {
                return true;
            }
            parent_is_empty = index == 0 && sub == Some("");
            let ok = match (level, sub) {
                (Level::Hash, _) => return true,
                // The subscription's `#` also matches its parent level and
                // any depth: only a `#` in the rule (above) covers it.
                (_, None | Some("#")) => false,
                (Level::Plus, Some(_)) => true,
                // Neither a literal nor a substitution can be `+` (the
                // filter was validated, the substitution vetted), so these
                // refuse a subscription's `+` by inequality.
                (Level::Literal(text), Some(s)) => text == s,
                (Level::Template(pieces), Some(s)) => template_matches(pieces, s, who),
            };
            if !ok {
                return false;
            }
        }
        sub_levels.next().is_none()
    }
}

/// Splits a `pattern` level into text and substitutions; a level with
/// neither `%c` nor `%u` stays a literal (any other `%` is plain text, as
/// in mosquitto).
fn template(level: &str) -> Level {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = level;
    while let Some(at) = rest.find('%') {
        text.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let piece = match after.as_bytes().first() {
            Some(b'c') => Piece::ClientId,
            Some(b'u') => Piece::Username,
            _ => {
                text.push('%');
                rest = after;
                continue;
            }
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(piece);
        rest = &after[1..];
    }
    if pieces.is_empty() {
        return Level::Literal(level.to_string());
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Level::Template(pieces)
}

fn template_matches(pieces: &[Piece], mut level: &str, who: &Who) -> bool {
    for piece in pieces {
        let expected = match piece {
            Piece::Text(text) => text.as_str(),
            Piece::ClientId => match who.substitutes().1 {
                Some(id) => id,
                None => return false,
            },
            Piece::Username => match who.substitutes().0 {
                Some(user) => user,
                None => return false,
            },
        };
        match level.strip_prefix(expected) {
            Some(rest) => level = rest,
            None => return false,
        }
    }
    level.is_empty()
}

/// A line of an ACL file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct AclError {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// An access-control list: who may publish, receive and subscribe to what.
///
/// The default (empty) list refuses everything; see the module doc for the
/// rules.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    /// Reads and parses an ACL file; errors carry the path
    /// (`path:line:col: what`).
    pub fn load(path: &std::path::Path) -> Result<Acl, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Acl::parse(&text).map_err(|errors| {
            errors
                .iter()
                .map(|e| format!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message))
                .collect()
        })
    }

    /// Parses an ACL file's text, returning every error found, in line
    /// order, if any.
    pub fn parse(text: &str) -> Result<Acl, Vec<AclError>> {
        let mut acl = Acl::default();
        let mut errors = Vec::new();
        let mut user: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error =
                |at: &str, message: String| AclError { line: index + 1, column: column_of(raw, at), message };
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" if rest.is_empty() => {
                    errors.push(error(&line[keyword.len()..], "missing username after `user`".into()));
                }
                "user" => {
                    // A user named twice gets both blocks, as in mosquitto.
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => match parse_rule(keyword, rest, line) {
                    Ok(rule) => {
                        let rules = if keyword == "pattern" {
                            &mut acl.patterns
                        } else if let Some(name) = &user {
                            acl.users.entry(name.clone()).or_default()
                        } else {
                            &mut acl.anonymous
                        };
                        rules.push(rule);
                    }
                    Err((at, message)) => errors.push(error(at, message)),
                },
                _ => errors.push(error(
                    keyword,
                    format!("unknown keyword `{keyword}`, expected `user`, `topic` or `pattern`"),
                )),
            }
        }
        if errors.is_empty() {
            Ok(acl)
        } else {
            Err(errors)
        }
    }

    /// Whether the client may receive a message published to `topic`, a
    /// valid topic name.
    pub fn may_read(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(user, client_id, Want::Read, |rule, who| rule.matches_topic(topic, who))
    }

    /// Whether the client may publish to `topic`, a valid topic name.
    pub fn may_write(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(user, client_id, Want::Write, |rule, who| rule.matches_topic(topic, who))
    }

    /// Whether the client may subscribe to `filter`, a valid topic filter,
    /// possibly shared (`$share/<group>/<filter>`).
    pub fn may_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/") {
            Some(shared) => match shared.split_once('/') {
                Some((_group, filter)) => filter,
                None => return false,
            },
            None => filter,
        };
        self.check(user, client_id, Want::Read, |rule, who| rule.covers(filter, who))
    }

    /// Whether an anonymous client could publish somewhere: an anonymous
    /// `topic` rule or a `pattern` without `%u` granting write. Deny rules
    /// are not weighed against them: this feeds a warning, where a rare
    /// false alarm is better than a missed one.
    pub fn grants_anonymous_write(&self) -> bool {
        let writes = |rule: &Rule| rule.access.grants(Want::Write);
        self.anonymous.iter().any(writes) || self.patterns.iter().any(|r| writes(r) && !r.uses_username)
    }

    /// How many `topic` and `pattern` rules the list holds.
    pub fn rule_count(&self) -> usize {
        self.anonymous.len() + self.patterns.len() + self.users.values().map(Vec::len).sum::<usize>()
    }

    fn check(
        &self,
        user: Option<&str>,
        client_id: &str,
        want: Want,
        matches: impl Fn(&Rule, &Who) -> bool,
    ) -> bool {
        let who = Who::new(user, client_id);
        let own = match user {
            Some(user) => self.users.get(user).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let mut granted = false;
        for rule in own.iter().chain(&self.patterns) {
            if rule.access == Access::Deny {
                // Deny wins, so every deny rule is tried even once granted.
                if matches(rule, &who) {
                    return false;
                }
            } else if !granted && rule.access.grants(want) && matches(rule, &who) {
                granted = true;
            }
        }
        granted
    }
}

/// Parses what follows `topic` or `pattern`; an error names the slice of
/// `line` it points at.
fn parse_rule<'a>(keyword: &str, rest: &'a str, line: &'a str) -> Result<Rule, (&'a str, String)> {
    let (first, after) = split_word(rest);
    let (access, filter) = match Access::from_word(first) {
        Some(_) if after.is_empty() => {
            return Err((&line[line.len()..], format!("missing topic filter after `{first}`")));
        }
        Some(access) => (access, after),
        None if first.is_empty() => {
            return Err((&line[line.len()..], format!("missing topic filter after `{keyword}`")));
        }
        // Without this, a misspelt access word would silently become part
        // of a readwrite filter, as it does in mosquitto.
        None if !after.is_empty() => {
            return Err((
                first,
                format!(
                    "unknown access `{first}`, expected `read`, `write`, `readwrite` or `deny` \
                     (a filter with spaces needs an access word before it)"
                ),
            ));
        }
        None => (Access::ReadWrite, first),
    };
    match TopicFilter::new(filter) {
        Ok(_) => Ok(Rule::new(access, filter, keyword == "pattern")),
        Err(why) => Err((filter, format!("invalid topic filter `{filter}`: {why}"))),
    }
}

/// Splits off the first word of a trimmed line; the rest is trimmed too.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (s, ""),
    }
}

/// The 1-based character column of `at`, a slice of `line`.
fn column_of(line: &str, at: &str) -> usize {
    let offset = (at.as_ptr() as usize).saturating_sub(line.as_ptr() as usize).min(line.len());
    line.get(..offset).map_or(offset, |before| before.chars().count()) + 1
}

#[cfg(test)]
#[path = "acl_tests.rs"]
mod tests;
