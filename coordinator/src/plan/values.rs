//! Range checks of single values, each problem recorded at the value's line. NaN fails every
//! check (the comparisons are written so that it does), and so do infinities.

use toml::Spanned;

use super::error::{PlanError, Source};

/// Collects the problems of one plan.
pub struct Checker<'a> {
    pub src: Source<'a>,
    pub errors: Vec<PlanError>,
}

impl<'a> Checker<'a> {
    pub fn new(src: Source<'a>) -> Self {
        Checker { src, errors: Vec::new() }
    }

    pub fn at<T>(&mut self, v: &Spanned<T>, message: impl Into<String>) {
        self.errors.push(self.src.at(&v.span(), message));
    }

    pub fn at_span(&mut self, span: &std::ops::Range<usize>, message: impl Into<String>) {
        self.errors.push(self.src.at(span, message));
    }

    pub fn at_line(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(self.src.at_line(line, message));
    }

    pub fn whole(&mut self, message: impl Into<String>) {
        self.errors.push(self.src.whole(message));
    }

    pub fn line_of<T>(&self, v: &Spanned<T>) -> usize {
        self.src.line(v.span().start)
    }

    /// A fraction in (0, 1].
    pub fn fraction(&mut self, v: &Spanned<f64>, key: &str) -> Option<f64> {
        let x = *v.get_ref();
        if x > 0.0 && x <= 1.0 {
            Some(x)
        } else {
            self.at(v, format!("`{key}` = {x} is outside (0, 1]"));
            None
        }
    }

    /// A fraction in (0, 1): some of a set, never all of it.
    pub fn open_fraction(&mut self, v: &Spanned<f64>, key: &str) -> Option<f64> {
        let x = *v.get_ref();
        if x > 0.0 && x < 1.0 {
            Some(x)
        } else {
            self.at(v, format!("`{key}` = {x} is outside (0, 1)"));
            None
        }
    }

    /// A finite number > 0.
    pub fn positive(&mut self, v: &Spanned<f64>, key: &str) -> Option<f64> {
        let x = *v.get_ref();
        if x > 0.0 && x.is_finite() {
            Some(x)
        } else {
            self.at(v, format!("`{key}` = {x} must be a finite number > 0"));
            None
        }
    }

    /// A finite number >= 0.
    pub fn non_negative(&mut self, v: &Spanned<f64>, key: &str) -> Option<f64> {
        let x = *v.get_ref();
        if x >= 0.0 && x.is_finite() {
            Some(x)
        } else {
            self.at(v, format!("`{key}` = {x} must be a finite number >= 0"));
            None
        }
    }

    /// An integer >= `min`, as a usize.
    pub fn count(&mut self, v: &Spanned<u64>, key: &str, min: u64) -> Option<usize> {
        let x = *v.get_ref();
        if x >= min && usize::try_from(x).is_ok() {
            Some(x as usize)
        } else {
            self.at(v, format!("`{key}` = {x} must be at least {min}"));
            None
        }
    }

    /// A number in [lo, hi) (finite).
    pub fn in_range(&mut self, v: &Spanned<f64>, key: &str, lo: f64, hi: f64) -> Option<f64> {
        let x = *v.get_ref();
        if x >= lo && x < hi {
            Some(x)
        } else {
            self.at(v, format!("`{key}` = {x} is outside [{lo}, {hi})"));
            None
        }
    }
}
