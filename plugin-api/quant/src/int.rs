//! Integer quantization: the scalar rounding rule, and the tensor quantize / dequantize built on it.
//!
//! `q = clamp(round_half_even(x / s + zp), qmin, qmax)` and `x̂ = (q − zp)·s`, in f32, as
//! compressed-tensors (`forward_helpers._quantize` / `_dequantize`) and msModelSlim define them.
//! Every function of this crate that rounds to an integer goes through [`quantize_value`]'s
//! kernel (`quantize_code`).

use crate::error::QuantError;
use crate::qparams::{check_len, Codec, QParams};
use crate::scheme::{QuantArgs, QuantType};

/// `1.5 · 2^23`; see [`round_half_even`].
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Largest magnitude [`round_half_even`] is exact for (`2^22`).
pub(crate) const ROUND_LIMIT: f32 = 4_194_304.0;

/// `f32::round_ties_even`, for `|y| ≤ 2^22`, in a form that vectorizes.
///
/// Why not `round_ties_even` itself: on baseline x86-64 (no SSE4.1) it is a libm call per element,
/// which keeps every tensor loop scalar. Adding `1.5·2^23` moves `y` into `[2^23, 2^24)`, where the
/// spacing of f32 is exactly 1, so that addition rounds to an integer with IEEE round-half-to-even;
/// subtracting the constant again is exact. `copysign` restores the sign of a zero result
/// (`round_ties_even(-0.3) == -0.0`). A test checks equality with `round_ties_even` bit for bit.
#[inline(always)]
pub(crate) fn round_half_even(y: f32) -> f32 {
    ((y + ROUND_MAGIC) - ROUND_MAGIC).copysign(y)
}

/// The quantized integer of `x`, as an f32: `clamp(round_half_even(x / scale + zero), lo, hi)`.
///
/// `lo`/`hi` are integers with `|lo|, |hi| ≤ 2^22`. Clamping before rounding gives the same result
/// as compressed-tensors' round-then-clamp (the bounds are integers and rounding is monotone) and
/// keeps the argument of [`round_half_even`] small. `x / scale` is a true division, not a
/// multiplication by `1/scale`, so ties land where torch's land.
#[inline(always)]
pub(crate) fn quantize_code(x: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    let y = x / scale + zero;
    let y = if y < lo {
        lo
    } else if y > hi {
        hi
    } else {
        y
    };
    round_half_even(y)
}

/// `(q − zero)·scale`, in f32.
#[inline(always)]
pub(crate) fn dequantize_code(q: f32, scale: f32, zero: f32) -> f32 {
    (q - zero) * scale
}

/// Quantizes one value: `q = clamp(round_half_even(x / scale + zero), qmin, qmax)`.
///
/// The single definition of the rounding rule; every tensor function of this crate applies it.
/// Ties round to even (`x/scale = 2.5 → 2`, `3.5 → 4`), as `torch.round` does.
/// `qmin`/`qmax` are clamped to `±2^22` (wider than any `b ≤ 8` range needs). `x` should be finite:
/// `±inf` clamps to `qmin`/`qmax`, NaN gives 0.
pub fn quantize_value(x: f32, scale: f32, zero: i32, qmin: i32, qmax: i32) -> i32 {
    let limit = ROUND_LIMIT as i32;
    let (lo, hi) = (qmin.clamp(-limit, limit), qmax.clamp(-limit, limit));
    quantize_code(x, scale, zero as f32, lo as f32, hi as f32) as i32
}

/// Dequantizes one value: `x̂ = (q − zero)·scale`, in f32.
pub fn dequantize_value(q: i32, scale: f32, zero: i32) -> f32 {
    dequantize_code(q as f32, scale, zero as f32)
}

/// `dst[i] = clamp(round_half_even(src[i] / scale + zero), qmin, qmax)`.
pub(crate) fn quantize_slice(
    src: &[f32],
    dst: &mut [i8],
    scale: f32,
    zero: i32,
    range: (i32, i32),
) {
    let (zero, lo, hi) = (zero as f32, range.0 as f32, range.1 as f32);
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = quantize_code(x, scale, zero, lo, hi) as i8;
    }
}

/// `dst[i] = (q[i] − zero)·scale`.
pub(crate) fn dequantize_slice(q: &[i8], dst: &mut [f32], scale: f32, zero: i32) {
    let zero = zero as f32;
    for (d, &q) in dst.iter_mut().zip(q) {
        *d = dequantize_code(f32::from(q), scale, zero);
    }
}

/// Quantize-then-dequantize without materializing the integers:
/// `dst[i] = (clamp(round_half_even(src[i] / scale + zero), qmin, qmax) − zero)·scale`.
pub(crate) fn fake_quantize_slice(
    src: &[f32],
    dst: &mut [f32],
    scale: f32,
    zero: i32,
    range: (i32, i32),
) {
    let (zero, lo, hi) = (zero as f32, range.0 as f32, range.1 as f32);
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = dequantize_code(quantize_code(x, scale, zero, lo, hi), scale, zero);
    }
}

/// Quantizes `w` to integers with the given qparams.
///
/// - `w`: row-major `[rows, cols]`, finite.
/// - `qp`: made for a `[rows, cols]` matrix at `args.granularity`; zero points present exactly
///   when `args` is asymmetric (see [`QParams`]).
/// - `args`: an `Int` scheme, `bits ≤ 8`, so every value fits an `i8`.
///
/// Returns row-major `[rows, cols]` values in `[-2^(b-1), 2^(b-1)-1]`.
pub fn quantize_int(
    w: &[f32],
    rows: usize,
    cols: usize,
    qp: &QParams,
    args: &QuantArgs,
) -> Result<Vec<i8>, QuantError> {
    let range = match Codec::of(args)? {
        Codec::Int { qmin, qmax } => (qmin, qmax),
        Codec::Fp8 => {
            return Err(QuantError::TypeMismatch {
                expected: QuantType::Int,
                actual: QuantType::Float,
            })
        }
    };
    qp.check_for(args)?;
    qp.check_shape(rows, cols)?;
    check_len("weights", w.len(), rows, cols)?;
    let mut q = vec![0i8; w.len()];
    qp.layout().try_for_each_segment(0, cols, |seg| {
        let src = &w[seg.range()];
        crate::qparams::check_finite(src, seg.start)?;
        quantize_slice(
            src,
            &mut q[seg.range()],
            qp.scales[seg.param],
            qp.zero(seg.param),
            range,
        );
        Ok(())
    })?;
    Ok(q)
}

/// Dequantizes integers: `x̂ = (q − zp)·s` with the scale and zero point of each element.
///
/// - `q`: row-major `[qp.rows, qp.cols]`.
///
/// Returns row-major `[qp.rows, qp.cols]` f32 values.
pub fn dequantize_int(q: &[i8], qp: &QParams) -> Result<Vec<f32>, QuantError> {
    qp.validate()?;
    check_len("quantized values", q.len(), qp.rows, qp.cols)?;
    let mut out = vec![0f32; q.len()];
    qp.layout().try_for_each_segment(0, qp.cols, |seg| {
        let zero = qp.zero(seg.param);
        dequantize_slice(
            &q[seg.range()],
            &mut out[seg.range()],
            qp.scales[seg.param],
            zero,
        );
        Ok::<(), QuantError>(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{Granularity, ScaleRule};

    fn int_args(bits: u8, symmetric: bool, granularity: Granularity) -> QuantArgs {
        QuantArgs {
            bits,
            ty: QuantType::Int,
            symmetric,
            granularity,
            scale_rule: ScaleRule::HalfRange,
        }
    }

    #[test]
    fn round_half_even_matches_round_ties_even_bit_for_bit() {
        // Exhaustive over every f32 with 0.25 ≤ |y| ≤ 256 (both signs) ...
        let (lo, hi) = (0.25f32.to_bits(), 256f32.to_bits());
        for bits in lo..=hi {
            for y in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(
                    round_half_even(y).to_bits(),
                    y.round_ties_even().to_bits(),
                    "{y}"
                );
            }
        }
        // ... strided below 0.25 (all round to ±0) and up to the 2^22 limit.
        for bits in (0..lo)
            .step_by(997)
            .chain((hi..=ROUND_LIMIT.to_bits()).step_by(101))
        {
            for y in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(
                    round_half_even(y).to_bits(),
                    y.round_ties_even().to_bits(),
                    "{y}"
                );
            }
        }
    }

    #[test]
    fn quantize_value_rounds_ties_to_even() {
        // torch.round is half-to-even: 2.5 → 2, 3.5 → 4, -2.5 → -2, -3.5 → -4, 0.5 → 0.
        for (x, q) in [
            (2.5, 2),
            (3.5, 4),
            (-2.5, -2),
            (-3.5, -4),
            (0.5, 0),
            (2.4999, 2),
            (2.5001, 3),
        ] {
            assert_eq!(quantize_value(x, 1.0, 0, -8, 7), q, "x = {x}");
        }
        // scale 0.5: x/s = 2.5 exactly → 2; with zero point 3: 2.5 + 3 = 5.5 → 6.
        assert_eq!(quantize_value(1.25, 0.5, 0, -8, 7), 2);
        assert_eq!(quantize_value(1.25, 0.5, 3, -8, 7), 6);
    }

    #[test]
    fn quantize_value_clamps_to_the_range() {
        assert_eq!(quantize_value(100.0, 1.0, 0, -8, 7), 7);
        assert_eq!(quantize_value(-100.0, 1.0, 0, -8, 7), -8);
        assert_eq!(quantize_value(f32::INFINITY, 1.0, 0, -8, 7), 7);
        assert_eq!(quantize_value(f32::NEG_INFINITY, 1.0, 0, -128, 127), -128);
        assert_eq!(quantize_value(f32::NAN, 1.0, 0, -8, 7), 0);
        // A zero point shifts the window: x/s + zp = 10 + (-5) = 5, in range.
        assert_eq!(quantize_value(10.0, 1.0, -5, -8, 7), 5);
        // Absurd bounds do not panic.
        assert_eq!(quantize_value(3.0, 1.0, 0, 7, -8), 7);
        assert_eq!(
            quantize_value(1e9, 1.0, 0, i32::MIN, i32::MAX),
            ROUND_LIMIT as i32
        );
    }

    #[test]
    fn dequantize_value_is_q_minus_zero_times_scale() {
        assert_eq!(dequantize_value(5, 0.25, 0), 1.25);
        assert_eq!(dequantize_value(-128, 0.5, -100), -14.0); // (-128 + 100)·0.5
        assert_eq!(dequantize_value(7, 2.0, 7), 0.0);
    }

    #[test]
    fn quantize_int_and_dequantize_int_by_hand_int4_channel() {
        // Row 0: absmax 1.5 → s = 1.5/7.5 = 0.2 (compressed-tensors HalfRange);
        //   x/s = [7.5, -5, 2.5, 0] → round-half-even → [8→clamp 7, -5, 2, 0].
        // Row 1: all zero → s = f32::EPSILON, q = 0.
        let args = int_args(4, true, Granularity::Channel);
        let w = [1.5, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0];
        let qp = crate::compute_qparams(&w, 2, 4, &args).unwrap();
        assert_eq!(qp.scales, vec![1.5f32 / 7.5, f32::EPSILON]);
        let q = quantize_int(&w, 2, 4, &qp, &args).unwrap();
        assert_eq!(q, vec![7, -5, 2, 0, 0, 0, 0, 0]);
        let x = dequantize_int(&q, &qp).unwrap();
        let s = 1.5f32 / 7.5;
        assert_eq!(x, vec![7.0 * s, -5.0 * s, 2.0 * s, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn quantize_int_asymmetric_uses_the_zero_point() {
        // int8 asymmetric, given qparams s = 0.5, zp = -28:
        // x = [-50, 0, 0.25, 63.75] → x/s + zp = [-128, -28, -27.5 → -28 (even), 99.5 → 100].
        let args = int_args(8, false, Granularity::Tensor);
        let qp = QParams::new(Granularity::Tensor, 1, 4, vec![0.5], vec![-28]).unwrap();
        let q = quantize_int(&[-50.0, 0.0, 0.25, 63.75], 1, 4, &qp, &args).unwrap();
        assert_eq!(q, vec![-128, -28, -28, 100]);
        let x = dequantize_int(&q, &qp).unwrap();
        assert_eq!(x, vec![-50.0, 0.0, 0.0, 64.0]);
    }

    #[test]
    fn quantize_int_rejects_bad_input() {
        let args = int_args(4, true, Granularity::Tensor);
        let qp = QParams::new(Granularity::Tensor, 1, 2, vec![1.0], vec![]).unwrap();
        assert!(matches!(
            quantize_int(&[1.0, f32::NAN], 1, 2, &qp, &args),
            Err(QuantError::NonFinite { index: 1, .. })
        ));
        assert_eq!(
            quantize_int(&[1.0], 1, 2, &qp, &args),
            Err(QuantError::LengthMismatch {
                what: "weights",
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            quantize_int(&[1.0, 2.0], 2, 1, &qp, &args),
            Err(QuantError::ShapeMismatch {
                expected: [1, 2],
                actual: [2, 1]
            })
        );
        let fp8 = QuantArgs {
            bits: 8,
            ty: QuantType::Float,
            ..args
        };
        assert_eq!(
            quantize_int(&[1.0, 2.0], 1, 2, &qp, &fp8),
            Err(QuantError::TypeMismatch {
                expected: QuantType::Int,
                actual: QuantType::Float
            })
        );
        let asym = int_args(4, false, Granularity::Tensor);
        assert_eq!(
            quantize_int(&[1.0, 2.0], 1, 2, &qp, &asym),
            Err(QuantError::LengthMismatch {
                what: "zero points",
                expected: 1,
                actual: 0
            })
        );
        let channel = int_args(4, true, Granularity::Channel);
        assert_eq!(
            quantize_int(&[1.0, 2.0], 1, 2, &qp, &channel),
            Err(QuantError::GranularityMismatch {
                args: Granularity::Channel,
                qparams: Granularity::Tensor
            })
        );
        assert_eq!(
            dequantize_int(&[1, 2, 3], &qp),
            Err(QuantError::LengthMismatch {
                what: "quantized values",
                expected: 2,
                actual: 3
            })
        );
    }
}
