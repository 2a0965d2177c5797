//! Reading an AscendV1 checkpoint back (FORMATS.md Part C, "Ascend" checklist).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use gs_quant::{dequantize_int, Granularity, QParams};
use serde_json::Value;

use super::rules::{deq_scales, quant_bias};
use super::{dynamic_input_args, static_input_args, AscendType, DESCRIPTION_FILE, NAMING};
use crate::export::{Codes, DecodedCheckpoint, DecodedLayer, ExportError};
use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::forward::{TensorF32, TensorSource};
use crate::model::{DType, ModelConfig, ModelError, Weights, CONFIG_FILE};

/// Global keys of a description (msModelSlim V0/V1), not tensor entries.
const GLOBAL_KEYS: &[&str] = &[
    "version",
    "model_quant_type",
    "metadata",
    "group_size",
    "optional",
    "kv_cache_type",
    "kv_quant_type",
    "fa_quant_type",
    "indexer_quant_type",
    "reduce_quant_type",
];

/// Global keys that describe a quantization gs-host cannot evaluate.
const UNSUPPORTED_KEYS: &[&str] = &[
    "kv_cache_type",
    "kv_quant_type",
    "fa_quant_type",
    "indexer_quant_type",
    "reduce_quant_type",
];

/// Whether `dir` holds an Ascend checkpoint: `quant_model_description.json` exists.
pub fn detect(dir: &Path) -> bool {
    dir.join(DESCRIPTION_FILE).is_file()
}

/// An Ascend checkpoint opened for evaluation: `<layer>.weight` of a quantized layer decodes
/// to `(q − o)·s` in f32, every other tensor is read as stored.
#[derive(Debug)]
pub struct AscendCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    weights: Weights,
    /// Tensor entries of the description, in its order.
    entries: Vec<(String, AscendType)>,
    /// Quantized layers (module name → type), and their description order.
    layers: BTreeMap<String, AscendType>,
    order: Vec<String>,
    /// The description's `group_size` (0: none).
    group_size: usize,
}

/// One decoded layer; `dequantized` is empty when not asked for.
struct Decoded {
    out: usize,
    cols: usize,
    codes: Vec<i8>,
    qparams: QParams,
    bias: Option<Vec<f32>>,
    input: Option<ActQuant>,
}

impl AscendCheckpoint {
    /// Opens `dir`: the description, config.json (which must have no `quantization_config`)
    /// and the weights through `quant_model_weights.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ExportError> {
        let desc_path = dir.join(DESCRIPTION_FILE);
        let bad = |reason: String| ExportError::BadCheckpoint {
            file: desc_path.clone(),
            reason,
        };
        let text = fs::read(&desc_path).map_err(ExportError::io("read", &desc_path))?;
        let doc: Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(doc) = doc else {
            return Err(bad("expected a JSON object".into()));
        };
        match doc.get("model_quant_type") {
            Some(Value::String(_)) => {}
            Some(v) => {
                return Err(bad(format!(
                    "\"model_quant_type\" must be a string, found {v}"
                )))
            }
            None => return Err(bad("the key \"model_quant_type\" is missing".into())),
        }
        let group_size = match doc.get("group_size") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().map(|g| g as usize).ok_or_else(|| {
                bad(format!(
                    "\"group_size\" must be a non-negative integer, found {v}"
                ))
            })?,
        };
        if let Some(key) = UNSUPPORTED_KEYS.iter().find(|k| doc.contains_key(**k)) {
            return Err(bad(format!(
                "\"{key}\": KV-cache / attention / communication quantization is not decoded by gs-host"
            )));
        }
        let mut entries = Vec::new();
        for (name, v) in &doc {
            if GLOBAL_KEYS.contains(&name.as_str()) {
                continue;
            }
            let Some(ty) = v.as_str() else {
                return Err(bad(format!(
                    "\"{name}\": expected a type string such as \"W8A8\" or \"FLOAT\", found {v}"
                )));
            };
            let ty = AscendType::parse(ty).ok_or_else(|| {
                bad(format!(
                    "\"{name}\": type \"{ty}\" is not decoded by gs-host (supported: FLOAT, W8A16, W8A8_DYNAMIC, W8A8)"
                ))
            })?;
            entries.push((name.clone(), ty));
        }

        let config_path = dir.join(CONFIG_FILE);
        let config = ModelConfig::from_file(&config_path)?;
        let in_text = config
            .raw
            .get("text_config")
            .is_some_and(|t| t.get("quantization_config").is_some());
        if config.raw.get("quantization_config").is_some() || in_text {
            return Err(ExportError::BadCheckpoint {
                file: config_path,
                reason: format!(
                    "has a \"quantization_config\"{}: an Ascend checkpoint is described by {DESCRIPTION_FILE} only (msModelSlim removes it; vLLM would pick another quantization method)",
                    if in_text { " in \"text_config\"" } else { "" }
                ),
            });
        }
        let weights = Weights::open_with_index(dir, NAMING.index)?;

        let mut layers = BTreeMap::new();
        let mut order = Vec::new();
        for (name, ty) in &entries {
            if !weights.contains(name) {
                return Err(bad(format!(
                    "\"{name}\" is described but no weight file holds it"
                )));
            }
            if *ty == AscendType::Float {
                continue;
            }
            if let Some(layer) = name.strip_suffix(".weight") {
                layers.insert(layer.to_string(), *ty);
                order.push(layer.to_string());
            }
        }
        Ok(AscendCheckpoint {
            dir: dir.to_path_buf(),
            config,
            weights,
            entries,
            layers,
            order,
            group_size,
        })
    }

    /// The stored weights.
    pub(super) fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Names of the described tensors.
    pub(super) fn described(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Quantized layers in description order.
    pub(super) fn quantized_layer_names(&self) -> &[String] {
        &self.order
    }

    /// Decodes `layer` without materializing its weights: every consistency check of
    /// [`DecodedCheckpoint::decode_layer`].
    pub(super) fn check_layer(&self, layer: &str) -> Result<(), ExportError> {
        self.decode(layer).map(|_| ())
    }

    fn bad(&self, reason: String) -> ExportError {
        ExportError::BadCheckpoint {
            file: self.dir.join(NAMING.index),
            reason,
        }
    }

    fn layer_type(&self, layer: &str) -> Result<AscendType, ExportError> {
        self.layers.get(layer).copied().ok_or_else(|| ExportError::BadCheckpoint {
            file: self.dir.join(DESCRIPTION_FILE),
            reason: format!("{layer} is not a quantized layer (no W8A8, W8A8_DYNAMIC or W8A16 entry \"{layer}.weight\")"),
        })
    }

    /// Tensor `name` with the given dtype and element count; its f32 values (float dtypes) or
    /// raw bytes.
    fn tensor(
        &self,
        name: &str,
        dtypes: &[DType],
        numel: usize,
    ) -> Result<(DType, Vec<usize>, &[u8]), ExportError> {
        let info = self
            .weights
            .info(name)
            .map_err(|_| self.bad(format!("tensor \"{name}\" is missing")))?;
        if !dtypes.contains(&info.dtype()) {
            return Err(self.bad(format!(
                "tensor \"{name}\" has dtype {}, expected {}",
                info.dtype(),
                dtypes
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        if info.numel() != numel {
            return Err(self.bad(format!(
                "tensor \"{name}\" has shape {:?}, expected {numel} values",
                info.shape()
            )));
        }
        Ok((
            info.dtype(),
            info.shape().to_vec(),
            self.weights.raw_bytes(name)?,
        ))
    }

    fn f32s(&self, name: &str, numel: usize) -> Result<Vec<f32>, ExportError> {
        let (_, _, bytes) = self.tensor(name, &[DType::F32], numel)?;
        Ok(f32_values(bytes))
    }

    /// A float tensor of any float dtype, widened.
    fn floats(&self, name: &str, numel: usize) -> Result<Vec<f32>, ExportError> {
        self.tensor(name, &[DType::F32, DType::BF16, DType::F16], numel)?;
        Ok(self.weights.to_f32(name)?)
    }

    /// `(input_scale, input_offset)` of a `W8A8` layer: F32 `[1]` each, the offset an
    /// integer in `[-128, 127]`.
    fn static_input(&self, layer: &str) -> Result<(f32, i32), ExportError> {
        let scale = self.f32s(&format!("{layer}.input_scale"), 1)?[0];
        let offset = self.f32s(&format!("{layer}.input_offset"), 1)?[0];
        if !(scale.is_finite() && scale > 0.0) {
            return Err(self.bad(format!(
                "{layer}.input_scale is {scale}, expected a positive number"
            )));
        }
        if offset.fract() != 0.0 || !(-128.0..=127.0).contains(&offset) {
            return Err(self.bad(format!(
                "{layer}.input_offset is {offset}, expected an integer in [-128, 127]"
            )));
        }
        Ok((scale, offset as i32))
    }

    fn decode(&self, layer: &str) -> Result<Decoded, ExportError> {
        let ty = self.layer_type(layer)?;
        let wname = format!("{layer}.weight");
        let info = self.weights.info(&wname)?;
        let &[out, cols] = info.shape() else {
            return Err(self.bad(format!(
                "{wname} has shape {:?}, expected [out, in]",
                info.shape()
            )));
        };
        let (_, _, bytes) = self.tensor(&wname, &[DType::I8], out * cols)?;
        let codes: Vec<i8> = bytes.iter().map(|&b| b as i8).collect();
        let bname = format!("{layer}.bias");
        let bias = if self.weights.contains(&bname) {
            Some(self.floats(&bname, out)?)
        } else {
            None
        };

        let (qparams, input) = match ty {
            AscendType::W8A8 => self.decode_w8a8(layer, out, cols, &codes, bias.as_deref())?,
            AscendType::W8A8Dynamic | AscendType::W8A16 => {
                let qp = self.decode_scale_offset(layer, out, cols)?;
                let input = (ty == AscendType::W8A8Dynamic)
                    .then(|| ActQuant::Dynamic(dynamic_input_args()));
                (qp, input)
            }
            AscendType::Float => unreachable!("FLOAT layers are not in `layers`"),
        };
        Ok(Decoded {
            out,
            cols,
            codes,
            qparams,
            bias,
            input,
        })
    }

    /// W8A8: the weight scale is the stored `weight_scale` when present (gs-host and
    /// msModelSlim V0 write it). msModelSlim V1 does not, and then it is recovered as
    /// `deq_scale / input_scale`, which is exact only to f32 rounding (the product
    /// `input_scale·weight_scale` was rounded once). `deq_scale` (and its dtype: F32 for a
    /// bf16 config, else I64) and `quant_bias` are checked against the formulas.
    fn decode_w8a8(
        &self,
        layer: &str,
        out: usize,
        cols: usize,
        codes: &[i8],
        bias: Option<&[f32]>,
    ) -> Result<(QParams, Option<ActQuant>), ExportError> {
        let (scale, zero) = self.static_input(layer)?;
        let bf16 = self.config.dtype.as_deref() == Some("bfloat16");
        let dname = format!("{layer}.deq_scale");
        let expected = if bf16 { DType::F32 } else { DType::I64 };
        let (dtype, _, bytes) = self.tensor(&dname, &[DType::F32, DType::I64], out)?;
        if dtype != expected {
            return Err(self.bad(format!(
                "{dname} is {dtype}, but config.json's dtype {:?} needs {expected} (msModelSlim and vLLM-Ascend: F32 for bfloat16 models, I64 otherwise)",
                self.config.dtype.as_deref().unwrap_or("(none)")
            )));
        }
        let deq: Vec<f32> = if dtype == DType::F32 {
            f32_values(bytes)
        } else {
            let mut v = Vec::with_capacity(out);
            for (n, c) in bytes.chunks_exact(8).enumerate() {
                let x = i64::from_le_bytes(c.try_into().unwrap_or_default());
                let low = x as i32;
                if i64::from(low) != x {
                    return Err(self.bad(format!(
                        "{dname}[{n}] = {x} is not a sign-extended f32 bit pattern"
                    )));
                }
                v.push(f32::from_bits(low as u32));
            }
            v
        };
        let sname = format!("{layer}.weight_scale");
        let scales = if self.weights.contains(&sname) {
            let s = self.floats(&sname, out)?;
            if let Some(n) = deq_scales(scale, &s)
                .iter()
                .zip(&deq)
                .position(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(self.bad(format!(
                    "{dname}[{n}] = {} but input_scale·weight_scale = {scale}·{} = {}",
                    deq[n],
                    s[n],
                    scale * s[n]
                )));
            }
            s
        } else {
            deq.iter().map(|d| d / scale).collect()
        };
        self.check_zero_offsets(layer, out)?;
        let zeros = vec![0f32; out];
        let expected = quant_bias(bias.unwrap_or(&zeros), &deq, zero, codes, cols)
            .map_err(|e| self.bad(format!("{layer}: {e}")))?;
        let qname = format!("{layer}.quant_bias");
        let (_, _, bytes) = self.tensor(&qname, &[DType::I32], out)?;
        for (n, (c, e)) in bytes.chunks_exact(4).zip(&expected).enumerate() {
            let stored = i32::from_le_bytes(c.try_into().unwrap_or_default());
            if stored != *e {
                return Err(self.bad(format!(
                    "{qname}[{n}] = {stored}, but round(bias/deq_scale − input_offset·Σ weight) = {e}{}",
                    if bias.is_none() { " (no bias)" } else { "" }
                )));
            }
        }
        let qp = QParams::new(Granularity::Channel, out, cols, scales, Vec::new())
            .map_err(|e| self.bad(format!("{layer}: {e}")))?;
        let input = ActQuant::Static {
            args: static_input_args(),
            scale,
            zero,
        };
        Ok((qp, Some(input)))
    }

    /// `weight_offset`, if stored, must be all zeros (symmetric weights; `[out, 1]` or the
    /// shape of the scales).
    fn check_zero_offsets(&self, layer: &str, numel: usize) -> Result<(), ExportError> {
        let oname = format!("{layer}.weight_offset");
        if !self.weights.contains(&oname) {
            return Ok(());
        }
        let offsets = self.floats(&oname, numel)?;
        if let Some(n) = offsets.iter().position(|&o| o != 0.0) {
            return Err(self.bad(format!(
                "{oname}[{n}] = {}: gs-host decodes symmetric weights only (npu_quant_matmul ignores weight offsets, and the sign of W8A16's antiquant offset is unverified)",
                offsets[n]
            )));
        }
        Ok(())
    }

    /// W8A8_DYNAMIC / W8A16: `weight_scale` `[out, 1]` (per channel) or `[out, in/gs]` (per
    /// group, `gs` = the description's `group_size`), zero `weight_offset` of the same size.
    fn decode_scale_offset(
        &self,
        layer: &str,
        out: usize,
        cols: usize,
    ) -> Result<QParams, ExportError> {
        let sname = format!("{layer}.weight_scale");
        let info = self
            .weights
            .info(&sname)
            .map_err(|_| self.bad(format!("tensor \"{sname}\" is missing")))?;
        let per_row = match info.shape() {
            [n] | [n, 1] if *n == out => 1,
            [n, g] if *n == out => *g,
            s => {
                return Err(self.bad(format!(
                    "{sname} has shape {s:?}, expected [{out}, 1] or [{out}, in/group_size]"
                )))
            }
        };
        let granularity = if per_row == 1 {
            Granularity::Channel
        } else {
            let gs = self.group_size;
            if gs == 0 || cols % gs != 0 || cols / gs != per_row {
                return Err(self.bad(format!(
                    "{sname} has {per_row} groups per row for {cols} input columns, which does not match the description's group_size {gs}"
                )));
            }
            Granularity::Group(gs as u32)
        };
        let scales = self.floats(&sname, out * per_row)?;
        self.check_zero_offsets(layer, out * per_row)?;
        QParams::new(granularity, out, cols, scales, Vec::new())
            .map_err(|e| self.bad(format!("{layer}: {e}")))
    }
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A decode error as the forward pass reports it.
fn as_model_error(dir: &Path, e: ExportError) -> ModelError {
    match e {
        ExportError::Model(m) => m,
        ExportError::BadCheckpoint { file, reason } => ModelError::Io {
            action: "decode",
            path: file,
            source: std::io::Error::other(reason),
        },
        other => ModelError::Io {
            action: "decode",
            path: dir.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

impl TensorSource for AscendCheckpoint {
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        if let Some(layer) = name.strip_suffix(".weight") {
            if self.layers.contains_key(layer) {
                let model_error = |e| as_model_error(&self.dir, e);
                let d = self.decode(layer).map_err(model_error)?;
                let values = dequantize_int(&d.codes, &d.qparams)
                    .map_err(|e| model_error(self.bad(format!("{layer}: {e}"))))?;
                return Ok(Some(TensorF32 {
                    shape: vec![d.out, d.cols],
                    values: Cow::Owned(values),
                }));
            }
        }
        self.weights.tensor_f32(name)
    }

    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    fn release_prefix(&self, prefix: &str) {
        self.weights.release_prefix(prefix);
    }
}

impl DecodedCheckpoint for AscendCheckpoint {
    fn format(&self) -> ExportFormat {
        ExportFormat::Ascend
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn quantized_layers(&self) -> Vec<String> {
        self.order.clone()
    }

    fn decode_layer(&self, name: &str) -> Result<DecodedLayer, ExportError> {
        let d = self.decode(name)?;
        let dequantized =
            dequantize_int(&d.codes, &d.qparams).map_err(|e| self.bad(format!("{name}: {e}")))?;
        Ok(DecodedLayer {
            name: name.to_string(),
            codes: Codes::Int(d.codes),
            qparams: d.qparams,
            dequantized,
            bias: d.bias,
            input: d.input,
        })
    }

    fn input_quant(&self, layer: &str) -> Result<Option<ActQuant>, ExportError> {
        Ok(match self.layers.get(layer) {
            Some(AscendType::W8A8) => {
                let (scale, zero) = self.static_input(layer)?;
                Some(ActQuant::Static {
                    args: static_input_args(),
                    scale,
                    zero,
                })
            }
            Some(AscendType::W8A8Dynamic) => Some(ActQuant::Dynamic(dynamic_input_args())),
            _ => None,
        })
    }
}
