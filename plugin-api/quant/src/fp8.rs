//! FP8 E4M3 (`float8_e4m3fn`): encoding, decoding, and the tensor quantize / dequantize.
//!
//! Format: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Exponent 0 holds subnormals
//! `m·2^-9`; exponent 15 is an ordinary binade except `S.1111.111` (`0x7F`, `0xFF`), which is NaN.
//! There are no infinities; the largest finite value is `1.75·2^8 = 448`.
//!
//! Quantization follows compressed-tensors: `code = e4m3(clamp(x / s, -448, 448))` with
//! round-to-nearest-even (torch's clamp-then-cast), `x̂ = f32(code)·s`.

use crate::error::QuantError;
use crate::int::round_half_even;
use crate::qparams::{check_finite, check_len, QParams};

/// Largest finite E4M3 value.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// Smallest normal E4M3 value, `2^-6`; below it values are multiples of `2^-9`.
const MIN_NORMAL: f32 = 0.015_625;

/// `2^k` for `-126 ≤ k ≤ 127`, built from its bits (usable in `const`).
const fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// The value of an E4M3 code, by the definition in the module docs.
const fn decode(code: u8) -> f32 {
    let exp = ((code >> 3) & 0x0F) as i32;
    let man = (code & 0x07) as u32;
    let magnitude = if exp == 0x0F && man == 0x07 {
        f32::NAN
    } else if exp == 0 {
        man as f32 * pow2(-9)
    } else {
        (8 + man) as f32 * pow2(exp - 10) // (1 + m/8)·2^(e-7)
    };
    if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Every E4M3 code's f32 value; decoding is one table lookup.
static E4M3_TO_F32: [f32; 256] = {
    let mut table = [0.0; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode(code as u8);
        code += 1;
    }
    table
};

/// The f32 value of an E4M3 code (exact; `0x7F`/`0xFF` are NaN).
#[inline]
pub fn fp8_e4m3_to_f32(code: u8) -> f32 {
    E4M3_TO_F32[code as usize]
}

/// `x` rounded to the nearest E4M3 value (ties to even), saturating at ±448; NaN stays NaN.
///
/// The single rounding rule of this module: [`f32_to_fp8_e4m3`] encodes its result.
#[inline(always)]
pub fn round_to_fp8_e4m3(x: f32) -> f32 {
    let a = x.abs();
    // Saturate: torch clamps to ±448 before the cast (NaN fails the comparison and stays NaN).
    let a = if a > FP8_E4M3_MAX { FP8_E4M3_MAX } else { a };
    let r = if a < MIN_NORMAL {
        // Subnormal binade: a multiple of 2^-9 (a·512 < 8 is exact and small enough to round).
        round_half_even(a * 512.0) * (1.0 / 512.0)
    } else {
        round_mantissa_to_3_bits(a)
    };
    let r = if x.is_nan() { x } else { r };
    r.copysign(x)
}

/// Rounds a positive normal f32 to 3 mantissa bits, ties to even, on its bit pattern: add just
/// under half of the dropped part (plus the kept LSB, which turns ties to even), then truncate.
/// A carry out of the mantissa correctly bumps the exponent.
#[inline(always)]
fn round_mantissa_to_3_bits(a: f32) -> f32 {
    const DROPPED: u32 = 23 - 3;
    let bits = a.to_bits();
    let kept_lsb = (bits >> DROPPED) & 1;
    let rounded = (bits + ((1 << (DROPPED - 1)) - 1) + kept_lsb) & !((1 << DROPPED) - 1);
    f32::from_bits(rounded)
}

/// Encodes `x` as E4M3: round to nearest even, saturate to ±448 (no infinities), NaN → `0x7F`
/// (`0xFF` when the sign bit is set). `-0.0` → `0x80`.
#[inline]
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    code_of_exact(round_to_fp8_e4m3(x))
}

/// The code of an f32 that is exactly an E4M3 value (or NaN).
#[inline(always)]
fn code_of_exact(r: f32) -> u8 {
    let sign = ((r.to_bits() >> 24) & 0x80) as u8;
    let a = r.abs();
    let magnitude = if a.is_nan() {
        0x7F
    } else if a < MIN_NORMAL {
        (a * 512.0) as u8 // 0..=7, exact
    } else {
        let bits = a.to_bits();
        let exp = (bits >> 23) - (127 - 7); // rebias: 1..=15
        ((exp << 3) | ((bits >> 20) & 0x07)) as u8
    };
    sign | magnitude
}

/// `dst[i] = e4m3(src[i] / scale)`.
pub(crate) fn quantize_slice(src: &[f32], dst: &mut [u8], scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f32_to_fp8_e4m3(x / scale);
    }
}

/// `dst[i] = f32(codes[i])·scale`.
pub(crate) fn dequantize_slice(codes: &[u8], dst: &mut [f32], scale: f32) {
    for (d, &c) in dst.iter_mut().zip(codes) {
        *d = fp8_e4m3_to_f32(c) * scale;
    }
}

/// `dst[i] = round_to_e4m3(src[i] / scale)·scale`, without encoding.
pub(crate) fn fake_quantize_slice(src: &[f32], dst: &mut [f32], scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = round_to_fp8_e4m3(x / scale) * scale;
    }
}

/// The symmetric FP8 qparams must have no zero points.
fn check_no_zeros(qp: &QParams) -> Result<(), QuantError> {
    if qp.zeros.is_empty() {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch {
            what: "zero points",
            expected: 0,
            actual: qp.zeros.len(),
        })
    }
}

/// Quantizes `w` to FP8 E4M3 codes (the bytes of a `F8_E4M3` tensor).
///
/// - `w`: row-major `[rows, cols]`, finite.
/// - `qp`: made for `[rows, cols]`, without zero points (e.g. from
///   [`compute_qparams`](crate::compute_qparams) with a `Float` scheme: `s = absmax / 448`).
///
/// Returns row-major `[rows, cols]` codes.
pub fn quantize_fp8(
    w: &[f32],
    rows: usize,
    cols: usize,
    qp: &QParams,
) -> Result<Vec<u8>, QuantError> {
    qp.validate()?;
    check_no_zeros(qp)?;
    qp.check_shape(rows, cols)?;
    check_len("weights", w.len(), rows, cols)?;
    let mut codes = vec![0u8; w.len()];
    qp.layout().try_for_each_segment(0, cols, |seg| {
        let src = &w[seg.range()];
        check_finite(src, seg.start)?;
        quantize_slice(src, &mut codes[seg.range()], qp.scales[seg.param]);
        Ok(())
    })?;
    Ok(codes)
}

/// Dequantizes FP8 E4M3 codes: `x̂ = f32(code)·s`.
///
/// - `codes`: row-major `[qp.rows, qp.cols]`.
///
/// Returns row-major `[qp.rows, qp.cols]` f32 values (NaN for the NaN codes `0x7F`/`0xFF`).
pub fn dequantize_fp8(codes: &[u8], qp: &QParams) -> Result<Vec<f32>, QuantError> {
    qp.validate()?;
    check_no_zeros(qp)?;
    check_len("fp8 codes", codes.len(), qp.rows, qp.cols)?;
    let mut out = vec![0f32; codes.len()];
    qp.layout().try_for_each_segment(0, qp.cols, |seg| {
        dequantize_slice(
            &codes[seg.range()],
            &mut out[seg.range()],
            qp.scales[seg.param],
        );
        Ok::<(), QuantError>(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::Granularity;

    /// float8_e4m3fn by its definition, written independently of `decode`.
    fn by_definition(code: u8) -> f32 {
        let sign = if code >> 7 == 1 { -1.0 } else { 1.0 };
        let e = i32::from((code >> 3) & 0xF);
        let m = f64::from(code & 0x7);
        if e == 15 && m == 7.0 {
            return f32::NAN;
        }
        let v = if e == 0 {
            2f64.powi(1 - 7) * (m / 8.0) // subnormal: 2^(1-bias)·0.m
        } else {
            2f64.powi(e - 7) * (1.0 + m / 8.0)
        };
        (sign * v) as f32
    }

    #[test]
    fn decode_matches_the_definition_for_all_256_codes() {
        for code in 0..=255u8 {
            let (got, want) = (fp8_e4m3_to_f32(code), by_definition(code));
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#04x}");
                assert!(code == 0x7F || code == 0xFF);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {code:#04x}");
            }
        }
        // Spot values: max 448, min normal 2^-6, min subnormal 2^-9, 1.0, -0.0, 0x7E/0xFE.
        assert_eq!(fp8_e4m3_to_f32(0x7E), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0xFE), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x08), 0.015625);
        assert_eq!(fp8_e4m3_to_f32(0x01), 0.001953125);
        assert_eq!(fp8_e4m3_to_f32(0x07), 7.0 / 512.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn encode_decode_round_trips_every_finite_code() {
        for code in 0..=255u8 {
            if code & 0x7F != 0x7F {
                assert_eq!(
                    f32_to_fp8_e4m3(fp8_e4m3_to_f32(code)),
                    code,
                    "code {code:#04x}"
                );
            }
        }
    }

    #[test]
    fn encode_rounds_to_nearest_even_between_neighbours() {
        // For each pair of adjacent non-negative finite codes: the midpoint goes to the even
        // code, anything nudged off the midpoint goes to the nearer one.
        for c in 0..0x7Eu8 {
            let (lo, hi) = (fp8_e4m3_to_f32(c), fp8_e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0; // exact in f32
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(f32_to_fp8_e4m3(mid), even, "midpoint of {c:#04x}");
            assert_eq!(
                f32_to_fp8_e4m3(-mid),
                even | 0x80,
                "negative midpoint of {c:#04x}"
            );
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(f32_to_fp8_e4m3(below), c);
            assert_eq!(f32_to_fp8_e4m3(above), c + 1);
        }
        // Hand values: 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39) → even 0x38;
        // 1.1875 between 1.125 (0x39) and 1.25 (0x3A) → 0x3A.
        assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_fp8_e4m3(1.1875), 0x3A);
        // Subnormal tie: 2.5·2^-9 → 2·2^-9 (0x02); 3.5·2^-9 → 4·2^-9 (0x04).
        assert_eq!(f32_to_fp8_e4m3(2.5 / 512.0), 0x02);
        assert_eq!(f32_to_fp8_e4m3(3.5 / 512.0), 0x04);
        // Below half the smallest subnormal → ±0.
        assert_eq!(f32_to_fp8_e4m3(0.9 / 1024.0), 0x00);
        assert_eq!(f32_to_fp8_e4m3(-0.9 / 1024.0), 0x80);
        // Just under the min normal rounds up into it: 7.9·2^-9 → 8·2^-9 = 2^-6 (0x08).
        assert_eq!(f32_to_fp8_e4m3(7.9 / 512.0), 0x08);
    }

    #[test]
    fn encode_saturates_and_keeps_nan() {
        // torch: clamp(x, -448, 448) then cast, so everything beyond saturates to 0x7E/0xFE.
        for x in [448.0, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_fp8_e4m3(x), 0x7E, "{x}");
            assert_eq!(f32_to_fp8_e4m3(-x), 0xFE, "{x}");
        }
        // 432 is the midpoint of 416 (0x7D) and 448 (0x7E) → even 0x7E.
        assert_eq!(f32_to_fp8_e4m3(432.0), 0x7E);
        assert_eq!(f32_to_fp8_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_fp8_e4m3(-f32::NAN), 0xFF);
        assert!(round_to_fp8_e4m3(f32::NAN).is_nan());
    }

    #[test]
    fn quantize_and_dequantize_fp8_per_channel() {
        // Row 0: s = 2 → x/s = [448, -1.0625 → -1 (tie to even), 0.1 → 0.1015625 (13·2^-7)].
        // Row 1: s = 0.5 → x/s = [1000 → saturate 448, -0.0, 3].
        let qp = QParams::new(Granularity::Channel, 2, 3, vec![2.0, 0.5], vec![]).unwrap();
        let w = [896.0, -2.125, 0.2, 500.0, -0.0, 1.5];
        let codes = quantize_fp8(&w, 2, 3, &qp).unwrap();
        assert_eq!(codes, vec![0x7E, 0xB8, 0x1D, 0x7E, 0x80, 0x44]);
        let x = dequantize_fp8(&codes, &qp).unwrap();
        assert_eq!(x, vec![896.0, -2.0, 0.203125, 224.0, -0.0, 1.5]);
    }

    #[test]
    fn fp8_tensor_functions_reject_bad_input() {
        let qp = QParams::new(Granularity::Tensor, 1, 2, vec![1.0], vec![]).unwrap();
        assert!(matches!(
            quantize_fp8(&[0.0, f32::NAN], 1, 2, &qp),
            Err(QuantError::NonFinite { index: 1, .. })
        ));
        assert_eq!(
            quantize_fp8(&[0.0; 4], 2, 2, &qp),
            Err(QuantError::ShapeMismatch {
                expected: [1, 2],
                actual: [2, 2]
            })
        );
        let with_zeros = QParams {
            zeros: vec![0],
            ..qp.clone()
        };
        assert_eq!(
            quantize_fp8(&[0.0; 2], 1, 2, &with_zeros),
            Err(QuantError::LengthMismatch {
                what: "zero points",
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(
            dequantize_fp8(&[0; 3], &qp),
            Err(QuantError::LengthMismatch {
                what: "fp8 codes",
                expected: 2,
                actual: 3
            })
        );
        let bad_scale = QParams {
            scales: vec![f32::NAN],
            ..qp
        };
        assert!(matches!(
            dequantize_fp8(&[0; 2], &bad_scale),
            Err(QuantError::InvalidScale { index: 0, .. })
        ));
    }
}
