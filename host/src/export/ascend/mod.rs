//! The `ascend` export: msModelSlim's AscendV1 layout, as vLLM-Ascend (`--quantization ascend`)
//! and MindIE load it (`shared/reference/FORMATS.md`, Part B).
//!
//! An output directory holds
//! - `quant_model_weights-0000k-of-0000N.safetensors` and `quant_model_weights.safetensors.index.json`
//!   (shards without `__metadata__`, as msModelSlim's `BufferedSafetensorsWriter` writes them);
//! - `quant_model_description.json`: one `"<tensor>": "<TYPE>"` entry per tensor, then the global
//!   keys `version`, `model_quant_type`, `metadata`, `group_size`, `optional`;
//! - the source's config.json without `quantization_config`, and its other files.
//!
//! Per quantized linear `X` (`[out, in]` weight):
//!
//! | type | tensors (in this order) |
//! |---|---|
//! | `W8A8` | `weight` I8, `quant_bias` I32 `[out]`, `input_scale` F32 `[1]`, `input_offset` F32 `[1]`, `deq_scale` `[out]` (F32 for a bf16 model, else I64 holding the f32 bits), `weight_scale` F32 `[out,1]`, `weight_offset` F32 zeros `[out,1]`, `bias` F32 |
//! | `W8A8_DYNAMIC` | `weight` I8, `weight_scale` F32 `[out,1]`, `weight_offset` F32 zeros, `bias` F32 |
//! | `W8A16` | `weight` I8, `weight_scale` F32 `[out,1]` or `[out,in/gs]`, `weight_offset` F32 zeros, `bias` F32 |
//!
//! `W8A8` also carries `weight_scale`/`weight_offset` (msModelSlim V1 writes them for `W8A8_MIX`,
//! V0 for `W8A8`; vLLM-Ascend allocates both), so the decoder reads the exact weight scales
//! instead of recovering them from `deq_scale / input_scale`. Every other tensor is `FLOAT`.
//!
//! Engine caveats (vLLM-Ascend main @182b75e, `quantization/methods/*.py`), not modelled by
//! [`RULES`]: `weight_scale`/`weight_offset` (W8A8_DYNAMIC, W8A16) and `input_scale` (W8A8)
//! are loaded into parameters of the serving dtype, so a bf16 server computes with bf16-rounded
//! copies of the F32 values (W8A8's matmul uses the F32 `deq_scale`); its W8A16 linear loads
//! per-channel scales only.

mod reader;
mod writer;

#[cfg(test)]
mod tests;

use gs_quant::{Granularity, QuantArgs, QuantType, ScaleDtype, ScaleRule, Scheme};

use super::{NumberRules, ShardNaming};

pub use reader::{detect, AscendCheckpoint};
pub use writer::AscendExport;

/// The description file; vLLM-Ascend reads only this name (`modelslim_config.py`).
pub const DESCRIPTION_FILE: &str = "quant_model_description.json";

/// msModelSlim V1's weight files (`ascendv1.py`: `ASCENDV1_SAFETENSORS_NAME`, one part is
/// still `-00001-of-00001`), without `__metadata__` (`safetensors.torch.save_file(t)`).
pub const NAMING: ShardNaming = ShardNaming {
    stem: "quant_model_weights",
    index: "quant_model_weights.safetensors.index.json",
    metadata: None,
};

/// Ascend stores weight scales and static input scales as F32, and its decoder computes
/// `(q − o)·s` in f32.
pub const RULES: NumberRules = NumberRules {
    scale_dtype: |_| ScaleDtype::F32,
    dequant_dtype: |_| None,
};

/// The description types gs-host writes and reads, lowest priority first: msModelSlim V1's
/// `QUANT_TYPE_PRIORITY` is `FLOAT < W16A16S < W8A16 < W8A8_DYNAMIC < W8A8_MIX < W8A8 < …`,
/// and `model_quant_type` is the highest one present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum AscendType {
    Float,
    W8A16,
    W8A8Dynamic,
    W8A8,
}

impl AscendType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            AscendType::Float => "FLOAT",
            AscendType::W8A16 => "W8A16",
            AscendType::W8A8Dynamic => "W8A8_DYNAMIC",
            AscendType::W8A8 => "W8A8",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<AscendType> {
        [
            AscendType::Float,
            AscendType::W8A16,
            AscendType::W8A8Dynamic,
            AscendType::W8A8,
        ]
        .into_iter()
        .find(|t| t.name() == name)
    }

    /// The type of a scheme [`check_scheme`] accepts.
    pub(crate) fn of_scheme(scheme: &Scheme) -> AscendType {
        match (scheme.weights, scheme.activations) {
            (None, _) => AscendType::Float,
            (Some(_), None) => AscendType::W8A16,
            (Some(_), Some(a)) if a.dynamic => AscendType::W8A8Dynamic,
            (Some(_), Some(_)) => AscendType::W8A8,
        }
    }
}

fn int8(symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits: 8,
        ty: QuantType::Int,
        symmetric,
        granularity,
        scale_rule: ScaleRule::Qmax,
    }
}

/// The input quantizer args of a decoded `W8A8` layer.
///
/// The format stores `input_scale` and `input_offset` and the device computes
/// `clamp(round(x/s + o), −128, 127)` whatever the calibration's symmetry was, and the
/// description has no place for that flag: static inputs are decoded as asymmetric always.
/// That gives the same numbers as symmetric args with the same scale when `o = 0`:
/// [`crate::model::fakequant::ActQuant::apply`] then passes `zeros = [0]` to
/// `gs_quant::fake_quantize_with`, which rounds `x/s + 0` into the same `[−128, 127]` range
/// (`int_range(8)` does not depend on symmetry) as symmetric qparams (`zeros = []`, zero 0).
/// The scale rule is irrelevant for a static quantizer (its scale is given); Qmax is
/// msModelSlim's.
pub(crate) fn static_input_args() -> QuantArgs {
    int8(false, Granularity::Tensor)
}

/// The input quantizer args of `W8A8_DYNAMIC`: `npu_dynamic_quant`, symmetric int8 per token,
/// `s = absmax/127` (the only dynamic scheme [`check_scheme`] accepts).
pub(crate) fn dynamic_input_args() -> QuantArgs {
    int8(true, Granularity::Channel)
}

/// Whole-model rules: the description has one `group_size`, so every per-group layer must use
/// the same one.
pub fn check_plan(layers: &[(String, Scheme)]) -> Result<(), String> {
    let mut first: Option<(&str, u32)> = None;
    for (name, scheme) in layers {
        if let Some(Granularity::Group(g)) = scheme.weights.map(|w| w.granularity) {
            match first {
                None => first = Some((name, g)),
                Some((other, g0)) if g0 != g => {
                    return Err(format!(
                        "{other} uses groups of {g0} and {name} groups of {g}, but quant_model_description.json has a single group_size; use one group size for every per-group layer"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether the Ascend format can express `scheme` for `layer`; the error names the layer, what
/// Ascend cannot express and what to use instead.
///
/// Accepted (what vLLM-Ascend's `w8a8_static`, `w8a8_dynamic` and `w8a16` methods load):
/// - `W8A8`: int8 symmetric per-channel weights, int8 static per-tensor activations
///   (symmetric or asymmetric);
/// - `W8A8_DYNAMIC`: int8 symmetric per-channel weights, int8 symmetric dynamic per-token
///   activations with `scale_rule = qmax`;
/// - `W8A16`: int8 symmetric weights, per channel or per group;
/// - `FLOAT`: a skipped layer (no weight quantization, no activation quantization).
pub fn check_scheme(layer: &str, scheme: &Scheme) -> Result<(), String> {
    let refuse = |what: &str, instead: &str| -> Result<(), String> {
        Err(format!(
            "{layer}: the Ascend format (msModelSlim AscendV1 for vLLM-Ascend / MindIE) cannot express {what}; {instead}"
        ))
    };
    if scheme.kv_cache.is_some() {
        return refuse(
            "KV-cache quantization (gs-host does not write msModelSlim's C8 tensors)",
            "remove the kv_cache table for this export",
        );
    }
    let Some(w) = scheme.weights else {
        if scheme.activations.is_some() {
            return refuse(
                "quantized activations on a layer whose weights stay in float",
                "quantize the layer's weights too, or leave its activations in float",
            );
        }
        return Ok(());
    };
    if w.ty == QuantType::Float {
        return refuse(
            "FP8 weights (gs-host writes only the int8 types W8A8, W8A8_DYNAMIC and W8A16)",
            "export FP8 as `compressed-tensors`",
        );
    }
    if w.bits != 8 {
        let bits = w.bits;
        return match (bits, scheme.activations) {
            (4, None) => refuse(
                "4-bit weights (W4A16): vLLM-Ascend has no W4A16 linear path (vllm-project/vllm-ascend#6481)",
                "export W4A16 as `compressed-tensors`, or use 8-bit weights (W8A16) for Ascend",
            ),
            (4, Some(_)) => refuse(
                "4-bit weights with quantized activations (W4A8): vLLM-Ascend loads W4A8_DYNAMIC for MoE experts only, not for linear layers",
                "export as `compressed-tensors`, or use 8-bit weights for Ascend",
            ),
            _ => refuse(
                &format!("{bits}-bit weights (it stores int8 weights only)"),
                &format!("set bits = 8 for Ascend, or export {bits}-bit weights as `compressed-tensors`"),
            ),
        };
    }
    if !w.symmetric {
        return if scheme.activations.is_some() {
            refuse(
                "asymmetric weights",
                "8-bit full quantization on Ascend needs symmetric weights: npu_quant_matmul has no weight offset; set symmetric = true",
            )
        } else {
            refuse(
                "asymmetric W8A16 weights",
                "npu_weight_quant_batchmatmul applies CANN's antiquant offset, and whether it adds or subtracts msModelSlim's weight_offset is unverified, so gs-host does not write one; set symmetric = true",
            )
        };
    }
    match w.granularity {
        Granularity::Tensor => {
            return refuse(
                "per-tensor weight scales (it stores one weight scale per output channel, or per group for W8A16)",
                "set granularity = \"channel\"",
            )
        }
        Granularity::Group(_) if scheme.activations.is_some() => {
            return refuse(
                "per-group weights with quantized activations: vLLM-Ascend's W8A8 and W8A8_DYNAMIC linears take one weight scale per output channel",
                "set granularity = \"channel\" for the weights",
            )
        }
        _ => {}
    }
    let Some(a) = scheme.activations else {
        return Ok(());
    };
    if a.args.ty == QuantType::Float {
        return refuse(
            "FP8 activations",
            "use int8 activations for Ascend, or export FP8 as `compressed-tensors`",
        );
    }
    if a.args.bits != 8 {
        return refuse(
            &format!(
                "{}-bit activations (it quantizes activations to int8)",
                a.args.bits
            ),
            "set bits = 8 in the activations table",
        );
    }
    if a.dynamic {
        match a.args.granularity {
            Granularity::Tensor => {
                return refuse(
                    "dynamic per-tensor activations: W8A8_DYNAMIC quantizes each token with its own scale (npu_dynamic_quant)",
                    "set granularity = \"token\" in the activations table",
                )
            }
            Granularity::Group(_) => {
                return refuse(
                    "per-group dynamic activations: W8A8_DYNAMIC quantizes each token with one scale (npu_dynamic_quant)",
                    "set granularity = \"token\" in the activations table",
                )
            }
            Granularity::Channel => {}
        }
        if !a.args.symmetric {
            return refuse(
                "asymmetric dynamic activations: npu_dynamic_quant is symmetric and W8A8_DYNAMIC stores no activation offset",
                "set symmetric = true in the activations table",
            );
        }
        if a.args.scale_rule != ScaleRule::Qmax {
            return refuse(
                "dynamic activation scales absmax/127.5 (scale_rule \"half_range\"): npu_dynamic_quant scales each token by absmax/127",
                "set scale_rule = \"qmax\" in the activations table",
            );
        }
    } else if a.args.granularity != Granularity::Tensor {
        return refuse(
            "static activations with more than one scale: W8A8 stores one input_scale and input_offset per layer",
            "set granularity = \"tensor\" in the activations table",
        );
    }
    Ok(())
}
