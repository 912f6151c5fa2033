//! `exp` for f32 without a branch or a call, so that loops over slices vectorise: the InfoNCE
//! block takes two exponentials per logit in each pass (about 2 x 10^9 at 8,192 x 65,536),
//! which through the C library's `expf` cost as much as a third of the op on this machine's
//! two cores.
//!
//! Range reduction `x = n ln 2 + r`, `|r| <= ln(2) / 2`, a degree-6 Taylor polynomial for
//! `e^r` (truncation under 1.2e-7 relative), and `2^n` built from two exponent fields so that
//! results down to the subnormals come out. Below about -103.3 the result is 0 (as `expf`
//! rounds it), above 88.72 it is `inf`; NaN stays NaN.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in few bits and the rest, so that `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;

/// `2^k` for `k` in `-126..=127`, from the exponent field.
#[inline(always)]
fn pow2i(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// `e^x`, within 2 ulp of the exact value over the normal range.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons keep a NaN (min/max would replace it).
    let x = if x < -104.0 { -104.0 } else { x };
    let x = if x > 89.0 { 89.0 } else { x };
    let t = x * LOG2E + ROUNDER;
    let n = (t.to_bits() as i32) - (ROUNDER.to_bits() as i32);
    let nf = t - ROUNDER;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n in -150..=129: two factors, each a normal power of two.
    let n1 = n >> 1;
    p * pow2i(n1) * pow2i(n - n1)
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn matches_f64_exp_across_the_range() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            // Relative error in the normal range; absolute against the smallest normal below.
            let err = (got - want).abs() / want.max(f32::MIN_POSITIVE as f64);
            worst = worst.max(err);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-87.0) > 0.0 && exp(-100.0) > 0.0, "subnormal results come out");
    }
}
