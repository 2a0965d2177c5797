//! Writing a compressed-tensors checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gs_quant::{pack_int32_cols, pack_int32_rows, packed_int32_len, Granularity, QuantType};

use super::config::{python_json, quantization_config_json, GroupSpec};
use super::{
    check_scheme, encode_floats, scale_storage_dtype, CompressedTensorsCheckpoint, CtFormat,
};
use crate::export::files::source_dtype_bytes;
use crate::export::{
    add_extra_file, copy_source_files, Codes, DecodedCheckpoint, ExportError, ExportOptions,
    ExportSummary, Exporter, QuantLayer, ShardNaming, ShardedWriter, Staging,
};
use crate::model::fakequant::ActQuant;
use crate::model::{DType, Model, CONFIG_FILE};

/// transformers' `save_pretrained` naming, with `__metadata__ {"format": "pt"}` in every shard.
pub(crate) const NAMING: ShardNaming = ShardNaming {
    stem: "model",
    index: "model.safetensors.index.json",
    metadata: Some(&[("format", "pt")]),
};

/// One tensor of a quantized layer, ready for the shard writer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Writes a compressed-tensors checkpoint of `model`: quantized layers in their format's
/// tensors, every other tensor as in the source (or as changed), config.json with
/// `quantization_config`, the source's other files; everything staged and committed at
/// [`finish`](Exporter::finish).
#[derive(Debug)]
pub struct CompressedTensorsExport<'m> {
    model: &'m Model,
    staging: Staging,
    writer: ShardedWriter,
    /// Every linear of the model, in module order (for `ignore` and group order).
    linears: Vec<String>,
    /// Quantized layers and their groups.
    layers: BTreeMap<String, GroupSpec>,
    /// Float tensors handed to [`Exporter::tensor`].
    changed: usize,
    /// Files added by [`Exporter::add_file`].
    added: BTreeSet<PathBuf>,
}

impl<'m> CompressedTensorsExport<'m> {
    /// Starts an export of `model` to `output` (see [`Staging::begin`] for what is refused).
    /// A source that already has a `quantization_config` is refused.
    pub fn begin(
        model: &'m Model,
        output: &Path,
        options: &ExportOptions,
    ) -> Result<Self, ExportError> {
        if model.config.raw.get("quantization_config").is_some() {
            return Err(ExportError::BadCheckpoint {
                file: model.config.path.clone(),
                reason:
                    "the source model already has a quantization_config; quantize a float model"
                        .into(),
            });
        }
        let staging = Staging::begin(output, &model.dir, options.force)?;
        let writer = ShardedWriter::new(staging.path(), NAMING, options.max_shard_bytes);
        tracing::info!(
            source = %model.dir.display(),
            output = %staging.output().display(),
            "compressed-tensors export started"
        );
        Ok(CompressedTensorsExport {
            model,
            staging,
            writer,
            linears: options.linears.clone(),
            layers: BTreeMap::new(),
            changed: 0,
            added: BTreeSet::new(),
        })
    }

    /// The quantized layer `tensor` belongs to as its weight, if any.
    fn consumed_by<'a>(&self, tensor: &'a str) -> Option<&'a str> {
        tensor
            .strip_suffix(".weight")
            .filter(|m| self.layers.contains_key(*m))
    }

    /// The config groups in module order of their first layer, with their targets: `Linear`
    /// when one group holds every quantized layer (and the linears are known, so `ignore` can
    /// list the others), else each group's module names.
    fn groups(&self) -> Vec<(GroupSpec, Vec<String>)> {
        let position: BTreeMap<&str, usize> = self
            .linears
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut names: Vec<&String> = self.layers.keys().collect();
        names.sort_by_key(|n| (position.get(n.as_str()).copied().unwrap_or(usize::MAX), *n));
        let mut groups: Vec<(GroupSpec, Vec<String>)> = Vec::new();
        for n in names {
            let spec = self.layers[n];
            match groups.iter_mut().find(|(s, _)| *s == spec) {
                Some((_, targets)) => targets.push(n.clone()),
                None => groups.push((spec, vec![n.clone()])),
            }
        }
        if groups.len() == 1 && !self.linears.is_empty() {
            groups[0].1 = vec!["Linear".to_string()];
        }
        groups
    }

    /// Every linear that is not quantized, in module order, and `lm_head`
    /// (`QuantizationConfig.from_pretrained` lists the untargeted modules of a quantized class).
    fn ignore(&self) -> Vec<String> {
        let mut ignore: Vec<String> = Vec::new();
        for n in self.linears.iter().map(String::as_str).chain(["lm_head"]) {
            if !self.layers.contains_key(n) && !ignore.iter().any(|i| i == n) {
                ignore.push(n.to_string());
            }
        }
        ignore
    }

    /// Warns about fused modules vLLM loads as one layer (`qkv_proj`, `gate_up_proj`) whose
    /// parts have different schemes: vLLM refuses them, or applies the first part's scheme.
    fn warn_fused_mismatch(&self) {
        for parts in [
            &["q_proj", "k_proj", "v_proj"][..],
            &["gate_proj", "up_proj"][..],
        ] {
            let mut seen: BTreeMap<&str, Vec<Option<GroupSpec>>> = BTreeMap::new();
            for n in &self.linears {
                if let Some(prefix) = parts.iter().find_map(|p| n.strip_suffix(p)) {
                    seen.entry(prefix)
                        .or_default()
                        .push(self.layers.get(n).copied());
                }
            }
            for (prefix, specs) in seen {
                if specs.windows(2).any(|w| w[0] != w[1]) {
                    tracing::warn!(
                        modules = %parts.iter().map(|p| format!("{prefix}{p}")).collect::<Vec<_>>().join(", "),
                        "vLLM fuses these linears into one layer and needs one scheme for all of them; this checkpoint will not load in vLLM"
                    );
                }
            }
        }
    }

    /// Re-opens the staged output with the decoder: every layer written decodes with the group
    /// it was written with (headers only), and every other source tensor is present unchanged
    /// in dtype and shape.
    fn verify(&self) -> Result<(), ExportError> {
        let fail = |m: String| ExportError::Verification(m);
        let ck = CompressedTensorsCheckpoint::open(self.staging.path())
            .map_err(|e| fail(format!("the written checkpoint does not decode: {e}")))?;
        let found = ck.quantized_layers();
        let expected: Vec<String> = self.layers.keys().cloned().collect();
        if found != expected {
            return Err(fail(format!(
                "the written checkpoint decodes {} quantized layers, {} were written",
                found.len(),
                expected.len()
            )));
        }
        for (name, spec) in &self.layers {
            match ck.layer_spec(name) {
                Some((_, s)) if s == spec => {}
                other => {
                    return Err(fail(format!(
                        "layer {name} decodes with {:?}, written as {spec:?}",
                        other.map(|o| o.1)
                    )))
                }
            }
        }
        for (name, info) in self.model.weights.iter() {
            if self.consumed_by(name).is_some() {
                continue;
            }
            match ck.weights().info(name) {
                Ok(o) if o.dtype() == info.dtype() && o.shape() == info.shape() => {}
                _ => {
                    return Err(fail(format!(
                        "tensor \"{name}\" is missing or changed dtype/shape"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The tensors of a quantized layer in its format (see the module docs), its scheme checked.
pub(crate) fn layer_tensors(l: &QuantLayer) -> Result<(GroupSpec, Vec<OutTensor>), String> {
    check_scheme(&l.name, &l.scheme)?;
    let name = &l.name;
    let w = l.weight_args;
    let spec = GroupSpec::of(&w, l.scheme.activations.as_ref());
    let (out, inp) = (l.out_features, l.in_features);
    let qp = &l.qparams;
    if (qp.rows, qp.cols) != (out, inp) || qp.granularity != w.granularity {
        return Err(format!(
            "layer {name}: qparams are {:?} [{}, {}], the layer is {:?} [{out}, {inp}]",
            qp.granularity, qp.rows, qp.cols, w.granularity
        ));
    }
    if let Granularity::Group(g) = w.granularity {
        if inp % g as usize != 0 {
            return Err(format!(
                "layer {name}: group size {g} does not divide the {inp} input columns (compressed-tensors refuses a short last group)"
            ));
        }
    }
    let sd = scale_storage_dtype(l.weight_dtype);
    let scale_shape = match w.granularity {
        Granularity::Tensor => vec![1],
        Granularity::Channel => vec![out, 1],
        Granularity::Group(g) => vec![out, inp / g as usize],
    };
    let n_groups = scale_shape[scale_shape.len() - 1];
    let encode = |what: &str, values: &[f32], dtype: DType| -> Result<Vec<u8>, String> {
        let bytes = encode_floats(values, dtype)
            .ok_or_else(|| format!("layer {name}: cannot store {what} as {dtype}"))?;
        // The stored value must be the one evaluated (RULES rounded it already).
        let back = super::decode_floats(&bytes, dtype).unwrap_or_default();
        if let Some(i) = values
            .iter()
            .zip(&back)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(format!(
                "layer {name}: {what} {} is not representable in {dtype}; round it with the compressed-tensors number rules (scale dtype {dtype}) before evaluation",
                values[i]
            ));
        }
        Ok(bytes)
    };
    let t = |s: &str| format!("{name}.{s}");
    let mut tensors = Vec::new();
    let mut push = |n: String, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>| {
        tensors.push(OutTensor {
            name: n,
            dtype,
            shape,
            bytes,
        })
    };
    match (&l.codes, spec.format) {
        (Codes::Int(q), CtFormat::Pack) => {
            let words =
                pack_int32_rows(q, out, inp, w.bits).map_err(|e| format!("layer {name}: {e}"))?;
            push(
                t("weight_packed"),
                DType::I32,
                vec![out, packed_int32_len(inp, w.bits)],
                words.iter().flat_map(|v| v.to_le_bytes()).collect(),
            );
            push(
                t("weight_scale"),
                sd,
                scale_shape.clone(),
                encode("weight scale", &qp.scales, sd)?,
            );
            push(
                t("weight_shape"),
                DType::I64,
                vec![2],
                [out as i64, inp as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            );
            if !w.symmetric {
                let zp: Vec<i8> = qp.zeros.iter().map(|&z| z as i8).collect();
                let words = pack_int32_cols(&zp, out, n_groups, w.bits)
                    .map_err(|e| format!("layer {name}: zero points: {e}"))?;
                push(
                    t("weight_zero_point"),
                    DType::I32,
                    vec![packed_int32_len(out, w.bits), n_groups],
                    words.iter().flat_map(|v| v.to_le_bytes()).collect(),
                );
            }
        }
        (Codes::Int(q), _) if w.ty == QuantType::Int => {
            push(
                t("weight"),
                DType::I8,
                vec![out, inp],
                q.iter().map(|&v| v as u8).collect(),
            );
            push(
                t("weight_scale"),
                sd,
                scale_shape.clone(),
                encode("weight scale", &qp.scales, sd)?,
            );
        }
        (Codes::Fp8(c), _) if w.ty == QuantType::Float => {
            push(t("weight"), DType::F8E4M3, vec![out, inp], c.clone());
            push(
                t("weight_scale"),
                sd,
                scale_shape.clone(),
                encode("weight scale", &qp.scales, sd)?,
            );
        }
        _ => {
            return Err(format!(
                "layer {name}: its codes do not match its {:?} weights",
                w.ty
            ))
        }
    }
    if let Some(act) = spec.input.filter(|a| !a.dynamic) {
        let Some(ActQuant::Static { scale, zero, .. }) = l.input else {
            return Err(format!(
                "layer {name}: the scheme has static input activations but the layer carries no calibrated input scale"
            ));
        };
        push(
            t("input_scale"),
            sd,
            vec![1],
            encode("static input scale", &[scale], sd)?,
        );
        if act.args.symmetric {
            if zero != 0 {
                return Err(format!(
                    "layer {name}: symmetric static input quantization with zero point {zero}"
                ));
            }
        } else {
            let z = i8::try_from(zero)
                .map_err(|_| format!("layer {name}: input zero point {zero} is outside int8"))?;
            push(t("input_zero_point"), DType::I8, vec![1], vec![z as u8]);
        }
    }
    if let Some((bias, dtype)) = &l.bias {
        if bias.len() != out {
            return Err(format!(
                "layer {name}: bias has {} values for {out} outputs",
                bias.len()
            ));
        }
        let bytes = encode_floats(bias, *dtype)
            .ok_or_else(|| format!("layer {name}: cannot store the bias as {dtype}"))?;
        push(t("bias"), *dtype, vec![out], bytes);
    }
    Ok((spec, tensors))
}

impl Exporter for CompressedTensorsExport<'_> {
    fn output(&self) -> &Path {
        self.staging.output()
    }

    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), ExportError> {
        if let Some(layer) = self.consumed_by(name) {
            return Err(ExportError::Verification(format!(
                "tensor \"{name}\" is the weight of quantized layer {layer}, already written"
            )));
        }
        let (info, bytes) = source_dtype_bytes(self.model, name, values)?;
        if self.writer.contains(name) {
            return Err(ExportError::AlreadyReplaced {
                tensor: name.to_string(),
            });
        }
        self.writer.add(name, info.dtype(), info.shape(), &bytes)?;
        self.changed += 1;
        Ok(())
    }

    fn layer(&mut self, layer: &QuantLayer) -> Result<(), ExportError> {
        let name = &layer.name;
        let weight = format!("{name}.weight");
        if self.layers.contains_key(name) {
            return Err(ExportError::Verification(format!(
                "layer {name} written twice"
            )));
        }
        if self.writer.contains(&weight) {
            return Err(ExportError::Verification(format!(
                "layer {name}: its float weight was already written as a changed tensor"
            )));
        }
        let info = self.model.weights.info(&weight)?;
        if info.shape() != [layer.out_features, layer.in_features] {
            return Err(ExportError::Verification(format!(
                "layer {name}: [{}, {}] quantized, the source weight is {:?}",
                layer.out_features,
                layer.in_features,
                info.shape()
            )));
        }
        let (spec, tensors) = layer_tensors(layer).map_err(ExportError::Verification)?;
        for t in &tensors {
            self.writer.add(&t.name, t.dtype, &t.shape, &t.bytes)?;
        }
        self.model.weights.release(&weight)?;
        self.layers.insert(name.clone(), spec);
        Ok(())
    }

    fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        if Path::new(name) == Path::new(CONFIG_FILE) {
            return Err(ExportError::InvalidExtraFile {
                name: name.to_string(),
                reason: "config.json is written by the compressed-tensors export (it carries quantization_config)",
            });
        }
        add_extra_file(self.staging.path(), &mut self.added, name, bytes)
    }

    fn finish(mut self: Box<Self>) -> Result<ExportSummary, ExportError> {
        let model = self.model;
        let weights = &model.weights;
        for (name, info) in weights.iter() {
            if self.writer.contains(name) || self.consumed_by(name).is_some() {
                continue;
            }
            self.writer
                .add(name, info.dtype(), info.shape(), weights.raw_bytes(name)?)?;
            // Copied: drop the source pages so peak RSS does not grow with the model.
            weights.release(name)?;
        }
        let writer = std::mem::replace(
            &mut self.writer,
            ShardedWriter::new(self.staging.path(), NAMING, 1),
        );
        let written = writer.finish()?;
        let user_added: Vec<PathBuf> = self.added.iter().cloned().collect();
        if self.layers.is_empty() {
            tracing::warn!(
                "no layer was quantized: config.json is copied without quantization_config"
            );
        } else {
            self.warn_fused_mismatch();
            let mut config = self.model.config.raw.clone();
            let qc = quantization_config_json(&self.groups(), &self.ignore());
            if let Some(obj) = config.as_object_mut() {
                obj.insert("quantization_config".to_string(), qc);
            }
            let text = python_json(&config);
            add_extra_file(
                self.staging.path(),
                &mut self.added,
                CONFIG_FILE,
                text.as_bytes(),
            )?;
        }
        let copied = copy_source_files(self.model, self.staging.path(), &self.added)?;
        if !self.layers.is_empty() {
            self.verify()?;
        }
        let this = *self;
        let quantized = this.layers.len();
        let output = this.staging.commit()?;
        tracing::info!(
            output = %output.display(),
            quantized,
            tensors = written.weight_map.len(),
            shards = written.files.len(),
            "compressed-tensors export finished"
        );
        Ok(ExportSummary {
            output,
            shards: written.files.len(),
            tensors: written.weight_map.len(),
            replaced: this.changed + quantized,
            tensor_bytes: written.total_size,
            copied_files: copied,
            added_files: user_added,
        })
    }
}
