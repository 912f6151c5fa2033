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

/// A failure that is another rank's: this rank lost its connection to rank `rank` (it closed
/// the connection, or sent nothing within the timeout). The failure report names that rank
/// (`JobResult.lost_peer`), so the coordinator does not blame the rank that noticed.
#[derive(Debug, Clone)]
pub struct PeerLost {
    pub rank: usize,
    /// What this rank saw, e.g. "ring: rank 1 closed its connection (it stopped or died)".
    pub what: String,
}

impl PeerLost {
    /// The error for a lost `rank`, described by `what`.
    pub fn error(rank: usize, what: String) -> anyhow::Error {
        anyhow::Error::new(PeerLost { rank, what })
    }
}

impl fmt::Display for PeerLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for PeerLost {}

/// The rank whose loss caused `e`, if it did (under any context added since).
pub fn lost_peer(e: &anyhow::Error) -> Option<usize> {
    e.downcast_ref::<PeerLost>().map(|p| p.rank)
}

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
        let e = r.unwrap_err();
        assert!(!is_permanent(&e));
        assert_eq!(lost_peer(&e), None);
    }

    #[test]
    fn a_lost_peer_is_found_under_further_context_and_keeps_the_message() {
        let e = PeerLost::error(1, "ring: rank 1 closed its connection (it stopped or died)".into());
        let e = e.context("all-gather").context("step 6");
        assert_eq!(lost_peer(&e), Some(1));
        assert!(!is_permanent(&e));
        assert_eq!(format!("{e:#}"), "step 6: all-gather: ring: rank 1 closed its connection (it stopped or died)");
    }
}
