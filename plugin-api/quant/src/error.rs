//! The one error type of this crate.
//!
//! Every public function validates its input and reports a [`QuantError`] instead of panicking.

use crate::pack::PairAxis;
use crate::scheme::{Granularity, QuantType};

/// Why a quantization primitive refused its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// `bits` outside `1..=8` (every quantized value must fit an `i8`).
    #[error("bits must be in 1..=8, got {bits}")]
    BitsOutOfRange { bits: u8 },

    /// Float quantization is FP8 E4M3 only.
    #[error("float quantization is FP8 E4M3 and needs bits = 8, got {bits}")]
    FloatBits { bits: u8 },

    /// FP8 has no zero point.
    #[error("float (FP8) quantization must be symmetric")]
    AsymmetricFloat,

    /// Symmetric 1-bit `ScaleRule::Qmax` would divide by `qmax = 0`.
    #[error("ScaleRule::Qmax needs qmax > 0; symmetric 1-bit quantization must use HalfRange")]
    QmaxRuleOneBit,

    /// The function handles one number type and was given the other.
    #[error("expected a {expected:?} scheme, got {actual:?}")]
    TypeMismatch {
        expected: QuantType,
        actual: QuantType,
    },

    /// `Granularity::Group(0)`.
    #[error("group size must be at least 1, got 0")]
    GroupSizeZero,

    /// `rows * cols` does not fit in `usize`.
    #[error("shape [{rows}, {cols}] has more elements than fit in usize")]
    ShapeOverflow { rows: usize, cols: usize },

    /// A buffer has the wrong number of elements for the shape given with it.
    #[error("{what}: expected length {expected}, got {actual}")]
    LengthMismatch {
        /// Which buffer, e.g. `"weights"`, `"scales"`, `"zero points"`, `"packed words"`.
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// An input value is NaN or infinite (`index` into the row-major input).
    #[error("non-finite input value {value} at index {index}")]
    NonFinite { index: usize, value: f32 },

    /// `min`/`max` handed to [`scale_zero`](crate::scale_zero) are not finite.
    #[error("min and max must be finite, got min = {min}, max = {max}")]
    NonFiniteRange { min: f32, max: f32 },

    /// A scale is zero, negative, NaN or infinite (`index` into `QParams::scales`).
    #[error("scale {value} at index {index} is not a positive finite number")]
    InvalidScale { index: usize, value: f32 },

    /// A multiplier of [`QParams::scale_rows`](crate::QParams::scale_rows) is zero, negative, NaN
    /// or infinite (`index` = its row).
    #[error("row factor {value} at index {index} is not a positive finite number")]
    InvalidFactor { index: usize, value: f32 },

    /// A zero point lies outside the integer range (`index` into `QParams::zeros`).
    #[error("zero point {value} at index {index} is outside [{qmin}, {qmax}]")]
    ZeroPointOutOfRange {
        index: usize,
        value: i32,
        qmin: i32,
        qmax: i32,
    },

    /// A value to pack lies outside the signed `bits`-bit range.
    #[error("value {value} at index {index} is outside the {bits}-bit range [{qmin}, {qmax}]")]
    ValueOutOfRange {
        index: usize,
        value: i32,
        bits: u8,
        qmin: i32,
        qmax: i32,
    },

    /// The quantization args and the qparams disagree on the granularity.
    #[error("granularity mismatch: args say {args:?}, qparams were made for {qparams:?}")]
    GranularityMismatch {
        args: Granularity,
        qparams: Granularity,
    },

    /// The tensor's shape differs from the `[rows, cols]` the qparams describe.
    #[error("qparams describe a {expected:?} matrix, got {actual:?}")]
    ShapeMismatch {
        expected: [usize; 2],
        actual: [usize; 2],
    },

    /// A column window has a row count other than the one the qparams describe.
    #[error("qparams describe {expected} rows, got {actual}")]
    RowsMismatch { expected: usize, actual: usize },

    /// A column window reaches past the columns the qparams describe.
    #[error("columns {start}..{end} are outside the {cols} columns the qparams describe")]
    ColumnRange {
        start: usize,
        end: usize,
        cols: usize,
    },

    /// Ascend int4 pairs need an even length along the packed axis.
    #[error("int4 pair packing along {axis:?} needs an even length, got {len}")]
    OddPairAxis { axis: PairAxis, len: usize },

    /// A range search may shrink the range by a fraction in `[0, 1)` only.
    #[error("max_shrink must be in [0, 1), got {value}")]
    MaxShrinkOutOfRange { value: f32 },
}
