//! The block scheduler: walks the decoder blocks one at a time and runs the pipeline on each
//! block's subsets.
//!
//! Only one block's linear weights (and the prev_op weights) are held in f32 at a time; the
//! rest of the model stays memory-mapped. Within a block the order is *stage-major*: stage 1
//! runs on every subset of the block, then stage 2, … (so a smoothing stage has folded all its
//! scales before a quantizing stage sees the weights). Changed tensors are handed to a sink
//! (the exporter) as soon as their block is done.
//!
//! This version runs data-free pipelines (no calibration activations): statistics and the
//! module-forward service answer `NOT_AVAILABLE`.

use std::collections::BTreeMap;

use gs_quant::{Granularity, QParams, Scheme};
use indicatif::{ProgressBar, ProgressStyle};

use crate::arch::{BlockSubset, Family, PrevOpKind};
use crate::manifest::QuantPlan;
use crate::model::{Model, ModelError};
use crate::plugins::{AlgorithmInstance, LayerState, PluginError, PrevOpState, SubsetRun};

/// Why a scheduled run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("tensor {name}: expected a 2-D weight, found shape {shape:?}")]
    NotAMatrix { name: String, shape: Vec<usize> },
    #[error("{layer} ([{out}, {inp}]): group size {group} does not divide its {inp} input columns; choose a group size that divides every quantized layer, or override this layer in [[quant.override]]")]
    GroupSize {
        layer: String,
        out: usize,
        inp: usize,
        group: u32,
    },
    #[error("{0}")]
    Sink(String),
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
}

/// The linear layers of every block, with full names, in block order.
pub fn all_linears(family: &Family, model: &Model) -> Vec<String> {
    (0..model.config.num_hidden_layers)
        .flat_map(|b| family.block_linears(b))
        .collect()
}

/// Checks, before any work, that every linear layer exists with a 2-D shape and that its
/// scheme fits it (a group size must divide the input columns).
pub fn validate(family: &Family, model: &Model, plan: &QuantPlan) -> Result<(), ScheduleError> {
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

    fn get(&mut self, name: &str) -> Result<Vec<f32>, ScheduleError> {
        if let Some(v) = self.values.get(name) {
            return Ok(v.clone());
        }
        let v = self.model.weights.to_f32(name)?;
        // The f32 copy is what the block works on; the mapped source pages can go.
        self.model.weights.release(name)?;
        self.values.insert(name.to_string(), v.clone());
        Ok(v)
    }

    fn put(&mut self, name: &str, v: Vec<f32>) {
        self.values.insert(name.to_string(), v);
        self.changed.insert(name.to_string(), true);
    }
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
    for block in 0..n_blocks {
        let _span = tracing::info_span!("block", block).entered();
        let subsets = family.block_subsets(block);
        let mut tensors = BlockTensors::new(model);
        let mut reports: BTreeMap<String, LayerReport> = BTreeMap::new();
        for stage in stages.iter_mut() {
            for subset in &subsets {
                let _s = tracing::debug_span!("subset", subset = %subset.name).entered();
                let mut run = subset_run(model, plan, block, subset, &mut tensors)?;
                stage.transform(&mut run)?;
                write_back(&mut tensors, &mut reports, run);
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

/// Moves what a stage changed back into the block's tensors and the layer reports.
fn write_back(
    tensors: &mut BlockTensors<'_>,
    reports: &mut BTreeMap<String, LayerReport>,
    run: SubsetRun<'_>,
) {
    for l in run.layers {
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
            tensors.put(&format!("{}.weight", l.name), l.weight);
        }
        if let (true, Some(b)) = (l.bias_changed, l.bias) {
            tensors.put(&format!("{}.bias", l.name), b);
        }
    }
    if let Some(p) = run.prev_op.filter(|p| p.changed) {
        tensors.put(&format!("{}.weight", p.name), p.weight);
    }
}
