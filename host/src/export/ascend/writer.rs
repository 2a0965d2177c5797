//! Writing an AscendV1 checkpoint (msModelSlim 26.1.0 `ascendv1_saver`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gs_quant::{Granularity, ScaleDtype};
use serde_json::{Map, Value};

use super::reader::AscendCheckpoint;
use super::rules::{
    check_group, check_scheme, deq_scale_i64, deq_scales, quant_bias, same_group_size,
};
use super::{AscendType, DESCRIPTION_FILE, NAMING};
use crate::arch::Family;
use crate::export::files::{add_extra_file, copy_source_files, source_dtype_bytes};
use crate::export::staging::Staging;
use crate::export::writer::ShardedWriter;
use crate::export::{Codes, ExportError, ExportOptions, ExportSummary, Exporter, QuantLayer};
use crate::model::fakequant::ActQuant;
use crate::model::{DType, Model, CONFIG_FILE};

/// Names of the model's top-level tensors and its block layout (from its family, with the
/// Llama names as fallback for an architecture gs-host has no family file for).
#[derive(Debug)]
pub(super) struct Layout {
    pub embed: String,
    pub norm: String,
    pub lm_head: String,
    /// Block module prefix split at `{i}`, e.g. `("model.layers.", "")`.
    block: (String, String),
    family: Option<Family>,
}

impl Layout {
    pub(super) fn of(model_config: &crate::model::ModelConfig) -> Layout {
        let family = crate::arch::family_for(
            &model_config.architectures,
            &model_config.path.display().to_string(),
        )
        .ok();
        let (embed, norm, lm_head, block) = match &family {
            Some(f) => (
                f.embed_tokens_weight(),
                f.final_norm_weight(),
                format!("{}.weight", f.top.lm_head),
                f.block.clone(),
            ),
            None => (
                "model.embed_tokens.weight".to_string(),
                "model.norm.weight".to_string(),
                "lm_head.weight".to_string(),
                "model.layers.{i}".to_string(),
            ),
        };
        let (pre, post) = block.split_once("{i}").unwrap_or((&block, ""));
        Layout {
            embed,
            norm,
            lm_head,
            block: (pre.to_string(), post.to_string()),
            family,
        }
    }

    /// The decoder block a tensor belongs to, e.g. 3 for `model.layers.3.mlp.up_proj.weight`.
    pub(super) fn block_of(&self, name: &str) -> Option<usize> {
        let rest = name.strip_prefix(self.block.0.as_str())?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let i = rest[..digits].parse().ok()?;
        rest[digits..]
            .strip_prefix(self.block.1.as_str())?
            .starts_with('.')
            .then_some(i)
    }

    /// Sort key of a description entry: every decoder-layer entry first (by block, then as
    /// written), then the others with the embedding first and the final norm and lm_head last,
    /// as msModelSlim 26.1.0 V1 output orders them.
    fn order(&self, name: &str, seq: usize) -> (usize, usize, usize, usize) {
        if let Some(i) = self.block_of(name) {
            return (0, i, 0, seq);
        }
        let rank = if name == self.embed {
            0
        } else if name == self.lm_head {
            3
        } else if name == self.norm {
            2
        } else {
            1
        };
        (1, 0, rank, seq)
    }
}

/// `(input_scale, input_offset)` of a `W8A8` layer.
type StaticInput = (f32, i32);

/// Writes a model as msModelSlim's AscendV1 format (see the module docs).
///
/// Quantized layers and changed tensors go to size-limited shards as they arrive; `finish`
/// copies every other source tensor as `FLOAT`, writes the description and config.json,
/// copies the source's other files, checks that the staged output decodes and commits it.
#[derive(Debug)]
pub struct AscendExport<'m> {
    model: &'m Model,
    staging: Staging,
    writer: ShardedWriter,
    linears: Vec<String>,
    layout: Layout,
    /// Files in the staging directory that the source's copies must not overwrite.
    added: BTreeSet<PathBuf>,
    /// Files added with `add_file`.
    user_files: Vec<PathBuf>,
    /// Description entries in write order.
    entries: Vec<(String, AscendType)>,
    /// Quantized layers written, with `(input_scale, input_offset)` for `W8A8`.
    layers: BTreeMap<String, Option<StaticInput>>,
    /// Source tensors whose values came from the pipeline.
    replaced: usize,
    /// The group size of per-group layers, and the first layer that set it.
    group_size: Option<(u32, String)>,
    /// `deq_scale` is F32 for a bf16 model, I64 otherwise (msModelSlim `deqscale2int64_by_dtype`).
    deq_scale_f32: bool,
    /// The model ties `lm_head` to the embedding and has no `lm_head.weight`: write a copy,
    /// as msModelSlim V1 does, so that vLLM-Ascend finds `desc["lm_head.weight"]`.
    tie_copy: bool,
    /// Engine caveats already logged.
    warned: BTreeSet<&'static str>,
}

impl<'m> AscendExport<'m> {
    /// Starts an export of `model` to `output` (see [`Staging::begin`] for what is refused).
    pub fn begin(
        model: &'m Model,
        output: &Path,
        options: &ExportOptions,
    ) -> Result<Self, ExportError> {
        let staging = Staging::begin(output, &model.dir, options.force)?;
        let writer = ShardedWriter::new(staging.path(), NAMING, options.max_shard_bytes);
        let layout = Layout::of(&model.config);
        let deq_scale_f32 = model.config.dtype.as_deref() == Some("bfloat16");
        if model.config.dtype.is_none() {
            tracing::warn!(
                config = %model.config.path.display(),
                "config.json has no dtype/torch_dtype: W8A8 deq_scale is written as I64 (the fp16 form), as msModelSlim does"
            );
        }
        let tie_copy = model.config.tie_word_embeddings
            && !model.weights.contains(&layout.lm_head)
            && model.weights.contains(&layout.embed);
        // Never overwritten by a source file of the same name.
        let added = BTreeSet::from([PathBuf::from(NAMING.index)]);
        tracing::info!(
            source = %model.dir.display(),
            output = %staging.output().display(),
            "ascend export started"
        );
        Ok(AscendExport {
            model,
            staging,
            writer,
            linears: options.linears.clone(),
            layout,
            added,
            user_files: Vec::new(),
            entries: Vec::new(),
            layers: BTreeMap::new(),
            replaced: 0,
            group_size: None,
            deq_scale_f32,
            tie_copy,
            warned: BTreeSet::new(),
        })
    }

    fn add(
        &mut self,
        name: &str,
        ty: AscendType,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), ExportError> {
        self.writer.add(name, dtype, shape, bytes)?;
        self.entries.push((name.to_string(), ty));
        Ok(())
    }

    fn add_f32(
        &mut self,
        name: &str,
        ty: AscendType,
        shape: &[usize],
        values: &[f32],
    ) -> Result<(), ExportError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, ty, DType::F32, shape, &bytes)
    }

    /// A FLOAT tensor of the source with `bytes` in its source dtype; with a tied embedding,
    /// also its `lm_head.weight` copy.
    fn add_source_float(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        let info = self.model.weights.info(name)?;
        let (dtype, shape) = (info.dtype(), info.shape().to_vec());
        self.add(name, AscendType::Float, dtype, &shape, bytes)?;
        if self.tie_copy && name == self.layout.embed {
            let lm_head = self.layout.lm_head.clone();
            self.add(&lm_head, AscendType::Float, dtype, &shape, bytes)?;
        }
        Ok(())
    }

    /// Writes the tensors of one quantized layer.
    fn write_layer(&mut self, l: &QuantLayer) -> Result<(), ExportError> {
        let bad = |reason: String| ExportError::Verification(format!("{}: {reason}", l.name));
        check_scheme(&l.name, &l.scheme).map_err(ExportError::Unsupported)?;
        let ty = AscendType::of_scheme(&l.scheme);
        let (out, inp) = (l.out_features, l.in_features);
        let weight_name = format!("{}.weight", l.name);
        let info =
            self.model
                .weights
                .info(&weight_name)
                .map_err(|_| ExportError::UnknownTensor {
                    tensor: weight_name.clone(),
                    model_dir: self.model.dir.clone(),
                })?;
        if info.shape() != [out, inp] {
            return Err(bad(format!(
                "the layer is [{out}, {inp}] but the source weight is {:?}",
                info.shape()
            )));
        }
        if self.tie_copy && weight_name == self.layout.lm_head {
            return Err(bad(
                "lm_head is tied to the embedding and cannot be quantized on its own".into(),
            ));
        }
        let Codes::Int(q) = &l.codes else {
            return Err(bad("FP8 codes for an int8 Ascend type".into()));
        };
        let qp = &l.qparams;
        if q.len() != out * inp || (qp.rows, qp.cols) != (out, inp) || !qp.zeros.is_empty() {
            return Err(bad(format!(
                "expected symmetric qparams for [{out}, {inp}] codes, got {} codes, qparams for [{}, {}] with {} zero points",
                q.len(),
                qp.rows,
                qp.cols,
                qp.zeros.len()
            )));
        }
        let scale_shape = match qp.granularity {
            Granularity::Channel => vec![out, 1],
            Granularity::Group(g) => {
                check_group(g, inp).map_err(bad)?;
                vec![out, inp / g as usize]
            }
            Granularity::Tensor => return Err(bad("per-tensor weight scales".into())),
        };
        if qp.scales.len() != scale_shape.iter().product::<usize>() {
            return Err(bad(format!(
                "{} scales for weight_scale {scale_shape:?}",
                qp.scales.len()
            )));
        }
        let group = match qp.granularity {
            Granularity::Group(g) => {
                let first = self.group_size.as_ref().map(|(g0, l)| (*g0, l.as_str()));
                same_group_size(first, &l.name, g).map_err(ExportError::Verification)?;
                first.is_none().then_some(g)
            }
            _ => None,
        };
        self.warn_engine_limits(l, ty);
        let bias_name = format!("{}.bias", l.name);
        let bias = match &l.bias {
            Some((b, dtype)) => {
                if b.len() != out {
                    return Err(bad(format!("{} bias values for {out} outputs", b.len())));
                }
                Some(stored_bias(b, *dtype))
            }
            None if self.model.weights.contains(&bias_name) => {
                return Err(bad(format!(
                    "the source has {bias_name} but the layer was handed over without its bias"
                )))
            }
            None => None,
        };

        // W8A8: everything checked and computed before anything is written.
        let w8a8 = if ty == AscendType::W8A8 {
            let Some(ActQuant::Static { scale, zero, .. }) = l.input else {
                return Err(bad(
                    "a W8A8 layer needs its calibrated static input scale and offset".into(),
                ));
            };
            if !(scale.is_finite() && scale > 0.0 && (-128..=127).contains(&zero)) {
                return Err(bad(format!(
                    "input scale {scale} / offset {zero}: the scale must be positive and the offset in [-128, 127]"
                )));
            }
            let deq = deq_scales(scale, &qp.scales);
            let zeros = vec![0f32; out];
            let qbias =
                quant_bias(bias.as_deref().unwrap_or(&zeros), &deq, zero, q, inp).map_err(bad)?;
            Some((scale, zero, deq, qbias))
        } else {
            None
        };

        if let Some(g) = group {
            self.group_size = Some((g, l.name.clone()));
        }
        let codes: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        self.add(&weight_name, ty, DType::I8, &[out, inp], &codes)?;
        let mut input = None;
        if let Some((scale, zero, deq, qbias)) = w8a8 {
            let qbias: Vec<u8> = qbias.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.add(
                &format!("{}.quant_bias", l.name),
                ty,
                DType::I32,
                &[out],
                &qbias,
            )?;
            self.add_f32(&format!("{}.input_scale", l.name), ty, &[1], &[scale])?;
            self.add_f32(
                &format!("{}.input_offset", l.name),
                ty,
                &[1],
                &[zero as f32],
            )?;
            let deq_name = format!("{}.deq_scale", l.name);
            if self.deq_scale_f32 {
                self.add_f32(&deq_name, ty, &[out], &deq)?;
            } else {
                let bits: Vec<u8> = deq
                    .iter()
                    .flat_map(|&d| deq_scale_i64(d).to_le_bytes())
                    .collect();
                self.add(&deq_name, ty, DType::I64, &[out], &bits)?;
            }
            input = Some((scale, zero));
        }
        self.add_f32(
            &format!("{}.weight_scale", l.name),
            ty,
            &scale_shape,
            &qp.scales,
        )?;
        self.add_f32(
            &format!("{}.weight_offset", l.name),
            ty,
            &scale_shape,
            &vec![0.0; qp.scales.len()],
        )?;
        if let Some(b) = &bias {
            self.add_f32(&bias_name, AscendType::Float, &[out], b)?;
            self.replaced += 1;
        }
        self.replaced += 1;
        self.layers.insert(l.name.clone(), input);
        Ok(())
    }

    /// Logs, once per export, what the written layer needs from the engine beyond the format.
    fn warn_engine_limits(&mut self, l: &QuantLayer, ty: AscendType) {
        let dtype = self.model.config.dtype.as_deref();
        if ty == AscendType::W8A8
            && !matches!(dtype, Some("bfloat16" | "float16"))
            && self.warned.insert("w8a8-dtype")
        {
            tracing::warn!(
                layer = %l.name,
                dtype = ?dtype,
                "vLLM-Ascend's W8A8 method allocates deq_scale only when serving bfloat16 (F32) or float16 (I64); serve this model in one of them"
            );
        }
        if ty == AscendType::W8A16
            && matches!(l.qparams.granularity, Granularity::Group(_))
            && self.warned.insert("w8a16-group")
        {
            tracing::warn!(
                layer = %l.name,
                "per-group W8A16 follows msModelSlim's layout (weight_scale [out, in/group_size]); vLLM-Ascend's W8A16 linear (w8a16.py) allocates per-channel scales [out, 1] only"
            );
        }
    }

    /// Every linear must be described (vLLM-Ascend looks up `desc["<linear>.weight"]` for
    /// each), and the linears vLLM fuses (q/k/v, gate/up: a block subset) must share one type
    /// and, for W8A8, one input scale and offset (the fused layer keeps a single `[1]` value).
    fn check_linears(&self, types: &BTreeMap<&str, AscendType>) -> Result<(), ExportError> {
        for l in &self.linears {
            if !types.contains_key(format!("{l}.weight").as_str()) {
                return Err(ExportError::Verification(format!(
                    "linear {l} has no {l}.weight in the output (vLLM-Ascend needs a description entry for every linear)"
                )));
            }
        }
        let Some(family) = &self.layout.family else {
            return Ok(());
        };
        for i in 0..self.model.config.num_hidden_layers {
            for subset in family.block_subsets(i) {
                let fused: Vec<(&String, AscendType, Option<StaticInput>)> = subset
                    .layers
                    .iter()
                    .filter_map(|l| {
                        let ty = *types.get(format!("{l}.weight").as_str())?;
                        Some((l, ty, self.layers.get(l).copied().flatten()))
                    })
                    .collect();
                let Some((first, ty0, in0)) = fused.first() else {
                    continue;
                };
                for (l, ty, input) in &fused[1..] {
                    if ty != ty0 {
                        return Err(ExportError::Unsupported(format!(
                            "{first} is {} but {l} is {}: vLLM-Ascend fuses {} into one linear, which needs one type; give them the same scheme",
                            ty0.name(),
                            ty.name(),
                            subset.layers.join(", ")
                        )));
                    }
                    if input != in0 {
                        return Err(ExportError::Unsupported(format!(
                            "{first} and {l} have different input scales/offsets ({in0:?} vs {input:?}): vLLM-Ascend fuses {} and keeps one input_scale; calibrate them on their shared input",
                            subset.layers.join(", ")
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// `quant_model_description.json`, indent 4 (msModelSlim `JsonWriter`).
    fn description(&self) -> Result<Vec<u8>, ExportError> {
        let mut entries: Vec<(usize, &(String, AscendType))> =
            self.entries.iter().enumerate().collect();
        entries.sort_by_key(|(seq, (name, _))| self.layout.order(name, *seq));
        let mut root = Map::new();
        for (_, (name, ty)) in &entries {
            root.insert(name.clone(), Value::from(ty.name()));
        }
        let top = self
            .entries
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or(AscendType::Float);
        root.insert("version".into(), Value::from("1.0.0"));
        root.insert("model_quant_type".into(), Value::from(top.name()));
        root.insert("metadata".into(), Value::Object(Map::new()));
        root.insert(
            "group_size".into(),
            Value::from(self.group_size.as_ref().map_or(0, |(g, _)| *g)),
        );
        root.insert("optional".into(), Value::Object(Map::new()));
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        serde::Serialize::serialize(&Value::Object(root), &mut ser).map_err(|e| {
            ExportError::Verification(format!("cannot serialize {DESCRIPTION_FILE}: {e}"))
        })?;
        Ok(out)
    }

    /// config.json without `quantization_config` (top level and in `text_config`), as
    /// msModelSlim's `remove_quantization_config`; `None` when there is nothing to remove (the
    /// source file is then copied unchanged).
    fn config_without_quantization(&self) -> Result<Option<Vec<u8>>, ExportError> {
        let mut raw = self.model.config.raw.clone();
        let mut removed = false;
        if let Some(obj) = raw.as_object_mut() {
            removed |= obj.shift_remove("quantization_config").is_some();
            if let Some(text) = obj.get_mut("text_config").and_then(Value::as_object_mut) {
                removed |= text.shift_remove("quantization_config").is_some();
            }
        }
        if !removed {
            return Ok(None);
        }
        let mut text = serde_json::to_vec_pretty(&raw)
            .map_err(|e| ExportError::Verification(format!("cannot serialize config.json: {e}")))?;
        text.push(b'\n');
        Ok(Some(text))
    }

    /// Re-opens the staged output and checks it: every tensor described and every entry
    /// present, and every quantized layer decodes consistently (`deq_scale`, `quant_bias`,
    /// offsets, shapes, dtypes).
    fn verify(&self) -> Result<(), ExportError> {
        let ckpt = AscendCheckpoint::open(self.staging.path())
            .map_err(|e| ExportError::Verification(e.to_string()))?;
        let described = ckpt.described();
        let stored: BTreeSet<&str> = ckpt.weights().names().collect();
        if described.len() != stored.len() || described.iter().any(|n| !stored.contains(n)) {
            return Err(ExportError::Verification(format!(
                "{} description entries for {} stored tensors",
                described.len(),
                stored.len()
            )));
        }
        let layers = ckpt.quantized_layer_names();
        if layers.len() != self.layers.len() {
            return Err(ExportError::Verification(format!(
                "{} quantized layers written, {} described",
                self.layers.len(),
                layers.len()
            )));
        }
        for name in layers {
            ckpt.check_layer(name)
                .map_err(|e| ExportError::Verification(e.to_string()))?;
        }
        Ok(())
    }
}

impl Exporter for AscendExport<'_> {
    fn output(&self) -> &Path {
        self.staging.output()
    }

    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), ExportError> {
        let (_, bytes) = source_dtype_bytes(self.model, name, values)?;
        if self.writer.contains(name) {
            return Err(ExportError::AlreadyReplaced {
                tensor: name.to_string(),
            });
        }
        self.add_source_float(name, &bytes)?;
        self.replaced += 1;
        Ok(())
    }

    fn layer(&mut self, layer: &QuantLayer) -> Result<(), ExportError> {
        self.write_layer(layer)
    }

    fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        add_extra_file(self.staging.path(), &mut self.added, name, bytes)?;
        self.user_files.push(PathBuf::from(name));
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<ExportSummary, ExportError> {
        let model = self.model;
        for (name, _) in model.weights.iter() {
            if self.writer.contains(name) {
                continue;
            }
            self.add_source_float(name, model.weights.raw_bytes(name)?)?;
            // Copied: drop the source pages so peak RSS does not grow with the model.
            model.weights.release(name)?;
        }
        let types: BTreeMap<&str, AscendType> =
            self.entries.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        self.check_linears(&types)?;
        // `ShardedWriter::new` touches no file: the placeholder is dropped unused.
        let writer = std::mem::replace(
            &mut self.writer,
            ShardedWriter::new(Path::new(""), NAMING, 1),
        );
        let written = writer.finish()?;

        let description = self.description()?;
        let staging = self.staging.path().to_path_buf();
        add_extra_file(&staging, &mut self.added, DESCRIPTION_FILE, &description)?;
        if !self.added.contains(Path::new(CONFIG_FILE)) {
            if let Some(config) = self.config_without_quantization()? {
                add_extra_file(&staging, &mut self.added, CONFIG_FILE, &config)?;
            }
        }
        let copied = copy_source_files(model, &staging, &self.added)?;
        self.verify()?;

        let this = *self;
        let output = this.staging.commit()?;
        tracing::info!(
            output = %output.display(),
            tensors = written.weight_map.len(),
            shards = written.files.len(),
            quantized_layers = this.layers.len(),
            "ascend export finished"
        );
        Ok(ExportSummary {
            output,
            shards: written.files.len(),
            tensors: written.weight_map.len(),
            replaced: this.replaced,
            tensor_bytes: written.total_size,
            copied_files: copied,
            added_files: this.user_files,
        })
    }
}

/// The bias as stored (F32): the pipeline's values rounded to the bias's source dtype, i.e.
/// what a `fake` export stores and what a bf16/fp16 engine holds.
pub(super) fn stored_bias(b: &[f32], dtype: DType) -> Vec<f32> {
    let round = match dtype {
        DType::BF16 => ScaleDtype::BF16,
        DType::F16 => ScaleDtype::F16,
        _ => ScaleDtype::F32,
    };
    b.iter().map(|&v| round.round(v)).collect()
}
