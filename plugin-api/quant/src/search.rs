//! Range search: the scale and zero point of a range shrunk toward 0 that minimize an
//! importance-weighted squared rounding error (the "mse" observer of GPTQ's reference
//! `Quantizer.find_params`, with per-value weights).

use crate::error::QuantError;
use crate::fp8::round_to_fp8_e4m3;
use crate::int::{dequantize_code, dequantize_value, quantize_code, quantize_value, ROUND_LIMIT};
use crate::qparams::scale_zero;
use crate::scheme::{QuantArgs, QuantType};

/// `x̂ = dequant(quant(x))` with scale `s` and zero `z` under `args` (validated).
pub fn fake_value(x: f32, s: f32, z: i32, args: &QuantArgs) -> f32 {
    match args.ty {
        QuantType::Int => {
            let (qmin, qmax) = args.int_range();
            dequantize_value(quantize_value(x, s, z, qmin, qmax), s, z)
        }
        QuantType::Float => round_to_fp8_e4m3(x / s) * s,
    }
}

/// The `(s, zp)` of the range `[p·min(x), p·max(x)]`, `p ∈ {1, 1 − 1/grid, …, 1 − max_shrink}`,
/// that minimizes `Σ_i d_i (x_i − x̂_i)²` (`d = importance`, e.g. the Hessian diagonal;
/// all ones for the plain mean squared error). Ties keep the larger range; `grid = 0` or
/// `max_shrink = 0` is the plain min/max rule ([`scale_zero`]).
///
/// Errors: invalid `args`, a non-finite value, `importance` of another length, or
/// `max_shrink` outside `[0, 1)`.
pub fn search_scale_zero(
    x: &[f32],
    importance: &[f32],
    args: &QuantArgs,
    grid: u32,
    max_shrink: f32,
) -> Result<(f32, i32), QuantError> {
    if importance.len() != x.len() {
        return Err(QuantError::LengthMismatch {
            what: "importance",
            expected: x.len(),
            actual: importance.len(),
        });
    }
    if !(0.0..1.0).contains(&max_shrink) {
        return Err(QuantError::MaxShrinkOutOfRange { value: max_shrink });
    }
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let lo = if x.is_empty() { 0.0 } else { lo };
    let hi = if x.is_empty() { 0.0 } else { hi };
    let mut best = scale_zero(lo, hi, args)?;
    let steps = (max_shrink * grid as f32).floor() as u32;
    if steps == 0 {
        return Ok(best);
    }
    let error = |(s, z): (f32, i32)| weighted_error(x, importance, s, z, args);
    let mut best_err = error(best);
    for i in 1..=steps {
        let p = 1.0 - i as f32 / grid as f32;
        let cand = scale_zero(p * lo, p * hi, args)?;
        let err = error(cand);
        if err < best_err {
            (best, best_err) = (cand, err);
        }
    }
    Ok(best)
}

/// `Σ_i d_i (x_i − x̂_i)²` in f64, `x̂` = [`fake_value`] with `(s, z)`.
///
/// Summed in [`LANES`] interleaved partial sums: a single running sum is a serial dependency
/// the compiler may not reorder, so the loop would stay scalar; this is the hot loop of every
/// range search (one pass per candidate range and group).
fn weighted_error(x: &[f32], d: &[f32], s: f32, z: i32, args: &QuantArgs) -> f64 {
    let term = |v: f32, w: f32, q: f32| {
        let e = f64::from(v) - f64::from(q);
        f64::from(w) * e * e
    };
    match args.ty {
        QuantType::Int => {
            // `quantize_value`'s bounds, hoisted out of the loop.
            let (qmin, qmax) = args.int_range();
            let limit = ROUND_LIMIT as i32;
            let (lo, hi) = (
                qmin.clamp(-limit, limit) as f32,
                qmax.clamp(-limit, limit) as f32,
            );
            let zf = z as f32;
            let fake = |v: f32| dequantize_code(quantize_code(v, s, zf, lo, hi), s, zf);
            let mut acc = [0f64; LANES];
            let (xc, xr) = (x.chunks_exact(LANES), x.chunks_exact(LANES).remainder());
            let dc = d.chunks_exact(LANES);
            let dr = dc.remainder();
            for (xs, ds) in xc.zip(dc) {
                for l in 0..LANES {
                    acc[l] += term(xs[l], ds[l], fake(xs[l]));
                }
            }
            let tail: f64 = xr.iter().zip(dr).map(|(&v, &w)| term(v, w, fake(v))).sum();
            acc.iter().sum::<f64>() + tail
        }
        QuantType::Float => x
            .iter()
            .zip(d)
            .map(|(&v, &w)| term(v, w, fake_value(v, s, z, args)))
            .sum(),
    }
}

/// Partial sums of [`weighted_error`].
const LANES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{Granularity, ScaleRule};

    fn int4_sym() -> QuantArgs {
        QuantArgs {
            bits: 4,
            ty: QuantType::Int,
            symmetric: true,
            granularity: Granularity::Group(4),
            scale_rule: ScaleRule::Qmax,
        }
    }

    #[test]
    fn an_outlier_is_clipped_when_that_lowers_the_error() {
        // x = [7, 1.4, 1.4, 1.4], int4 sym, Qmax rule (s = absmax / 7).
        // p = 1: s = 1, x̂ = [7, 1, 1, 1], error 3 · 0.4² = 0.48.
        // p = 0.5 (grid 2): s = 0.5, x̂ = [3.5, 1.5, 1.5, 1.5], error 3.5² + 3 · 0.1² = 12.28.
        // With the outlier's importance 0, p = 0.5 wins: 0.03 < 0.48.
        let x = [7.0, 1.4, 1.4, 1.4];
        let a = int4_sym();
        assert_eq!(
            search_scale_zero(&x, &[1.0; 4], &a, 2, 0.5).unwrap(),
            (1.0, 0)
        );
        assert_eq!(
            search_scale_zero(&x, &[0.0, 1.0, 1.0, 1.0], &a, 2, 0.5).unwrap(),
            (0.5, 0)
        );
    }

    #[test]
    fn no_search_is_the_min_max_rule() {
        let x = [0.3, -1.2, 0.7];
        let a = int4_sym();
        let plain = scale_zero(-1.2, 0.7, &a).unwrap();
        assert_eq!(search_scale_zero(&x, &[1.0; 3], &a, 0, 0.5).unwrap(), plain);
        assert_eq!(
            search_scale_zero(&x, &[1.0; 3], &a, 20, 0.0).unwrap(),
            plain
        );
        assert!(search_scale_zero(&x, &[1.0; 2], &a, 20, 0.2).is_err());
        assert!(search_scale_zero(&x, &[1.0; 3], &a, 20, 1.0).is_err());
    }

    #[test]
    fn the_lane_sum_is_the_plain_weighted_error() {
        // 21 values: two full lanes of 8 and a tail of 5; both schemes' kernels.
        let x: Vec<f32> = (0..21)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
            .collect();
        let d: Vec<f32> = (0..21).map(|i| 0.5 + (i % 4) as f32).collect();
        let mut asym = int4_sym();
        asym.symmetric = false;
        for (args, s, z) in [(int4_sym(), 0.31, 0), (asym, 0.27, -3)] {
            let plain: f64 = x
                .iter()
                .zip(&d)
                .map(|(&v, &w)| {
                    let e = f64::from(v) - f64::from(fake_value(v, s, z, &args));
                    f64::from(w) * e * e
                })
                .sum();
            let lanes = weighted_error(&x, &d, s, z, &args);
            assert!((lanes - plain).abs() <= 1e-12 * plain, "{lanes} vs {plain}");
        }
    }
}
