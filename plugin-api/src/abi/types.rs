//! Value types of the ABI. All `#[repr(C)]`; frozen within a major version.

use std::ffi::c_void;
use std::fmt;

use abi_stable::{
    std_types::{RSlice, RStr, RString},
    StableAbi,
};

/// What kind of failure a [`PluginError`] reports. An open set: unknown codes read as `OTHER`.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ErrorKind(pub u32);

impl ErrorKind {
    pub const OTHER: Self = Self(0);
    /// The algorithm's parameter table is wrong.
    pub const INVALID_PARAMS: Self = Self(1);
    /// The algorithm cannot handle this subset or scheme.
    pub const UNSUPPORTED: Self = Self(2);
    /// A host service is not available in this host (older host, or data-free run).
    pub const NOT_AVAILABLE: Self = Self(3);
    /// The host refused a call (wrong shape, non-finite value, bad index).
    pub const HOST_REJECTED: Self = Self(4);
    /// The plugin panicked; the SDK caught it at the boundary.
    pub const PANIC: Self = Self(5);
    /// A numerical failure inside the algorithm (e.g. Cholesky failed for good).
    pub const NUMERIC: Self = Self(6);

    pub fn name(self) -> &'static str {
        match self {
            Self::INVALID_PARAMS => "invalid parameters",
            Self::UNSUPPORTED => "unsupported",
            Self::NOT_AVAILABLE => "not available",
            Self::HOST_REJECTED => "rejected by host",
            Self::PANIC => "panic",
            Self::NUMERIC => "numerical failure",
            _ => "error",
        }
    }
}

/// An error crossing the boundary in either direction.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: RString::from(message.into()),
        }
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_PARAMS, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNSUPPORTED, message)
    }
    pub fn not_available(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NOT_AVAILABLE, message)
    }
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::HOST_REJECTED, message)
    }
    pub fn numeric(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NUMERIC, message)
    }
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OTHER, message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.message)
    }
}

impl std::error::Error for PluginError {}

/// Statistics of a subset input that an algorithm asks for (a bit set).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct StatsRequest(pub u32);

impl StatsRequest {
    pub const NONE: Self = Self(0);
    pub const ABSMAX: Self = Self(1 << StatKind::ABSMAX.0);
    pub const MIN: Self = Self(1 << StatKind::MIN.0);
    pub const MAX: Self = Self(1 << StatKind::MAX.0);
    pub const MEAN_ABS: Self = Self(1 << StatKind::MEAN_ABS.0);
    pub const HESSIAN: Self = Self(1 << StatKind::HESSIAN.0);

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    pub const fn contains(self, kind: StatKind) -> bool {
        self.0 & (1 << kind.0) != 0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The kinds in this set, in ascending code order (unknown bits included).
    pub fn kinds(self) -> impl Iterator<Item = StatKind> {
        (0..32)
            .filter(move |b| self.0 & (1 << b) != 0)
            .map(StatKind)
    }
}

impl std::ops::BitOr for StatsRequest {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// One statistic of a subset input `X` (`[tokens, in_features]`, all calibration tokens).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct StatKind(pub u32);

impl StatKind {
    /// `max_t |X[t, j]|`, shape `[in_features]`.
    pub const ABSMAX: Self = Self(0);
    /// `min_t X[t, j]`, shape `[in_features]`.
    pub const MIN: Self = Self(1);
    /// `max_t X[t, j]`, shape `[in_features]`.
    pub const MAX: Self = Self(2);
    /// `mean_t |X[t, j]|`, shape `[in_features]`.
    pub const MEAN_ABS: Self = Self(3);
    /// `XᵀX` summed over all tokens (not averaged), row-major `[in_features, in_features]`.
    pub const HESSIAN: Self = Self(4);

    pub fn name(self) -> &'static str {
        match self {
            Self::ABSMAX => "absmax",
            Self::MIN => "min",
            Self::MAX => "max",
            Self::MEAN_ABS => "mean_abs",
            Self::HESSIAN => "hessian",
            _ => "unknown",
        }
    }
}

/// Severity of a plugin log line (mapped onto the host's `tracing` levels).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct LogLevel(pub u8);

impl LogLevel {
    pub const ERROR: Self = Self(1);
    pub const WARN: Self = Self(2);
    pub const INFO: Self = Self(3);
    pub const DEBUG: Self = Self(4);
    pub const TRACE: Self = Self(5);
}

/// What produces the subset's input, i.e. where input-channel scales can be folded.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct PrevOpKind(pub u8);

impl PrevOpKind {
    /// Nothing foldable (e.g. the input is the attention output with no linear map between).
    pub const NONE: Self = Self(0);
    /// An RMSNorm/LayerNorm weight, shape `[in_features]`: `x = norm(h) ⊙ γ`.
    pub const NORM: Self = Self(1);
    /// A linear layer whose output rows feed the subset: weight `[in_features, prev_in]`.
    pub const LINEAR: Self = Self(2);
}

/// The erased pair a plugin receives for one subset: the host services table and the host's
/// per-subset context. Plugins use it only through [`crate::Subset`].
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct SubsetHandle {
    /// `*const WithMetadata_<HostServices_Prefix, _>` of the host's version of the table.
    pub services: *const c_void,
    /// Opaque host context, passed back as the first argument of every service.
    pub ctx: *const c_void,
}

/// Quantization arguments of one tensor kind; mirrors `gs_quant::QuantArgs`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct AbiQuantArgs {
    /// 0 = absent (no quantization of this tensor kind).
    pub bits: u8,
    /// 0 = int, 1 = float (FP8 E4M3).
    pub ty: u8,
    /// 1 = symmetric.
    pub symmetric: u8,
    /// 0 = tensor, 1 = channel (per output row / per token), 2 = group.
    pub granularity: u8,
    /// Group size along the input dimension when `granularity == 2`.
    pub group_size: u32,
    /// 0 = half_range (`absmax/((qmax-qmin)/2)`), 1 = qmax (`absmax/qmax`).
    pub scale_rule: u8,
    /// Activations only: 1 = dynamic (computed at run time), 0 = static (calibrated).
    pub dynamic: u8,
    pub _reserved: [u8; 2],
}

/// The resolved scheme of one layer; mirrors `gs_quant::Scheme`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub struct AbiScheme {
    pub weights: AbiQuantArgs,
    pub activations: AbiQuantArgs,
    pub kv_cache: AbiQuantArgs,
}

/// Shape and scheme of one linear layer of a subset.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct LayerInfo {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: RString,
    pub out_features: u64,
    pub in_features: u64,
    pub has_bias: bool,
    pub scheme: AbiScheme,
}

/// Description of the subset as a whole.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct SubsetInfo {
    /// Decoder block index.
    pub block: u32,
    /// Subset name from the architecture file, e.g. `qkv`, `gate_up`, `o`, `down`.
    pub name: RString,
    pub n_layers: u32,
    pub prev_op: PrevOpKind,
    /// Module name of the prev_op, e.g. `model.layers.0.input_layernorm` (empty for NONE).
    pub prev_op_name: RString,
    /// Module name of the inspected module, e.g. `model.layers.0.self_attn`.
    pub inspect_name: RString,
}

/// Quantization parameters a plugin chose for a layer (see `gs_quant::QParams` for the layout).
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiQParams<'a> {
    /// 0 = tensor, 1 = channel, 2 = group.
    pub granularity: u8,
    pub group_size: u32,
    /// tensor: `[1]`; channel: `[out]`; group: `[out, ceil(in / group_size)]`.
    pub scales: RSlice<'a, f32>,
    /// Same shape as `scales`; empty for symmetric or float schemes.
    pub zeros: RSlice<'a, i32>,
}

/// A candidate weight for one layer, for the module-forward service.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct WeightOverride<'a> {
    /// Index of the layer within the subset.
    pub layer: u32,
    /// Row-major `[out_features, in_features]`.
    pub weight: RSlice<'a, f32>,
}

/// Borrowed string helper for logging.
pub type LogText<'a> = RStr<'a>;
