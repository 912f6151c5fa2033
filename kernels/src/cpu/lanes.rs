//! Elementwise loops that vectorise: reductions in eight independent lanes, and a way to
//! compile a hot loop for AVX2 while the crate itself targets plain x86-64.
//!
//! A float sum written as one running accumulator cannot be vectorised (the compiler keeps
//! the order of the additions), and the crate is built for the x86-64 baseline (SSE2), so
//! without help the InfoNCE block's exponentials ran one at a time. [`lanes!`] gives a
//! function two bodies, one compiled with AVX2 and chosen at run time when the CPU has it;
//! neither uses FMA, so both give the same bits (a fused multiply-add would round once where
//! the other rounds twice), and a result does not depend on the machine it ran on.

/// Lanes of the accumulators: one AVX2 register of f32.
pub const LANES: usize = 8;

/// Defines `$vis fn $name(args) -> R { body }` that runs `body` compiled for AVX2 when the
/// CPU supports it, and compiled for the baseline otherwise. The body must be safe code; what
/// it calls should be `#[inline(always)]` to be compiled for AVX2 as well.
macro_rules! lanes {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, the only requirement of `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use lanes;

/// The larger of two values as a comparison: a NaN `x` leaves `m` (like `f32::max`), but it
/// compiles to one instruction per lane.
#[inline(always)]
pub fn max(m: f32, x: f32) -> f32 {
    if x > m {
        x
    } else {
        m
    }
}

/// `max(init, v...)` in eight lanes.
#[inline(always)]
pub fn max_of(v: &[f32], init: f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = max(acc[k], c[k]);
        }
    }
    rest.iter().fold(acc.iter().fold(init, |a, &b| max(a, b)), |a, &b| max(a, b))
}

/// `sum f(v)` in eight lanes, the lanes added in a fixed order at the end.
#[inline(always)]
pub fn sum_map(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k]);
        }
    }
    for (k, &x) in rest.iter().enumerate() {
        acc[k] += f(x);
    }
    hsum(acc)
}

/// The lanes' sum, pairwise.
#[inline(always)]
pub fn hsum(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    lanes! {
        fn sum_of_squares(v: &[f32]) -> f32 {
            sum_map(v, |x| x * x)
        }
    }

    lanes! {
        fn sum_exp(v: &[f32]) -> f32 {
            sum_map(v, crate::cpu::fastexp::exp)
        }
    }

    #[test]
    fn reductions_match_f64_and_keep_nan() {
        for n in [1, 7, 8, 9, 100, 1001] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
            let want: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
            let got = sum_of_squares(&v) as f64;
            assert!((got - want).abs() <= 1e-6 * want, "{n}: {got} vs {want}");
            let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&v, f32::NEG_INFINITY), m);
        }
        assert!(sum_of_squares(&[1.0, f32::NAN, 2.0]).is_nan());
        // The AVX2 body (chosen on this machine if it has AVX2) and the baseline one agree to
        // the bit, exponentials included.
        let v: Vec<f32> = (0..1003).map(|i| ((i * 7919 % 2000) as f32 - 1000.0) / 40.0).collect();
        assert_eq!(sum_exp(&v).to_bits(), sum_map(&v, crate::cpu::fastexp::exp).to_bits());
        assert_eq!(max_of(&[1.0, f32::NAN, 2.0], f32::NEG_INFINITY), 2.0);
    }
}
