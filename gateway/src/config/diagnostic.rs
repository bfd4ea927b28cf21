//! Config errors that point at the text, and the parse that finds them all.
//!
//! serde stops at the first error. To report every mistake of a file in one
//! go, [`parse_all`] records the error, blanks out the entry it points at
//! (with spaces, so every byte offset after it stays valid), and parses
//! again, until the file parses or no progress is made. A table that lost a
//! required key this way would then report "missing field"; such echoes of
//! an error already reported are left out. A TOML syntax error ends the
//! search: what follows it cannot be read reliably.

use std::fmt;
use std::ops::Range;

use super::file::ConfigFile;

/// One problem with a config, at a place in its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Byte range of the offending text, when there is one.
    pub span: Option<Range<usize>>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Diagnostic {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Diagnostic { span: Some(span), message: message.into() }
    }

    pub fn whole_file(message: impl Into<String>) -> Self {
        Diagnostic { span: None, message: message.into() }
    }

    /// `file:line:col: message`, then the line with the span underlined.
    pub fn render<'a>(&'a self, source_name: &'a str, text: &'a str) -> impl fmt::Display + 'a {
        Rendered { diagnostic: self, source_name, text }
    }
}

struct Rendered<'a> {
    diagnostic: &'a Diagnostic,
    source_name: &'a str,
    text: &'a str,
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(span) = self.diagnostic.span.clone() else {
            return write!(f, "{}: {}", self.source_name, self.diagnostic.message);
        };
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..].find('\n').map_or(self.text.len(), |i| start + i);
        let line_no = self.text[..start].matches('\n').count() + 1;
        let col = self.text[line_start..start].chars().count() + 1;
        let line = self.text[line_start..line_end].trim_end_matches('\r');
        let width = self.text[start..span.end.clamp(start, line_end)].chars().count().max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        writeln!(f, "{}:{line_no}:{col}: {}", self.source_name, self.diagnostic.message)?;
        writeln!(f, "{gutter} |")?;
        writeln!(f, "{line_no} | {line}")?;
        write!(f, "{gutter} | {}{}", " ".repeat(col - 1), "^".repeat(width))
    }
}

/// Parses `text`, collecting every error instead of the first.
/// Returns the file as far as it could be read, and the errors in file order.
pub fn parse_all(text: &str) -> (Option<ConfigFile>, Vec<Diagnostic>) {
    let mut work = text.to_owned();
    let mut blanked: Vec<Range<usize>> = Vec::new();
    let mut diagnostics = Vec::new();
    // Each round blanks at least one line, so this bounds the work.
    for _ in 0..=text.lines().count() {
        let error = match toml::from_str::<ConfigFile>(&work) {
            Ok(file) => return (Some(file), sorted(diagnostics)),
            Err(error) => error,
        };
        let Some(span) = error.span() else {
            diagnostics.push(Diagnostic::whole_file(error.message()));
            break;
        };
        if toml::from_str::<toml::Table>(&work).is_err() {
            // A syntax error: nothing after it can be trusted.
            diagnostics.push(Diagnostic::at(span, error.message()));
            break;
        }
        let entry = entry_range(&work, span.clone());
        let echo = error.message().starts_with("missing field")
            && blanked.iter().any(|b| entry.start <= b.start && b.end <= entry.end);
        if !echo {
            diagnostics.push(Diagnostic::at(span, error.message()));
        }
        if entry.is_empty() || !blank(&mut work, entry.clone()) {
            break;
        }
        blanked.push(entry);
    }
    (None, sorted(diagnostics))
}

fn sorted(mut diagnostics: Vec<Diagnostic>) -> Vec<Diagnostic> {
    diagnostics.sort_by_key(|d| d.span.as_ref().map_or(0, |s| s.start));
    diagnostics
}

/// The text to blank for an error at `span`: a whole table when the error is
/// about its header (an unknown or incomplete table), else the key = value
/// entry holding the span, across as many lines as its value takes.
fn entry_range(text: &str, span: Range<usize>) -> Range<usize> {
    let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line_ends = text[start..].match_indices('\n').map(|(i, _)| start + i + 1).chain([text.len()]);
    if text[start..].trim_start().starts_with('[') {
        let next_header = text[start..]
            .match_indices('\n')
            .map(|(i, _)| start + i + 1)
            .find(|&l| text[l..].trim_start().starts_with('['));
        return start..next_header.unwrap_or(text.len());
    }
    // The shortest run of whole lines from `start` that parses on its own is
    // the entry (a multi-line array parses only once closed).
    let mut first_line_end = None;
    for end in line_ends.take(1000) {
        first_line_end.get_or_insert(end);
        if end > span.start && toml::from_str::<toml::Table>(&text[start..end]).is_ok() {
            return start..end;
        }
    }
    start..first_line_end.unwrap_or(text.len())
}

/// Replaces `range` with spaces, keeping newlines and the byte length (a
/// multi-byte character becomes as many spaces as it had bytes), so every
/// offset after it stays valid; false if nothing changed.
fn blank(text: &mut String, range: Range<usize>) -> bool {
    let blanked: String = text[range.clone()]
        .chars()
        .flat_map(|c| {
            let (fill, n) = if c == '\n' { ('\n', 1) } else { (' ', c.len_utf8()) };
            std::iter::repeat_n(fill, n)
        })
        .collect();
    if blanked == text[range.clone()] {
        return false;
    }
    text.replace_range(range, &blanked);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(text: &str) -> Vec<String> {
        parse_all(text).1.into_iter().map(|d| d.render("t.toml", text).to_string()).collect()
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_line_and_column() {
        let text = "[gateway]\nid = 5\n\n[[device]]\nname = \"host\"\nkind = \"system\"\npoll = \"soon\"\npoll_ms = 100\n";
        let got = messages(text);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].starts_with("t.toml:2:6: invalid type: integer `5`, expected a string"), "{}", got[0]);
        assert!(got[1].starts_with(
            "t.toml:7:8: invalid value: string \"soon\", expected a duration like \"250ms\", \"5s\" or \"2m\""
        ), "{}", got[1]);
        assert!(got[2].starts_with("t.toml:8:1: unknown field `poll_ms`, expected one of"), "{}", got[2]);
        assert!(got[2].ends_with("8 | poll_ms = 100\n  | ^^^^^^^"), "{}", got[2]);
    }

    #[test]
    fn a_blanked_required_key_is_not_reported_twice() {
        let text = "[[device]]\nname = \"a\"\nkind = \"sytem\"\n";
        let got = messages(text);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].starts_with("t.toml:3:8: invalid value: string \"sytem\", expected one of \"modbus-tcp\""),
            "{}",
            got[0]
        );
    }

    #[test]
    fn a_missing_required_key_points_at_its_table_and_the_rest_is_still_checked() {
        let text =
            "[[device]]\nkind = \"system\"\n\n[[device]]\nname = \"b\"\nkind = \"system\"\nformat = 3\n";
        let got = messages(text);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].starts_with("t.toml:1:1: missing field `name`"));
        assert!(
            got[1].starts_with("t.toml:7:10: invalid type: integer `3`, expected one of \"json\", \"value\""),
            "{}",
            got[1]
        );
    }

    #[test]
    fn a_multi_line_value_is_blanked_whole() {
        let text = "[broker]\nlisten = [\n  \"127.0.0.1:1883\",\n]\nlisten_ws = [\n  \"x\",\n]\nmax_connections = \"many\"\n";
        let got = messages(text);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].starts_with("t.toml:5:1: unknown field `listen_ws`"));
        assert!(got[1].starts_with("t.toml:8:19: invalid type: string \"many\""));
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let got = messages("[gateway\nid = \"x\"\n");
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with("t.toml:1:9:"), "{}", got[0]);
    }

    #[test]
    fn blanking_keeps_offsets_with_multibyte_text() {
        let mut text = String::from("a = \"°C\"\nb = 1\n");
        let len = text.len();
        assert!(blank(&mut text, 0..9));
        assert_eq!(text.len(), len);
        assert!(text.ends_with("\nb = 1\n"));
    }
}
