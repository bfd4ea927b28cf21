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

    /// Where it sorts: by position, errors about the whole file last.
    pub fn position(&self) -> usize {
        self.span.as_ref().map_or(usize::MAX, |s| s.start)
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
        // A tab is shown as one space, so the caret below lines up with it.
        let line = self.text[line_start..line_end].trim_end_matches('\r').replace('\t', " ");
        let width = self.text[start..span.end.clamp(start, line_end)].chars().count().max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        writeln!(f, "{}:{line_no}:{col}: {}", self.source_name, self.diagnostic.message)?;
        writeln!(f, "{gutter} |")?;
        writeln!(f, "{line_no} | {line}")?;
        write!(f, "{gutter} | {}{}", " ".repeat(col - 1), "^".repeat(width))
    }
}

/// After this many errors the parse stops: a file this wrong is better
/// fixed from the top, and each round re-parses the whole file.
const MAX_ERRORS: usize = 50;

/// What [`parse_all`] found.
pub struct Parsed {
    /// The file as far as it could be read (`None` if it never parsed).
    pub file: Option<ConfigFile>,
    /// Every error, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// The byte ranges blanked to get past errors.
    blanked: Vec<Range<usize>>,
}

impl Parsed {
    /// Whether an entry was blanked inside the top-level table (`[gateway]`,
    /// one `[[device]]` with its sub-tables...) that holds `offset`. Checks
    /// that combine keys must skip such a table: what they would see is not
    /// what the user wrote, and their complaints would be echoes.
    pub fn touched(&self, text: &str, offset: usize) -> bool {
        let headers: Vec<usize> = line_starts(text)
            .filter(|&l| header_path(&text[l..]).is_some_and(|p| !p.contains('.')))
            .collect();
        let start = headers.iter().rev().find(|&&h| h <= offset).copied().unwrap_or(0);
        let end = headers.iter().find(|&&h| h > offset).copied().unwrap_or(text.len());
        self.blanked.iter().any(|b| b.start < end && start < b.end)
    }
}

/// Parses `text`, collecting every error instead of the first.
pub fn parse_all(text: &str) -> Parsed {
    let mut parsed = Parsed { file: None, diagnostics: Vec::new(), blanked: Vec::new() };
    if let Err(error) = toml::from_str::<toml::Table>(text) {
        // A syntax error: what follows it cannot be read reliably.
        parsed.diagnostics.push(match error.span() {
            Some(span) => Diagnostic::at(span, error.message()),
            None => Diagnostic::whole_file(error.message()),
        });
        return parsed;
    }
    let mut work = text.to_owned();
    // The keys blanked so far, to recognise "missing field" echoes.
    let mut blanked_keys: Vec<(Range<usize>, String)> = Vec::new();
    // Every round blanks at least one non-blank character, so this ends.
    loop {
        let error = match toml::from_str::<ConfigFile>(&work) {
            Ok(file) => {
                parsed.file = Some(file);
                break;
            }
            Err(error) => error,
        };
        if parsed.diagnostics.len() >= MAX_ERRORS {
            parsed.diagnostics.push(Diagnostic::whole_file(format!("stopped after {MAX_ERRORS} errors")));
            break;
        }
        let (Some(span), Some(entry)) = (error.span(), error.span().and_then(|s| entry_range(&work, s)))
        else {
            parsed.diagnostics.push(match error.span() {
                Some(span) => Diagnostic::at(span, error.message()),
                None => Diagnostic::whole_file(error.message()),
            });
            break;
        };
        let echo = missing_field(error.message()).is_some_and(|field| {
            blanked_keys.iter().any(|(r, key)| entry.start <= r.start && r.end <= entry.end && key == field)
        });
        if !echo {
            parsed.diagnostics.push(Diagnostic::at(span, error.message()));
        }
        if let Some(key) = key_of(&work[entry.clone()]) {
            blanked_keys.push((entry.clone(), key));
        }
        if !blank(&mut work, entry.clone()) {
            break;
        }
        parsed.blanked.push(entry);
    }
    parsed.diagnostics.sort_by_key(Diagnostic::position);
    parsed
}

/// `x` in serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// The key of a `key = value` entry.
fn key_of(entry: &str) -> Option<String> {
    let (key, _) = entry.split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

fn line_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).filter(move |&l| l < text.len())
}

/// The dotted path of a `[table]` or `[[array.of.tables]]` header line.
fn header_path(line: &str) -> Option<&str> {
    let line = line.lines().next()?.trim_start();
    if !line.starts_with('[') {
        return None;
    }
    let inner = line.trim_start_matches('[');
    let end = inner.find(']')?;
    Some(inner[..end].trim())
}

/// The text to blank for an error at `span`, such that the rest still
/// parses: a whole table with its sub-tables when the error is about its
/// header (an unknown or incomplete table), else the whole `key = value`
/// entry holding the span, across as many lines as its value takes.
fn entry_range(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let at = span.start.min(text.len());
    let line = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let keeps_syntax = |range: Range<usize>| {
        let mut candidate = text.to_owned();
        blank(&mut candidate, range) && toml::from_str::<toml::Table>(&candidate).is_ok()
    };
    if let Some(path) = header_path(&text[line..]) {
        let sub_table = format!("{path}.");
        let end = line_starts(text)
            .filter(|&l| l > line)
            .find(|&l| header_path(&text[l..]).is_some_and(|p| !p.starts_with(&sub_table)))
            .unwrap_or(text.len());
        return keeps_syntax(line..end).then_some(line..end);
    }
    // The entry starts on this line or, inside a multi-line value, on one
    // above it; it is the shortest run of whole lines that parses alone.
    let mut starts: Vec<usize> = line_starts(text).filter(|&l| l <= line).collect();
    starts.reverse();
    for start in starts.into_iter().take(200) {
        if header_path(&text[start..]).is_some() {
            break;
        }
        let ends = text[start..].match_indices('\n').map(|(i, _)| start + i + 1).chain([text.len()]);
        for end in ends.filter(|&e| e > at).take(200) {
            if toml::from_str::<toml::Table>(&text[start..end]).is_ok() {
                if keeps_syntax(start..end) {
                    return Some(start..end);
                }
                break;
            }
        }
    }
    None
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
        parse_all(text).diagnostics.into_iter().map(|d| d.render("t.toml", text).to_string()).collect()
    }

    /// Asserts the errors of `text`, each by the start of its rendering.
    fn expect_errors(text: &str, starts: &[&str]) {
        let got = messages(text);
        assert_eq!(got.len(), starts.len(), "{got:#?}");
        for (got, start) in got.iter().zip(starts) {
            assert!(got.starts_with(start), "{got}\ndoes not start with\n{start}");
        }
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_line_and_column() {
        let text = "[gateway]\nid = 5\n\n[[device]]\nname = \"host\"\nkind = \"system\"\npoll = \"soon\"\npoll_ms = 100\n";
        expect_errors(
            text,
            &[
                "t.toml:2:6: invalid type: integer `5`, expected a string",
                "t.toml:7:8: invalid value: string \"soon\", expected a duration like \"250ms\", \"5s\" or \"2m\"",
                "t.toml:8:1: unknown field `poll_ms`, expected one of",
            ],
        );
        // The offending text is shown, underlined.
        assert!(messages(text)[2].ends_with("8 | poll_ms = 100\n  | ^^^^^^^"));
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
        expect_errors(
            text,
            &[
                "t.toml:1:1: missing field `name`",
                "t.toml:7:10: invalid type: integer `3`, expected one of \"json\", \"value\"",
            ],
        );
    }

    #[test]
    fn a_multi_line_value_is_blanked_whole() {
        let text = "[broker]\nlisten = [\n  \"127.0.0.1:1883\",\n]\nlisten_ws = [\n  \"x\",\n]\nmax_connections = \"many\"\n";
        expect_errors(
            text,
            &["t.toml:5:1: unknown field `listen_ws`", "t.toml:8:19: invalid type: string \"many\""],
        );
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        expect_errors("[gateway\nid = \"x\"\n", &["t.toml:1:9:"]);
    }

    #[test]
    fn a_real_missing_field_is_reported_beside_another_error_in_its_table() {
        expect_errors(
            "[[device]]\nkind = \"sytem\"\n",
            &["t.toml:1:1: missing field `name`", "t.toml:2:8: invalid value: string \"sytem\""],
        );
    }

    #[test]
    fn a_table_is_blanked_with_its_sub_tables() {
        let text = "[[device]]\nkind = \"system\"\n  [[device.attribute]]\n  name = \"load_1m\"\n\n[[device]]\nname = \"b\"\nkind = \"system\"\npoll = 1\n";
        expect_errors(text, &["t.toml:1:1: missing field `name`", "t.toml:9:8: invalid type: integer `1`"]);
    }

    #[test]
    fn a_bad_element_of_a_multi_line_array_blanks_the_whole_entry() {
        let text = "[broker]\nlisten = [\"a\",\n  5]\nmax_connections = \"x\"\n";
        expect_errors(
            text,
            &["t.toml:3:3: invalid type: integer `5`", "t.toml:4:19: invalid type: string \"x\""],
        );
    }

    #[test]
    fn a_hopeless_file_stops_after_a_bounded_number_of_errors() {
        let text: String = (0..200).map(|i| format!("key{i} = {i}\n")).collect();
        let got = messages(&text);
        assert_eq!(got.len(), MAX_ERRORS + 1);
        assert_eq!(got[MAX_ERRORS], format!("t.toml: stopped after {MAX_ERRORS} errors"));
    }

    #[test]
    fn only_the_table_with_a_blanked_entry_counts_as_touched() {
        let text = "[gateway]\nid = 1\n[[device]]\nname = \"a\"\nkind = \"system\"\n[[device]]\nname = \"b\"\nkind = \"system\"\npoll = 1\n";
        let parsed = parse_all(text);
        let offset_of = |s: &str| text.find(s).unwrap();
        assert!(parsed.touched(text, offset_of("id = 1")));
        assert!(!parsed.touched(text, offset_of("\"a\"")));
        assert!(parsed.touched(text, offset_of("\"b\"")));
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
