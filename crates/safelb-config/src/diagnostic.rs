//! Diagnostics: what is wrong with a config, where, which rule it broke and what to do.
//!
//! Every check in this crate reports through [`Diagnostics`] instead of returning early, so an
//! operator sees all problems of a file in one run. Spans are byte ranges into the source; they
//! are turned into `line:column` only when rendered.

use std::fmt::{self, Write as _};
use std::ops::Range;

use serde::Serialize;

/// How bad a finding is. Only errors make a config invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// The rules a config can break. The kebab-case name is printed and is stable for tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    Syntax,
    UnknownKey,
    MissingKey,
    WrongType,
    InvalidValue,
    InvalidDuration,
    InvalidAddress,
    UndefinedPool,
    EmptyPool,
    ZeroWeights,
    DuplicateName,
    DuplicateBackend,
    ShadowedRoute,
    UnusedPool,
    AdminNotLoopback,
    TestFailed,
    /// A route without exactly one of `pool`, `redirect`, `respond`, or with a key its action
    /// cannot use.
    RouteAction,
    UndefinedListener,
    InvalidHeader,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::UnknownKey => "unknown-key",
            Rule::MissingKey => "missing-key",
            Rule::WrongType => "wrong-type",
            Rule::InvalidValue => "invalid-value",
            Rule::InvalidDuration => "invalid-duration",
            Rule::InvalidAddress => "invalid-address",
            Rule::UndefinedPool => "undefined-pool",
            Rule::EmptyPool => "empty-pool",
            Rule::ZeroWeights => "zero-weights",
            Rule::DuplicateName => "duplicate-name",
            Rule::DuplicateBackend => "duplicate-backend",
            Rule::ShadowedRoute => "shadowed-route",
            Rule::UnusedPool => "unused-pool",
            Rule::AdminNotLoopback => "admin-not-loopback",
            Rule::TestFailed => "test-failed",
            Rule::RouteAction => "route-action",
            Rule::UndefinedListener => "undefined-listener",
            Rule::InvalidHeader => "invalid-header",
        }
    }
}

/// One finding, located by a byte span of the source.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub severity: Severity,
    pub rule: Rule,
    pub message: String,
    pub span: Range<usize>,
    pub hint: Option<String>,
}

/// All findings for one source file.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    file: String,
    source: String,
    items: Vec<Diagnostic>,
}

/// A diagnostic with its position resolved, as `--format json` prints it.
#[derive(Debug, Serialize)]
pub struct Located<'a> {
    pub severity: Severity,
    pub rule: Rule,
    pub file: &'a str,
    pub line: usize,
    pub column: usize,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'a str>,
}

impl Diagnostics {
    pub fn new(file: impl Into<String>, source: impl Into<String>) -> Self {
        Diagnostics {
            file: file.into(),
            source: source.into(),
            items: Vec::new(),
        }
    }

    pub fn error(&mut self, rule: Rule, span: Range<usize>, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Error, rule, span, message)
    }

    pub fn warning(&mut self, rule: Rule, span: Range<usize>, message: impl Into<String>) -> &mut Diagnostic {
        self.push(Severity::Warning, rule, span, message)
    }

    fn push(
        &mut self,
        severity: Severity,
        rule: Rule,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.items.push(Diagnostic {
            severity,
            rule,
            message: message.into(),
            span,
            hint: None,
        });
        self.items.last_mut().expect("an item was just pushed")
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn items(&self) -> &[Diagnostic] {
        &self.items
    }

    /// Findings in source order, with line and column (both 1-based; column counts characters).
    pub fn located(&self) -> Vec<Located<'_>> {
        let mut out: Vec<Located<'_>> = self
            .items
            .iter()
            .map(|d| {
                let (line, column) = line_col(&self.source, d.span.start);
                Located {
                    severity: d.severity,
                    rule: d.rule,
                    file: &self.file,
                    line,
                    column,
                    message: &d.message,
                    hint: d.hint.as_deref(),
                }
            })
            .collect();
        out.sort_by_key(|l| (l.line, l.column));
        out
    }

    /// Human output in the style of compilers: a header, the location, the line with a caret.
    pub fn render(&self) -> String {
        let mut order: Vec<&Diagnostic> = self.items.iter().collect();
        order.sort_by_key(|d| d.span.start);
        let mut out = String::new();
        for d in order {
            let (line, column) = line_col(&self.source, d.span.start);
            let kind = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let _ = writeln!(out, "{kind}[{}]: {}", d.rule.as_str(), d.message);
            let _ = writeln!(out, "  --> {}:{line}:{column}", self.file);
            let text = self.source.lines().nth(line - 1).unwrap_or("");
            let gutter = line.to_string();
            let pad = " ".repeat(gutter.len());
            let width = span_width(&self.source, &d.span, text, column);
            let (shown, caret) = snippet(text, column);
            let width = width.min(shown.chars().count().saturating_sub(caret).max(1));
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{gutter} | {shown}");
            let _ = write!(out, "{pad} | {}{}", " ".repeat(caret), "^".repeat(width));
            match &d.hint {
                Some(h) => {
                    let _ = writeln!(out, " {h}");
                }
                None => out.push('\n'),
            }
            out.push('\n');
        }
        let errors = self.items.iter().filter(|d| d.severity == Severity::Error).count();
        let warnings = self.items.len() - errors;
        let _ = writeln!(out, "{}: {errors} error(s), {warnings} warning(s)", self.file);
        out
    }
}

impl Diagnostic {
    pub fn hint(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// 1-based line and character column of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..floor_char_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Characters of a source line shown under a diagnostic at most: a line of a megabyte (a
/// minified or mangled file) is shown as a window around the column, marked with `…`.
const SNIPPET_CHARS: usize = 160;

/// The part of `line` to show and the caret's offset in it for 1-based `column`.
fn snippet(line: &str, column: usize) -> (String, usize) {
    let total = line.chars().count();
    if total <= SNIPPET_CHARS {
        return (line.to_string(), column - 1);
    }
    let from = (column - 1)
        .saturating_sub(SNIPPET_CHARS / 3)
        .min(total - SNIPPET_CHARS);
    let mut shown: String = line.chars().skip(from).take(SNIPPET_CHARS).collect();
    let mut caret = column - 1 - from;
    if from > 0 {
        shown.insert(0, '…');
        caret += 1;
    }
    if from + SNIPPET_CHARS < total {
        shown.push('…');
    }
    (shown, caret)
}

fn span_width(source: &str, span: &Range<usize>, line_text: &str, column: usize) -> usize {
    let start = floor_char_boundary(source, span.start.min(source.len()));
    let end = floor_char_boundary(source, span.end.min(source.len())).max(start);
    let chars = source[start..end].split('\n').next().unwrap_or("").chars().count();
    let room = line_text.chars().count().saturating_sub(column - 1);
    chars.clamp(1, room.max(1))
}

/// The closest known name to a misspelt one, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(given: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(given, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_and_in_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, src.find('=').unwrap()), (1, 3));
        assert_eq!(line_col(src, src.rfind('=').unwrap()), (2, 4));
    }

    #[test]
    fn a_long_line_is_shown_as_a_window_around_the_column() {
        assert_eq!(snippet("a = 1", 3), ("a = 1".to_string(), 2));
        let line = format!("{}={}", "x".repeat(100_000), "y".repeat(100_000));
        let (shown, caret) = snippet(&line, 100_001);
        assert_eq!(shown.chars().count(), SNIPPET_CHARS + 2, "the window and two ellipses");
        assert!(shown.starts_with('…') && shown.ends_with('…'));
        assert_eq!(
            shown.chars().nth(caret),
            Some('='),
            "the caret still points at the column"
        );
        let checked = crate::check("big.toml", &line);
        let rendered = checked.diagnostics.render();
        assert!(rendered.len() < 2_000, "{} bytes rendered", rendered.len());
        assert!(rendered.contains("big.toml:1:"), "{rendered}");
    }

    #[test]
    fn suggestion_only_for_close_names() {
        assert_eq!(did_you_mean("balanse", ["balance", "backends"]), Some("balance"));
        assert_eq!(did_you_mean("zzz", ["balance", "backends"]), None);
    }
}
