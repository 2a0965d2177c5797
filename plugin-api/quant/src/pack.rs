//! Bit packing of quantized integers, as checkpoint formats store them.
//!
//! - compressed-tensors `pack-quantized` (`pack_to_int32` / `unpack_from_int32`): each value is
//!   offset to unsigned, `u = q + 2^(b-1)`, and written into a dense little-endian bit stream,
//!   element `i` at bit `i·b`, LSB first; a value may straddle two words (3/5/6/7 bits). Weights
//!   are packed along each row (dim 1), zero points along each column (dim 0), each line padded to
//!   whole 32-bit words: `ceil(n·b/32)` words per line of `n` values.
//! - Ascend int4 pairs (msModelSlim `_pack_int4`): two signed nibbles per byte, no offset,
//!   `byte = (second << 4) | (first & 0x0F)`, along a chosen axis.

use crate::error::QuantError;
use crate::qparams::check_len;
use crate::scheme::int_range;

/// Number of 32-bit words holding `n` densely packed `bits`-bit values: `ceil(n·bits/32)`.
pub fn packed_int32_len(n: usize, bits: u8) -> usize {
    let b = usize::from(bits);
    // Split n so that n·b cannot overflow.
    (n / 32) * b + ((n % 32) * b).div_ceil(32)
}

/// `(qmin, qmax)` of `bits` in `1..=8`.
fn range_of(bits: u8) -> Result<(i32, i32), QuantError> {
    if (1..=8).contains(&bits) {
        Ok(int_range(bits))
    } else {
        Err(QuantError::BitsOutOfRange { bits })
    }
}

/// `ValueOutOfRange` for the first value of `q` outside `[qmin, qmax]`, if any.
fn check_values(q: &[i8], bits: u8, (qmin, qmax): (i32, i32)) -> Result<(), QuantError> {
    let outside = |v: i8| i32::from(v) < qmin || i32::from(v) > qmax;
    // Branch-free scan per chunk (vectorizes); locate the culprit only on failure.
    for (c, chunk) in q.chunks(256).enumerate() {
        if chunk.iter().fold(false, |any, &v| any | outside(v)) {
            let i = chunk.iter().position(|&v| outside(v)).unwrap_or(0);
            let value = i32::from(chunk[i]);
            return Err(QuantError::ValueOutOfRange {
                index: c * 256 + i,
                value,
                bits,
                qmin,
                qmax,
            });
        }
    }
    Ok(())
}

/// `q + 2^(b-1)`: the unsigned code compressed-tensors packs (`uint4b8`, `uint8b128`, …).
#[inline(always)]
fn offset_code(q: i8, bits: u32) -> u32 {
    ((i32::from(q) + (1 << (bits - 1))) as u32) & ((1 << bits) - 1)
}

/// Inverse of [`offset_code`].
#[inline(always)]
fn signed_of_code(u: u32, bits: u32) -> i8 {
    (u as i32 - (1 << (bits - 1))) as i8
}

/// Appends the words of one line when `B` divides 32 (no value straddles a word).
fn pack_line_aligned<const B: u32>(line: &[i8], out: &mut Vec<i32>) {
    let per_word = (32 / B) as usize;
    let chunks = line.chunks_exact(per_word);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut word = 0u32;
        for (k, &q) in chunk.iter().enumerate() {
            word |= offset_code(q, B) << (k as u32 * B);
        }
        out.push(word as i32);
    }
    if !tail.is_empty() {
        let mut word = 0u32; // padding bits stay 0
        for (k, &q) in tail.iter().enumerate() {
            word |= offset_code(q, B) << (k as u32 * B);
        }
        out.push(word as i32);
    }
}

/// Appends the words of one line for any `bits`, through a 64-bit accumulator.
fn pack_line_stream(line: &[i8], bits: u32, out: &mut Vec<i32>) {
    let (mut acc, mut filled) = (0u64, 0u32);
    for &q in line {
        acc |= u64::from(offset_code(q, bits)) << filled;
        filled += bits;
        if filled >= 32 {
            out.push(acc as u32 as i32);
            acc >>= 32;
            filled -= 32;
        }
    }
    if filled > 0 {
        out.push(acc as u32 as i32);
    }
}

/// Packs signed `bits`-bit values along each row (dim 1), compressed-tensors `pack-quantized`.
///
/// - `q`: row-major `[rows, cols]`, values in `[-2^(b-1), 2^(b-1)-1]`; `bits` in `1..=8`.
///
/// Returns `weight_packed`: row-major `[rows, ceil(cols·b/32)]` i32 words (4-bit: `[rows, cols/8]`).
/// Golden (4-bit): `[-8, -1, 0, 1, 7, 3, -2, 5]` → `0xD6BF9870`.
pub fn pack_int32_rows(
    q: &[i8],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i32>, QuantError> {
    let range = range_of(bits)?;
    check_len("quantized values", q.len(), rows, cols)?;
    check_values(q, bits, range)?;
    let mut out = Vec::with_capacity(rows * packed_int32_len(cols, bits));
    if cols == 0 {
        return Ok(out);
    }
    for line in q.chunks_exact(cols) {
        match bits {
            1 => pack_line_aligned::<1>(line, &mut out),
            2 => pack_line_aligned::<2>(line, &mut out),
            4 => pack_line_aligned::<4>(line, &mut out),
            8 => pack_line_aligned::<8>(line, &mut out),
            b => pack_line_stream(line, u32::from(b), &mut out),
        }
    }
    Ok(out)
}

/// The `bits`-bit code at bit position `bit` of a packed line (`words`), across a word boundary
/// if need be.
#[inline(always)]
fn code_at(words: impl Fn(usize) -> u32, n_words: usize, bit: usize, bits: u32) -> u32 {
    let (k, shift) = (bit / 32, bit % 32);
    let lo = u64::from(words(k));
    let hi = if k + 1 < n_words {
        u64::from(words(k + 1))
    } else {
        0
    };
    (((hi << 32) | lo) >> shift) as u32 & ((1 << bits) - 1)
}

/// Inverse of [`pack_int32_rows`].
///
/// - `words`: row-major `[rows, ceil(cols·b/32)]`; padding bits are ignored.
///
/// Returns row-major `[rows, cols]` signed values.
pub fn unpack_int32_rows(
    words: &[i32],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i8>, QuantError> {
    range_of(bits)?;
    let per_row = packed_int32_len(cols, bits);
    check_len("packed words", words.len(), rows, per_row)?;
    let b = u32::from(bits);
    let mut out = Vec::with_capacity(rows * cols);
    if per_row == 0 {
        out.resize(rows * cols, 0); // cols == 0
        return Ok(out);
    }
    for line in words.chunks_exact(per_row) {
        for i in 0..cols {
            let u = code_at(|k| line[k] as u32, per_row, i * bits as usize, b);
            out.push(signed_of_code(u, b));
        }
    }
    Ok(out)
}

/// Packs signed `bits`-bit values along each column (dim 0), as compressed-tensors packs
/// asymmetric zero points (`weight_zero_point`).
///
/// - `q`: row-major `[rows, cols]` (zero points: `[out_features, n_groups]`), values in range.
///
/// Returns row-major `[ceil(rows·b/32), cols]` i32 words: word `(k, c)` holds bits
/// `32k..32k+32` of column `c`'s stream.
pub fn pack_int32_cols(
    q: &[i8],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i32>, QuantError> {
    let range = range_of(bits)?;
    check_len("quantized values", q.len(), rows, cols)?;
    check_values(q, bits, range)?;
    let b = u32::from(bits);
    let mut out = vec![0u32; packed_int32_len(rows, bits) * cols];
    // Walk the input row by row (contiguous); each row lands at one bit offset of every column.
    // (`max(1)`: with no columns there is no input and nothing to walk.)
    for (r, line) in q.chunks_exact(cols.max(1)).enumerate() {
        let bit = r * bits as usize;
        let (k, shift) = (bit / 32, (bit % 32) as u32);
        for (c, &v) in line.iter().enumerate() {
            let u = offset_code(v, b);
            out[k * cols + c] |= u << shift;
            if shift + b > 32 {
                out[(k + 1) * cols + c] |= u >> (32 - shift);
            }
        }
    }
    Ok(out.into_iter().map(|w| w as i32).collect())
}

/// Inverse of [`pack_int32_cols`].
///
/// - `words`: row-major `[ceil(rows·b/32), cols]`.
///
/// Returns row-major `[rows, cols]` signed values.
pub fn unpack_int32_cols(
    words: &[i32],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i8>, QuantError> {
    range_of(bits)?;
    let packed_rows = packed_int32_len(rows, bits);
    check_len("packed words", words.len(), packed_rows, cols)?;
    let b = u32::from(bits);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let u = code_at(
                |k| words[k * cols + c] as u32,
                packed_rows,
                r * bits as usize,
                b,
            );
            out.push(signed_of_code(u, b));
        }
    }
    Ok(out)
}

/// Axis along which Ascend int4 pairs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairAxis {
    /// Rows `2i` (low nibble) and `2i+1` (high nibble) share a byte: `[rows, cols]` →
    /// `[rows/2, cols]`. W4A8_DYNAMIC and per-group W4A16 (pairs along `out`).
    Rows,
    /// Columns `2j` (low) and `2j+1` (high) share a byte: `[rows, cols]` → `[rows, cols/2]`.
    /// Per-channel W4A16 (pairs along `in`).
    Cols,
}

/// Two signed nibbles in one byte, the first in the low nibble.
#[inline(always)]
fn nibble_pair(first: i8, second: i8) -> i8 {
    (second << 4) | (first & 0x0F)
}

/// The two signed nibbles of a byte, sign-extended: `(low, high)`.
#[inline(always)]
fn nibbles(byte: i8) -> (i8, i8) {
    ((byte << 4) >> 4, byte >> 4)
}

/// The even length the pair axis must have.
fn pair_axis_len(rows: usize, cols: usize, axis: PairAxis) -> Result<(), QuantError> {
    let len = match axis {
        PairAxis::Rows => rows,
        PairAxis::Cols => cols,
    };
    if len % 2 == 0 {
        Ok(())
    } else {
        Err(QuantError::OddPairAxis { axis, len })
    }
}

/// Packs int4 values in signed pairs, Ascend / msModelSlim `_pack_int4`:
/// `byte = (w1 << 4) | (w0 & 0x0F)`, no offset. Golden: `(-8, 7)` → `0x78`, `(3, -2)` → `0xE3`.
///
/// - `q`: row-major `[rows, cols]`, values in `[-8, 7]`; the `axis` length must be even.
///
/// Returns row-major `[rows/2, cols]` (`PairAxis::Rows`) or `[rows, cols/2]` (`PairAxis::Cols`)
/// bytes, stored as I8.
pub fn pack_int4_pairs(
    q: &[i8],
    rows: usize,
    cols: usize,
    axis: PairAxis,
) -> Result<Vec<i8>, QuantError> {
    check_len("quantized values", q.len(), rows, cols)?;
    check_values(q, 4, int_range(4))?;
    pair_axis_len(rows, cols, axis)?;
    let out = match axis {
        // (`max(1)`: with no columns `q` is empty anyway.)
        PairAxis::Rows => q
            .chunks_exact(2 * cols.max(1))
            .flat_map(|two_rows| {
                let (first, second) = two_rows.split_at(cols);
                first.iter().zip(second).map(|(&a, &b)| nibble_pair(a, b))
            })
            .collect(),
        PairAxis::Cols => q.chunks_exact(2).map(|p| nibble_pair(p[0], p[1])).collect(),
    };
    Ok(out)
}

/// Inverse of [`pack_int4_pairs`].
///
/// - `packed`: row-major `[rows/2, cols]` (`Rows`) or `[rows, cols/2]` (`Cols`); `rows`, `cols`
///   are the unpacked shape.
///
/// Returns row-major `[rows, cols]` values in `[-8, 7]`.
pub fn unpack_int4_pairs(
    packed: &[i8],
    rows: usize,
    cols: usize,
    axis: PairAxis,
) -> Result<Vec<i8>, QuantError> {
    pair_axis_len(rows, cols, axis)?;
    let n = rows
        .checked_mul(cols)
        .ok_or(QuantError::ShapeOverflow { rows, cols })?;
    if packed.len() != n / 2 {
        return Err(QuantError::LengthMismatch {
            what: "packed bytes",
            expected: n / 2,
            actual: packed.len(),
        });
    }
    let mut out = Vec::with_capacity(n);
    match axis {
        PairAxis::Rows if cols > 0 => {
            for line in packed.chunks_exact(cols) {
                out.extend(line.iter().map(|&b| nibbles(b).0));
                out.extend(line.iter().map(|&b| nibbles(b).1));
            }
        }
        PairAxis::Rows => {}
        PairAxis::Cols => {
            for &b in packed {
                let (lo, hi) = nibbles(b);
                out.extend([lo, hi]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values covering the whole `bits` range.
    fn values(n: usize, bits: u8, seed: u64) -> Vec<i8> {
        let (qmin, qmax) = int_range(bits);
        let span = (qmax - qmin + 1) as u64;
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (qmin + ((s >> 33) % span) as i32) as i8
            })
            .collect()
    }

    #[test]
    fn int4_golden_word() {
        // FORMATS.md A.2 / compressed-tensors pack_to_int32: u = q + 8 = [0,7,8,9,15,11,6,13],
        // nibble i at bits 4i → 0xD6BF9870 = -692086672 (bytes on disk 70 98 BF D6).
        let q = [-8, -1, 0, 1, 7, 3, -2, 5];
        let words = pack_int32_rows(&q, 1, 8, 4).unwrap();
        assert_eq!(words, vec![0xD6BF9870u32 as i32]);
        assert_eq!(words[0], -692_086_672);
        assert_eq!(words[0].to_le_bytes(), [0x70, 0x98, 0xBF, 0xD6]);
        assert_eq!(unpack_int32_rows(&words, 1, 8, 4).unwrap(), q);
    }

    #[test]
    fn int8_and_int2_golden_words() {
        // int8: u = q + 128, byte i at bits 8i: [-128, -1, 0, 127] → [0x00, 0x7F, 0x80, 0xFF] → 0xFF807F00.
        assert_eq!(
            pack_int32_rows(&[-128, -1, 0, 127], 1, 4, 8).unwrap(),
            vec![0xFF80_7F00u32 as i32]
        );
        // int2 (range [-2, 1], u = q + 2): [1, -2, 0, -1, 1] → u [3, 0, 2, 1, 3] → bits
        // 0b11 | 0b00<<2 | 0b10<<4 | 0b01<<6 | 0b11<<8 = 0x363; one padded word.
        assert_eq!(
            pack_int32_rows(&[1, -2, 0, -1, 1], 1, 5, 2).unwrap(),
            vec![0x363]
        );
    }

    #[test]
    fn three_bit_values_straddle_words() {
        // 3-bit, 11 values: 33 bits → 2 words. u = q + 4. Value 10 sits at bits 30..33: its low
        // two bits end word 0, its high bit starts word 1.
        // q = [3, -4, 0, 0, 0, 0, 0, 0, 0, 0, 3]: u = [7, 0, 4 × 8, 7].
        // word 0 = 7 | Σ_{i=2..9} 4<<3i | (7 & 0b11)<<30; word 1 = 7 >> 2 = 1.
        let q = [3, -4, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let mut w0 = 7u32;
        for i in 2..10 {
            w0 |= 4 << (3 * i);
        }
        w0 |= 0b11 << 30;
        let words = pack_int32_rows(&q, 1, 11, 3).unwrap();
        assert_eq!(words, vec![w0 as i32, 1]);
        assert_eq!(unpack_int32_rows(&words, 1, 11, 3).unwrap(), q);
    }

    #[test]
    fn rows_round_trip_for_every_bit_width() {
        for bits in 1..=8u8 {
            for (rows, cols) in [(1, 1), (3, 31), (2, 32), (4, 33), (5, 100), (2, 0), (0, 7)] {
                let q = values(rows * cols, bits, u64::from(bits) * 1000 + cols as u64);
                let words = pack_int32_rows(&q, rows, cols, bits).unwrap();
                assert_eq!(
                    words.len(),
                    rows * (cols * bits as usize).div_ceil(32),
                    "bits {bits}, cols {cols}"
                );
                assert_eq!(
                    unpack_int32_rows(&words, rows, cols, bits).unwrap(),
                    q,
                    "bits {bits}, [{rows}, {cols}]"
                );
                // The streaming packer and the word-aligned packer agree.
                let mut streamed = vec![];
                for line in q.chunks(cols.max(1)) {
                    pack_line_stream(line, u32::from(bits), &mut streamed);
                }
                assert_eq!(streamed, words, "bits {bits}");
            }
        }
    }

    #[test]
    fn cols_packing_is_rows_packing_of_the_transpose() {
        for bits in 1..=8u8 {
            for (rows, cols) in [(1, 1), (8, 3), (33, 2), (70, 5), (0, 3), (4, 0)] {
                let q = values(rows * cols, bits, 77 + u64::from(bits));
                let words = pack_int32_cols(&q, rows, cols, bits).unwrap();
                let packed_rows = (rows * bits as usize).div_ceil(32);
                assert_eq!(words.len(), packed_rows * cols);
                assert_eq!(
                    unpack_int32_cols(&words, rows, cols, bits).unwrap(),
                    q,
                    "bits {bits}"
                );
                // Column c of the packed words == row c of pack_int32_rows(transpose(q)).
                let t: Vec<i8> = (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| (r, c)))
                    .map(|(r, c)| q[r * cols + c])
                    .collect();
                let t_words = pack_int32_rows(&t, cols, rows, bits).unwrap();
                for c in 0..cols {
                    for k in 0..packed_rows {
                        assert_eq!(
                            words[k * cols + c],
                            t_words[c * packed_rows + k],
                            "bits {bits}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_points_golden_along_dim_0() {
        // 4-bit zero points [8 rows, 2 cols]; column 0 = the golden sequence, column 1 all -8 (u = 0).
        let golden = [-8i8, -1, 0, 1, 7, 3, -2, 5];
        let q: Vec<i8> = golden.iter().flat_map(|&g| [g, -8]).collect();
        assert_eq!(
            pack_int32_cols(&q, 8, 2, 4).unwrap(),
            vec![0xD6BF9870u32 as i32, 0]
        );
    }

    #[test]
    fn int4_pairs_golden() {
        // msModelSlim _pack_int4: byte = (w1 << 4) | (w0 & 0x0F), signed, no offset.
        assert_eq!(
            pack_int4_pairs(&[-8, 7, 3, -2], 1, 4, PairAxis::Cols).unwrap(),
            vec![0x78, 0xE3u8 as i8]
        );
        // Along rows: [2, 2] with rows (-8, 3) and (7, -2) → column pairs (-8, 7), (3, -2).
        assert_eq!(
            pack_int4_pairs(&[-8, 3, 7, -2], 2, 2, PairAxis::Rows).unwrap(),
            vec![0x78, 0xE3u8 as i8]
        );
        assert_eq!(
            unpack_int4_pairs(&[0x78, 0xE3u8 as i8], 1, 4, PairAxis::Cols).unwrap(),
            vec![-8, 7, 3, -2]
        );
        assert_eq!(
            unpack_int4_pairs(&[0x78, 0xE3u8 as i8], 2, 2, PairAxis::Rows).unwrap(),
            vec![-8, 3, 7, -2]
        );
    }

    #[test]
    fn int4_pairs_round_trip_both_axes() {
        let (rows, cols) = (6, 10);
        let q = values(rows * cols, 4, 5);
        for axis in [PairAxis::Rows, PairAxis::Cols] {
            let packed = pack_int4_pairs(&q, rows, cols, axis).unwrap();
            assert_eq!(packed.len(), rows * cols / 2);
            assert_eq!(unpack_int4_pairs(&packed, rows, cols, axis).unwrap(), q);
        }
        // Every byte decodes to the nibbles that encode it.
        for byte in i8::MIN..=i8::MAX {
            let (lo, hi) = nibbles(byte);
            assert_eq!(nibble_pair(lo, hi), byte);
        }
    }

    #[test]
    fn packing_rejects_bad_input() {
        assert_eq!(
            pack_int32_rows(&[0], 1, 1, 0),
            Err(QuantError::BitsOutOfRange { bits: 0 })
        );
        assert_eq!(
            pack_int32_rows(&[0], 1, 1, 9),
            Err(QuantError::BitsOutOfRange { bits: 9 })
        );
        assert_eq!(
            unpack_int32_cols(&[0], 1, 1, 16),
            Err(QuantError::BitsOutOfRange { bits: 16 })
        );
        assert_eq!(
            pack_int32_rows(&[0, 1, 2], 1, 4, 4),
            Err(QuantError::LengthMismatch {
                what: "quantized values",
                expected: 4,
                actual: 3
            })
        );
        let mut q = vec![0i8; 300];
        q[261] = 8;
        assert_eq!(
            pack_int32_rows(&q, 3, 100, 4),
            Err(QuantError::ValueOutOfRange {
                index: 261,
                value: 8,
                bits: 4,
                qmin: -8,
                qmax: 7
            })
        );
        assert_eq!(
            pack_int32_cols(&[0, -3], 1, 2, 2),
            Err(QuantError::ValueOutOfRange {
                index: 1,
                value: -3,
                bits: 2,
                qmin: -2,
                qmax: 1
            })
        );
        assert_eq!(
            unpack_int32_rows(&[0; 3], 2, 9, 4),
            Err(QuantError::LengthMismatch {
                what: "packed words",
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            unpack_int32_cols(&[0; 3], 9, 2, 4),
            Err(QuantError::LengthMismatch {
                what: "packed words",
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            pack_int4_pairs(&[0; 6], 3, 2, PairAxis::Rows),
            Err(QuantError::OddPairAxis {
                axis: PairAxis::Rows,
                len: 3
            })
        );
        assert_eq!(
            pack_int4_pairs(&[0; 6], 2, 3, PairAxis::Cols),
            Err(QuantError::OddPairAxis {
                axis: PairAxis::Cols,
                len: 3
            })
        );
        assert_eq!(
            pack_int4_pairs(&[0, 9], 1, 2, PairAxis::Cols),
            Err(QuantError::ValueOutOfRange {
                index: 1,
                value: 9,
                bits: 4,
                qmin: -8,
                qmax: 7
            })
        );
        assert_eq!(
            unpack_int4_pairs(&[0; 3], 2, 4, PairAxis::Rows),
            Err(QuantError::LengthMismatch {
                what: "packed bytes",
                expected: 4,
                actual: 3
            })
        );
    }

    #[test]
    fn packed_int32_len_does_not_overflow() {
        assert_eq!(packed_int32_len(8, 4), 1);
        assert_eq!(packed_int32_len(11, 3), 2);
        assert_eq!(packed_int32_len(0, 8), 0);
        assert_eq!(packed_int32_len(usize::MAX, 8), (usize::MAX / 32) * 8 + 8);
    }
}
