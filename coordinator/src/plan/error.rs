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
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
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
