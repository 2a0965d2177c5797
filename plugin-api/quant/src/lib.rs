//! Quantization primitives shared by gs-host and every algorithm plugin.
//!
//! This crate is the single implementation of rounding, scales and packing: plugins link it
//! statically and must not re-implement any of it, so that every algorithm produces values the
//! checkpoint writers and inference engines agree on. The rules follow compressed-tensors
//! (llm-compressor / vLLM) and msModelSlim (Ascend); see `shared/reference/FORMATS.md`.
//!
//! Conventions:
//! - Matrices are row-major slices with explicit `rows`, `cols`; weights are `[out, in]`.
//! - Integers are signed, `[-2^(b-1), 2^(b-1)-1]` for `b` in `1..=8`, also when asymmetric.
//! - `q = clamp(round_half_even(x/s + zp), qmin, qmax)`, `x̂ = (q − zp)·s`, all in f32
//!   ([`quantize_value`], [`dequantize_value`]).
//! - FP8 is E4M3 (`float8_e4m3fn`), saturating at ±448 ([`f32_to_fp8_e4m3`]).
//! - Scales come from min/max ([`scale_zero`], [`compute_qparams`]); their layout is [`QParams`].
//! - Public functions validate their input and return [`QuantError`] rather than panic.
//! - Everything is single-threaded and deterministic; callers parallelize across layers or row
//!   blocks. (No thread pool here on purpose: plugins are dynamically loaded libraries, and each
//!   would otherwise start a pool of its own.)
//!
//! The usual path is [`fake_quantize`] (qparams + quantize + dequantize in one pass) for
//! calibration, then [`quantize_int`] / [`quantize_fp8`] and the packers in [`pack`] for export:
//!
//! ```
//! use gs_quant::*;
//!
//! // W4A16, group 128, compressed-tensors' symmetric scale (absmax / 7.5).
//! let args = QuantArgs {
//!     bits: 4,
//!     ty: QuantType::Int,
//!     symmetric: true,
//!     granularity: Granularity::Group(128),
//!     scale_rule: ScaleRule::HalfRange,
//! };
//! let (rows, cols) = (2, 256); // weight [out, in]
//! let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
//!
//! let (w_hat, qp) = fake_quantize(&w, rows, cols, &args)?; // what the model will compute with
//! assert_eq!(qp.scales.len(), rows * 2); // weight_scale [out, in / 128]
//!
//! let q = quantize_int(&w, rows, cols, &qp, &args)?; // integers in [-8, 7]
//! assert_eq!(dequantize_int(&q, &qp)?, w_hat);
//!
//! let packed = pack_int32_rows(&q, rows, cols, 4)?; // weight_packed [out, in / 8]
//! assert_eq!(packed.len(), rows * cols / 8);
//! assert_eq!(unpack_int32_rows(&packed, rows, cols, 4)?, q);
//! # Ok::<(), QuantError>(())
//! ```

pub mod error;
pub mod fake;
pub mod fp8;
pub mod int;
pub mod pack;
pub mod qparams;
pub mod scheme;
pub mod search;

pub use error::QuantError;
pub use fake::{
    fake_quantize, fake_quantize_cols, fake_quantize_into, fake_quantize_per_token,
    fake_quantize_with,
};
pub use fp8::{
    dequantize_fp8, f32_to_fp8_e4m3, fp8_e4m3_to_f32, quantize_fp8, round_to_fp8_e4m3, FP8_E4M3_MAX,
};
pub use int::{dequantize_int, dequantize_value, quantize_int, quantize_value};
pub use pack::{
    pack_int32_cols, pack_int32_rows, pack_int4_pairs, packed_int32_len, unpack_int32_cols,
    unpack_int32_rows, unpack_int4_pairs, PairAxis,
};
pub use qparams::{compute_qparams, scale_zero, QParams, ScaleDtype, ZERO_SCALE};
pub use scheme::*;
pub use search::{fake_value, search_scale_zero};
