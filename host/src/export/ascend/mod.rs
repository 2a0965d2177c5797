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
mod rules;
mod writer;

#[cfg(test)]
mod tests;

use gs_quant::{ScaleDtype, Scheme};

use super::{NumberRules, ShardNaming};

pub use reader::{detect, AscendCheckpoint};
pub use rules::{check_plan, check_scheme};
pub(crate) use rules::{dynamic_input_args, static_input_args};
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
