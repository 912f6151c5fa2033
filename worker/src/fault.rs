//! Injected faults, for rehearsing recovery: `CXRCLIP_FAULT="rank=R,step=S[,hang][,once=FILE]"`
//! makes rank `R` fail with an error as it starts step `S` (1-based, the step the metrics would
//! call `S`) of a training or fine-tuning job, or with `hang` stop computing there for good
//! while its heartbeat goes on (a wedged GPU, a stuck collective: the coordinator's step
//! watchdog, `--step-timeout`, must catch it). With `once=FILE` the fault fires only while
//! `FILE` does not exist, and creates it: the restarted job then runs through, as after a real
//! transient failure. The end-to-end tests use it to check that a failing rank is reported
//! with its reason and the run restarts from its checkpoint without hanging the others; an
//! operator can use it for a fire drill of a cluster's setup.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// A parsed `CXRCLIP_FAULT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub step: u64,
    /// Hang instead of failing.
    pub hang: bool,
    pub once: Option<PathBuf>,
}

impl Fault {
    /// The fault in the environment, if any; a malformed value is an error (a drill that
    /// silently never fires would prove nothing).
    pub fn from_env() -> Result<Option<Fault>> {
        match std::env::var("CXRCLIP_FAULT") {
            Ok(v) if !v.trim().is_empty() => Fault::parse(&v).map(Some).context("CXRCLIP_FAULT"),
            _ => Ok(None),
        }
    }

    pub fn parse(text: &str) -> Result<Fault> {
        let (mut rank, mut step, mut once, mut hang) = (None, None, None, false);
        for part in text.split(',') {
            if part.trim() == "hang" {
                hang = true;
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                bail!("'{part}' is not key=value (expected rank=R,step=S[,hang][,once=FILE])")
            };
            match key.trim() {
                "rank" => rank = Some(value.trim().parse().with_context(|| format!("rank '{value}'"))?),
                "step" => step = Some(value.trim().parse().with_context(|| format!("step '{value}'"))?),
                "once" => once = Some(PathBuf::from(value.trim())),
                other => bail!("unknown key '{other}' (expected rank, step, hang, once)"),
            }
        }
        match (rank, step) {
            (Some(rank), Some(step)) if step >= 1 => Ok(Fault { rank, step, hang, once }),
            (Some(_), Some(_)) => bail!("step counts from 1"),
            _ => bail!("needs rank=R and step=S"),
        }
    }

    /// Fails (or hangs) when this is the rank and step the fault names (and its `once` file is
    /// absent).
    pub fn check(&self, rank: usize, step: u64) -> Result<()> {
        if rank != self.rank || step != self.step {
            return Ok(());
        }
        if let Some(f) = &self.once {
            if f.exists() {
                return Ok(());
            }
            std::fs::write(f, format!("fired at rank {rank} step {step}\n"))
                .with_context(|| format!("writing the fault's once-file {}", f.display()))?;
        }
        if self.hang {
            eprintln!("worker: rank {rank}: injected hang (CXRCLIP_FAULT) at step {step}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        bail!("injected fault (CXRCLIP_FAULT) at step {step}")
    }
}

/// Checks the environment's fault, if any, for `rank` starting step `step` (1-based).
pub fn check(fault: &Option<Fault>, rank: usize, step: u64) -> Result<()> {
    fault.as_ref().map_or(Ok(()), |f| f.check(rank, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_fires_once() {
        let dir = std::env::temp_dir().join(format!("cxrclip-fault-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("fired");
        let _ = std::fs::remove_file(&marker);
        let f = Fault::parse(&format!("rank=1, step=6, once={}", marker.display())).unwrap();
        assert_eq!((f.rank, f.step), (1, 6));
        assert!(f.check(0, 6).is_ok() && f.check(1, 5).is_ok());
        let e = f.check(1, 6).unwrap_err().to_string();
        assert!(e.contains("injected fault") && e.contains("step 6"), "{e}");
        assert!(marker.exists());
        assert!(f.check(1, 6).is_ok(), "fires once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in ["rank=1", "step=2", "rank=x,step=2", "rank=1,step=0", "rank=1,step=2,when=now", "oops"] {
            assert!(Fault::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Fault::parse("rank=0,step=1").unwrap().once, None);
        assert!(!Fault::parse("rank=0,step=1").unwrap().hang);
        assert!(Fault::parse("rank=0, hang ,step=1").unwrap().hang);
    }
}
