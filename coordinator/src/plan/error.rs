//! A problem in a plan, with the file and line it is on, and the text it came from.

use std::fmt;
use std::ops::Range;

/// One problem: `FILE:LINE: reason` (no line for problems that belong to no line, such as a
/// command-line override).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The message may quote the plan's own text: its control characters are shown
        // escaped, so that a plan cannot drive the operator's terminal (found by `plan::fuzz`).
        let message = printable(&self.message);
        match self.line {
            Some(l) => write!(f, "{}:{l}: {message}", self.file),
            None => write!(f, "{}: {message}", self.file),
        }
    }
}

/// `text` with its control characters escaped as the network's strings are, line by line (a
/// message may quote several lines of the plan).
fn printable(text: &str) -> String {
    text.split('\n').map(proto::printable).collect::<Vec<_>>().join("\n")
}

impl std::error::Error for PlanError {}

/// The plan's text and the name to report it by.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    pub fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// A problem at a span of the text.
    pub fn at(&self, span: &Range<usize>, message: impl Into<String>) -> PlanError {
        PlanError { file: self.name.to_string(), line: Some(self.line(span.start)), message: message.into() }
    }

    /// A problem at a line.
    pub fn at_line(&self, line: usize, message: impl Into<String>) -> PlanError {
        PlanError { file: self.name.to_string(), line: Some(line), message: message.into() }
    }

    /// A problem that belongs to no line of the file.
    pub fn whole(&self, message: impl Into<String>) -> PlanError {
        PlanError { file: self.name.to_string(), line: None, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        let e = PlanError { file: "p.toml".into(), line: Some(3), message: "unknown variant `\u{1b}[31m`".into() };
        assert_eq!(e.to_string(), "p.toml:3: unknown variant `\\u{1b}[31m`");
    }

    #[test]
    fn offsets_map_to_lines() {
        let s = Source { name: "p.toml", text: "a = 1\nb = 2\n\nc = 3" };
        assert_eq!(s.line(0), 1);
        assert_eq!(s.line(5), 1); // the newline itself ends line 1
        assert_eq!(s.line(6), 2);
        assert_eq!(s.line(13), 4);
        assert_eq!(s.line(1000), 4);
        assert_eq!(s.at(&(6..7), "bad").to_string(), "p.toml:2: bad");
    }
}
