//! The manifest exactly as written: serde structs with `deny_unknown_fields`, and
//! [`Spanned`] on every value that is validated after deserialization so its error can point
//! at it. Field order is the order serde lists valid keys in error messages.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::quant::Preset;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub model: RawModel,
    pub calibration: Option<RawCalibration>,
    pub quant: RawQuant,
    pub pipeline: Option<Spanned<Vec<RawStage>>>,
    #[serde(default)]
    pub plugins: BTreeMap<String, RawPluginPin>,
    pub export: RawExport,
    pub eval: Option<RawEval>,
    pub run: Option<RawRun>,
    pub device: Option<RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub path: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCalibration {
    pub dataset: Spanned<String>,
    pub nsamples: Option<Spanned<i64>>,
    pub seqlen: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    pub text_field: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuant {
    pub scheme: Option<Spanned<Preset>>,
    pub weights: Option<RawWeights>,
    pub activations: Option<RawActivations>,
    pub kv_cache: Option<RawKvCache>,
    #[serde(rename = "override", default)]
    pub overrides: Vec<RawOverride>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverride {
    pub pattern: Spanned<String>,
    pub skip: Option<Spanned<bool>>,
    pub scheme: Option<Spanned<Preset>>,
    pub weights: Option<RawWeights>,
    pub activations: Option<RawActivations>,
    pub kv_cache: Option<RawKvCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWeights {
    pub bits: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    pub ty: Option<Spanned<RawType>>,
    pub symmetric: Option<Spanned<bool>>,
    pub granularity: Option<Spanned<RawGranularity>>,
    pub group_size: Option<Spanned<i64>>,
    pub scale_rule: Option<Spanned<RawScaleRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawActivations {
    pub enabled: Option<Spanned<bool>>,
    pub bits: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    pub ty: Option<Spanned<RawType>>,
    pub symmetric: Option<Spanned<bool>>,
    pub dynamic: Option<Spanned<bool>>,
    pub granularity: Option<Spanned<RawGranularity>>,
    pub group_size: Option<Spanned<i64>>,
    pub scale_rule: Option<Spanned<RawScaleRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKvCache {
    pub enabled: Option<Spanned<bool>>,
    pub bits: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    pub ty: Option<Spanned<RawType>>,
    pub symmetric: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawType {
    Int,
    Float,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawGranularity {
    Tensor,
    Channel,
    Group,
    Token,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawScaleRule {
    HalfRange,
    Qmax,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    pub algorithm: Spanned<String>,
    #[serde(default)]
    pub params: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPluginPin {
    pub sha256: Spanned<String>,
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExport {
    // A string rather than an enum so that formats of later versions get their own message.
    pub format: Spanned<String>,
    pub output: Spanned<String>,
    pub max_shard_size: Option<Spanned<RawSize>>,
}

/// A byte size: an integer, or a string such as `"5GB"` / `"500MiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEval {
    pub dataset: Spanned<String>,
    pub seqlen: Option<Spanned<i64>>,
    pub windows: Option<Spanned<i64>>,
    pub points: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub sequential: Option<bool>,
    pub output_error: Option<bool>,
    pub stage_timeout_s: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevice {
    // Strings rather than enums so that unknown values get a message listing the valid ones.
    pub kind: Spanned<String>,
    pub ids: Option<Spanned<Vec<Spanned<i64>>>>,
    pub precision: Option<Spanned<String>>,
}
