//! The compressed-tensors format: what llm-compressor writes and vLLM, SGLang and transformers
//! load (`quantization_config.quant_method = "compressed-tensors"`, version 0.20.0).
//!
//! One storage layout ("format") per quantized linear `X`, chosen by the rule of
//! compressed-tensors' `infer_module_format` (`compressors/format.py`):
//!
//! | scheme | format | tensors of `X` |
//! |---|---|---|
//! | int weights, int activations | `int-quantized` | `X.weight` I8, `X.weight_scale`, static acts: `X.input_scale` (+ `X.input_zero_point` I8 if asymmetric) |
//! | int weights, no activation quantization | `pack-quantized` | `X.weight_packed` I32, `X.weight_scale`, `X.weight_shape` I64 `[2]`, asymmetric: `X.weight_zero_point` I32 packed along dim 0 |
//! | FP8 weights and activations | `float-quantized` | `X.weight` F8_E4M3, `X.weight_scale`, static acts: `X.input_scale` |
//! | FP8 weights only | `naive-quantized` | `X.weight` F8_E4M3, `X.weight_scale` |
//!
//! Scales are stored in the model dtype (the dtype of `X.weight` in the source; compressed-tensors
//! `initialize_qparams` falls back to F16 for any non-float dtype) with shape `[1]` (tensor),
//! `[out, 1]` (channel) or `[out, in/gs]` (group). Which schemes vLLM can load is decided in
//! [`check_scheme`], before any work.
//!
//! - [`writer`]: [`CompressedTensorsExport`], the [`Exporter`](super::Exporter);
//! - [`reader`]: [`CompressedTensorsCheckpoint`], the decoder (also the writer's verification);
//! - [`config`]: `quantization_config` in both directions, and config.json as Python's
//!   `json.dump(indent=2, sort_keys=True)` writes it.

mod config;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

use gs_quant::{Granularity, QuantArgs, QuantType, ScaleDtype, ScaleRule, Scheme};

use super::NumberRules;
use crate::model::{f32_to_dtype_bytes, DType};

pub use reader::{detect, CompressedTensorsCheckpoint};
pub use writer::CompressedTensorsExport;

/// compressed-tensors stores weight scales and static input scales in the model dtype, and its
/// decompressor computes `(q − zp)·s` in the scale's dtype (`forward.py` `_dequantize`:
/// `x_q.to(scale.dtype)`, then the product): torch multiplies two bf16/f16 tensors in f32 and
/// rounds once, which is what `dequant_dtype` = the scale dtype reproduces.
pub const RULES: NumberRules = NumberRules {
    scale_dtype: super::model_scale_dtype,
    dequant_dtype: |d| Some(super::model_scale_dtype(d)),
};

/// compressed-tensors' name of a layer's storage layout (`CompressionFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum CtFormat {
    /// `pack-quantized`
    Pack,
    /// `int-quantized`
    Int,
    /// `float-quantized`
    Float,
    /// `naive-quantized`
    Naive,
}

impl CtFormat {
    pub(crate) fn name(self) -> &'static str {
        match self {
            CtFormat::Pack => "pack-quantized",
            CtFormat::Int => "int-quantized",
            CtFormat::Float => "float-quantized",
            CtFormat::Naive => "naive-quantized",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<CtFormat> {
        [
            CtFormat::Pack,
            CtFormat::Int,
            CtFormat::Float,
            CtFormat::Naive,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }

    /// The format compressed-tensors infers for weights `w` with input activations `a`: the
    /// first match of `COMPRESSION_FORMAT_PRIORITY` (int-quantized, pack-quantized,
    /// float-quantized, naive-quantized).
    pub(crate) fn infer(w: &QuantArgs, input: Option<&gs_quant::ActArgs>) -> CtFormat {
        match (w.ty, input) {
            (QuantType::Int, Some(_)) => CtFormat::Int,
            (QuantType::Int, None) => CtFormat::Pack,
            (QuantType::Float, Some(_)) => CtFormat::Float,
            (QuantType::Float, None) => CtFormat::Naive,
        }
    }
}

/// Whether compressed-tensors can store `scheme` for `layer` in a form vLLM loads.
///
/// The rules are those of vLLM's `CompressedTensorsConfig._get_scheme_from_parts`
/// (`compressed_tensors.py`) and the schemes it dispatches to:
/// - weight-only int (`CompressedTensorsWNA16`): per-channel or per-group scales; symmetric
///   2–8 bits (`WNA16_SUPPORTED_TYPES_MAP`), asymmetric 4 or 8 bits (`WNA16_ZP_SUPPORTED_TYPES_MAP`);
/// - int8 weights with int8 activations (`CompressedTensorsW8A8Int8`): symmetric per-tensor or
///   per-channel weights; activations static per-tensor or dynamic per-token (either symmetry);
/// - not W4A8 int: `CompressedTensorsW4A8Int` reads an int8 `weight_packed`, which no
///   compressed-tensors compressor writes (int-quantized stores `weight`), so it is refused;
/// - FP8 weights (`CompressedTensorsW8A8Fp8` / `W8A16Fp8`): per-tensor or per-channel scales;
///   no activation quantization, dynamic FP8 activations, or static per-tensor FP8 activations.
///
/// A dynamic activation scale is computed at run time by the engine, and the checkpoint cannot
/// say which rule the evaluation used: the decoder assumes compressed-tensors'
/// `calculate_qparams` (`absmax / 127.5` for int8), so a symmetric int `Qmax` rule is refused.
/// KV-cache quantization is not exported yet. A skipped layer is always fine.
pub fn check_scheme(layer: &str, scheme: &Scheme) -> Result<(), String> {
    let Some(w) = scheme.weights else {
        return Ok(());
    };
    let refuse = |what: String, instead: &str| {
        Err(format!(
            "layer {layer}: compressed-tensors cannot store {what} in a form vLLM loads; {instead}"
        ))
    };
    if scheme.kv_cache.is_some() {
        return refuse(
            "a KV-cache scheme (gs-host does not export k/v scales yet)".into(),
            "remove the kv_cache setting, or export with --format fake",
        );
    }
    if let Err(e) = w.validate() {
        return Err(format!("layer {layer}: invalid weight scheme: {e}"));
    }
    let gran = |g: Granularity| match g {
        Granularity::Tensor => "per-tensor".to_string(),
        Granularity::Channel => "per-channel".to_string(),
        Granularity::Group(g) => format!("per-group (group size {g})"),
    };
    let Some(act) = scheme.activations else {
        return match w.ty {
            QuantType::Int => {
                if w.granularity == Granularity::Tensor {
                    return refuse(
                        "weight-only int weights with one per-tensor scale (pack-quantized needs per-channel or per-group scales)".into(),
                        "use per-channel or per-group weight scales",
                    );
                }
                if w.symmetric && !(2..=8).contains(&w.bits) {
                    return refuse(
                        format!("symmetric {}-bit weight-only weights (vLLM's WNA16 kernels take 2 to 8 bits)", w.bits),
                        "use 2 to 8 bits",
                    );
                }
                if !w.symmetric && !matches!(w.bits, 4 | 8) {
                    return refuse(
                        format!("asymmetric {}-bit weights (vLLM supports zero points only for 4 and 8 bits)", w.bits),
                        "use 4 or 8 bits, or symmetric weights",
                    );
                }
                Ok(())
            }
            QuantType::Float => {
                if matches!(w.granularity, Granularity::Group(_)) {
                    return refuse(
                        "per-group FP8 weight scales".into(),
                        "use per-tensor or per-channel FP8 weight scales",
                    );
                }
                Ok(())
            }
        };
    };
    let a = act.args;
    if let Err(e) = a.validate() {
        return Err(format!("layer {layer}: invalid activation scheme: {e}"));
    }
    if a.ty != w.ty {
        let (wt, at) = match w.ty {
            QuantType::Int => ("int", "FP8"),
            QuantType::Float => ("FP8", "int"),
        };
        return refuse(
            format!("{wt} weights with {at} activations (no vLLM scheme takes the pair)"),
            "quantize weights and activations to the same type (int8 W8A8 or FP8)",
        );
    }
    let act_ok = matches!(
        (act.dynamic, a.granularity, a.ty),
        (false, Granularity::Tensor, _)
            | (true, Granularity::Channel, _)
            | (true, Granularity::Tensor, QuantType::Float)
    );
    if !act_ok {
        let kind = if act.dynamic { "dynamic" } else { "static" };
        let allowed = match a.ty {
            QuantType::Int => "static per-tensor or dynamic per-token int8 activations",
            QuantType::Float => {
                "static per-tensor, dynamic per-tensor or dynamic per-token FP8 activations"
            }
        };
        return refuse(
            format!("{kind} {} activation quantization", gran(a.granularity)),
            &format!("use {allowed}"),
        );
    }
    match w.ty {
        QuantType::Int => {
            if a.bits != 8 {
                return refuse(
                    format!("{}-bit int activations", a.bits),
                    "quantize activations to 8 bits",
                );
            }
            if !w.symmetric {
                return refuse(
                    "asymmetric int weights with int8 activations (vLLM's W8A8 int kernels need symmetric weights; activations may be asymmetric)".into(),
                    "make the weights symmetric",
                );
            }
            if w.bits != 8 {
                // vLLM's W4A8 int scheme reads an int8 `weight_packed`, which no
                // compressed-tensors compressor writes (int-quantized stores `weight`).
                return refuse(
                    format!("{}-bit int weights with int8 activations (vLLM's W8A8 int path takes 8-bit weights)", w.bits),
                    "use 8-bit weights, or drop activation quantization",
                );
            }
            if matches!(w.granularity, Granularity::Group(_)) {
                return refuse(
                    "per-group int8 weights with int8 activations".into(),
                    "use per-tensor or per-channel weight scales",
                );
            }
            if act.dynamic && a.symmetric && a.scale_rule == ScaleRule::Qmax {
                return refuse(
                    "dynamic activations with the absmax/qmax scale rule (the checkpoint has no field for the rule; compressed-tensors derives dynamic scales as absmax/127.5)".into(),
                    "use scale rule half_range for dynamic activations",
                );
            }
            Ok(())
        }
        QuantType::Float => {
            if matches!(w.granularity, Granularity::Group(_)) {
                return refuse(
                    "per-group FP8 weight scales".into(),
                    "use per-tensor or per-channel FP8 weight scales",
                );
            }
            Ok(())
        }
    }
}

/// dtype compressed-tensors stores scales in for a layer whose weight is `weight_dtype`
/// (`initialize_qparams`: the observed dtype if it is f16/bf16/f32/f64, else f16). Its values
/// are those of [`RULES`]' `scale_dtype` (an F64 model keeps f32-rounded scales, widened).
pub(crate) fn scale_storage_dtype(weight_dtype: DType) -> DType {
    match weight_dtype {
        DType::BF16 | DType::F16 | DType::F32 | DType::F64 => weight_dtype,
        _ => DType::F16,
    }
}

/// The [`ScaleDtype`] `(q − zp)·s` is rounded to when the scale is stored as `dtype`
/// (`None`: f64, computed in f32 here and not rounded).
pub(crate) fn dequant_rounding(dtype: DType) -> Option<ScaleDtype> {
    match dtype {
        DType::BF16 => Some(ScaleDtype::BF16),
        DType::F16 => Some(ScaleDtype::F16),
        DType::F32 => Some(ScaleDtype::F32),
        _ => None,
    }
}

/// `values` as little-endian BF16/F16/F32/F64 bytes (`None` for any other dtype).
pub(crate) fn encode_floats(values: &[f32], dtype: DType) -> Option<Vec<u8>> {
    if dtype == DType::F64 {
        return Some(
            values
                .iter()
                .flat_map(|&v| f64::from(v).to_le_bytes())
                .collect(),
        );
    }
    f32_to_dtype_bytes(values, dtype).ok()
}

/// Little-endian BF16/F16/F32/F64 bytes as f32 (`None` for any other dtype or a bad length).
pub(crate) fn decode_floats(bytes: &[u8], dtype: DType) -> Option<Vec<f32>> {
    if dtype == DType::F64 {
        if bytes.len() % 8 != 0 {
            return None;
        }
        return Some(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
        );
    }
    crate::model::dtype_bytes_to_f32(bytes, dtype).ok()
}
