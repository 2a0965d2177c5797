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

mod watchdog;

use std::collections::BTreeMap;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::path::PathBuf;

use gs_plugin_api::{StatKind, StatsRequest};
use gs_quant::{scale_zero, Granularity, QParams, ScaleDtype, Scheme};
use indicatif::{ProgressBar, ProgressStyle};

use crate::arch::{BlockSubset, Family, LinearRole, PrevOpKind, Tap};
use crate::data::Windows;
use crate::device::Device;
use crate::eval::{EvalStream, Nll};
use crate::export::{Exporter, FinalizeError, NumberRules, QuantLayer};
use crate::manifest::QuantPlan;
use crate::model::fakequant::ActQuant;
use crate::model::forward::{
    attention_forward, block_forward, block_forward_probed, block_forward_resume,
    block_forward_until, linear_shape, mlp_forward, tap_width, BlockWeights, Decoder, ForwardError,
    TensorF32, TensorSource,
};
use crate::model::DType;
use crate::model::{Model, ModelError};
use crate::plugins::{
    AlgorithmInstance, LayerState, ModuleForward, PluginError, PrevOpState, SubsetRun,
};
use crate::stats::{Accumulator, InputStats, StatsCache, TapRank};

mod checkpoint;

pub use checkpoint::{BlockState, Checkpoint, CheckpointError, Fingerprint, SavedLayer};

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
    #[error(transparent)]
    Finalize(#[from] FinalizeError),
    #[error("the model at {} has no tensor \"{tensor}\", which {config} implies (num_hidden_layers = {blocks}, every block has the {role} projection); the checkpoint and its config.json disagree", dir.display())]
    MissingLinear {
        tensor: String,
        dir: PathBuf,
        config: String,
        blocks: usize,
        role: &'static str,
    },
    #[error("tensor \"{tensor}\" in {} has dtype {dtype}; gs-host quantizes float checkpoints (BF16, F16, F32): is this checkpoint already quantized?", file.display())]
    NotFloat {
        tensor: String,
        file: PathBuf,
        dtype: DType,
    },
    #[error("{layer}: its scheme quantizes weights, but no pipeline stage quantized it (set qparams); the output format stores quantized codes, so add a quantizing stage such as `rtn` after the others, or skip the layer in [[quant.override]]")]
    NotQuantized { layer: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{layer}: static activation quantization needs calibration data to measure the input range; add a [calibration] section or use dynamic activations")]
    StaticNeedsCalibration { layer: String },
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
    /// The decoder block the layer belongs to.
    pub block: usize,
    /// Its role in the block (`None` only for a name the family file does not know).
    pub role: Option<LinearRole>,
    pub scheme: Scheme,
    pub qparams: Option<QParams>,
    /// `(algorithm, key, value)` as reported by plugins.
    pub metrics: Vec<(String, String, f64)>,
    /// The layer's input quantizer (static ones with their calibrated scale).
    pub input: Option<ActQuant>,
    /// `‖y_q − y‖ / ‖y‖` of the layer's output on the calibration data (see [`run`]).
    pub rel_output_error: Option<f64>,
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
    /// Blocks whose stage result came from the checkpoint of an interrupted run.
    pub blocks_resumed: usize,
    /// Perplexity of the source model, when the run evaluated the `float` point.
    pub float_nll: Option<Nll>,
    /// Perplexity after the pipeline, when the run evaluated the `fake_quant` point.
    pub fake_quant_nll: Option<Nll>,
}

/// The linear layers of every block, with full names, in block order.
pub fn all_linears(family: &Family, model: &Model) -> Vec<String> {
    (0..model.config.num_hidden_layers)
        .flat_map(|b| family.block_linears(b))
        .collect()
}

/// Checks, before any work and without reading tensor data, that every linear layer exists
/// with a float dtype and the shape config.json implies, and that its scheme fits it (a group
/// size must divide the input columns).
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
            let Ok(info) = model.weights.info(&tensor) else {
                return Err(ScheduleError::MissingLinear {
                    tensor,
                    dir: model.dir.clone(),
                    config: c.path.display().to_string(),
                    blocks: c.num_hidden_layers,
                    role: role.name(),
                });
            };
            if !info.dtype().converts_to_f32() {
                return Err(ScheduleError::NotFloat {
                    file: info.shard_path().to_path_buf(),
                    dtype: info.dtype(),
                    tensor,
                });
            }
            let found = info.shape().to_vec();
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

/// Formats that store quantized codes load fused projections (q/k/v, gate/up) as one matrix
/// with one scheme: every shard of a fused group must have the same scheme.
pub fn check_fused_schemes(family: &Family, model: &Model, plan: &QuantPlan) -> Result<(), String> {
    const FUSED: [&[LinearRole]; 2] = [
        &[LinearRole::Q, LinearRole::K, LinearRole::V],
        &[LinearRole::Gate, LinearRole::Up],
    ];
    for block in 0..model.config.num_hidden_layers {
        for group in FUSED {
            let first = family.block_linear(block, group[0]);
            let scheme = plan.scheme_for(&first);
            for role in &group[1..] {
                let other = family.block_linear(block, *role);
                if plan.scheme_for(&other) != scheme {
                    return Err(format!(
                        "{first} and {other} have different schemes, but inference engines fuse them into one matrix with one scheme; make your [[quant.override]] patterns treat the whole group alike"
                    ));
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
    /// Measure each quantized layer's relative output error (see [`propagate`]); without it a
    /// sequential run skips the float block forward.
    pub output_error: bool,
    /// Where the forward passes run: the module-forward service, and chunk 0 (of every `n`)
    /// of the chunked calibration passes.
    pub device: &'a dyn Device,
    /// Further devices for the chunked calibration passes (statistics, static input ranges,
    /// propagation): chunk `i` runs on `[device, parallel…][i mod n]`, the `n` devices in
    /// parallel threads, and the chunks' results are reduced in chunk order. Chunk boundaries
    /// depend only on [`Self::chunk_tokens`], so devices computing alike give the same result
    /// for any `n`. Empty: everything on `device`.
    pub parallel: &'a [&'a dyn Device],
    /// Tokens per forward call, rounded down to whole sequences (at least one): bounds the
    /// activations — the MLP intermediate alone is `[tokens, ffn]` — without changing results,
    /// since attention never crosses sequences and every other op works row by row.
    pub chunk_tokens: usize,
}

impl Calibration<'_> {
    /// Values of one forward chunk of hidden states `[tokens, hidden]`: [`Self::chunk_tokens`]
    /// rounded down to whole sequences, at least one.
    fn chunk_len(&self, hidden: usize) -> usize {
        let seqlen = self.windows.seqlen();
        (self.chunk_tokens / seqlen).max(1) * seqlen * hidden
    }

    /// The devices of the chunked passes, `device` first.
    fn devices(&self) -> Vec<&dyn Device> {
        std::iter::once(self.device)
            .chain(self.parallel.iter().copied())
            .collect()
    }
}

/// Runs `work` on every input, chunk `i` on device `i mod n`, `n` chunks at a time in
/// parallel threads (one device: in this thread), and hands the results to `reduce` in input
/// order. At most `n` results are held at once, so a reduction that streams over the chunks
/// keeps its memory bound; the first error in chunk order is returned.
fn for_each_chunk<I: Send, R: Send>(
    devices: &[&dyn Device],
    inputs: impl IntoIterator<Item = I>,
    work: &(dyn Fn(&dyn Device, I) -> Result<R, ForwardError> + Sync),
    reduce: &mut dyn FnMut(R) -> Result<(), ScheduleError>,
) -> Result<(), ScheduleError> {
    let mut inputs = inputs.into_iter().peekable();
    let n = devices.len().max(1);
    while inputs.peek().is_some() {
        let round: Vec<I> = inputs.by_ref().take(n).collect();
        let results: Vec<Result<R, ForwardError>> = if round.len() == 1 || devices.len() < 2 {
            round
                .into_iter()
                .zip(devices.iter().cycle())
                .map(|(input, dev)| work(*dev, input))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let mut round = round.into_iter().zip(devices.iter());
                let first = round.next();
                let handles: Vec<_> = round
                    .map(|(input, dev)| scope.spawn(move || work(*dev, input)))
                    .collect();
                let mut out = Vec::with_capacity(handles.len() + 1);
                if let Some((input, dev)) = first {
                    out.push(work(*dev, input));
                }
                for h in handles {
                    // A panic in a device thread is a defect; carry it to this thread.
                    out.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                out
            })
        };
        for r in results {
            reduce(r?)?;
        }
    }
    Ok(())
}

/// Receives, block by block, the finished quantized layers and every other tensor the
/// pipeline changed (the exporter; [`Discard`] for runs that only measure).
pub trait Sink {
    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), String>;
    fn layer(&mut self, layer: &QuantLayer) -> Result<(), String>;
}

impl Sink for Box<dyn Exporter + '_> {
    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), String> {
        Exporter::tensor(self.as_mut(), name, values).map_err(|e| e.to_string())
    }
    fn layer(&mut self, layer: &QuantLayer) -> Result<(), String> {
        Exporter::layer(self.as_mut(), layer).map_err(|e| e.to_string())
    }
}

/// A [`Sink`] that keeps nothing.
#[derive(Debug, Default)]
pub struct Discard;

impl Sink for Discard {
    fn tensor(&mut self, _: &str, _: &[f32]) -> Result<(), String> {
        Ok(())
    }
    fn layer(&mut self, _: &QuantLayer) -> Result<(), String> {
        Ok(())
    }
}

/// Perplexity measured during the run, in the same pass over the blocks.
pub struct InRunEval<'a> {
    pub windows: &'a Windows,
    /// Evaluate the source model (`float` point).
    pub float: bool,
    /// Evaluate the pipeline's result with activation quantization (`fake_quant` point).
    pub fake_quant: bool,
    pub device: &'a dyn Device,
}

/// Everything a run needs besides the stages and the sink.
pub struct RunSpec<'a> {
    pub model: &'a Model,
    pub family: &'a Family,
    pub plan: &'a QuantPlan,
    /// How the output format stores quantized numbers (see [`QuantLayer::finalize`]).
    pub rules: NumberRules,
    /// `true` when the format stores codes: every layer whose scheme quantizes weights must
    /// come out of the pipeline with qparams.
    pub require_qparams: bool,
    pub calibration: Option<&'a Calibration<'a>>,
    pub eval: Option<&'a InRunEval<'a>>,
    /// Saves each block's stage result, and replays the blocks an interrupted run saved.
    pub checkpoint: Option<&'a Checkpoint>,
    /// The longest one stage may take on one subset. A call that overruns cannot be stopped:
    /// the process removes its uncommitted outputs, reports the call and exits with status 1
    /// (see [`watchdog`]). `None`: no limit.
    pub stage_timeout: Option<std::time::Duration>,
}

/// Runs `stages` over every block; the sink receives each block's quantized layers and other
/// changed tensors as soon as the block is done.
///
/// Per block: the stages (stage-major), then [`finalize_block`] (codes and stored scales of
/// every quantized layer, calibrated static input scales), then one pass that measures each
/// layer's relative output error against the float block and produces the next block's input
/// (the quantized block's output when sequential, the float block's otherwise), then the
/// evaluation streams.
pub fn run(
    spec: &RunSpec<'_>,
    stages: &mut [AlgorithmInstance],
    sink: &mut dyn Sink,
) -> Result<RunSummary, ScheduleError> {
    let RunSpec {
        model,
        family,
        plan,
        calibration,
        ..
    } = *spec;
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
    let chunk = calibration.map_or(CHUNK_TOKENS, |c| c.chunk_tokens);
    // Both evaluation streams start from the same embeddings.
    let (mut float_eval, mut fake_eval) = match spec.eval {
        Some(e) if e.float || e.fake_quant => {
            let start = EvalStream::start(&model.weights, &model.config, family, e.windows, chunk)?;
            let fake = e.fake_quant.then(|| start.clone());
            (e.float.then_some(start), fake)
        }
        _ => (None, None),
    };
    let watchdog = spec.stage_timeout.map(watchdog::Watchdog::new);
    // Learned in the first block: which stages change weights (see `collect_stats`).
    let mut modifies = vec![false; stages.len()];
    for block in 0..n_blocks {
        let _span = tracing::info_span!("block", block).entered();
        let subsets = family.block_subsets(block);
        let mut tensors = BlockTensors::new(model);
        let mut reports: BTreeMap<String, LayerReport> = BTreeMap::new();
        let mut cache = StatsCache::default();
        let mut paused: Option<Paused> = None;
        if calibration.is_some() || fake_eval.is_some() {
            tensors.load_block(&family.block_prefix(block))?;
        }
        let mut calib = match (calibration, hidden.as_mut()) {
            (Some(c), Some(h)) => Some((c, h)),
            _ => None,
        };
        let restored = match spec.checkpoint {
            Some(ck) => ck.load(block)?,
            None => None,
        };
        let replayed = restored.is_some();
        let mut pending = None;
        if let Some(state) = restored {
            // An interrupted run finished this block's stages: replay their result.
            restore_block(
                spec,
                block,
                &mut tensors,
                &mut reports,
                &mut modifies,
                state,
            )?;
            summary.blocks_resumed += 1;
        } else {
            for (k, stage) in stages.iter_mut().enumerate() {
                for (si, subset) in subsets.iter().enumerate() {
                    let _s = tracing::debug_span!("subset", subset = %subset.name).entered();
                    let needed = stage.required;
                    if let Some((c, h)) = calib.as_mut() {
                        if cache.needs(&subset.name, needed) {
                            // A stage that changes weights makes the later subsets' inputs stale:
                            // compute only this subset's tap for it.
                            let only = modifies[k].then_some(subset.tap);
                            collect_stats(
                                model,
                                family,
                                block,
                                &subsets,
                                &tensors,
                                c,
                                h,
                                request,
                                only,
                                &mut cache,
                                &mut paused,
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
                    let module = calib.as_ref().map(|(c, h)| InspectedModule {
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
                    let armed = watchdog.as_ref().map(|w| {
                        w.arm(format!(
                            "plugin `{}` algorithm `{}` on block {block} subset `{}` ({})",
                            stage.plugin.name,
                            stage.name,
                            subset.name,
                            subset.layers.join(", ")
                        ))
                    });
                    let done = stage.transform(&mut run);
                    drop(armed);
                    done?;
                    // Keep only what the stage changed; the borrows of `tensors` end here.
                    let SubsetRun {
                        layers, prev_op, ..
                    } = run;
                    drop(module);
                    let changed =
                        write_back(family, block, &mut tensors, &mut reports, layers, prev_op);
                    modifies[k] |= !changed.is_empty();
                    if let Some(from) = changed
                        .iter()
                        .filter_map(|t| invalidates_from(family, block, t))
                        .min()
                    {
                        if paused.as_ref().is_some_and(|p| p.at.rank() >= from) {
                            paused = None;
                        }
                        let dropped = cache.invalidate_from(from);
                        if !dropped.is_empty() {
                            tracing::debug!(?dropped, "statistics made stale by {}", stage.name);
                        }
                    }
                }
            }
            // Captured before finalization changes the weights; saved once the block's
            // output errors are known.
            pending = spec
                .checkpoint
                .map(|_| saved_block(&tensors, &reports, &modifies));
        }
        let finished = finalize_block(
            spec,
            block,
            &mut tensors,
            &mut reports,
            calib.as_ref().map(|(c, h)| (*c, &h[..])),
        )?;
        if let Some((c, h)) = calib {
            // A replayed block's errors come from the checkpoint: skip the float forward.
            let replay = Calibration {
                output_error: false,
                ..*c
            };
            let errors = propagate(
                spec,
                block,
                &tensors,
                &finished,
                if replayed { &replay } else { c },
                h,
            )?;
            for (name, e) in errors {
                if let Some(r) = reports.get_mut(&name) {
                    r.rel_output_error = Some(e);
                }
            }
        }
        if let (Some(ck), Some(mut state)) = (spec.checkpoint, pending) {
            for l in &mut state.layers {
                l.rel_output_error = reports.get(&l.name).and_then(|r| r.rel_output_error);
            }
            ck.record(block, &state);
        }
        if let (Some(stream), Some(e)) = (float_eval.as_mut(), spec.eval) {
            let w = BlockWeights::load_from(&model.config, family, block, &model.weights)?;
            stream.advance(e.device, &model.config, &w)?;
            drop(w);
            model
                .weights
                .release_prefix(&format!("{}.", family.block_prefix(block)));
        }
        if let (Some(stream), Some(e)) = (fake_eval.as_mut(), spec.eval) {
            let w = quantized_block(spec, block, &tensors, &finished)?;
            stream.advance(e.device, &model.config, &w)?;
        }
        let mut consumed = std::collections::BTreeSet::new();
        for l in &finished {
            sink.layer(l).map_err(ScheduleError::Sink)?;
            summary.tensors_written += 1 + usize::from(l.bias.is_some());
            consumed.insert(format!("{}.weight", l.name));
            consumed.insert(format!("{}.bias", l.name));
        }
        for (name, changed) in &tensors.changed {
            if *changed && !consumed.contains(name) {
                let v = &tensors.values[name];
                sink.tensor(name, v).map_err(ScheduleError::Sink)?;
                summary.tensors_written += 1;
            }
        }
        summary.layers.extend(reports.into_values());
        bar.inc(1);
        tracing::debug!(block, "block done");
    }
    bar.finish_and_clear();
    if let Some(e) = spec.eval {
        if let Some(stream) = float_eval {
            summary.float_nll =
                Some(stream.finish(e.device, &model.weights, &model.config, family)?);
        }
        if let Some(stream) = fake_eval {
            summary.fake_quant_nll =
                Some(stream.finish(e.device, &model.weights, &model.config, family)?);
        }
    }
    Ok(summary)
}

/// Turns the pipeline's result for one block into what the format stores and evaluation uses:
///
/// 1. every layer the scheme quantizes, with the qparams its last quantizing stage set, becomes
///    a [`QuantLayer`] (codes recovered, scales rounded to the format's dtype), and its weight
///    in `tensors` becomes the dequantized value the format's decoder computes;
/// 2. every other changed tensor, and the biases of quantized layers, are rounded to their
///    source dtype (what the output stores);
/// 3. static input scales are calibrated: per-tensor min/max of each quantized layer's input
///    over the calibration data, in a forward pass with the finished weights, then the
///    scheme's min/max rule; scales rounded to the format's dtype.
fn finalize_block(
    spec: &RunSpec<'_>,
    block: usize,
    tensors: &mut BlockTensors<'_>,
    reports: &mut BTreeMap<String, LayerReport>,
    calib: Option<(&Calibration<'_>, &[f32])>,
) -> Result<Vec<QuantLayer>, ScheduleError> {
    let (model, family) = (spec.model, spec.family);
    let mut staged = Vec::new();
    for role in LinearRole::ALL {
        let name = family.block_linear(block, role);
        let scheme = spec.plan.scheme_for(&name);
        if scheme.weights.is_none() {
            continue;
        }
        let qparams = reports.get(&name).and_then(|r| r.qparams.clone());
        let Some(qparams) = qparams else {
            if spec.require_qparams {
                return Err(ScheduleError::NotQuantized { layer: name });
            }
            continue;
        };
        let wname = format!("{name}.weight");
        let weight_dtype = model.weights.info(&wname)?.dtype();
        let bname = format!("{name}.bias");
        let bias = if model.weights.contains(&bname) {
            let dtype = model.weights.info(&bname)?.dtype();
            let mut b = tensors.get(&bname)?;
            round_to(&mut b, dtype);
            Some((b, dtype))
        } else {
            None
        };
        let w = tensors.get(&wname)?;
        let layer = QuantLayer::finalize(
            &name,
            scheme,
            weight_dtype,
            &w,
            &qparams,
            bias,
            None,
            &spec.rules,
        )?;
        tensors.put(&wname, layer.dequantized.clone());
        if let Some((b, _)) = &layer.bias {
            tensors.put(&bname, b.clone());
        }
        staged.push((role, layer));
    }
    // Other changed tensors hold exactly what the output will store. (A quantized layer's
    // weight is already what its format decodes, which need not be the source dtype: Ascend
    // dequantizes in f32.)
    let layer_weights: Vec<String> = staged
        .iter()
        .map(|(_, l)| format!("{}.weight", l.name))
        .collect();
    let changed: Vec<String> = tensors
        .changed
        .iter()
        .filter(|(n, c)| **c && !layer_weights.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    for name in changed {
        let dtype = model.weights.info(&name)?.dtype();
        if let Some(v) = tensors.values.get_mut(&name) {
            round_to(v, dtype);
        }
    }
    // Input quantizers: dynamic ones need nothing; static ones are calibrated here.
    let statics: Vec<usize> = staged
        .iter()
        .enumerate()
        .filter(|(_, (_, l))| l.scheme.activations.is_some_and(|a| !a.dynamic))
        .map(|(i, _)| i)
        .collect();
    let mut ranges: BTreeMap<Tap, (f32, f32)> = BTreeMap::new();
    if !statics.is_empty() {
        let Some((c, h)) = calib else {
            return Err(ScheduleError::StaticNeedsCalibration {
                layer: staged[statics[0]].1.name.clone(),
            });
        };
        let wanted: Vec<Tap> = statics.iter().map(|&i| staged[i].0.input_tap()).collect();
        let last = wanted.iter().copied().max_by_key(|t| t.rank());
        let mut scratch = h.to_vec();
        forward_block(
            model,
            family,
            block,
            tensors,
            c,
            &mut scratch,
            last,
            &wanted,
            &mut |t, x| {
                if wanted.contains(&t) {
                    let r = ranges
                        .entry(t)
                        .or_insert((f32::INFINITY, f32::NEG_INFINITY));
                    for &v in x {
                        r.0 = r.0.min(v);
                        r.1 = r.1.max(v);
                    }
                }
            },
        )?;
    }
    let mut finished = Vec::with_capacity(staged.len());
    for (role, mut layer) in staged {
        if let Some(act) = layer.scheme.activations {
            let calibrated = if act.dynamic {
                None
            } else {
                let (lo, hi) = ranges.get(&role.input_tap()).copied().unwrap_or((0.0, 0.0));
                let (scale, zero) = scale_zero(lo, hi, &act.args).map_err(|e| {
                    ScheduleError::Finalize(FinalizeError::Quant {
                        layer: layer.name.clone(),
                        message: format!(
                            "static input scale from the calibration range [{lo}, {hi}]: {e}"
                        ),
                    })
                })?;
                let dt = (spec.rules.scale_dtype)(layer.weight_dtype);
                let stored = dt.round(scale);
                Some((if stored > 0.0 { stored } else { dt.epsilon() }, zero))
            };
            layer.input = ActQuant::from_scheme(&act, calibrated);
        }
        if let Some(r) = reports.get_mut(&layer.name) {
            r.input = layer.input;
        }
        finished.push(layer);
    }
    Ok(finished)
}

/// `v` rounded to what `dtype` stores (BF16/F16; F32 and others unchanged).
fn round_to(v: &mut [f32], dtype: DType) {
    let dt = match dtype {
        DType::BF16 => ScaleDtype::BF16,
        DType::F16 => ScaleDtype::F16,
        _ => return,
    };
    v.iter_mut().for_each(|x| *x = dt.round(*x));
}

/// The block's finished weights with the input quantizers of its quantized layers.
fn quantized_block<'t>(
    spec: &RunSpec<'_>,
    block: usize,
    tensors: &'t BlockTensors<'_>,
    finished: &[QuantLayer],
) -> Result<BlockWeights<'t>, ScheduleError> {
    let mut w = BlockWeights::load_from(&spec.model.config, spec.family, block, tensors)?;
    for l in finished {
        if let Some(role) = role_in_block(spec.family, block, &l.name) {
            w.linear_mut(role).act = l.input;
        }
    }
    Ok(w)
}

fn role_in_block(family: &Family, block: usize, layer: &str) -> Option<LinearRole> {
    let prefix = format!("{}.", family.block_prefix(block));
    family.modules.role_of(layer.strip_prefix(&prefix)?)
}

/// One pass over the calibration data that (a) measures, for each quantized layer, the
/// relative error of its output `‖y_q − y‖ / ‖y‖` in the quantized block (finished weights,
/// input quantizers) against the float block (source weights), both run on the same block
/// input — so a layer's error includes what the quantized layers before it in the block
/// changed — and (b) replaces `h` by the next block's input: the quantized block's output
/// when sequential, the float block's otherwise. Chunked like every calibration forward.
///
/// Without [`Calibration::output_error`] only the block `h` needs is run, and nothing is
/// measured.
fn propagate(
    spec: &RunSpec<'_>,
    block: usize,
    tensors: &BlockTensors<'_>,
    finished: &[QuantLayer],
    c: &Calibration<'_>,
    h: &mut [f32],
) -> Result<BTreeMap<String, f64>, ScheduleError> {
    let cfg = &spec.model.config;
    let (run_quant, run_float) = (
        c.sequential || c.output_error,
        !c.sequential || c.output_error,
    );
    let quant = run_quant
        .then(|| quantized_block(spec, block, tensors, finished))
        .transpose()?;
    let float = run_float
        .then(|| BlockWeights::load_from(cfg, spec.family, block, &spec.model.weights))
        .transpose()?;
    let weights: &dyn TensorSource = &spec.model.weights;
    weights.release_prefix(&format!("{}.", spec.family.block_prefix(block)));
    let measured: Vec<(LinearRole, String)> = finished
        .iter()
        .filter(|_| c.output_error)
        .filter_map(|l| role_in_block(spec.family, block, &l.name).map(|r| (r, l.name.clone())))
        .collect();
    // Σ (y_q − y)², Σ y² per role.
    let mut sums: BTreeMap<LinearRole, (f64, f64)> = BTreeMap::new();
    let seqlen = c.windows.seqlen();
    let per_chunk = c.chunk_len(cfg.hidden_size);
    // Per chunk: the float block's outputs of the measured roles, and the quantized block's.
    type Outputs = (BTreeMap<LinearRole, Vec<f32>>, Vec<(LinearRole, Vec<f32>)>);
    let work = |dev: &dyn Device, chunk: &mut [f32]| -> Result<Outputs, ForwardError> {
        let n = chunk.len() / (seqlen * cfg.hidden_size);
        let mut reference: BTreeMap<LinearRole, Vec<f32>> = BTreeMap::new();
        let mut float_out = Vec::new();
        if let Some(float) = &float {
            float_out = chunk.to_vec();
            block_forward_probed(
                dev,
                cfg,
                float,
                &mut float_out,
                n,
                seqlen,
                &mut |_, _| {},
                &mut |r, y| {
                    if measured.iter().any(|(m, _)| *m == r) {
                        reference.insert(r, y.to_vec());
                    }
                },
            )?;
        }
        let mut outputs = Vec::new();
        let mut quant_out = Vec::new();
        if let Some(quant) = &quant {
            quant_out = chunk.to_vec();
            block_forward_probed(
                dev,
                cfg,
                quant,
                &mut quant_out,
                n,
                seqlen,
                &mut |_, _| {},
                &mut |r, y| {
                    if reference.contains_key(&r) {
                        outputs.push((r, y.to_vec()));
                    }
                },
            )?;
        }
        chunk.copy_from_slice(if c.sequential { &quant_out } else { &float_out });
        Ok((reference, outputs))
    };
    // The sums run in chunk order, element by element, whatever device computed the chunk.
    for_each_chunk(&c.devices(), h.chunks_mut(per_chunk), &work, &mut |(
        reference,
        outputs,
    )| {
        for (r, y) in outputs {
            if let Some(y_ref) = reference.get(&r) {
                let s = sums.entry(r).or_insert((0.0, 0.0));
                for (a, b) in y.iter().zip(y_ref) {
                    let d = f64::from(*a) - f64::from(*b);
                    s.0 += d * d;
                    s.1 += f64::from(*b) * f64::from(*b);
                }
            }
        }
        Ok(())
    })?;
    Ok(measured
        .into_iter()
        .filter_map(|(r, name)| {
            let (num, den) = sums.get(&r)?;
            Some((
                name,
                if *den > 0.0 {
                    (num / den).sqrt()
                } else {
                    num.sqrt()
                },
            ))
        })
        .collect())
}

/// Default calibration tokens per forward call (see [`Calibration::chunk_tokens`]).
pub const CHUNK_TOKENS: usize = 1024;

/// Runs block `block` with its current tensors on `h` (updated in place), a chunk of
/// sequences at a time; `tap` sees each subset input of `keep` chunk by chunk, in token order.
/// With `until`, each chunk stops after that tap (`h` is then left partly updated).
#[allow(clippy::too_many_arguments)]
fn forward_block(
    model: &Model,
    family: &Family,
    block: usize,
    tensors: &BlockTensors<'_>,
    c: &Calibration<'_>,
    h: &mut [f32],
    until: Option<Tap>,
    keep: &[Tap],
    tap: &mut dyn FnMut(Tap, &[f32]),
) -> Result<(), ScheduleError> {
    // Borrows the block's tensors: no copy of the weights per pass.
    let w = BlockWeights::load_from(&model.config, family, block, tensors)?;
    let seqlen = c.windows.seqlen();
    let per_chunk = c.chunk_len(model.config.hidden_size);
    let work = |dev: &dyn Device, chunk: &mut [f32]| {
        let n = chunk.len() / (seqlen * model.config.hidden_size);
        let mut seen: Vec<(Tap, Vec<f32>)> = Vec::new();
        let mut record = |t: Tap, x: &[f32]| {
            if keep.contains(&t) {
                seen.push((t, x.to_vec()));
            }
        };
        match until {
            Some(last) => {
                block_forward_until(dev, &model.config, &w, chunk, n, seqlen, last, &mut record)?
            }
            None => block_forward(dev, &model.config, &w, chunk, n, seqlen, &mut record)?,
        }
        Ok(seen)
    };
    for_each_chunk(&c.devices(), h.chunks_mut(per_chunk), &work, &mut |seen| {
        for (t, x) in seen {
            tap(t, &x);
        }
        Ok(())
    })
}

/// Where the block's last statistics pass stopped, chunk by chunk: the residual stream and the
/// value of tap `at`. The next pass continues from there while no module before `at` has
/// changed, so a sequential run computes each module of the block once for the statistics, not
/// once for every later subset.
struct Paused {
    at: Tap,
    /// `(h, x)` per forward chunk, in token order.
    chunks: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Largest [`Paused`] state kept (bytes); a larger one (huge calibration sets) is dropped and
/// the next pass starts from the block input, as it would without it.
const PAUSE_BUDGET: usize = 1 << 30;

/// One forward pass over the block's calibration input that computes `request` for every
/// subset whose statistics are missing (only those observed at tap `only`, when given), and
/// caches them. The forward stops at the last tap it needs, and starts from `paused` when that
/// is still valid and not past the first tap it needs; it leaves its own end in `paused`.
///
/// `XᵀX` is summed in f32 within a forward chunk (at most [`Calibration::chunk_tokens`] tokens,
/// one GEMM) and across chunks in f64.
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
    only: Option<Tap>,
    cache: &mut StatsCache,
    paused: &mut Option<Paused>,
) -> Result<(), ScheduleError> {
    let mut pending: Vec<(usize, Option<Accumulator>)> = subsets
        .iter()
        .enumerate()
        .filter(|(_, s)| cache.needs(&s.name, request) && only.is_none_or(|t| s.tap == t))
        .map(|(i, _)| (i, None))
        .collect();
    let taps = || pending.iter().map(|(i, _)| subsets[*i].tap.rank());
    let (Some(first), Some(last)) = (taps().min(), taps().max()) else {
        return Ok(());
    };
    let last = Tap::ALL[last];
    let hessian = request.contains(StatKind::HESSIAN);
    let observed: Vec<Tap> = pending.iter().map(|(i, _)| subsets[*i].tap).collect();
    let w = BlockWeights::load_from(&model.config, family, block, tensors)?;
    let seqlen = c.windows.seqlen();
    let hidden = model.config.hidden_size;
    let starts: Vec<(Option<Tap>, Vec<f32>, Vec<f32>)> =
        match paused.take().filter(|p| p.at.rank() <= first) {
            Some(p) => p
                .chunks
                .into_iter()
                .map(|(h, x)| (Some(p.at), h, x))
                .collect(),
            None => h
                .chunks(c.chunk_len(hidden))
                .map(|h| (None, h.to_vec(), Vec::new()))
                .collect(),
        };
    /// One chunk's pass: where it stopped, and every observed tap value with its `XᵀX` in f32.
    type Observed = (Vec<f32>, Vec<f32>, Vec<(Tap, Vec<f32>, Vec<f32>)>);
    let work = |dev: &dyn Device,
                (at, mut h, x): (Option<Tap>, Vec<f32>, Vec<f32>)|
     -> Result<Observed, ForwardError> {
        let n = h.len() / (seqlen * hidden);
        let mut seen = Vec::new();
        let mut failure = None;
        let mut tap = |t: Tap, x: &[f32]| {
            if !observed.contains(&t) || failure.is_some() {
                return;
            }
            // The chunk's XᵀX in f32, one device GEMM (summed across chunks in f64 below).
            let mut gram = Vec::new();
            if hessian {
                let k = tap_width(&model.config, t);
                gram.resize(k * k, 0.0f32);
                if let Err(e) = dev.xtx_accumulate(x, x.len() / k.max(1), k, &mut gram) {
                    failure = Some(e);
                    return;
                }
            }
            seen.push((t, x.to_vec(), gram));
        };
        let from = at.map(|t| (t, x));
        let x = block_forward_resume(
            dev,
            &model.config,
            &w,
            &mut h,
            from,
            n,
            seqlen,
            last,
            &mut tap,
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok((h, x, seen))
    };
    let mut chunks = Vec::with_capacity(starts.len());
    // Accumulated in chunk order, whatever device computed the chunk.
    for_each_chunk(&c.devices(), starts, &work, &mut |(h, x, seen)| {
        for (t, x, gram) in &seen {
            for (i, acc) in pending.iter_mut() {
                if subsets[*i].tap != *t {
                    continue;
                }
                let k = tap_width(&model.config, *t);
                let acc = acc.get_or_insert_with(|| Accumulator::new(request, k));
                acc.observe(x, &mut |_, _, _, h| {
                    for (s, g) in h.iter_mut().zip(gram) {
                        *s += f64::from(*g);
                    }
                });
            }
        }
        chunks.push((h, x));
        Ok(())
    })?;
    let bytes: usize = chunks.iter().map(|(h, x)| 4 * (h.len() + x.len())).sum();
    if bytes <= PAUSE_BUDGET {
        *paused = Some(Paused { at: last, chunks });
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
            Some(tap),
            &[tap],
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
                scheme: match kind {
                    PrevOpKind::Linear => plan.scheme_for(name),
                    _ => Scheme::default(),
                },
                qparams: None,
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
/// The stage result of a block for the checkpoint: the tensors the stages changed and every
/// layer report as they left it (finalization has not run yet).
fn saved_block(
    tensors: &BlockTensors<'_>,
    reports: &BTreeMap<String, LayerReport>,
    modifies: &[bool],
) -> BlockState {
    BlockState::capture(
        tensors
            .changed
            .iter()
            .filter(|(_, c)| **c)
            .filter_map(|(n, _)| Some((n.as_str(), tensors.values.get(n)?.as_slice()))),
        reports
            .values()
            .map(|r| SavedLayer {
                name: r.name.clone(),
                qparams: r.qparams.clone(),
                metrics: r.metrics.clone(),
                rel_output_error: None,
            })
            .collect(),
        modifies.to_vec(),
    )
}

/// Puts a saved stage result back as [`write_back`] left it after the last stage.
fn restore_block(
    spec: &RunSpec<'_>,
    block: usize,
    tensors: &mut BlockTensors<'_>,
    reports: &mut BTreeMap<String, LayerReport>,
    modifies: &mut [bool],
    state: BlockState,
) -> Result<(), ScheduleError> {
    let prefix = format!("{}.", spec.family.block_prefix(block));
    let corrupt = |message: String| -> ScheduleError {
        CheckpointError::Corrupt {
            path: spec
                .checkpoint
                .map(|c| c.dir().to_path_buf())
                .unwrap_or_default(),
            message,
        }
        .into()
    };
    for (name, values) in state.tensors().map_err(corrupt)? {
        let expected = spec.model.weights.info(&name)?.numel();
        if !name.starts_with(&prefix) || values.len() != expected {
            return Err(CheckpointError::Corrupt {
                path: spec
                    .checkpoint
                    .map(|c| c.dir().to_path_buf())
                    .unwrap_or_default(),
                message: format!(
                    "block {block}: saved tensor {name} has {} values, the model's has {expected}",
                    values.len()
                ),
            }
            .into());
        }
        tensors.put(&name, values);
    }
    for l in state.layers {
        reports.insert(
            l.name.clone(),
            LayerReport {
                block,
                role: role_in_block(spec.family, block, &l.name),
                scheme: spec.plan.scheme_for(&l.name),
                qparams: l.qparams,
                metrics: l.metrics,
                input: None,
                rel_output_error: l.rel_output_error,
                name: l.name,
            },
        );
    }
    if state.modifies.len() == modifies.len() {
        modifies.copy_from_slice(&state.modifies);
    }
    Ok(())
}

fn write_back(
    family: &Family,
    block: usize,
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
                block,
                role: role_in_block(family, block, &l.name),
                scheme: l.scheme,
                qparams: None,
                metrics: Vec::new(),
                input: None,
                rel_output_error: None,
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
    if let Some(p) = prev_op {
        if let Some(qp) = p.qparams {
            // A fold moved the grid of a layer an earlier subset quantized.
            reports
                .entry(p.name.clone())
                .or_insert_with(|| LayerReport {
                    name: p.name.clone(),
                    block,
                    role: role_in_block(family, block, &p.name),
                    scheme: p.scheme,
                    qparams: None,
                    metrics: Vec::new(),
                    input: None,
                    rel_output_error: None,
                })
                .qparams = Some(qp);
        }
        if p.changed {
            put(tensors, format!("{}.weight", p.name), p.weight);
        }
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

    #[test]
    fn a_missing_or_integer_linear_is_refused_naming_it() {
        let spec = Spec::llama(DType::F32, 1);
        let family = crate::arch::family_for(&["LlamaForCausalLM".to_string()], "c").unwrap();
        let write = |spec: &Spec| {
            let dir = tempfile::tempdir().unwrap();
            write_model(dir.path(), spec);
            let model = Model::open(dir.path()).unwrap();
            (dir, model)
        };
        let name = "model.layers.1.self_attn.o_proj.weight";
        let mut int = spec.clone();
        int.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap()
            .dtype = DType::I32;
        let (_d, model) = write(&int);
        let e = validate(&family, &model, &plan()).unwrap_err().to_string();
        assert!(
            e.contains(name) && e.contains("model.safetensors") && e.contains("dtype I32"),
            "{e}"
        );

        let mut missing = spec.clone();
        missing.tensors.retain(|t| t.name != name);
        let (_d, model) = write(&missing);
        let e = validate(&family, &model, &plan()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("no tensor \"{name}\""))
                && e.contains("num_hidden_layers = 2")
                && e.contains("the o projection"),
            "{e}"
        );
    }
}
