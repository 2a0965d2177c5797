//! Fake quantization (quantize then dequantize, staying in f32): what calibration algorithms and
//! accuracy simulation see of a quantized tensor.

use crate::error::QuantError;
use crate::qparams::{check_finite, check_len, min_max, scale_zero_of, Codec, Layout, QParams};
use crate::scheme::{Granularity, QuantArgs};
use crate::{fp8, int};

/// `dst = dequantize(quantize(src))` with one scale and zero point.
#[inline]
fn fake_quantize_segment(codec: Codec, src: &[f32], dst: &mut [f32], scale: f32, zero: i32) {
    match codec {
        Codec::Int { qmin, qmax } => int::fake_quantize_slice(src, dst, scale, zero, (qmin, qmax)),
        Codec::Fp8 => fp8::fake_quantize_slice(src, dst, scale),
    }
}

/// Min/max qparams, quantize and dequantize in one call: `(x̂, qparams)`.
///
/// - `w`: row-major `[rows, cols]`, finite.
/// - `args`: any valid scheme (integer or FP8, any granularity).
///
/// Returns `x̂` as row-major `[rows, cols]`, and the qparams of
/// [`compute_qparams`](crate::compute_qparams). Channel and group granularities visit each row
/// segment once while it is in cache (min/max, scale, then the rounding); no integer tensor is
/// materialized. See [`fake_quantize_into`] to reuse the output buffer.
pub fn fake_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    args: &QuantArgs,
) -> Result<(Vec<f32>, QParams), QuantError> {
    let mut out = vec![0f32; w.len()];
    let qp = fake_quantize_into(w, rows, cols, args, &mut out)?;
    Ok((out, qp))
}

/// [`fake_quantize`] writing `x̂` into `out` (row-major `[rows, cols]`, fully overwritten), for
/// loops that fake-quantize the same shape many times (scale searches): a fresh multi-megabyte
/// `Vec` costs a page fault per 4 KiB, about as much as the quantization itself.
///
/// Returns the qparams. On error `out` may be partly written.
pub fn fake_quantize_into(
    w: &[f32],
    rows: usize,
    cols: usize,
    args: &QuantArgs,
    out: &mut [f32],
) -> Result<QParams, QuantError> {
    let codec = Codec::of(args)?;
    check_len("weights", w.len(), rows, cols)?;
    check_len("output", out.len(), rows, cols)?;
    if args.granularity == Granularity::Tensor {
        // One scale needs the whole tensor's min/max first.
        let qp = crate::compute_qparams(w, rows, cols, args)?;
        apply(w, 0, cols, &qp, codec, out)?;
        return Ok(qp);
    }
    let layout = Layout {
        granularity: args.granularity,
        rows,
        cols,
    };
    let n = QParams::n_scales(args.granularity, rows, cols)?;
    // Rows with no columns keep the scale of an empty range.
    let (empty_scale, empty_zero) = scale_zero_of(f32::INFINITY, f32::NEG_INFINITY, args, codec)
        .map_err(|value| QuantError::InvalidScale { index: 0, value })?;
    let with_zeros = codec.has_zeros(args);
    let mut scales = vec![empty_scale; n];
    let mut zeros = if with_zeros {
        vec![empty_zero; n]
    } else {
        Vec::new()
    };
    layout.try_for_each_segment(0, cols, |seg| {
        let src = &w[seg.range()];
        let (mn, mx) = min_max(src, seg.start)?;
        let (scale, zero) =
            scale_zero_of(mn, mx, args, codec).map_err(|value| QuantError::InvalidScale {
                index: seg.param,
                value,
            })?;
        scales[seg.param] = scale;
        if with_zeros {
            zeros[seg.param] = zero;
        }
        fake_quantize_segment(codec, src, &mut out[seg.range()], scale, zero);
        Ok(())
    })?;
    Ok(QParams {
        granularity: args.granularity,
        rows,
        cols,
        scales,
        zeros,
    })
}

/// Fake-quantizes `w` with given qparams (for example ones an algorithm has searched or rounded
/// with [`QParams::round_scales`]).
///
/// - `w`: row-major `[rows, cols]`, finite; `qp` made for `[rows, cols]` and `args` (see
///   [`QParams::check_for`]).
///
/// Returns `x̂` as row-major `[rows, cols]`.
pub fn fake_quantize_with(
    w: &[f32],
    rows: usize,
    cols: usize,
    qp: &QParams,
    args: &QuantArgs,
) -> Result<Vec<f32>, QuantError> {
    qp.check_shape(rows, cols)?;
    fake_quantize_cols(w, rows, 0, cols, qp, args)
}

/// Fake-quantizes a block of columns of the matrix `qp` describes (GPTQ-style column sweeps).
///
/// - `w`: row-major `[rows, ncols]`, holding columns `col0..col0 + ncols` of the `[qp.rows,
///   qp.cols]` matrix; `rows == qp.rows`. Each element uses the scale of its column in the full
///   matrix, e.g. with group 128, block column `j` uses group `(col0 + j) / 128`.
///
/// Returns `x̂` as row-major `[rows, ncols]`.
pub fn fake_quantize_cols(
    w: &[f32],
    rows: usize,
    col0: usize,
    ncols: usize,
    qp: &QParams,
    args: &QuantArgs,
) -> Result<Vec<f32>, QuantError> {
    let codec = Codec::of(args)?;
    qp.check_for(args)?;
    qp.check_window(rows, col0, ncols)?;
    check_len("weights", w.len(), rows, ncols)?;
    let mut out = vec![0f32; w.len()];
    apply(w, col0, ncols, qp, codec, &mut out)?;
    Ok(out)
}

/// Fake-quantizes a validated block `[qp.rows, ncols]` starting at column `col0` into `out`.
fn apply(
    w: &[f32],
    col0: usize,
    ncols: usize,
    qp: &QParams,
    codec: Codec,
    out: &mut [f32],
) -> Result<(), QuantError> {
    qp.layout().try_for_each_segment(col0, ncols, |seg| {
        let src = &w[seg.range()];
        check_finite(src, seg.start)?;
        let (scale, zero) = (qp.scales[seg.param], qp.zero(seg.param));
        fake_quantize_segment(codec, src, &mut out[seg.range()], scale, zero);
        Ok(())
    })
}

/// Dynamic per-token activation quantization, simulated: one min/max scale per row.
///
/// - `x`: row-major `[tokens, hidden]`, finite. `args.granularity` is ignored (always per token).
///
/// Returns `x̂` as row-major `[tokens, hidden]`.
pub fn fake_quantize_per_token(
    x: &[f32],
    tokens: usize,
    hidden: usize,
    args: &QuantArgs,
) -> Result<Vec<f32>, QuantError> {
    let per_token = QuantArgs {
        granularity: Granularity::Channel,
        ..*args
    };
    fake_quantize(x, tokens, hidden, &per_token).map(|(x, _)| x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{QuantType, ScaleRule};
    use crate::{compute_qparams, dequantize_fp8, dequantize_int, quantize_fp8, quantize_int};

    fn int_args(
        bits: u8,
        symmetric: bool,
        granularity: Granularity,
        scale_rule: ScaleRule,
    ) -> QuantArgs {
        QuantArgs {
            bits,
            ty: QuantType::Int,
            symmetric,
            granularity,
            scale_rule,
        }
    }

    /// Deterministic pseudo-random weights in about [-2, 2] (xorshift), no `rand` needed.
    fn weights(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn int4_half_range_by_hand_and_plus_absmax_clamps_to_qmax() {
        // compressed-tensors calculate_qparams: s = absmax/7.5 = 3.75/7.5 = 0.5.
        // x/s = [7.5, -7.5, 1.0, 2.5, -0.5]: +absmax → 7.5 → 8 (ties to even) → clamped to qmax 7,
        // -absmax → -7.5 → -8 (even) = qmin; 2.5 → 2; -0.5 → -0 (even).
        let args = int_args(4, true, Granularity::Tensor, ScaleRule::HalfRange);
        let w = [3.75, -3.75, 0.5, 1.25, -0.25];
        let (x, qp) = fake_quantize(&w, 1, 5, &args).unwrap();
        assert_eq!(qp.scales, vec![0.5]);
        assert_eq!(
            quantize_int(&w, 1, 5, &qp, &args).unwrap(),
            vec![7, -8, 1, 2, 0]
        );
        assert_eq!(x, vec![3.5, -4.0, 0.5, 1.0, 0.0]);
        assert_eq!(
            x[4].to_bits(),
            (-0.0f32).to_bits(),
            "torch.round(-0.5) is -0.0"
        );
    }

    #[test]
    fn int4_qmax_rule_by_hand() {
        // s = absmax/7 = 3.5/7 = 0.5; x/s = [7, -7, 2.5 → 2, 1.5 → 2]: ±absmax map to ±7.
        let args = int_args(4, true, Granularity::Channel, ScaleRule::Qmax);
        let (x, qp) = fake_quantize(&[3.5, -3.5, 1.25, 0.75], 1, 4, &args).unwrap();
        assert_eq!(qp.scales, vec![0.5]);
        assert_eq!(x, vec![3.5, -3.5, 1.0, 1.0]);
    }

    #[test]
    fn int8_asymmetric_channel_by_hand() {
        // calculate_qparams asymmetric, row [-1, 0, 0.5, 1.55]: s = (max - min)/255 = 2.55/255 ≈ 0.01,
        // zp = round(-128 - min/s) = round(-128 + 100) = -28.
        // x/s + zp ≈ [-128, -28, 22, 127] → x̂ = (q + 28)·s.
        let args = int_args(8, false, Granularity::Channel, ScaleRule::HalfRange);
        let w = [-1.0, 0.0, 0.5, 1.55];
        let (x, qp) = fake_quantize(&w, 1, 4, &args).unwrap();
        let s = (1.55f32 - -1.0) / 255.0;
        assert_eq!(qp.scales, vec![s]);
        assert_eq!(qp.zeros, vec![-28]);
        assert_eq!(
            quantize_int(&w, 1, 4, &qp, &args).unwrap(),
            vec![-128, -28, 22, 127]
        );
        assert_eq!(x, vec![-100.0 * s, 0.0, 50.0 * s, 155.0 * s]);
    }

    #[test]
    fn group_with_short_last_group_by_hand() {
        // cols 5, group 2 → groups [0,1], [2,3], [4]; int4 HalfRange s = absmax/7.5.
        // g0: [7.5, -1.5]  s = 1    → q [7 (7.5 → 8 → clamp), -2 (-1.5 → even)] → [7, -2]
        // g1: [3.75, 1.25] s = 0.5  → q [7 (7.5 → clamp), 2 (2.5 → even)]       → [3.5, 1]
        // g2: [-1.875]     s = 0.25 → q -8 (-7.5 → even)                        → [-2]
        let args = int_args(4, true, Granularity::Group(2), ScaleRule::HalfRange);
        let w = [7.5, -1.5, 3.75, 1.25, -1.875];
        let (x, qp) = fake_quantize(&w, 1, 5, &args).unwrap();
        assert_eq!(qp.scales, vec![1.0, 0.5, 0.25]);
        assert_eq!(
            quantize_int(&w, 1, 5, &qp, &args).unwrap(),
            vec![7, -2, 7, 2, -8]
        );
        assert_eq!(x, vec![7.0, -2.0, 3.5, 1.0, -2.0]);
    }

    #[test]
    fn all_zero_rows_get_epsilon_scale_and_zero_output() {
        let args = int_args(8, false, Granularity::Channel, ScaleRule::HalfRange);
        let (x, qp) = fake_quantize(&[0.0; 6], 2, 3, &args).unwrap();
        assert_eq!(qp.scales, vec![f32::EPSILON; 2]);
        assert_eq!(qp.zeros, vec![0, 0]);
        assert_eq!(x, vec![0.0; 6]);
    }

    #[test]
    fn fused_path_equals_qparams_then_quantize_then_dequantize() {
        let (rows, cols) = (7, 300);
        let w = weights(rows * cols, 42);
        let mut schemes = vec![];
        for bits in 1..=8 {
            for symmetric in [true, false] {
                for granularity in [
                    Granularity::Tensor,
                    Granularity::Channel,
                    Granularity::Group(64),
                ] {
                    for rule in [ScaleRule::HalfRange, ScaleRule::Qmax] {
                        if !(bits == 1 && symmetric && rule == ScaleRule::Qmax) {
                            schemes.push(int_args(bits, symmetric, granularity, rule));
                        }
                    }
                }
            }
        }
        for args in schemes {
            let (x, qp) = fake_quantize(&w, rows, cols, &args).unwrap();
            assert_eq!(
                qp,
                compute_qparams(&w, rows, cols, &args).unwrap(),
                "{args:?}"
            );
            let q = quantize_int(&w, rows, cols, &qp, &args).unwrap();
            let (qmin, qmax) = args.int_range();
            assert!(
                q.iter().all(|&v| (qmin..=qmax).contains(&i32::from(v))),
                "{args:?}"
            );
            assert_eq!(x, dequantize_int(&q, &qp).unwrap(), "{args:?}");
            assert_eq!(
                x,
                fake_quantize_with(&w, rows, cols, &qp, &args).unwrap(),
                "{args:?}"
            );
            // Each element lies within half a step of its input (no clamping at these ranges,
            // except HalfRange's +absmax which loses at most one full step).
            for (i, (&xh, &xw)) in x.iter().zip(&w).enumerate() {
                let s = qp.scale_for(i / cols, i % cols);
                assert!(
                    (xh - xw).abs() <= s * 1.0001,
                    "{args:?} at {i}: {xw} → {xh}"
                );
            }
        }
    }

    #[test]
    fn fp8_fake_quantize_equals_codes_then_decode() {
        let (rows, cols) = (5, 200);
        let w = weights(rows * cols, 7);
        for granularity in [
            Granularity::Tensor,
            Granularity::Channel,
            Granularity::Group(32),
        ] {
            let args = QuantArgs {
                bits: 8,
                ty: QuantType::Float,
                symmetric: true,
                granularity,
                scale_rule: ScaleRule::HalfRange,
            };
            let (x, qp) = fake_quantize(&w, rows, cols, &args).unwrap();
            let codes = quantize_fp8(&w, rows, cols, &qp).unwrap();
            assert_eq!(x, dequantize_fp8(&codes, &qp).unwrap());
            // The absmax of each scale group maps to ±448 exactly.
            assert!(codes.iter().any(|&c| c & 0x7F == 0x7E));
        }
        // By hand, tensor scale 896/448 = 2: x/s = [448, 0.1 → 0.1015625, -3.3 → -3.25].
        let args = QuantArgs {
            bits: 8,
            ty: QuantType::Float,
            symmetric: true,
            granularity: Granularity::Tensor,
            scale_rule: ScaleRule::HalfRange,
        };
        let (x, qp) = fake_quantize(&[896.0, 0.2, -6.6], 1, 3, &args).unwrap();
        assert_eq!(qp.scales, vec![2.0]);
        assert_eq!(x, vec![896.0, 0.203125, -6.5]);
    }

    #[test]
    fn column_window_uses_the_full_matrix_groups() {
        let (rows, cols) = (3, 40);
        let w = weights(rows * cols, 3);
        let args = int_args(4, false, Granularity::Group(16), ScaleRule::HalfRange);
        let (full, qp) = fake_quantize(&w, rows, cols, &args).unwrap();
        for (c0, n) in [(0, 40), (5, 1), (10, 20), (30, 10), (39, 1), (17, 0)] {
            let block: Vec<f32> = (0..rows)
                .flat_map(|r| w[r * cols + c0..r * cols + c0 + n].to_vec())
                .collect();
            let got = fake_quantize_cols(&block, rows, c0, n, &qp, &args).unwrap();
            let want: Vec<f32> = (0..rows)
                .flat_map(|r| full[r * cols + c0..r * cols + c0 + n].to_vec())
                .collect();
            assert_eq!(got, want, "columns {c0}..{}", c0 + n);
        }
        assert_eq!(
            fake_quantize_cols(&[0.0; 5], rows, 38, 2, &qp, &args),
            Err(QuantError::LengthMismatch {
                what: "weights",
                expected: 6,
                actual: 5
            })
        );
        assert_eq!(
            fake_quantize_cols(&[0.0; 9], rows, 38, 3, &qp, &args),
            Err(QuantError::ColumnRange {
                start: 38,
                end: 41,
                cols: 40
            })
        );
        assert_eq!(
            fake_quantize_cols(&[0.0; 2], 2, 0, 1, &qp, &args),
            Err(QuantError::RowsMismatch {
                expected: 3,
                actual: 2
            })
        );
        assert_eq!(
            fake_quantize_with(&[0.0; 6], rows, 2, &qp, &args),
            Err(QuantError::ShapeMismatch {
                expected: [3, 40],
                actual: [3, 2]
            })
        );
    }

    #[test]
    fn per_token_uses_one_scale_per_row() {
        // int8 symmetric HalfRange per token: row 0 absmax 2.55 → s = 0.02, row 1 absmax 12.75 → s = 0.1.
        let args = int_args(8, true, Granularity::Tensor, ScaleRule::HalfRange);
        let x = [2.55, -1.0, 0.013, 12.75, 0.25, -0.05];
        let got = fake_quantize_per_token(&x, 2, 3, &args).unwrap();
        let (s0, s1) = (2.55f32 / 127.5, 12.75f32 / 127.5);
        // Row 0: 2.55/s0 = 127.5 → 128 → clamp 127; -1/s0 = -50; 0.013/s0 = 0.65 → 1.
        // Row 1: 127.5 → 127; 0.25/s1 = 2.5 → 2 (even); -0.05/s1 = -0.5 → -0.
        assert_eq!(
            got,
            vec![127.0 * s0, -50.0 * s0, s0, 127.0 * s1, 2.0 * s1, -0.0]
        );
    }

    #[test]
    fn fake_quantize_into_reuses_the_buffer() {
        let args = int_args(4, false, Granularity::Group(16), ScaleRule::HalfRange);
        let w = weights(4 * 50, 11);
        let (want, want_qp) = fake_quantize(&w, 4, 50, &args).unwrap();
        let mut out = vec![f32::NAN; 200];
        for _ in 0..2 {
            assert_eq!(
                fake_quantize_into(&w, 4, 50, &args, &mut out),
                Ok(want_qp.clone())
            );
            assert_eq!(out, want);
        }
        let tensor = QuantArgs {
            granularity: Granularity::Tensor,
            ..args
        };
        let (want, _) = fake_quantize(&w, 4, 50, &tensor).unwrap();
        fake_quantize_into(&w, 4, 50, &tensor, &mut out).unwrap();
        assert_eq!(out, want);
        assert_eq!(
            fake_quantize_into(&w, 4, 50, &args, &mut out[..199]),
            Err(QuantError::LengthMismatch {
                what: "output",
                expected: 200,
                actual: 199
            })
        );
    }

    #[test]
    fn fake_quantize_rejects_bad_input() {
        let args = int_args(4, true, Granularity::Group(4), ScaleRule::HalfRange);
        let mut w = vec![0.5; 16];
        w[9] = f32::NAN;
        assert!(matches!(
            fake_quantize(&w, 2, 8, &args),
            Err(QuantError::NonFinite { index: 9, .. })
        ));
        assert_eq!(
            fake_quantize(&w, 3, 8, &args).map(|_| ()),
            Err(QuantError::LengthMismatch {
                what: "weights",
                expected: 24,
                actual: 16
            })
        );
        let bad = QuantArgs { bits: 12, ..args };
        assert_eq!(
            fake_quantize(&w, 2, 8, &bad).map(|_| ()),
            Err(QuantError::BitsOutOfRange { bits: 12 })
        );
        let qp = QParams::new(Granularity::Group(4), 2, 8, vec![1.0; 4], vec![]).unwrap();
        assert!(matches!(
            fake_quantize_with(&w, 2, 8, &qp, &args),
            Err(QuantError::NonFinite { index: 9, .. })
        ));
    }
}
