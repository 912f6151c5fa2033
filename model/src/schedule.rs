//! Learning-rate schedules, as pure functions of the step.

use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warm-up over `warmup` steps to the base rate, then a cosine decay to
    /// `min_ratio * base` at step `total` (open_clip's `cosine_lr` when `min_ratio` is 0).
    WarmupCosine {
        warmup: u64,
        total: u64,
        min_ratio: f64,
    },
    /// `torch.optim.lr_scheduler.OneCycleLR` with cosine annealing (two phases): from
    /// `base / div_factor` up to `base` at step `pct_start * total - 1`, then down to
    /// `base / div_factor / final_div_factor` at the last step, `total - 1`. Only the rate
    /// cycles: torch's default `cycle_momentum` (beta1 between 0.85 and 0.95) is not done.
    OneCycle {
        total: u64,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    },
}

fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

/// `OneCycleLR`'s defaults: the rate starts at `max_lr / 25` and ends at that over 1e4.
pub const ONE_CYCLE_DIV_FACTOR: f64 = 25.0;
pub const ONE_CYCLE_FINAL_DIV_FACTOR: f64 = 1e4;

impl Schedule {
    /// `OneCycleLR(total_steps=total, pct_start=pct_start)` with torch's other defaults.
    pub fn one_cycle(total: u64, pct_start: f64) -> Schedule {
        Schedule::OneCycle {
            total,
            pct_start,
            div_factor: ONE_CYCLE_DIV_FACTOR,
            final_div_factor: ONE_CYCLE_FINAL_DIV_FACTOR,
        }
    }

    /// The learning rate of (0-based) step `step` for base rate `base`.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupCosine { warmup, total, min_ratio } => {
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let pct = ((step - warmup) as f64 / span).min(1.0);
                    let min = base * min_ratio;
                    min + 0.5 * (1.0 + (PI * pct).cos()) * (base - min)
                }
            }
            Schedule::OneCycle { total, pct_start, div_factor, final_div_factor } => {
                let initial = base / div_factor;
                let min = initial / final_div_factor;
                let end_up = pct_start * total as f64 - 1.0;
                let end_down = total as f64 - 1.0;
                let s = step as f64;
                if s <= end_up {
                    // end_up = 0 (a one-step warm-up, where torch divides by zero): the peak.
                    let pct = if end_up > 0.0 { s / end_up } else { 1.0 };
                    cos_anneal(initial, base, pct)
                } else {
                    cos_anneal(base, min, ((s - end_up) / (end_down - end_up)).min(1.0))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn warmup_cosine_shape() {
        let s = Schedule::WarmupCosine { warmup: 10, total: 110, min_ratio: 0.0 };
        assert!(close(s.lr(1.0, 0), 0.1));
        assert!(close(s.lr(1.0, 9), 1.0));
        assert!(close(s.lr(1.0, 10), 1.0));
        assert!(close(s.lr(1.0, 60), 0.5));
        assert!(s.lr(1.0, 110).abs() < 1e-12);
    }

    #[test]
    fn one_cycle_matches_torch() {
        // torch OneCycleLR(max_lr=1, total_steps=100) (pct_start .3, div 25, final 1e4):
        // step 0 -> 0.04, step 29 -> 1.0, step 99 -> 4e-6; step 64 is half-way down.
        let s = Schedule::OneCycle { total: 100, pct_start: 0.3, div_factor: 25.0, final_div_factor: 1e4 };
        assert!(close(s.lr(1.0, 0), 0.04));
        assert!(close(s.lr(1.0, 29), 1.0));
        assert!(close(s.lr(1.0, 99), 4e-6));
        assert!(close(s.lr(1.0, 64), (1.0 + 4e-6) / 2.0));
        assert_eq!(Schedule::one_cycle(100, 0.3), s);
    }

    /// Values of torch's `OneCycleLR(opt, max_lr=3e-4, total_steps=T, pct_start=p)` (cosine,
    /// div_factor 25, final_div_factor 1e4) worked by hand from its phase rule: phase one ends
    /// at step `p*T - 1`, phase two at `T - 1`, and the rate is
    /// `end + (start - end) / 2 * (cos(pi * pct) + 1)` with `pct` the fraction of the phase.
    #[test]
    fn one_cycle_with_the_papers_and_the_tests_warm_up() {
        let base = 3e-4;
        let (initial, min) = (base / 25.0, base / 25.0 / 1e4);
        // T = 200, p = 0.05: phase one ends at step 9, so step 0 is at 1.2e-5, step 9 at the
        // peak, step 199 at 1.2e-9; step 4 is 4/9 of the way up: cos(4pi/9) = 0.17364817766693.
        let s = Schedule::one_cycle(200, 0.05);
        assert!(close(s.lr(base, 0), 1.2e-5));
        assert!(close(s.lr(base, 9), base));
        assert!(close(s.lr(base, 199), 1.2e-9));
        assert!(close(s.lr(base, 4), base + (initial - base) / 2.0 * (0.173_648_177_666_930_35 + 1.0)));
        // Step 104 is half-way down (95 of 190 steps after the peak).
        assert!(close(s.lr(base, 104), (base + min) / 2.0));
        // T = 4, p = 0.1 (the end-to-end test's): phase one ends at step -0.6, so every step is
        // in phase two, whose fraction is (k + 0.6) / 3.6: step 0 at cos(pi/6) = sqrt(3)/2 and
        // step 3 at the minimum.
        let s = Schedule::one_cycle(4, 0.1);
        assert!(close(s.lr(base, 0), min + (base - min) / 2.0 * (3f64.sqrt() / 2.0 + 1.0)));
        assert!(close(s.lr(base, 3), min));
        // cos(pi * 1.6 / 3.6) = cos(4pi/9).
        assert!(close(s.lr(base, 1), min + (base - min) / 2.0 * (0.173_648_177_666_930_35 + 1.0)));
        // T = 10, p = 0.1: phase one ends at step 0 (torch divides by zero there): the peak.
        let s = Schedule::one_cycle(10, 0.1);
        assert!(close(s.lr(base, 0), base));
        assert!(close(s.lr(base, 9), min));
        // A whole warm-up (p = 1) ends at the peak on the last step.
        let s = Schedule::one_cycle(10, 1.0);
        assert!(close(s.lr(base, 0), initial));
        assert!(close(s.lr(base, 9), base));
        for k in 0..10 {
            assert!(s.lr(base, k).is_finite());
        }
    }
}
