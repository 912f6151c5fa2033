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
    /// `base / div_factor` up to `base` over `pct_start * total` steps, then down to
    /// `base / div_factor / final_div_factor` at the last step.
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

impl Schedule {
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
                    cos_anneal(initial, base, s / end_up)
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
    }
}
