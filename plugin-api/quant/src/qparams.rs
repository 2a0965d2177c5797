//! Scales and zero points: the min/max rule, the [`QParams`] layout, and the min/max observer.

use std::ops::Range;

use crate::error::QuantError;
use crate::fp8::FP8_E4M3_MAX;
use crate::int::round_half_even;
use crate::scheme::{int_range, Granularity, QuantArgs, QuantType, ScaleRule};

/// Scale used where the rule gives `s = 0` (an all-zero group): `f32::EPSILON` (`2^-23`).
///
/// compressed-tensors replaces a zero scale by the epsilon of the scale's dtype; scales are
/// computed in f32 here. llm-compressor observes bf16 weights in bf16, where the stored scale of
/// an all-zero group would be `2^-7` instead; that changes nothing else, since any positive scale
/// gives that group all `q = zp` and all `x̂ = 0`. ([`QParams::round_scales`] keeps `2^-23`, which
/// bf16 and f16 represent exactly.)
pub const ZERO_SCALE: f32 = f32::EPSILON;

/// Validated quantization args: what the rounding needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// Signed integers in `[qmin, qmax]`.
    Int { qmin: i32, qmax: i32 },
    /// FP8 E4M3, finite range ±448.
    Fp8,
}

impl Codec {
    pub(crate) fn of(args: &QuantArgs) -> Result<Self, QuantError> {
        args.validate()?;
        Ok(match args.ty {
            QuantType::Int => {
                let (qmin, qmax) = int_range(args.bits);
                Codec::Int { qmin, qmax }
            }
            QuantType::Float => Codec::Fp8,
        })
    }

    /// Only asymmetric integer schemes store zero points.
    pub(crate) fn has_zeros(self, args: &QuantArgs) -> bool {
        matches!(self, Codec::Int { .. }) && !args.symmetric
    }
}

/// Scale and zero point of a value range, compressed-tensors' `calculate_qparams`:
///
/// 1. `min := min(min, 0)`, `max := max(max, 0)` (0 must stay exactly representable).
/// 2. Int, symmetric, `absmax = max(|min|, |max|)`:
///    [`ScaleRule::HalfRange`] `s = absmax / ((qmax − qmin) / 2)` (int4: /7.5, int8: /127.5);
///    [`ScaleRule::Qmax`] `s = absmax / qmax` (int4: /7, int8: /127); `zp = 0`.
/// 3. Int, asymmetric: `s = (max − min) / (qmax − qmin)`,
///    `zp = round_half_even(clamp(qmin − min / s, qmin, qmax))`.
/// 4. FP8 E4M3: `s = absmax / 448`, `zp = 0`.
/// 5. `s == 0` (only when `min = max = 0`) becomes [`ZERO_SCALE`]; an asymmetric zero point is
///    then 0 (torch computes `qmin − 0/0 = NaN` there, whose cast to int is unspecified).
///
/// All arithmetic is f32, in the order above, so results match torch's f32 computation bit for bit.
/// Errors: invalid `args`, a non-finite `min`/`max`, or a range so wide that `s` overflows f32.
pub fn scale_zero(min: f32, max: f32, args: &QuantArgs) -> Result<(f32, i32), QuantError> {
    let codec = Codec::of(args)?;
    if !(min.is_finite() && max.is_finite()) {
        return Err(QuantError::NonFiniteRange { min, max });
    }
    scale_zero_of(min, max, args, codec)
        .map_err(|value| QuantError::InvalidScale { index: 0, value })
}

/// [`scale_zero`] for validated args; `Err(s)` when `s` is not finite. `min = +inf`,
/// `max = -inf` (an empty range) gives `(ZERO_SCALE, 0)`.
pub(crate) fn scale_zero_of(
    min: f32,
    max: f32,
    args: &QuantArgs,
    codec: Codec,
) -> Result<(f32, i32), f32> {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let absmax = (-min).max(max);
    let (scale, zero) = match codec {
        Codec::Fp8 => (absmax / FP8_E4M3_MAX, 0),
        Codec::Int { qmin, qmax } if args.symmetric => {
            let scale = match args.scale_rule {
                ScaleRule::HalfRange => absmax / ((qmax - qmin) as f32 / 2.0),
                ScaleRule::Qmax => absmax / qmax as f32,
            };
            (scale, 0)
        }
        Codec::Int { qmin, qmax } => {
            let scale = (max - min) / (qmax - qmin) as f32;
            if scale == 0.0 {
                return Ok((ZERO_SCALE, 0));
            }
            let zero = (qmin as f32 - min / scale).clamp(qmin as f32, qmax as f32);
            (scale, round_half_even(zero) as i32)
        }
    };
    if scale == 0.0 {
        Ok((ZERO_SCALE, zero))
    } else if scale.is_finite() {
        Ok((scale, zero))
    } else {
        Err(scale)
    }
}

/// Scales and zero points of one `[rows, cols]` matrix (weights `[out, in]`).
///
/// Layout of `scales` (and of `zeros` when present), row-major:
/// - [`Granularity::Tensor`]: 1 value;
/// - [`Granularity::Channel`]: `rows` values, one per row;
/// - [`Granularity::Group`]`(g)`: `rows × ceil(cols / g)` values, `[row, col / g]`; the last group
///   of a row is short when `g` does not divide `cols`.
///
/// `zeros` is empty for symmetric and FP8 schemes; otherwise it has the length of `scales` and
/// values in the scheme's integer range. Scales are positive and finite.
#[derive(Debug, Clone, PartialEq)]
pub struct QParams {
    pub granularity: Granularity,
    pub rows: usize,
    pub cols: usize,
    pub scales: Vec<f32>,
    /// Empty when symmetric or float.
    pub zeros: Vec<i32>,
}

impl QParams {
    /// Checked constructor: see [`QParams::validate`].
    pub fn new(
        granularity: Granularity,
        rows: usize,
        cols: usize,
        scales: Vec<f32>,
        zeros: Vec<i32>,
    ) -> Result<Self, QuantError> {
        let qp = QParams {
            granularity,
            rows,
            cols,
            scales,
            zeros,
        };
        qp.validate()?;
        Ok(qp)
    }

    /// Number of scales a `[rows, cols]` matrix has at `granularity` (see the layout above).
    pub fn n_scales(
        granularity: Granularity,
        rows: usize,
        cols: usize,
    ) -> Result<usize, QuantError> {
        Layout {
            granularity,
            rows,
            cols,
        }
        .n_params()
    }

    /// Scale groups per row: `ceil(cols / g)` for groups, 1 for channel and tensor (the tensor's
    /// single group spans every row).
    pub fn n_groups_per_row(&self) -> usize {
        self.layout().groups_per_row()
    }

    /// Index into `scales` / `zeros` of element `(row, col)`.
    ///
    /// Does not check bounds; `scale_for` / `zero_for` panic like slice indexing when the index is
    /// out of range.
    pub fn index_of(&self, row: usize, col: usize) -> usize {
        self.layout().param(row, col)
    }

    /// Scale of element `(row, col)`.
    ///
    /// # Panics
    /// When `(row, col)` is outside the matrix or `scales` has the wrong length.
    pub fn scale_for(&self, row: usize, col: usize) -> f32 {
        self.scales[self.index_of(row, col)]
    }

    /// Zero point of element `(row, col)`; 0 for symmetric and FP8 qparams.
    ///
    /// # Panics
    /// When `(row, col)` is outside the matrix or `zeros` has the wrong length.
    pub fn zero_for(&self, row: usize, col: usize) -> i32 {
        self.zero(self.index_of(row, col))
    }

    /// `true` when there are no zero points (symmetric or FP8).
    pub fn is_symmetric(&self) -> bool {
        self.zeros.is_empty()
    }

    /// Checks the layout: the group size is not 0, `scales` has [`QParams::n_scales`] values,
    /// `zeros` is empty or as long as `scales`, every scale is positive and finite.
    pub fn validate(&self) -> Result<(), QuantError> {
        let n = Self::n_scales(self.granularity, self.rows, self.cols)?;
        if self.scales.len() != n {
            return Err(QuantError::LengthMismatch {
                what: "scales",
                expected: n,
                actual: self.scales.len(),
            });
        }
        if !self.zeros.is_empty() && self.zeros.len() != n {
            return Err(QuantError::LengthMismatch {
                what: "zero points",
                expected: n,
                actual: self.zeros.len(),
            });
        }
        match self
            .scales
            .iter()
            .position(|s| !(s.is_finite() && *s > 0.0))
        {
            Some(index) => Err(QuantError::InvalidScale {
                index,
                value: self.scales[index],
            }),
            None => Ok(()),
        }
    }

    /// [`QParams::validate`], plus agreement with `args`: same granularity, zero points present
    /// exactly for asymmetric integer schemes, zero points inside the integer range.
    pub fn check_for(&self, args: &QuantArgs) -> Result<(), QuantError> {
        let codec = Codec::of(args)?;
        self.validate()?;
        if self.granularity != args.granularity {
            return Err(QuantError::GranularityMismatch {
                args: args.granularity,
                qparams: self.granularity,
            });
        }
        let expected = if codec.has_zeros(args) {
            self.scales.len()
        } else {
            0
        };
        if self.zeros.len() != expected {
            return Err(QuantError::LengthMismatch {
                what: "zero points",
                expected,
                actual: self.zeros.len(),
            });
        }
        if let Codec::Int { qmin, qmax } = codec {
            if let Some(index) = self.zeros.iter().position(|z| !(qmin..=qmax).contains(z)) {
                let value = self.zeros[index];
                return Err(QuantError::ZeroPointOutOfRange {
                    index,
                    value,
                    qmin,
                    qmax,
                });
            }
        }
        Ok(())
    }

    /// Rounds every scale to the dtype it will be stored in, so that quantizing with these qparams
    /// uses exactly the scales a checkpoint holds (compressed-tensors stores scales in the model
    /// dtype and dequantizes with them).
    ///
    /// A scale that rounds to 0 becomes that dtype's epsilon (as `calculate_qparams` does in the
    /// dtype); one that overflows (f16 above 65504) is an [`QuantError::InvalidScale`], and then
    /// no scale is changed.
    pub fn round_scales(&mut self, dtype: ScaleDtype) -> Result<(), QuantError> {
        let mut rounded = Vec::with_capacity(self.scales.len());
        for (index, &s) in self.scales.iter().enumerate() {
            let r = dtype.round(s);
            if !(r.is_finite() && r >= 0.0) {
                return Err(QuantError::InvalidScale { index, value: r });
            }
            rounded.push(if r == 0.0 { dtype.epsilon() } else { r });
        }
        self.scales = rounded;
        Ok(())
    }

    /// Multiplies every scale of row `r` by `factors[r]` (`factors: [rows]`), zero points kept.
    ///
    /// Scaling row `r` of a quantized matrix by `c` keeps it exactly on a grid: `c·(q − zp)·s =
    /// (q − zp)·(c·s)`. An algorithm that folds a per-channel factor into the output rows of an
    /// already quantized layer (AWQ's `v_proj → o_proj`, `up_proj → down_proj`) moves the grid
    /// with it here. Only channel and group qparams have per-row scales; tensor qparams are an
    /// error ([`QuantError::GranularityMismatch`] naming `Channel`). Every factor must be
    /// positive and finite, and so must every product; on error nothing is changed.
    pub fn scale_rows(&mut self, factors: &[f32]) -> Result<(), QuantError> {
        if self.granularity == Granularity::Tensor {
            return Err(QuantError::GranularityMismatch {
                args: Granularity::Channel,
                qparams: Granularity::Tensor,
            });
        }
        self.validate()?;
        if factors.len() != self.rows {
            return Err(QuantError::LengthMismatch {
                what: "row factors",
                expected: self.rows,
                actual: factors.len(),
            });
        }
        if let Some(index) = factors.iter().position(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(QuantError::InvalidFactor {
                index,
                value: factors[index],
            });
        }
        let per_row = self.n_groups_per_row();
        let scaled: Vec<f32> = self
            .scales
            .iter()
            .enumerate()
            .map(|(i, s)| s * factors[i / per_row])
            .collect();
        if let Some(index) = scaled.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(QuantError::InvalidScale {
                index,
                value: scaled[index],
            });
        }
        self.scales = scaled;
        Ok(())
    }

    /// The matrix must be exactly `[rows, cols]`.
    pub(crate) fn check_shape(&self, rows: usize, cols: usize) -> Result<(), QuantError> {
        if (rows, cols) != (self.rows, self.cols) {
            return Err(QuantError::ShapeMismatch {
                expected: [self.rows, self.cols],
                actual: [rows, cols],
            });
        }
        Ok(())
    }

    /// A block of all rows and columns `col0..col0 + ncols` must lie inside the matrix.
    pub(crate) fn check_window(
        &self,
        rows: usize,
        col0: usize,
        ncols: usize,
    ) -> Result<(), QuantError> {
        if rows != self.rows {
            return Err(QuantError::RowsMismatch {
                expected: self.rows,
                actual: rows,
            });
        }
        match col0.checked_add(ncols) {
            Some(end) if end <= self.cols => Ok(()),
            end => Err(QuantError::ColumnRange {
                start: col0,
                end: end.unwrap_or(usize::MAX),
                cols: self.cols,
            }),
        }
    }

    pub(crate) fn layout(&self) -> Layout {
        Layout {
            granularity: self.granularity,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Zero point at `scales` index `param`.
    pub(crate) fn zero(&self, param: usize) -> i32 {
        if self.zeros.is_empty() {
            0
        } else {
            self.zeros[param]
        }
    }
}

/// Storage dtype of scales, for [`QParams::round_scales`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDtype {
    F32,
    F16,
    BF16,
}

impl ScaleDtype {
    /// `x` rounded to this dtype (nearest, ties to even) and widened back to f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDtype::F32 => x,
            ScaleDtype::F16 => half::f16::from_f32(x).to_f32(),
            ScaleDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// `torch.finfo(dtype).eps`: the distance from 1.0 to the next value.
    pub fn epsilon(self) -> f32 {
        match self {
            ScaleDtype::F32 => f32::EPSILON,
            ScaleDtype::F16 => half::f16::EPSILON.to_f32(),
            ScaleDtype::BF16 => half::bf16::EPSILON.to_f32(),
        }
    }
}

/// Min/max observer: the qparams of `w` at `args.granularity`.
///
/// - `w`: row-major `[rows, cols]`, finite (the first NaN/inf is reported with its index).
///
/// Reduces min and max over the whole tensor, each row, or each row segment of `g` columns, then
/// applies [`scale_zero`].
pub fn compute_qparams(
    w: &[f32],
    rows: usize,
    cols: usize,
    args: &QuantArgs,
) -> Result<QParams, QuantError> {
    let codec = Codec::of(args)?;
    check_len("weights", w.len(), rows, cols)?;
    let layout = Layout {
        granularity: args.granularity,
        rows,
        cols,
    };
    let n = layout.n_params()?;
    let (mut lo, mut hi) = (vec![f32::INFINITY; n], vec![f32::NEG_INFINITY; n]);
    layout.try_for_each_segment(0, cols, |seg| {
        let (mn, mx) = min_max(&w[seg.range()], seg.start)?;
        lo[seg.param] = lo[seg.param].min(mn);
        hi[seg.param] = hi[seg.param].max(mx);
        Ok(())
    })?;
    let with_zeros = codec.has_zeros(args);
    let mut scales = Vec::with_capacity(n);
    let mut zeros = Vec::with_capacity(if with_zeros { n } else { 0 });
    for (index, (&mn, &mx)) in lo.iter().zip(&hi).enumerate() {
        let (s, z) = scale_zero_of(mn, mx, args, codec)
            .map_err(|value| QuantError::InvalidScale { index, value })?;
        scales.push(s);
        if with_zeros {
            zeros.push(z);
        }
    }
    Ok(QParams {
        granularity: args.granularity,
        rows,
        cols,
        scales,
        zeros,
    })
}

/// `rows * cols`, which `actual` must equal.
pub(crate) fn check_len(
    what: &'static str,
    actual: usize,
    rows: usize,
    cols: usize,
) -> Result<usize, QuantError> {
    let expected = rows
        .checked_mul(cols)
        .ok_or(QuantError::ShapeOverflow { rows, cols })?;
    if actual != expected {
        return Err(QuantError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(expected)
}

/// Accumulator lanes of the reductions below; f32 reductions only vectorize when written per lane.
const LANES: usize = 8;

/// All-ones exponent: the bits of every NaN and infinity.
const EXP_MASK: u32 = 0x7F80_0000;

/// 1 when `x` is NaN or infinite, else 0; integer ops, so it vectorizes cleanly.
#[inline(always)]
fn non_finite_bit(x: f32) -> u32 {
    u32::from(x.to_bits() & EXP_MASK == EXP_MASK)
}

/// `(min, max)` of `xs`, `(+inf, -inf)` when empty; `NonFinite` with index `offset + i` for the
/// first NaN/inf.
pub(crate) fn min_max(xs: &[f32], offset: usize) -> Result<(f32, f32), QuantError> {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut bad = [0u32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for i in 0..LANES {
            let x = chunk[i];
            lo[i] = if x < lo[i] { x } else { lo[i] };
            hi[i] = if x > hi[i] { x } else { hi[i] };
            bad[i] |= non_finite_bit(x);
        }
    }
    for (i, &x) in tail.iter().enumerate() {
        lo[i] = if x < lo[i] { x } else { lo[i] };
        hi[i] = if x > hi[i] { x } else { hi[i] };
        bad[i] |= non_finite_bit(x);
    }
    if bad.iter().any(|&b| b != 0) {
        return Err(first_non_finite(xs, offset));
    }
    let lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    Ok((lo, hi))
}

/// `NonFinite` for a NaN/inf in `xs`, if there is one.
pub(crate) fn check_finite(xs: &[f32], offset: usize) -> Result<(), QuantError> {
    let mut bad = [0u32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for i in 0..LANES {
            bad[i] |= non_finite_bit(chunk[i]);
        }
    }
    if bad.iter().any(|&b| b != 0) || tail.iter().any(|x| !x.is_finite()) {
        return Err(first_non_finite(xs, offset));
    }
    Ok(())
}

/// The error for the first non-finite value of `xs` (the caller knows there is one).
#[cold]
fn first_non_finite(xs: &[f32], offset: usize) -> QuantError {
    let i = xs.iter().position(|x| !x.is_finite()).unwrap_or(0);
    QuantError::NonFinite {
        index: offset + i,
        value: xs.get(i).copied().unwrap_or(f32::NAN),
    }
}

/// Elements `start..end` of a row-major buffer that share the scale at index `param`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: usize,
    pub end: usize,
    pub param: usize,
}

impl Segment {
    pub(crate) fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// Which elements of a `[rows, cols]` matrix share a scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub granularity: Granularity,
    pub rows: usize,
    pub cols: usize,
}

impl Layout {
    fn groups_per_row(&self) -> usize {
        match self.granularity {
            Granularity::Tensor | Granularity::Channel => 1,
            Granularity::Group(g) => self.cols.div_ceil(g.max(1) as usize),
        }
    }

    fn n_params(&self) -> Result<usize, QuantError> {
        match self.granularity {
            Granularity::Tensor => Ok(1),
            Granularity::Channel => Ok(self.rows),
            Granularity::Group(0) => Err(QuantError::GroupSizeZero),
            Granularity::Group(_) => {
                self.rows
                    .checked_mul(self.groups_per_row())
                    .ok_or(QuantError::ShapeOverflow {
                        rows: self.rows,
                        cols: self.cols,
                    })
            }
        }
    }

    fn param(&self, row: usize, col: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => 0,
            Granularity::Channel => row,
            Granularity::Group(g) => row * self.groups_per_row() + col / g.max(1) as usize,
        }
    }

    /// Calls `f` for each run of elements sharing one scale, row by row, in a row-major block
    /// `[rows, ncols]` holding columns `col0..col0 + ncols` of the matrix. Segment ranges index
    /// the block; `param` indexes the matrix's scales. The caller checks the window is inside.
    pub(crate) fn try_for_each_segment<E>(
        &self,
        col0: usize,
        ncols: usize,
        mut f: impl FnMut(Segment) -> Result<(), E>,
    ) -> Result<(), E> {
        if ncols == 0 {
            return Ok(());
        }
        let col_end = col0 + ncols;
        for row in 0..self.rows {
            let base = row * ncols;
            match self.granularity {
                Granularity::Tensor | Granularity::Channel => {
                    let param = self.param(row, col0);
                    f(Segment {
                        start: base,
                        end: base + ncols,
                        param,
                    })?;
                }
                Granularity::Group(g) => {
                    let g = g.max(1) as usize;
                    let first = row * self.groups_per_row();
                    for j in col0 / g..=(col_end - 1) / g {
                        let (c0, c1) = ((j * g).max(col0), (j * g).saturating_add(g).min(col_end));
                        f(Segment {
                            start: base + c0 - col0,
                            end: base + c1 - col0,
                            param: first + j,
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
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
    const FP8: QuantArgs = QuantArgs {
        bits: 8,
        ty: QuantType::Float,
        symmetric: true,
        granularity: Granularity::Channel,
        scale_rule: ScaleRule::HalfRange,
    };

    #[test]
    fn int4_symmetric_half_range_divides_absmax_by_7_5() {
        // compressed-tensors calculate_qparams: symmetric s = absmax / ((qmax - qmin) / 2) = absmax / 7.5.
        let a = args(4, true, Granularity::Tensor, ScaleRule::HalfRange);
        assert_eq!(scale_zero(-3.0, 1.5, &a), Ok((3.0 / 7.5, 0)));
        assert_eq!(scale_zero(-0.5, 3.0, &a), Ok((3.0 / 7.5, 0)));
        // int8: /127.5.
        let a8 = args(8, true, Granularity::Tensor, ScaleRule::HalfRange);
        assert_eq!(scale_zero(-2.55, 1.0, &a8), Ok((2.55 / 127.5, 0)));
    }

    #[test]
    fn int4_symmetric_qmax_divides_absmax_by_7() {
        // msModelSlim / GPTQ: s = absmax / qmax = absmax / 7 (int4), / 127 (int8).
        let a = args(4, true, Granularity::Tensor, ScaleRule::Qmax);
        assert_eq!(scale_zero(-3.5, 1.0, &a), Ok((0.5, 0)));
        let a8 = args(8, true, Granularity::Tensor, ScaleRule::Qmax);
        assert_eq!(scale_zero(-1.0, 254.0, &a8), Ok((2.0, 0)));
    }

    #[test]
    fn int8_asymmetric_scale_and_zero_point() {
        // calculate_qparams asymmetric: s = (max - min) / (qmax - qmin) = (3 - (-2)) / 255,
        // zp = round(clamp(qmin - min/s, qmin, qmax)) = round(-128 + 2/s) = round(-128 + 102) = -26.
        let a = args(8, false, Granularity::Tensor, ScaleRule::HalfRange);
        let (s, z) = scale_zero(-2.0, 3.0, &a).unwrap();
        assert_eq!(s, 5.0f32 / 255.0);
        assert_eq!(z, -26);
        // Only positive values: min := 0, s = 127.5/255 = 0.5, zp = qmin: 0.0 maps to -128 exactly.
        assert_eq!(scale_zero(1.0, 127.5, &a), Ok((0.5, -128)));
        // Only negative values: max := 0, s = 0.5, zp = -128 + 127.5/0.5 = 127.
        assert_eq!(scale_zero(-127.5, -1.0, &a), Ok((0.5, 127)));
        // ScaleRule is ignored when asymmetric.
        let q = QuantArgs {
            scale_rule: ScaleRule::Qmax,
            ..a
        };
        assert_eq!(scale_zero(-2.0, 3.0, &q), scale_zero(-2.0, 3.0, &a));
    }

    #[test]
    fn asymmetric_zero_point_rounds_half_to_even() {
        // int4 asymmetric, min = -1, max = 14: s = 15/15 = 1, zp = -8 + 1 = -7 (exact).
        let a = args(4, false, Granularity::Tensor, ScaleRule::HalfRange);
        assert_eq!(scale_zero(-1.0, 14.0, &a), Ok((1.0, -7)));
        // min = -0.5, max = 7: s = 7.5/15 = 0.5, zp = -8 + 1 = -7; min = -0.25, max = 7.25:
        // s = 0.5, zp = -8 + 0.5 = -7.5 → -8 (ties to even).
        assert_eq!(scale_zero(-0.25, 7.25, &a), Ok((0.5, -8)));
        assert_eq!(scale_zero(-0.75, 6.75, &a), Ok((0.5, -6))); // -8 + 1.5 = -6.5 → -6
    }

    #[test]
    fn zero_scale_becomes_epsilon() {
        // calculate_qparams: scales == 0 are replaced by the dtype's eps (f32 here).
        for a in [
            args(4, true, Granularity::Tensor, ScaleRule::HalfRange),
            args(4, true, Granularity::Tensor, ScaleRule::Qmax),
            args(8, false, Granularity::Tensor, ScaleRule::HalfRange),
            QuantArgs {
                granularity: Granularity::Tensor,
                ..FP8
            },
        ] {
            assert_eq!(scale_zero(0.0, 0.0, &a), Ok((f32::EPSILON, 0)), "{a:?}");
            // min > 0 and max < 0 both clamp to 0 as well.
            assert_eq!(scale_zero(0.5, -0.5, &a), Ok((f32::EPSILON, 0)), "{a:?}");
        }
    }

    #[test]
    fn fp8_scale_is_absmax_over_448() {
        // compressed-tensors FP8: s = absmax / ((448 - (-448)) / 2) = absmax / 448.
        assert_eq!(scale_zero(-896.0, 10.0, &FP8), Ok((2.0, 0)));
        assert_eq!(scale_zero(-1.0, 4.48, &FP8), Ok((4.48f32 / 448.0, 0)));
    }

    #[test]
    fn scale_zero_rejects_bad_input() {
        let a = args(4, true, Granularity::Tensor, ScaleRule::HalfRange);
        assert!(matches!(
            scale_zero(f32::NAN, 1.0, &a),
            Err(QuantError::NonFiniteRange { .. })
        ));
        assert!(matches!(
            scale_zero(0.0, f32::INFINITY, &a),
            Err(QuantError::NonFiniteRange { .. })
        ));
        assert_eq!(
            scale_zero(0.0, 1.0, &QuantArgs { bits: 0, ..a }),
            Err(QuantError::BitsOutOfRange { bits: 0 })
        );
        assert_eq!(
            scale_zero(0.0, 1.0, &QuantArgs { bits: 9, ..a }),
            Err(QuantError::BitsOutOfRange { bits: 9 })
        );
        assert_eq!(
            scale_zero(0.0, 1.0, &QuantArgs { bits: 4, ..FP8 }),
            Err(QuantError::FloatBits { bits: 4 })
        );
        assert_eq!(
            scale_zero(
                0.0,
                1.0,
                &QuantArgs {
                    symmetric: false,
                    ..FP8
                }
            ),
            Err(QuantError::AsymmetricFloat)
        );
        assert_eq!(
            scale_zero(
                0.0,
                1.0,
                &QuantArgs {
                    granularity: Granularity::Group(0),
                    ..a
                }
            ),
            Err(QuantError::GroupSizeZero)
        );
        let one_bit_qmax = args(1, true, Granularity::Tensor, ScaleRule::Qmax);
        assert_eq!(
            scale_zero(0.0, 1.0, &one_bit_qmax),
            Err(QuantError::QmaxRuleOneBit)
        );
        // (max - min) overflows f32.
        let asym = args(8, false, Granularity::Tensor, ScaleRule::HalfRange);
        assert!(matches!(
            scale_zero(-f32::MAX, f32::MAX, &asym),
            Err(QuantError::InvalidScale { .. })
        ));
    }

    #[test]
    fn compute_qparams_per_group_with_a_short_last_group() {
        // [2, 5] with group 2 → ceil(5/2) = 3 groups per row, the last one 1 column wide.
        // Symmetric int4 HalfRange: s = absmax / 7.5 per group.
        let w = [
            1.5, -0.75, /**/ 3.0, 0.0, /**/ -7.5, //
            0.0, 0.0, /**/ 0.15, -0.3, /**/ 15.0,
        ];
        let a = args(4, true, Granularity::Group(2), ScaleRule::HalfRange);
        let qp = compute_qparams(&w, 2, 5, &a).unwrap();
        assert_eq!(qp.n_groups_per_row(), 3);
        assert_eq!(
            qp.scales,
            vec![0.2, 0.4, 1.0, f32::EPSILON, 0.3f32 / 7.5, 2.0]
        );
        assert!(qp.zeros.is_empty());
        assert_eq!(qp.scale_for(0, 4), 1.0);
        assert_eq!(qp.scale_for(1, 3), 0.3f32 / 7.5);
        assert_eq!(qp.index_of(1, 4), 5);
        assert_eq!(qp.zero_for(1, 4), 0);
    }

    #[test]
    fn compute_qparams_tensor_and_channel() {
        let w = [1.0, -2.0, 0.5, /**/ 4.0, 3.0, -1.0];
        // Tensor: one scale from the global absmax 4 → 4/127.5 (int8 HalfRange).
        let t = compute_qparams(
            &w,
            2,
            3,
            &args(8, true, Granularity::Tensor, ScaleRule::HalfRange),
        )
        .unwrap();
        assert_eq!(t.scales, vec![4.0 / 127.5]);
        assert_eq!(t.scale_for(1, 2), 4.0 / 127.5);
        assert_eq!(t.n_groups_per_row(), 1);
        // Channel, asymmetric int8: row 0 min -2, max 1 → s = 3/255, zp = round(-128 + 2/s) = round(42.0) = 42;
        // row 1 min -1, max 4 → s = 5/255, zp = round(-128 + 1/s) = round(-77.0) = -77.
        let c = compute_qparams(
            &w,
            2,
            3,
            &args(8, false, Granularity::Channel, ScaleRule::HalfRange),
        )
        .unwrap();
        assert_eq!(c.scales, vec![3.0 / 255.0, 5.0 / 255.0]);
        assert_eq!(c.zeros, vec![42, -77]);
        assert_eq!(c.zero_for(1, 0), -77);
    }

    #[test]
    fn compute_qparams_rejects_bad_input() {
        let a = args(4, true, Granularity::Channel, ScaleRule::HalfRange);
        assert_eq!(
            compute_qparams(&[1.0; 5], 2, 3, &a),
            Err(QuantError::LengthMismatch {
                what: "weights",
                expected: 6,
                actual: 5
            })
        );
        let mut w = [1.0; 20];
        w[13] = f32::INFINITY;
        assert_eq!(
            compute_qparams(&w, 2, 10, &a),
            Err(QuantError::NonFinite {
                index: 13,
                value: f32::INFINITY
            })
        );
        assert_eq!(
            compute_qparams(&[], usize::MAX, 2, &a),
            Err(QuantError::ShapeOverflow {
                rows: usize::MAX,
                cols: 2
            })
        );
    }

    #[test]
    fn compute_qparams_of_empty_shapes() {
        let a = args(4, true, Granularity::Channel, ScaleRule::HalfRange);
        let qp = compute_qparams(&[], 3, 0, &a).unwrap();
        assert_eq!(qp.scales, vec![f32::EPSILON; 3]);
        let g = args(4, true, Granularity::Group(8), ScaleRule::HalfRange);
        assert_eq!(
            compute_qparams(&[], 3, 0, &g).unwrap().scales,
            Vec::<f32>::new()
        );
        assert_eq!(
            compute_qparams(&[], 0, 4, &a).unwrap().scales,
            Vec::<f32>::new()
        );
    }

    #[test]
    fn qparams_validation() {
        use Granularity::*;
        assert!(QParams::new(Group(4), 2, 9, vec![1.0; 6], vec![]).is_ok());
        assert_eq!(
            QParams::new(Group(4), 2, 9, vec![1.0; 4], vec![]),
            Err(QuantError::LengthMismatch {
                what: "scales",
                expected: 6,
                actual: 4
            })
        );
        assert_eq!(
            QParams::new(Channel, 2, 9, vec![1.0; 2], vec![0]),
            Err(QuantError::LengthMismatch {
                what: "zero points",
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            QParams::new(Tensor, 2, 9, vec![0.0], vec![]),
            Err(QuantError::InvalidScale {
                index: 0,
                value: 0.0
            })
        );
        assert_eq!(
            QParams::new(Channel, 2, 9, vec![1.0, -1.0], vec![]),
            Err(QuantError::InvalidScale {
                index: 1,
                value: -1.0
            })
        );
        assert_eq!(
            QParams::new(Group(0), 2, 9, vec![], vec![]),
            Err(QuantError::GroupSizeZero)
        );
        let qp = QParams::new(Channel, 2, 3, vec![1.0, 1.0], vec![0, 8]).unwrap();
        let a = args(4, false, Channel, ScaleRule::HalfRange);
        assert_eq!(
            qp.check_for(&a),
            Err(QuantError::ZeroPointOutOfRange {
                index: 1,
                value: 8,
                qmin: -8,
                qmax: 7
            })
        );
        assert_eq!(
            qp.check_for(&QuantArgs {
                symmetric: true,
                ..a
            }),
            Err(QuantError::LengthMismatch {
                what: "zero points",
                expected: 0,
                actual: 2
            })
        );
    }

    #[test]
    fn scale_rows_moves_each_rows_grid_with_it() {
        // [2, 5] int4 asymmetric, group 2 → 3 groups per row; row 0 × 0.5, row 1 × 4.
        let w = [
            1.5, -0.75, 3.0, 0.0, -7.5, //
            0.0, 0.25, 0.15, -0.3, 15.0,
        ];
        let a = args(4, false, Granularity::Group(2), ScaleRule::HalfRange);
        let qp = compute_qparams(&w, 2, 5, &a).unwrap();
        let mut scaled = qp.clone();
        scaled.scale_rows(&[0.5, 4.0]).unwrap();
        let expected: Vec<f32> = qp
            .scales
            .iter()
            .enumerate()
            .map(|(i, s)| s * if i < 3 { 0.5 } else { 4.0 })
            .collect();
        assert_eq!(scaled.scales, expected);
        assert_eq!(scaled.zeros, qp.zeros);
        // The codes of w are the codes of the row-scaled w under the scaled qparams:
        // (c·w)/(c·s) = w/s, exact here since 0.5 and 4 are powers of two.
        let codes = crate::quantize_int(&w, 2, 5, &qp, &a).unwrap();
        let w_scaled: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, v)| v * if i < 5 { 0.5 } else { 4.0 })
            .collect();
        assert_eq!(
            crate::quantize_int(&w_scaled, 2, 5, &scaled, &a).unwrap(),
            codes
        );
        // Channel qparams: one scale per row.
        let mut c = QParams::new(Granularity::Channel, 2, 3, vec![1.0, 2.0], vec![]).unwrap();
        c.scale_rows(&[3.0, 0.25]).unwrap();
        assert_eq!(c.scales, vec![3.0, 0.5]);
    }

    #[test]
    fn scale_rows_refuses_bad_factors_and_tensor_qparams() {
        let mut qp = QParams::new(Granularity::Group(2), 2, 4, vec![1.0; 4], vec![]).unwrap();
        let before = qp.clone();
        assert_eq!(
            qp.scale_rows(&[1.0]),
            Err(QuantError::LengthMismatch {
                what: "row factors",
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            qp.scale_rows(&[1.0, 0.0]),
            Err(QuantError::InvalidFactor {
                index: 1,
                value: 0.0
            })
        );
        assert!(matches!(
            qp.scale_rows(&[f32::NAN, 1.0]),
            Err(QuantError::InvalidFactor { index: 0, .. })
        ));
        // A product that overflows f32 is refused and nothing is changed.
        let mut big = QParams::new(Granularity::Group(2), 2, 4, vec![f32::MAX; 4], vec![]).unwrap();
        assert!(matches!(
            big.scale_rows(&[1.0, 2.0]),
            Err(QuantError::InvalidScale { index: 2, .. })
        ));
        assert_eq!(big.scales, vec![f32::MAX; 4]);
        assert_eq!(qp, before);
        let mut t = QParams::new(Granularity::Tensor, 2, 4, vec![1.0], vec![]).unwrap();
        assert_eq!(
            t.scale_rows(&[1.0, 1.0]),
            Err(QuantError::GranularityMismatch {
                args: Granularity::Channel,
                qparams: Granularity::Tensor
            })
        );
    }

    #[test]
    fn round_scales_to_storage_dtype() {
        // bf16 keeps 8 significant bits: 0.1 → 205/2048 = 0.10009765625 (0x3DCD);
        // f16 keeps 11: 0.1 → 1638/16384 = 0.0999755859375 (0x2E66).
        let mut qp = QParams::new(
            Granularity::Channel,
            3,
            1,
            vec![0.1, f32::EPSILON, 1e-30],
            vec![],
        )
        .unwrap();
        let mut bf = qp.clone();
        bf.round_scales(ScaleDtype::BF16).unwrap();
        assert_eq!(
            bf.scales,
            vec![
                205.0 / 2048.0,
                f32::EPSILON,
                half::bf16::from_f32(1e-30).to_f32()
            ]
        );
        // f16 flushes 2^-23 to a subnormal (kept) and 1e-30 to 0 → f16 eps 2^-10.
        qp.round_scales(ScaleDtype::F16).unwrap();
        assert_eq!(
            qp.scales,
            vec![1638.0 / 16384.0, 1.0 / 8_388_608.0, 1.0 / 1024.0]
        );
        let mut big = QParams::new(Granularity::Tensor, 1, 1, vec![1e6], vec![]).unwrap();
        assert_eq!(
            big.round_scales(ScaleDtype::F16),
            Err(QuantError::InvalidScale {
                index: 0,
                value: f32::INFINITY
            })
        );
        assert_eq!(big.scales, vec![1e6]);
    }

    #[test]
    fn segments_of_a_column_window() {
        // [2, 10] matrix, group 4 → groups [0..4, 4..8, 8..10]; window columns 3..9 (6 wide).
        let layout = Layout {
            granularity: Granularity::Group(4),
            rows: 2,
            cols: 10,
        };
        let mut segs = vec![];
        layout
            .try_for_each_segment(3, 6, |s| {
                segs.push((s.start, s.end, s.param));
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(
            segs,
            vec![
                (0, 1, 0),
                (1, 5, 1),
                (5, 6, 2),
                (6, 7, 3),
                (7, 11, 4),
                (11, 12, 5)
            ]
        );
    }

    #[test]
    fn min_max_finds_extremes_and_non_finite_values() {
        let xs: Vec<f32> = (0..21).map(|i| (i as f32 - 7.0) * 0.5).collect();
        assert_eq!(min_max(&xs, 0), Ok((-3.5, 6.5)));
        assert_eq!(min_max(&[], 0), Ok((f32::INFINITY, f32::NEG_INFINITY)));
        let mut ys = xs.clone();
        ys[19] = f32::NEG_INFINITY;
        assert_eq!(
            min_max(&ys, 100),
            Err(QuantError::NonFinite {
                index: 119,
                value: f32::NEG_INFINITY
            })
        );
        assert!(matches!(
            check_finite(&[0.0, f32::NAN], 5),
            Err(QuantError::NonFinite { index: 6, .. })
        ));
        assert_eq!(check_finite(&xs, 0), Ok(()));
    }
}
