//! Failures a restart cannot change: the same job from the same checkpoint fails the same way
//! (a model that does not load, a loss gone NaN, no GPU, a data set none of whose images
//! decode). The worker marks them so in its failure report, and the coordinator stops at once
//! with the cause instead of spending its restarts on them; anything else (a dead peer, a lost
//! connection, a full disk that may be freed) stays retryable.

use std::fmt;

/// The context that marks an error permanent: what a restart cannot change.
#[derive(Debug, Clone, Copy)]
pub struct Permanent(pub &'static str);

impl fmt::Display for Permanent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Permanent {}

/// Whether `e` (or any context below its top) was marked [`Permanent`].
pub fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Permanent>()) || e.downcast_ref::<Permanent>().is_some()
}

#[cfg(test)]
mod tests {
    use anyhow::{anyhow, Context};

    use super::*;

    #[test]
    fn the_mark_survives_further_context_and_plain_errors_stay_retryable() {
        let e = anyhow!("step 3: the loss is NaN").context(Permanent("the loss is not finite"));
        let e = e.context("rank 1").context("the job");
        assert!(is_permanent(&e));
        assert!(format!("{e:#}").contains("the loss is not finite: step 3: the loss is NaN"), "{e:#}");
        let r: anyhow::Result<()> = Err(std::io::Error::other("connection reset")).context("ring");
        assert!(!is_permanent(&r.unwrap_err()));
    }
}
