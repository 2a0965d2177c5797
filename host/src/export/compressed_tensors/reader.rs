//! Reading a compressed-tensors checkpoint back (FORMATS.md Part C): which layers are
//! quantized, with which group's args, and their weights decoded exactly as the format's
//! decompressor computes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gs_quant::{
    fp8_e4m3_to_f32, packed_int32_len, unpack_int32_cols, unpack_int32_rows, Granularity, QParams,
    QuantArgs, QuantType, ScaleRule,
};
use regex::Regex;
use serde_json::Value;

use super::config::{parse_quantization_config, GroupSpec, ParsedConfig};
use super::{decode_floats, dequant_rounding, CtFormat};
use crate::export::{dequantize, Codes, DecodedCheckpoint, DecodedLayer, ExportError};
use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::forward::{TensorF32, TensorSource};
use crate::model::{DType, ModelConfig, ModelError, TensorInfo, Weights, CONFIG_FILE};

/// Whether `dir/config.json` declares a compressed-tensors checkpoint
/// (`quantization_config.quant_method == "compressed-tensors"`). No config.json: `false`.
pub fn detect(dir: &Path) -> Result<bool, ExportError> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ExportError::io("read", &path)(e)),
    };
    let v: Value = serde_json::from_slice(&text).map_err(|e| ExportError::BadCheckpoint {
        file: path.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    Ok(v.pointer("/quantization_config/quant_method")
        .and_then(Value::as_str)
        == Some("compressed-tensors"))
}

/// A `targets`/`ignore` entry, matched as vLLM (`compressed_tensors/utils.py`
/// `_is_equal_or_regex_match`) and compressed-tensors (`utils/match.py`) do: `re:` + a
/// regex matched at the start of the name (`re.match`), else the exact module name; in
/// `targets`, `Linear` also matches by class (every layer with quantized tensors is a Linear).
#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Regex(Regex),
}

impl Pattern {
    fn new(s: &str) -> Result<Pattern, String> {
        match s.strip_prefix("re:") {
            Some(re) => Regex::new(&format!("^(?:{re})"))
                .map(Pattern::Regex)
                .map_err(|e| format!("invalid regex \"{s}\": {e}")),
            None => Ok(Pattern::Exact(s.to_string())),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(s) => s == name,
            Pattern::Regex(r) => r.is_match(name),
        }
    }
}

/// A quantized layer, its tensors checked at open (header level).
#[derive(Debug, Clone)]
struct LayerPlan {
    /// The config group it matched.
    group: String,
    spec: GroupSpec,
    out: usize,
    inp: usize,
    /// dtype of `X.weight_scale` (the model dtype the writer used).
    scale_dtype: DType,
}

/// A compressed-tensors checkpoint opened for evaluation (see [`DecodedCheckpoint`]).
#[derive(Debug)]
pub struct CompressedTensorsCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    weights: Weights,
    layers: BTreeMap<String, LayerPlan>,
}

impl CompressedTensorsCheckpoint {
    /// Opens `dir`: parses config.json and its `quantization_config`, maps the weights, finds
    /// the quantized layers (those with `X.weight_packed` or `X.weight_scale`), matches each to
    /// its config group (vLLM's order: `ignore`, then the first target naming the layer, then
    /// the class `Linear`) and checks every layer's tensor names, dtypes and shapes.
    pub fn open(dir: &Path) -> Result<CompressedTensorsCheckpoint, ExportError> {
        let config_path = dir.join(CONFIG_FILE);
        let config = ModelConfig::from_file(&config_path)?;
        let Some(qc) = config.raw.get("quantization_config") else {
            return Err(ExportError::BadCheckpoint {
                file: config_path,
                reason: "no quantization_config: not a compressed-tensors checkpoint".into(),
            });
        };
        let parsed = parse_quantization_config(qc, &config_path)?;
        let weights = Weights::open(dir)?;
        let layers = plan_layers(&parsed, &weights, &config_path)?;
        tracing::info!(dir = %dir.display(), quantized = layers.len(), "opened compressed-tensors checkpoint");
        Ok(CompressedTensorsCheckpoint {
            dir: dir.to_path_buf(),
            config,
            weights,
            layers,
        })
    }

    /// The config group and scheme of a quantized layer.
    pub(crate) fn layer_spec(&self, layer: &str) -> Option<(&str, &GroupSpec)> {
        self.layers.get(layer).map(|p| (p.group.as_str(), &p.spec))
    }

    /// The underlying weights.
    pub(crate) fn weights(&self) -> &Weights {
        &self.weights
    }

    fn bad_tensor(&self, tensor: &str, reason: String) -> ExportError {
        bad_tensor(&self.weights, tensor, reason)
    }

    fn floats(&self, tensor: &str) -> Result<Vec<f32>, ExportError> {
        let info = self.weights.info(tensor)?;
        decode_floats(self.weights.raw_bytes(tensor)?, info.dtype()).ok_or_else(|| {
            self.bad_tensor(
                tensor,
                format!("dtype {} is not a float type", info.dtype()),
            )
        })
    }

    fn i32s(&self, tensor: &str) -> Result<Vec<i32>, ExportError> {
        Ok(self
            .weights
            .raw_bytes(tensor)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn i8s(&self, tensor: &str) -> Result<Vec<i8>, ExportError> {
        Ok(self
            .weights
            .raw_bytes(tensor)?
            .iter()
            .map(|&b| b as i8)
            .collect())
    }

    fn decode(&self, name: &str) -> Result<DecodedLayer, ExportError> {
        let Some(p) = self.layers.get(name) else {
            return Err(ExportError::BadCheckpoint {
                file: self.dir.clone(),
                reason: format!("\"{name}\" is not a quantized layer of this checkpoint"),
            });
        };
        let w = &p.spec.weights;
        let (out, inp) = (p.out, p.inp);
        let t = |s: &str| format!("{name}.{s}");
        let codes = match p.spec.format {
            CtFormat::Pack => {
                let words = self.i32s(&t("weight_packed"))?;
                let q = unpack_int32_rows(&words, out, inp, w.bits)
                    .map_err(|e| self.bad_tensor(&t("weight_packed"), e.to_string()))?;
                Codes::Int(q)
            }
            _ if w.ty == QuantType::Int => {
                let q = self.i8s(&t("weight"))?;
                let (qmin, qmax) = w.int_range();
                if let Some(i) = q
                    .iter()
                    .position(|&v| !(qmin..=qmax).contains(&i32::from(v)))
                {
                    return Err(self.bad_tensor(
                        &t("weight"),
                        format!(
                            "element {i} is {}, outside the {}-bit range [{qmin}, {qmax}]",
                            q[i], w.bits
                        ),
                    ));
                }
                Codes::Int(q)
            }
            _ => {
                let c = self.weights.raw_bytes(&t("weight"))?.to_vec();
                if let Some(i) = c.iter().position(|&b| fp8_e4m3_to_f32(b).is_nan()) {
                    return Err(self.bad_tensor(
                        &t("weight"),
                        format!("element {i} is an FP8 E4M3 NaN (0x{:02X})", c[i]),
                    ));
                }
                Codes::Fp8(c)
            }
        };
        let scales = self.floats(&t("weight_scale"))?;
        let zeros = if w.symmetric || w.ty == QuantType::Float {
            Vec::new()
        } else {
            let zp_name = t("weight_zero_point");
            let n_groups = scales.len() / out.max(1);
            let zp: Vec<i8> = match (p.spec.format, w.granularity) {
                (CtFormat::Pack, Granularity::Channel | Granularity::Group(_)) => {
                    unpack_int32_cols(&self.i32s(&zp_name)?, out, n_groups, w.bits)
                        .map_err(|e| self.bad_tensor(&zp_name, e.to_string()))?
                }
                _ => self.i8s(&zp_name)?,
            };
            let (qmin, qmax) = w.int_range();
            if let Some(i) = zp
                .iter()
                .position(|&z| !(qmin..=qmax).contains(&i32::from(z)))
            {
                return Err(self.bad_tensor(
                    &zp_name,
                    format!("zero point {i} is {}, outside [{qmin}, {qmax}]", zp[i]),
                ));
            }
            zp.into_iter().map(i32::from).collect()
        };
        let qparams = QParams::new(w.granularity, out, inp, scales, zeros)
            .map_err(|e| self.bad_tensor(&t("weight_scale"), e.to_string()))?;
        let mut dequantized = dequantize(&codes, &qparams)
            .map_err(|e| self.bad_tensor(&t("weight_scale"), e.to_string()))?;
        if let Some(dt) = dequant_rounding(p.scale_dtype) {
            dequantized.iter_mut().for_each(|v| *v = dt.round(*v));
        }
        let bias = if self.weights.contains(&t("bias")) {
            Some(self.weights.to_f32(&t("bias"))?)
        } else {
            None
        };
        Ok(DecodedLayer {
            name: name.to_string(),
            codes,
            qparams,
            dequantized,
            bias,
            input: self.input(name)?,
        })
    }

    fn input(&self, layer: &str) -> Result<Option<ActQuant>, ExportError> {
        let Some(act) = self.layers.get(layer).and_then(|p| p.spec.input) else {
            return Ok(None);
        };
        let args = QuantArgs {
            scale_rule: ScaleRule::HalfRange,
            ..act.args
        };
        if act.dynamic {
            return Ok(Some(ActQuant::Dynamic(args)));
        }
        let name = format!("{layer}.input_scale");
        let scale = self.floats(&name)?[0];
        if !(scale.is_finite() && scale > 0.0) {
            return Err(self.bad_tensor(
                &name,
                format!("the scale {scale} is not positive and finite"),
            ));
        }
        let zero = if args.symmetric {
            0
        } else {
            i32::from(self.i8s(&format!("{layer}.input_zero_point"))?[0])
        };
        Ok(Some(ActQuant::Static { args, scale, zero }))
    }
}

/// `BadCheckpoint` naming the shard that holds `tensor` (the directory if there is none).
fn bad_tensor(weights: &Weights, tensor: &str, reason: String) -> ExportError {
    let file = weights
        .shard_of(tensor)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| weights.dir().to_path_buf());
    ExportError::BadCheckpoint {
        file,
        reason: format!("tensor \"{tensor}\": {reason}"),
    }
}

/// Finds and checks every quantized layer (see [`CompressedTensorsCheckpoint::open`]).
fn plan_layers(
    parsed: &ParsedConfig,
    weights: &Weights,
    config_path: &Path,
) -> Result<BTreeMap<String, LayerPlan>, ExportError> {
    let bad_config = |reason: String| ExportError::BadCheckpoint {
        file: config_path.to_path_buf(),
        reason,
    };
    let ignore = parsed
        .ignore
        .iter()
        .map(|s| Pattern::new(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_config(format!("quantization_config.ignore: {e}")))?;
    let mut targets = Vec::new();
    for g in &parsed.groups {
        for t in &g.targets {
            let p = Pattern::new(t).map_err(|e| {
                bad_config(format!(
                    "quantization_config.config_groups.{}.targets: {e}",
                    g.name
                ))
            })?;
            targets.push((g, t.as_str(), p));
        }
    }
    let modules: std::collections::BTreeSet<&str> = weights
        .names()
        .filter_map(|n| {
            n.strip_suffix(".weight_packed")
                .or_else(|| n.strip_suffix(".weight_scale"))
        })
        .collect();
    let mut layers = BTreeMap::new();
    for m in modules {
        let example = if weights.contains(&format!("{m}.weight_packed")) {
            format!("{m}.weight_packed")
        } else {
            format!("{m}.weight_scale")
        };
        if let Some(i) = parsed
            .ignore
            .iter()
            .zip(&ignore)
            .find(|(_, p)| p.matches(m))
        {
            return Err(bad_tensor(
                weights,
                &example,
                format!("layer \"{m}\" has quantized tensors but quantization_config.ignore lists it (\"{}\")", i.0),
            ));
        }
        let group = targets
            .iter()
            .find(|(_, _, p)| p.matches(m))
            .or_else(|| targets.iter().find(|(_, t, _)| *t == "Linear"))
            .map(|(g, _, _)| *g);
        let Some(group) = group else {
            return Err(bad_tensor(
                weights,
                &example,
                format!("layer \"{m}\" has quantized tensors but matches no target of quantization_config.config_groups"),
            ));
        };
        let Some(spec) = group.spec else {
            return Err(bad_tensor(
                weights,
                &example,
                format!("layer \"{m}\" has quantized tensors but its config group \"{}\" does not quantize weights", group.name),
            ));
        };
        let plan = check_layer(weights, m, &group.name, spec)?;
        layers.insert(m.to_string(), plan);
    }
    // A target naming a module exactly must have been quantized.
    for (g, t, p) in &targets {
        if let (Pattern::Exact(name), Some(_)) = (p, g.spec) {
            if *t != "Linear"
                && !layers.contains_key(name.as_str())
                && weights.contains(&format!("{name}.weight"))
            {
                return Err(bad_tensor(
                    weights,
                    &format!("{name}.weight"),
                    format!("config group \"{}\" targets \"{name}\", but the layer is stored unquantized (no {name}.weight_scale)", g.name),
                ));
            }
        }
    }
    Ok(layers)
}

/// Checks the tensors of layer `m` against its group (FORMATS.md Part C, steps 3–7).
fn check_layer(
    weights: &Weights,
    m: &str,
    group: &str,
    spec: GroupSpec,
) -> Result<LayerPlan, ExportError> {
    let t = |s: &str| format!("{m}.{s}");
    let w = spec.weights;
    let anchor = if weights.contains(&t("weight_packed")) {
        t("weight_packed")
    } else {
        t("weight_scale")
    };
    let require = |name: &str| -> Result<&TensorInfo, ExportError> {
        weights.info(name).map_err(|_| {
            bad_tensor(
                weights,
                &anchor,
                format!(
                    "tensor \"{name}\" is missing (required by format {} of group \"{group}\")",
                    spec.format.name()
                ),
            )
        })
    };
    // `shapes`: the accepted shapes (empty: any).
    let expect = |name: &str, info: &TensorInfo, dtypes: &[DType], shapes: &[&[usize]]| {
        if !dtypes.contains(&info.dtype()) {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(bad_tensor(
                weights,
                name,
                format!(
                    "dtype {} where {} is expected",
                    info.dtype(),
                    names.join(" or ")
                ),
            ));
        }
        if !shapes.is_empty() && !shapes.contains(&info.shape()) {
            return Err(bad_tensor(
                weights,
                name,
                format!("shape {:?} where {:?} is expected", info.shape(), shapes[0]),
            ));
        }
        Ok(())
    };
    let absent = |name: &str, why: &str| {
        if weights.contains(name) {
            Err(bad_tensor(
                weights,
                name,
                format!("unexpected tensor: {why}"),
            ))
        } else {
            Ok(())
        }
    };
    const FLOATS: &[DType] = &[DType::BF16, DType::F16, DType::F32, DType::F64];
    let (out, inp) = match spec.format {
        CtFormat::Pack => {
            let shape_name = t("weight_shape");
            let info = require(&shape_name)?;
            expect(&shape_name, info, &[DType::I64, DType::I32], &[&[2]])?;
            let raw = weights.raw_bytes(&shape_name)?;
            let dims: Vec<i64> = match info.dtype() {
                DType::I64 => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
                _ => raw
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            };
            let (Ok(out), Ok(inp)) = (usize::try_from(dims[0]), usize::try_from(dims[1])) else {
                return Err(bad_tensor(
                    weights,
                    &shape_name,
                    format!("negative dimensions {dims:?}"),
                ));
            };
            let packed = t("weight_packed");
            let info = require(&packed)?;
            expect(
                &packed,
                info,
                &[DType::I32],
                &[&[out, packed_int32_len(inp, w.bits)]],
            )?;
            absent(
                &t("weight"),
                "a pack-quantized layer stores weight_packed, not weight",
            )?;
            (out, inp)
        }
        _ => {
            let name = t("weight");
            let info = require(&name)?;
            let dtype = match w.ty {
                QuantType::Int => DType::I8,
                QuantType::Float => DType::F8E4M3,
            };
            expect(&name, info, &[dtype], &[])?;
            let [out, inp] = info.shape()[..] else {
                return Err(bad_tensor(
                    weights,
                    &name,
                    format!("shape {:?} is not a matrix", info.shape()),
                ));
            };
            absent(
                &t("weight_packed"),
                "only pack-quantized layers store weight_packed",
            )?;
            (out, inp)
        }
    };
    let scale_shape: Vec<usize> = match w.granularity {
        Granularity::Tensor => vec![1],
        Granularity::Channel => vec![out, 1],
        Granularity::Group(g) => vec![out, inp.div_ceil(g as usize)],
    };
    let scale = t("weight_scale");
    let info = require(&scale)?;
    // A per-tensor scale may also be a 0-d tensor (older writers).
    let scalar: &[&[usize]] = &[&[1], &[]];
    let scale_shapes: &[&[usize]] = match w.granularity {
        Granularity::Tensor => scalar,
        _ => &[&scale_shape],
    };
    expect(&scale, info, FLOATS, scale_shapes)?;
    let scale_dtype = info.dtype();
    let zp = t("weight_zero_point");
    if w.symmetric || w.ty == QuantType::Float {
        absent(&zp, "the weights are symmetric")?;
    } else {
        let info = require(&zp)?;
        match (spec.format, w.granularity) {
            (CtFormat::Pack, Granularity::Channel | Granularity::Group(_)) => {
                let shape = [packed_int32_len(out, w.bits), scale_shape[1]];
                expect(&zp, info, &[DType::I32], &[&shape])?;
            }
            _ => expect(&zp, info, &[DType::I8], scale_shapes)?,
        }
    }
    if let Some(act) = spec.input.filter(|a| !a.dynamic) {
        let name = t("input_scale");
        expect(&name, require(&name)?, FLOATS, scalar)?;
        let zname = t("input_zero_point");
        if act.args.symmetric {
            absent(&zname, "the input activations are symmetric")?;
        } else {
            expect(&zname, require(&zname)?, &[DType::I8], scalar)?;
        }
    }
    Ok(LayerPlan {
        group: group.to_string(),
        spec,
        out,
        inp,
        scale_dtype,
    })
}

/// A decoding error as the model layer reports errors (the forward pass reads tensors through
/// [`TensorSource`]).
fn to_model_error(e: ExportError, dir: &Path) -> ModelError {
    match e {
        ExportError::Model(e) => e,
        ExportError::BadCheckpoint { file, reason }
            if file.extension().is_some_and(|x| x == "safetensors") =>
        {
            ModelError::ShardHeader {
                path: file,
                message: reason,
            }
        }
        ExportError::BadCheckpoint { file, reason } => ModelError::ConfigInconsistent {
            path: file,
            message: reason,
        },
        other => ModelError::ConfigInconsistent {
            path: dir.to_path_buf(),
            message: other.to_string(),
        },
    }
}

impl TensorSource for CompressedTensorsCheckpoint {
    /// `X.weight` of a quantized layer is its decoded `[out, in]` weight; every other tensor is
    /// read as stored.
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        if let Some(layer) = name.strip_suffix(".weight") {
            if let Some(p) = self.layers.get(layer) {
                let d = self
                    .decode(layer)
                    .map_err(|e| to_model_error(e, &self.dir))?;
                return Ok(Some(TensorF32 {
                    shape: vec![p.out, p.inp],
                    values: std::borrow::Cow::Owned(d.dequantized),
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

impl DecodedCheckpoint for CompressedTensorsCheckpoint {
    fn format(&self) -> ExportFormat {
        ExportFormat::CompressedTensors
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn quantized_layers(&self) -> Vec<String> {
        self.layers.keys().cloned().collect()
    }

    fn decode_layer(&self, name: &str) -> Result<DecodedLayer, ExportError> {
        self.decode(name)
    }

    fn input_quant(&self, layer: &str) -> Result<Option<ActQuant>, ExportError> {
        self.input(layer)
    }
}
