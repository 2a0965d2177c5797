//! The block scheduler: walks the decoder blocks one at a time and runs the pipeline on each
//! block's subsets.
//!
//! Only one block's weights are held in f32 at a time (plus, in a calibrated run, the
//! calibration activations `[nsamples · seqlen, hidden]`); the rest of the model stays
//! memory-mapped and each source tensor's pages are released once converted. Within a block
//! the order is *stage-major*: stage 1 runs on every subset of the block, then stage 2, … (so a
//! smoothing stage has folded all its scales before a quantizing stage sees the weights).
//! Changed tensors go to a sink (the exporter) as soon as their block is done.
//!
//! With calibration data, each block runs on the calibration activations: statistics a stage
//! requests are computed in one forward pass over the block (every missing subset at once),
//! cached, and dropped exactly where a transform changed an upstream module, so a later subset
//! is calibrated on the inputs the already-transformed modules produce. After the pipeline the
//! block's output is recomputed with the transformed weights and fed to the next block
//! (sequential, GPTQ-style), or the float block output is fed instead (`[run] sequential =
//! false`).

use std::collections::BTreeMap;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::path::PathBuf;

use gs_plugin_api::StatsRequest;
use gs_quant::{Granularity, QParams, Scheme};
use indicatif::{ProgressBar, ProgressStyle};

use crate::arch::{BlockSubset, Family, LinearRole, PrevOpKind, Tap};
use crate::data::Windows;
use crate::device::Device;
use crate::manifest::QuantPlan;
use crate::model::forward::{
    attention_forward, block_forward, linear_shape, mlp_forward, tap_width, BlockWeights, Decoder,
    ForwardError, TensorF32, TensorSource,
};
use crate::model::{Model, ModelError};
use crate::plugins::{
    AlgorithmInstance, LayerState, ModuleForward, PluginError, PrevOpState, SubsetRun,
};
use crate::stats::{Accumulator, InputStats, StatsCache, TapRank};

/// Why a scheduled run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    ShapeMismatch(Box<ShapeMismatch>),
    #[error("tensor {name}: expected a 2-D weight, found shape {shape:?}")]
    NotAMatrix { name: String, shape: Vec<usize> },
    #[error("{layer} ([{out}, {inp}]): group size {group} does not divide its {inp} input columns; choose a group size that divides every quantized layer, or override this layer in [[quant.override]]")]
    GroupSize {
        layer: String,
        out: usize,
        inp: usize,
        group: u32,
    },
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("{0}")]
    Sink(String),
}

/// A block linear whose shape disagrees with config.json.
#[derive(Debug, thiserror::Error)]
#[error("tensor {tensor} has shape {found:?}, but {config} implies {expected:?} for the {role} projection ({why}); the checkpoint and its config.json disagree")]
pub struct ShapeMismatch {
    pub tensor: String,
    pub found: Vec<usize>,
    pub expected: Vec<usize>,
    pub role: &'static str,
    pub why: &'static str,
    pub config: String,
}

/// What happened to one linear layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub name: String,
    pub scheme: Scheme,
    pub qparams: Option<QParams>,
    /// `(algorithm, key, value)` as reported by plugins.
    pub metrics: Vec<(String, String, f64)>,
}

/// Summary of a scheduled run.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub blocks: usize,
    pub layers: Vec<LayerReport>,
    /// Tensors handed to the sink (weights, biases, prev_op weights that changed).
    pub tensors_written: usize,
    /// Forward passes run to compute statistics (one per block unless a transform made
    /// statistics stale and a later stage needed them again).
    pub stats_passes: usize,
}

/// The linear layers of every block, with full names, in block order.
pub fn all_linears(family: &Family, model: &Model) -> Vec<String> {
    (0..model.config.num_hidden_layers)
        .flat_map(|b| family.block_linears(b))
        .collect()
}

/// Checks, before any work and without reading tensor data, that every linear layer exists
/// with the shape config.json implies and that its scheme fits it (a group size must divide
/// the input columns).
pub fn validate(family: &Family, model: &Model, plan: &QuantPlan) -> Result<(), ScheduleError> {
    let c = &model.config;
    for block in 0..c.num_hidden_layers {
        for role in LinearRole::ALL {
            let expected = linear_shape(c, role);
            let why = match role {
                LinearRole::Q => "num_attention_heads·head_dim × hidden_size",
                LinearRole::K | LinearRole::V => "num_key_value_heads·head_dim × hidden_size",
                LinearRole::O => "hidden_size × num_attention_heads·head_dim",
                LinearRole::Gate | LinearRole::Up => "intermediate_size × hidden_size",
                LinearRole::Down => "hidden_size × intermediate_size",
            };
            let tensor = family.block_tensor(block, family.modules.linear(role), "weight");
            let found = model.weights.info(&tensor)?.shape().to_vec();
            if found != expected {
                return Err(ScheduleError::ShapeMismatch(Box::new(ShapeMismatch {
                    tensor,
                    found,
                    expected: expected.to_vec(),
                    role: role.name(),
                    why,
                    config: c.path.display().to_string(),
                })));
            }
        }
    }
    for name in all_linears(family, model) {
        let (out, inp) = matrix_shape(model, &format!("{name}.weight"))?;
        if let Some(w) = plan.scheme_for(&name).weights {
            if let Granularity::Group(g) = w.granularity {
                if g == 0 || inp % g as usize != 0 {
                    return Err(ScheduleError::GroupSize {
                        layer: name,
                        out,
                        inp,
                        group: g,
                    });
                }
            }
        }
    }
    Ok(())
}

fn matrix_shape(model: &Model, tensor: &str) -> Result<(usize, usize), ScheduleError> {
    let shape = model.weights.info(tensor)?.shape().to_vec();
    match shape[..] {
        [out, inp] => Ok((out, inp)),
        _ => Err(ScheduleError::NotAMatrix {
            name: tensor.to_string(),
            shape,
        }),
    }
}

/// The f32 tensors of the block being processed, loaded on first use.
struct BlockTensors<'m> {
    model: &'m Model,
    values: BTreeMap<String, Vec<f32>>,
    changed: BTreeMap<String, bool>,
}

impl<'m> BlockTensors<'m> {
    fn new(model: &'m Model) -> Self {
        Self {
            model,
            values: BTreeMap::new(),
            changed: BTreeMap::new(),
        }
    }

    fn load(&mut self, name: &str) -> Result<&Vec<f32>, ModelError> {
        if !self.values.contains_key(name) {
            let v = self.model.weights.to_f32(name)?;
            // The f32 copy is what the block works on; the mapped source pages can go.
            self.model.weights.release(name)?;
            self.values.insert(name.to_string(), v);
        }
        Ok(&self.values[name])
    }

    fn get(&mut self, name: &str) -> Result<Vec<f32>, ScheduleError> {
        Ok(self.load(name)?.clone())
    }

    fn put(&mut self, name: &str, v: Vec<f32>) {
        self.values.insert(name.to_string(), v);
        self.changed.insert(name.to_string(), true);
    }

    /// Loads every tensor of the block (`prefix.*`), so the forward can read them by name.
    fn load_block(&mut self, prefix: &str) -> Result<(), ModelError> {
        let dotted = format!("{prefix}.");
        let names: Vec<String> = self
            .model
            .weights
            .names()
            .filter(|n| n.starts_with(&dotted))
            .map(str::to_string)
            .collect();
        for n in names {
            self.load(&n)?;
        }
        Ok(())
    }
}

/// The block's current (possibly transformed) tensors, as the forward reads them.
impl TensorSource for BlockTensors<'_> {
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        let Some(values) = self.values.get(name) else {
            return Ok(None);
        };
        Ok(Some(TensorF32 {
            shape: self.model.weights.info(name)?.shape().to_vec(),
            values: Cow::Borrowed(values),
        }))
    }

    fn dir(&self) -> PathBuf {
        self.model.dir.clone()
    }
}

/// The calibration data of a run.
pub struct Calibration<'a> {
    pub windows: &'a Windows,
    /// `true`: each block's input is the previous block's output computed with its transformed
    /// weights (GPTQ-style); `false`: the float model's block outputs.
    pub sequential: bool,
    /// Where the forward passes run.
    pub device: &'a dyn Device,
    /// Tokens per forward call, rounded down to whole sequences (at least one): bounds the
    /// activations — the MLP intermediate alone is `[tokens, ffn]` — without changing results,
    /// since attention never crosses sequences and every other op works row by row.
    pub chunk_tokens: usize,
}

/// Receives `(tensor name, f32 values)` for every tensor a block changed (the exporter).
pub type TensorSink<'a> = dyn FnMut(&str, &[f32]) -> Result<(), String> + 'a;

/// Runs `stages` over every block of `model`; `sink(tensor name, values)` receives every
/// tensor that changed, block by block.
pub fn run(
    model: &Model,
    family: &Family,
    plan: &QuantPlan,
    stages: &mut [AlgorithmInstance],
    calibration: Option<&Calibration<'_>>,
    sink: &mut TensorSink<'_>,
) -> Result<RunSummary, ScheduleError> {
    let n_blocks = model.config.num_hidden_layers;
    let bar = ProgressBar::new(n_blocks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} blocks, {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("quantizing");
    let mut summary = RunSummary {
        blocks: n_blocks,
        ..Default::default()
    };
    // Everything any stage asks for is computed in the same pass.
    let request = stages
        .iter()
        .fold(StatsRequest::NONE, |acc, s| acc | s.required);
    let mut hidden = match calibration {
        Some(c) => Some(Decoder::new(model)?.embed(c.windows.ids())?),
        None => None,
    };
    for block in 0..n_blocks {
        let _span = tracing::info_span!("block", block).entered();
        let subsets = family.block_subsets(block);
        let mut tensors = BlockTensors::new(model);
        let mut reports: BTreeMap<String, LayerReport> = BTreeMap::new();
        let mut cache = StatsCache::default();
        let mut calib = match (calibration, hidden.as_mut()) {
            (Some(c), Some(h)) => {
                tensors.load_block(&family.block_prefix(block))?;
                let float_out = if c.sequential {
                    None
                } else {
                    let mut out = h.clone();
                    forward_block(model, family, block, &tensors, c, &mut out, &mut |_, _| {})?;
                    Some(out)
                };
                Some((c, h, float_out))
            }
            _ => None,
        };
        for stage in stages.iter_mut() {
            for (si, subset) in subsets.iter().enumerate() {
                let _s = tracing::debug_span!("subset", subset = %subset.name).entered();
                let needed = stage.required;
                if let Some((c, h, _)) = calib.as_mut() {
                    if cache.needs(&subset.name, needed) {
                        collect_stats(
                            model, family, block, &subsets, &tensors, c, h, request, &mut cache,
                        )?;
                        summary.stats_passes += 1;
                    }
                }
                let stats = if needed.is_empty() {
                    None
                } else {
                    cache.get(&subsets[si].name, needed)
                };
                let mut run = subset_run(model, plan, block, subset, &mut tensors)?;
                run.stats = stats.map(|s| s as &dyn crate::stats::SubsetStats);
                let module = calib.as_ref().map(|(c, h, _)| InspectedModule {
                    model,
                    family,
                    block,
                    subset,
                    tensors: &tensors,
                    calibration: c,
                    block_input: h,
                    input: OnceCell::new(),
                    weights: OnceCell::new(),
                });
                run.forward = module.as_ref().map(|m| m as &dyn ModuleForward);
                stage.transform(&mut run)?;
                // Keep only what the stage changed; the borrows of `tensors` end here.
                let SubsetRun {
                    layers, prev_op, ..
                } = run;
                drop(module);
                let changed = write_back(&mut tensors, &mut reports, layers, prev_op);
                if let Some(from) = changed
                    .iter()
                    .filter_map(|t| invalidates_from(family, block, t))
                    .min()
                {
                    let dropped = cache.invalidate_from(from);
                    if !dropped.is_empty() {
                        tracing::debug!(?dropped, "statistics made stale by {}", stage.name);
                    }
                }
            }
        }
        if let Some((c, h, float_out)) = calib {
            match float_out {
                Some(out) => *h = out,
                None => forward_block(model, family, block, &tensors, c, h, &mut |_, _| {})?,
            }
        }
        for (name, changed) in &tensors.changed {
            if *changed {
                let v = &tensors.values[name];
                sink(name, v).map_err(ScheduleError::Sink)?;
                summary.tensors_written += 1;
            }
        }
        summary.layers.extend(reports.into_values());
        bar.inc(1);
        tracing::debug!(block, "block done");
    }
    bar.finish_and_clear();
    Ok(summary)
}

/// Default calibration tokens per forward call (see [`Calibration::chunk_tokens`]).
pub const CHUNK_TOKENS: usize = 1024;

/// Runs block `block` with its current tensors on `h` (updated in place), a chunk of
/// sequences at a time; `tap` sees each subset input chunk by chunk, in token order.
fn forward_block(
    model: &Model,
    family: &Family,
    block: usize,
    tensors: &BlockTensors<'_>,
    c: &Calibration<'_>,
    h: &mut [f32],
    tap: &mut dyn FnMut(Tap, &[f32]),
) -> Result<(), ScheduleError> {
    // Borrows the block's tensors: no copy of the weights per pass.
    let w = BlockWeights::load_from(&model.config, family, block, tensors)?;
    let seqlen = c.windows.seqlen();
    let per_chunk = (c.chunk_tokens / seqlen).max(1) * seqlen * model.config.hidden_size;
    for chunk in h.chunks_mut(per_chunk) {
        let n = chunk.len() / (seqlen * model.config.hidden_size);
        block_forward(c.device, &model.config, &w, chunk, n, seqlen, tap)?;
    }
    Ok(())
}

/// One forward pass over the block's calibration input that computes `request` for every
/// subset whose statistics are missing, and caches them.
#[allow(clippy::too_many_arguments)]
fn collect_stats(
    model: &Model,
    family: &Family,
    block: usize,
    subsets: &[BlockSubset],
    tensors: &BlockTensors<'_>,
    c: &Calibration<'_>,
    h: &[f32],
    request: StatsRequest,
    cache: &mut StatsCache,
) -> Result<(), ScheduleError> {
    let mut pending: Vec<(usize, Option<Accumulator>)> = subsets
        .iter()
        .enumerate()
        .filter(|(_, s)| cache.needs(&s.name, request))
        .map(|(i, _)| (i, None))
        .collect();
    let mut failure = None;
    let mut tap = |t: Tap, x: &[f32]| {
        for (i, acc) in pending.iter_mut() {
            if subsets[*i].tap != t {
                continue;
            }
            let k = tap_width(&model.config, t);
            let acc = acc.get_or_insert_with(|| Accumulator::new(request, k));
            acc.observe(x, &mut |x, m, k, h| {
                if let Err(e) = c.device.xtx_accumulate_f64(x, m, k, h) {
                    failure.get_or_insert(e);
                }
            });
        }
    };
    let mut scratch = h.to_vec();
    forward_block(model, family, block, tensors, c, &mut scratch, &mut tap)?;
    if let Some(e) = failure {
        return Err(ForwardError::from(e).into());
    }
    for (i, acc) in pending {
        let stats: InputStats = acc.map(Accumulator::finish).unwrap_or_default();
        tracing::debug!(subset = %subsets[i].name, tokens = stats.tokens, "statistics computed");
        cache.insert(&subsets[i].name, subsets[i].tap.rank(), stats);
    }
    Ok(())
}

/// The module-forward service of one subset: runs its inspected module (attention through
/// o_proj, the MLP through down_proj, or the single linear) on the subset's calibration input
/// with candidate weights. The input and the block's weights are computed once per transform
/// call, so a search calling it many times pays only for the module itself.
struct InspectedModule<'a, 'm> {
    model: &'m Model,
    family: &'a Family,
    block: usize,
    subset: &'a BlockSubset,
    tensors: &'a BlockTensors<'m>,
    calibration: &'a Calibration<'a>,
    block_input: &'a [f32],
    /// The subset input `X: [tokens, in]` at the subset's tap.
    input: OnceCell<Vec<f32>>,
    weights: OnceCell<BlockWeights<'a>>,
}

impl<'a> InspectedModule<'a, '_> {
    fn tokens(&self) -> usize {
        self.calibration.windows.n() * self.calibration.windows.seqlen()
    }

    fn input(&self) -> Result<&[f32], String> {
        if let Some(x) = self.input.get() {
            return Ok(x);
        }
        let mut captured = Vec::new();
        let mut h = self.block_input.to_vec();
        let tap = self.subset.tap;
        forward_block(
            self.model,
            self.family,
            self.block,
            self.tensors,
            self.calibration,
            &mut h,
            &mut |t, x| {
                if t == tap {
                    captured.extend_from_slice(x);
                }
            },
        )
        .map_err(|e| e.to_string())?;
        if captured.len() != self.tokens() * tap_width(&self.model.config, tap) {
            return Err(format!(
                "the block forward gave {} input values for subset `{}`",
                captured.len(),
                self.subset.name
            ));
        }
        Ok(self.input.get_or_init(|| captured))
    }

    fn weights(&self) -> Result<&BlockWeights<'a>, String> {
        if let Some(w) = self.weights.get() {
            return Ok(w);
        }
        let w = BlockWeights::load_from(&self.model.config, self.family, self.block, self.tensors)
            .map_err(|e| e.to_string())?;
        Ok(self.weights.get_or_init(|| w))
    }

    fn role_of(&self, layer: &str) -> Option<LinearRole> {
        let prefix = format!("{}.", self.family.block_prefix(self.block));
        self.family.modules.role_of(layer.strip_prefix(&prefix)?)
    }
}

impl ModuleForward for InspectedModule<'_, '_> {
    fn output_len(&self) -> usize {
        self.tokens() * self.model.config.hidden_size
    }

    fn forward(
        &self,
        layers: &[LayerState],
        overrides: &[(usize, &[f32])],
        out: &mut [f32],
    ) -> Result<(), String> {
        let x = self.input()?;
        let mut w = self.weights()?.borrowed();
        // The subset's layers as the plugin currently has them, then the candidates.
        for (i, l) in layers.iter().enumerate() {
            let role = self
                .role_of(&l.name)
                .ok_or_else(|| format!("{} has no role in the family file", l.name))?;
            let weight = overrides
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(l.weight.as_slice(), |(_, c)| c);
            w.linear_mut(role).weight = Cow::Borrowed(weight);
        }
        let dev = self.calibration.device;
        let (n, seqlen) = (
            self.calibration.windows.n(),
            self.calibration.windows.seqlen(),
        );
        let y = match self.subset.tap {
            Tap::AttnInput => attention_forward(dev, &self.model.config, &w, x, n, seqlen),
            Tap::AttnContext => w.o.forward(dev, x),
            Tap::MlpInput => mlp_forward(dev, &w, x),
            Tap::MlpHidden => w.down.forward(dev, x),
        }
        .map_err(|e| e.to_string())?;
        if y.len() != out.len() {
            return Err(format!(
                "inspected module {} produced {} values, expected {}",
                self.subset.inspect,
                y.len(),
                out.len()
            ));
        }
        out.copy_from_slice(&y);
        Ok(())
    }
}

/// The first tap whose input a change to `tensor` makes stale, or `None` when no subset
/// input of the block depends on it (down_proj, or a tensor outside the block).
fn invalidates_from(family: &Family, block: usize, tensor: &str) -> Option<TapRank> {
    let prefix = format!("{}.", family.block_prefix(block));
    let module = tensor
        .strip_prefix(&prefix)?
        .strip_suffix(".weight")
        .or_else(|| tensor.strip_prefix(&prefix)?.strip_suffix(".bias"))?;
    let m = &family.modules;
    if module == m.input_norm {
        return Some(Tap::AttnInput.rank());
    }
    if module == m.post_attention_norm {
        return Some(Tap::MlpInput.rank());
    }
    if [&m.q_norm, &m.k_norm]
        .iter()
        .any(|n| n.as_deref() == Some(module))
    {
        return Some(Tap::AttnContext.rank());
    }
    m.role_of(module)
        .map(|r| r.input_tap().rank() + 1)
        .filter(|rank| *rank <= Tap::MlpHidden.rank())
}

/// Builds the context one stage sees of one subset, from the block's current tensors.
fn subset_run<'a>(
    model: &Model,
    plan: &QuantPlan,
    block: usize,
    subset: &BlockSubset,
    tensors: &mut BlockTensors<'_>,
) -> Result<SubsetRun<'a>, ScheduleError> {
    let mut layers = Vec::with_capacity(subset.layers.len());
    for name in &subset.layers {
        let wname = format!("{name}.weight");
        let (out, inp) = matrix_shape(model, &wname)?;
        let bname = format!("{name}.bias");
        let bias = if model.weights.contains(&bname) {
            Some(tensors.get(&bname)?)
        } else {
            None
        };
        layers.push(LayerState {
            name: name.clone(),
            out_features: out,
            in_features: inp,
            weight: tensors.get(&wname)?,
            bias,
            scheme: plan.scheme_for(name),
            qparams: None,
            weight_changed: false,
            bias_changed: false,
            metrics: Vec::new(),
        });
    }
    let prev_op = match &subset.prev_op {
        None => None,
        Some((kind, name)) => {
            let wname = format!("{name}.weight");
            let shape = model.weights.info(&wname)?.shape().to_vec();
            let (rows, cols) = match (kind, &shape[..]) {
                (PrevOpKind::Linear, [r, c]) => (*r, *c),
                (_, [n]) => (*n, 1),
                _ => return Err(ScheduleError::NotAMatrix { name: wname, shape }),
            };
            Some(PrevOpState {
                kind: match kind {
                    PrevOpKind::Norm => gs_plugin_api::PrevOpKind::NORM,
                    PrevOpKind::Linear => gs_plugin_api::PrevOpKind::LINEAR,
                    PrevOpKind::None => gs_plugin_api::PrevOpKind::NONE,
                },
                name: name.clone(),
                weight: tensors.get(&wname)?,
                rows,
                cols,
                changed: false,
            })
        }
    };
    Ok(SubsetRun {
        block,
        name: subset.name.clone(),
        inspect: subset.inspect.clone(),
        layers,
        prev_op,
        stats: None,
        forward: None,
    })
}

/// Moves what a stage changed back into the block's tensors and the layer reports; returns
/// the names of the tensors that changed.
fn write_back(
    tensors: &mut BlockTensors<'_>,
    reports: &mut BTreeMap<String, LayerReport>,
    layers: Vec<LayerState>,
    prev_op: Option<PrevOpState>,
) -> Vec<String> {
    let mut changed = Vec::new();
    let mut put = |tensors: &mut BlockTensors<'_>, name: String, v: Vec<f32>| {
        tensors.put(&name, v);
        changed.push(name);
    };
    for l in layers {
        let r = reports
            .entry(l.name.clone())
            .or_insert_with(|| LayerReport {
                name: l.name.clone(),
                scheme: l.scheme,
                qparams: None,
                metrics: Vec::new(),
            });
        if l.qparams.is_some() {
            r.qparams = l.qparams;
        }
        r.metrics.extend(l.metrics);
        if l.weight_changed {
            put(tensors, format!("{}.weight", l.name), l.weight);
        }
        if let (true, Some(b)) = (l.bias_changed, l.bias) {
            put(tensors, format!("{}.bias", l.name), b);
        }
    }
    if let Some(p) = prev_op.filter(|p| p.changed) {
        put(tensors, format!("{}.weight", p.name), p.weight);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use crate::model::testutil::{write_model, Spec};
    use crate::model::DType;

    fn plan() -> QuantPlan {
        let text = "[model]\npath = \"m\"\n[quant]\nscheme = \"w8a16\"\n[[pipeline]]\nalgorithm = \"rtn\"\n[export]\nformat = \"fake\"\noutput = \"o\"\n";
        Manifest::parse(text, std::path::Path::new("run.toml"))
            .unwrap()
            .plan
    }

    #[test]
    fn a_shape_that_disagrees_with_config_json_is_refused_before_any_work() {
        let mut spec = Spec::llama(DType::F32, 1);
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let family = crate::arch::family_for(&model.config.architectures, "c").unwrap();
        validate(&family, &model, &plan()).unwrap();

        // Same element count, transposed: only the shape check can tell.
        let t = spec
            .tensors
            .iter_mut()
            .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.shape = vec![8, 16];
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let e = validate(&family, &model, &plan()).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.1.mlp.up_proj.weight")
                && e.contains("[8, 16]")
                && e.contains("implies [16, 8]")
                && e.contains("intermediate_size × hidden_size")
                && e.contains("config.json"),
            "{e}"
        );
    }
}
