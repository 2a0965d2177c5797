//! What a quantization scheme says, independent of any file format or ABI.
//!
//! The manifest resolves one [`Scheme`] per linear layer; plugins receive it through the ABI
//! (as `gs_plugin_api::abi::AbiScheme`) and hand its [`QuantArgs`] to the primitives in this crate.

use crate::error::QuantError;

/// Number representation of quantized values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// Signed integers in `[-2^(b-1), 2^(b-1)-1]`, also for asymmetric schemes (zero point in that range),
    /// as compressed-tensors and msModelSlim both define it.
    Int,
    /// FP8 E4M3 (`float8_e4m3fn`, finite range ±448); only `bits = 8`.
    Float,
}

/// Which values share one scale (and zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output row (weights) or per token (activations).
    Channel,
    /// One scale per `group_size` consecutive input columns of each row, `ceil(cols / group_size)`
    /// groups per row; the last group of a row is short when `group_size` does not divide `cols`.
    ///
    /// compressed-tensors' forward pass rejects such a short group unless `cols < group_size`, so an
    /// exporter should check divisibility itself; this crate quantizes the short group like any other.
    Group(u32),
}

/// How a symmetric scale is derived from the absolute maximum.
///
/// Both conventions are in use and give different checkpoints, so the choice is explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleRule {
    /// `s = absmax / ((qmax - qmin) / 2)`: /7.5 for int4, /127.5 for int8 — compressed-tensors'
    /// `calculate_qparams` (`+absmax` rounds to `qmax + 1` and is clamped).
    HalfRange,
    /// `s = absmax / qmax`: /7 for int4, /127 for int8 — GPTQ's and msModelSlim's classic rule.
    Qmax,
}

/// Quantization of one tensor kind (weights or activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantArgs {
    /// Bits per value, 1..=8.
    pub bits: u8,
    /// Integer or FP8.
    pub ty: QuantType,
    /// `true`: zero point fixed at 0. `false`: a zero point per scale.
    pub symmetric: bool,
    /// Which values share one scale (and zero point).
    pub granularity: Granularity,
    /// Symmetric scale convention; ignored for asymmetric schemes (always `(max-min)/(qmax-qmin)`).
    pub scale_rule: ScaleRule,
}

/// How activations (the input of a linear layer) are quantized at inference time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActArgs {
    /// Bits, type, symmetry, granularity and scale rule of the activations.
    pub args: QuantArgs,
    /// `true`: scales computed at run time (per token or per tensor); `false`: a calibrated static scale.
    pub dynamic: bool,
}

/// The full scheme of one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scheme {
    /// `None`: the layer is skipped (left in float).
    pub weights: Option<QuantArgs>,
    /// `None`: activations stay in float (weight-only schemes such as W4A16).
    pub activations: Option<ActArgs>,
    /// KV-cache quantization of the attention this layer belongs to, if any.
    pub kv_cache: Option<QuantArgs>,
}

impl QuantArgs {
    /// Integer range `(qmin, qmax)` of a `bits`-bit signed value.
    ///
    /// # Panics
    /// As [`int_range`]; call [`QuantArgs::validate`] first for untrusted args.
    pub fn int_range(&self) -> (i32, i32) {
        int_range(self.bits)
    }

    /// Checks what every primitive of this crate requires of its args:
    /// `Int` has `bits` in `1..=8` (and symmetric 1-bit uses `HalfRange`, since `qmax = 0`);
    /// `Float` has `bits == 8` and is symmetric; a group size is not 0.
    pub fn validate(&self) -> Result<(), QuantError> {
        match self.ty {
            QuantType::Int if !(1..=8).contains(&self.bits) => {
                return Err(QuantError::BitsOutOfRange { bits: self.bits })
            }
            QuantType::Float if self.bits != 8 => {
                return Err(QuantError::FloatBits { bits: self.bits })
            }
            QuantType::Float if !self.symmetric => return Err(QuantError::AsymmetricFloat),
            QuantType::Int
                if self.symmetric && self.bits == 1 && self.scale_rule == ScaleRule::Qmax =>
            {
                return Err(QuantError::QmaxRuleOneBit)
            }
            _ => {}
        }
        if self.granularity == Granularity::Group(0) {
            return Err(QuantError::GroupSizeZero);
        }
        Ok(())
    }
}

/// Signed range of a `bits`-bit integer: `[-2^(b-1), 2^(b-1) - 1]`.
///
/// # Panics
/// If `bits` is 0 or greater than 32 (the shift overflows).
pub fn int_range(bits: u8) -> (i32, i32) {
    let half = 1i32 << (bits - 1);
    (-half, half - 1)
}

impl Scheme {
    /// A layer is quantized at all when its weights are.
    pub fn is_skip(&self) -> bool {
        self.weights.is_none()
    }
}
