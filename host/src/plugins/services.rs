//! The host side of the ABI: the services table and the per-subset context behind it.

use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{RNone, ROption, RResult, RSlice, RSliceMut, RSome, RStr, RString};
use gs_plugin_api::abi::{
    AbiQParams, AbiScheme, ErrorKind, HostServices, HostServicesRef, LayerInfo, LogLevel,
    PluginError as AbiError, PrevOpKind, StatKind, SubsetHandle, SubsetInfo, WeightOverride,
};
use gs_quant::{Granularity, QParams, Scheme};

use super::{AlgorithmInstance, PluginError};
use crate::stats::SubsetStats;

/// One linear layer of a subset while the pipeline runs on it.
#[derive(Debug, Clone)]
pub struct LayerState {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    /// Row-major `[out_features, in_features]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub scheme: Scheme,
    /// Set by the last plugin that called `set_qparams`.
    pub qparams: Option<QParams>,
    pub weight_changed: bool,
    pub bias_changed: bool,
    /// `(stage algorithm, key, value)` reported by plugins.
    pub metrics: Vec<(String, String, f64)>,
}

/// The op that produces a subset's input.
#[derive(Debug, Clone)]
pub struct PrevOpState {
    pub kind: PrevOpKind,
    pub name: String,
    /// Norm: `[in_features]`; linear: row-major `[rows, cols]`.
    pub weight: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub changed: bool,
    /// A linear prev_op's resolved scheme (`Scheme::default()`, no quantization, for a norm).
    pub scheme: Scheme,
    /// New qparams set by a plugin that folded factors into an already quantized prev_op.
    pub qparams: Option<QParams>,
}

/// Runs the inspected module of a subset on its calibration input (AWQ-style searches).
pub trait ModuleForward {
    /// Values written per call (`tokens × out_dim`).
    fn output_len(&self) -> usize;
    /// Forward with `overrides` replacing some layers' weights; `layers` hold the current ones.
    fn forward(
        &self,
        layers: &[LayerState],
        overrides: &[(usize, &[f32])],
        out: &mut [f32],
    ) -> Result<(), String>;
}

/// Everything a stage sees of one subset. The scheduler builds it, runs every stage on it,
/// then reads back what changed.
pub struct SubsetRun<'a> {
    pub block: usize,
    pub name: String,
    pub inspect: String,
    pub layers: Vec<LayerState>,
    pub prev_op: Option<PrevOpState>,
    pub stats: Option<&'a dyn SubsetStats>,
    pub forward: Option<&'a dyn ModuleForward>,
}

struct CallCtx<'r, 'a> {
    run: RefCell<&'r mut SubsetRun<'a>>,
    plugin: &'r str,
    algorithm: &'r str,
    info: SubsetInfo,
    /// Calls the host refused: the stage fails even if the plugin ignores the error.
    rejected: RefCell<Vec<String>>,
}

impl AlgorithmInstance {
    /// Runs this algorithm on one subset through the ABI.
    pub fn transform(&mut self, run: &mut SubsetRun<'_>) -> Result<(), PluginError> {
        let (block, subset) = (run.block, run.name.clone());
        let info = SubsetInfo {
            block: run.block as u32,
            name: RString::from(run.name.as_str()),
            n_layers: run.layers.len() as u32,
            prev_op: run.prev_op.as_ref().map_or(PrevOpKind::NONE, |p| p.kind),
            prev_op_name: RString::from(run.prev_op.as_ref().map_or("", |p| p.name.as_str())),
            inspect_name: RString::from(run.inspect.as_str()),
        };
        let plugin_name = self.plugin.name.clone();
        let ctx = CallCtx {
            run: RefCell::new(run),
            plugin: &plugin_name,
            algorithm: &self.name,
            info,
            rejected: RefCell::new(Vec::new()),
        };
        let handle = SubsetHandle {
            services: services().0.to_raw_ptr() as *const c_void,
            ctx: &ctx as *const CallCtx<'_, '_> as *const c_void,
        };
        let fail = |message: String| PluginError::Transform {
            plugin: plugin_name.clone(),
            algorithm: self.name.clone(),
            block,
            subset: subset.clone(),
            message,
        };
        let result = self.obj.transform_subset(handle).into_result();
        if let Err(e) = result {
            return Err(fail(e.to_string()));
        }
        let rejected = ctx.rejected.into_inner();
        if let Some(first) = rejected.first() {
            return Err(fail(format!(
                "the host rejected {} of its results: {first}",
                rejected.len()
            )));
        }
        Ok(())
    }
}

/// The one services table of this host, built once.
fn services() -> HostServicesRef {
    static TABLE: OnceLock<HostServicesRef> = OnceLock::new();
    *TABLE.get_or_init(|| {
        HostServices {
            log,
            subset_info,
            layer_info,
            layer_weight,
            layer_bias,
            set_layer_weight,
            set_layer_bias,
            prev_op_weight,
            set_prev_op_weight,
            stat,
            token_count,
            module_output_len,
            module_forward,
            set_qparams,
            report_metric,
            set_prev_op_qparams,
        }
        .leak_into_prefix()
    })
}

/// Runs a service body, containing host panics and recording refusals.
fn serve<T>(
    ctx: *const c_void,
    f: impl FnOnce(&CallCtx) -> Result<T, AbiError>,
) -> RResult<T, AbiError> {
    // SAFETY: `ctx` is the `CallCtx` that `transform` passed in the handle; services are only
    // reachable during that call.
    let ctx: &CallCtx = unsafe { &*(ctx as *const CallCtx) };
    match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => {
            if e.kind == ErrorKind::HOST_REJECTED {
                ctx.rejected.borrow_mut().push(e.message.to_string());
            }
            RResult::RErr(e)
        }
        Err(_) => RResult::RErr(AbiError::other("internal error in a gs-host service")),
    }
}

fn layer_index(c: &CallCtx, i: u32) -> Result<usize, AbiError> {
    let n = c.run.borrow().layers.len();
    let i = i as usize;
    if i < n {
        Ok(i)
    } else {
        Err(AbiError::rejected(format!(
            "layer index {i} out of range: subset `{}` has {n} layers",
            c.info.name
        )))
    }
}

/// Checks a plugin-provided tensor: exact length and every value finite.
fn check_values(what: &str, values: &[f32], expected: usize) -> Result<Vec<f32>, AbiError> {
    if values.len() != expected {
        return Err(AbiError::rejected(format!(
            "{what}: expected {expected} values, got {}",
            values.len()
        )));
    }
    if let Some(k) = values.iter().position(|v| !v.is_finite()) {
        return Err(AbiError::rejected(format!(
            "{what}: value {k} is {} (every value must be finite)",
            values[k]
        )));
    }
    // Copied before any mutable borrow: the slice may point into the host's own storage.
    Ok(values.to_vec())
}

fn static_slice<T>(v: &[T]) -> RSlice<'static, T> {
    // SAFETY: valid until the owning Vec is replaced by a setter or the call ends (the
    // documented lifetime of every slice the host returns).
    unsafe { RSlice::from_raw_parts(v.as_ptr(), v.len()) }
}

extern "C" fn log(ctx: *const c_void, level: LogLevel, message: RStr<'_>) {
    let _ = serve(ctx, |c| {
        let (p, a, m) = (c.plugin, c.algorithm, message.as_str());
        match level {
            LogLevel::ERROR => {
                tracing::error!(target: "gs_plugin", plugin = p, algorithm = a, "{m}")
            }
            LogLevel::WARN => tracing::warn!(target: "gs_plugin", plugin = p, algorithm = a, "{m}"),
            LogLevel::INFO => tracing::info!(target: "gs_plugin", plugin = p, algorithm = a, "{m}"),
            LogLevel::DEBUG => {
                tracing::debug!(target: "gs_plugin", plugin = p, algorithm = a, "{m}")
            }
            _ => tracing::trace!(target: "gs_plugin", plugin = p, algorithm = a, "{m}"),
        }
        Ok(())
    });
}

extern "C" fn subset_info(ctx: *const c_void) -> SubsetInfo {
    // SAFETY: as in `serve`.
    let c: &CallCtx = unsafe { &*(ctx as *const CallCtx) };
    c.info.clone()
}

extern "C" fn layer_info(ctx: *const c_void, i: u32) -> RResult<LayerInfo, AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let run = c.run.borrow();
        let l = &run.layers[i];
        Ok(LayerInfo {
            name: RString::from(l.name.as_str()),
            out_features: l.out_features as u64,
            in_features: l.in_features as u64,
            has_bias: l.bias.is_some(),
            scheme: AbiScheme::from_scheme(&l.scheme),
        })
    })
}

extern "C" fn layer_weight(ctx: *const c_void, i: u32) -> RResult<RSlice<'static, f32>, AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        Ok(static_slice(&c.run.borrow().layers[i].weight))
    })
}

extern "C" fn layer_bias(
    ctx: *const c_void,
    i: u32,
) -> RResult<ROption<RSlice<'static, f32>>, AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        Ok(match &c.run.borrow().layers[i].bias {
            Some(b) => RSome(static_slice(b)),
            None => RNone,
        })
    })
}

extern "C" fn set_layer_weight(
    ctx: *const c_void,
    i: u32,
    weight: RSlice<'_, f32>,
) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let (name, n) = {
            let run = c.run.borrow();
            let l = &run.layers[i];
            (l.name.clone(), l.out_features * l.in_features)
        };
        let w = check_values(&format!("weight of {name}"), weight.as_slice(), n)?;
        let mut run = c.run.borrow_mut();
        run.layers[i].weight = w;
        run.layers[i].weight_changed = true;
        Ok(())
    })
}

extern "C" fn set_layer_bias(
    ctx: *const c_void,
    i: u32,
    bias: RSlice<'_, f32>,
) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let (name, n, has) = {
            let run = c.run.borrow();
            let l = &run.layers[i];
            (l.name.clone(), l.out_features, l.bias.is_some())
        };
        if !has {
            return Err(AbiError::rejected(format!(
                "{name} has no bias; a bias cannot be added"
            )));
        }
        let b = check_values(&format!("bias of {name}"), bias.as_slice(), n)?;
        let mut run = c.run.borrow_mut();
        run.layers[i].bias = Some(b);
        run.layers[i].bias_changed = true;
        Ok(())
    })
}

fn no_prev_op(c: &CallCtx) -> AbiError {
    AbiError::not_available(format!(
        "subset `{}` has no prev_op that scales can be folded into",
        c.info.name
    ))
}

extern "C" fn prev_op_weight(ctx: *const c_void) -> RResult<RSlice<'static, f32>, AbiError> {
    serve(ctx, |c| match &c.run.borrow().prev_op {
        Some(p) => Ok(static_slice(&p.weight)),
        None => Err(no_prev_op(c)),
    })
}

extern "C" fn set_prev_op_weight(
    ctx: *const c_void,
    weight: RSlice<'_, f32>,
) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let (name, n) = match &c.run.borrow().prev_op {
            Some(p) => (p.name.clone(), p.rows * p.cols),
            None => return Err(no_prev_op(c)),
        };
        let w = check_values(&format!("weight of {name}"), weight.as_slice(), n)?;
        let mut run = c.run.borrow_mut();
        if let Some(p) = run.prev_op.as_mut() {
            p.weight = w;
            p.changed = true;
        }
        Ok(())
    })
}

fn no_stats(c: &CallCtx) -> AbiError {
    AbiError::not_available(format!(
        "statistics of subset `{}` are not available: this run is data-free (calibration statistics are not supported by this gs-host version yet)",
        c.info.name
    ))
}

extern "C" fn stat(ctx: *const c_void, kind: StatKind) -> RResult<RSlice<'static, f32>, AbiError> {
    serve(ctx, |c| {
        let run = c.run.borrow();
        let stats = run.stats.ok_or_else(|| no_stats(c))?;
        stats
            .get(kind)
            .map(static_slice)
            .map_err(|m| AbiError::not_available(format!("statistic {}: {m}", kind.name())))
    })
}

extern "C" fn token_count(ctx: *const c_void) -> RResult<u64, AbiError> {
    serve(ctx, |c| {
        let run = c.run.borrow();
        Ok(run.stats.ok_or_else(|| no_stats(c))?.token_count())
    })
}

fn no_forward(c: &CallCtx) -> AbiError {
    AbiError::not_available(format!(
        "module forward of `{}` is not available: this run is data-free (calibration is not supported by this gs-host version yet)",
        c.info.inspect_name
    ))
}

extern "C" fn module_output_len(ctx: *const c_void) -> RResult<u64, AbiError> {
    serve(ctx, |c| {
        let run = c.run.borrow();
        Ok(run.forward.ok_or_else(|| no_forward(c))?.output_len() as u64)
    })
}

extern "C" fn module_forward(
    ctx: *const c_void,
    overrides: RSlice<'_, WeightOverride<'_>>,
    mut out: RSliceMut<'_, f32>,
) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let run = c.run.borrow();
        let fwd = run.forward.ok_or_else(|| no_forward(c))?;
        let mut ov = Vec::with_capacity(overrides.len());
        for o in overrides.iter() {
            let i = layer_index(c, o.layer)?;
            let l = &run.layers[i];
            if o.weight.len() != l.out_features * l.in_features {
                return Err(AbiError::rejected(format!(
                    "candidate weight of {}: expected {} values, got {}",
                    l.name,
                    l.out_features * l.in_features,
                    o.weight.len()
                )));
            }
            ov.push((i, o.weight.as_slice()));
        }
        if out.len() != fwd.output_len() {
            return Err(AbiError::rejected(format!(
                "module forward output buffer: expected {} values, got {}",
                fwd.output_len(),
                out.len()
            )));
        }
        fwd.forward(&run.layers, &ov, out.as_mut_slice())
            .map_err(AbiError::other)
    })
}

/// The host's copy of plugin-provided qparams for a `[rows, cols]` layer, checked: a known
/// granularity, the right number of finite positive scales, zero points absent or one per scale.
fn qparams_from_abi(
    name: &str,
    rows: usize,
    cols: usize,
    q: &AbiQParams<'_>,
) -> Result<QParams, AbiError> {
    let granularity = match q.granularity {
        0 => Granularity::Tensor,
        1 => Granularity::Channel,
        2 if q.group_size > 0 => Granularity::Group(q.group_size),
        g => {
            return Err(AbiError::rejected(format!(
                "qparams of {name}: granularity code {g} with group size {} is invalid",
                q.group_size
            )))
        }
    };
    let n = match granularity {
        Granularity::Tensor => 1,
        Granularity::Channel => rows,
        Granularity::Group(g) => rows * cols.div_ceil(g as usize),
    };
    let scales = check_values(&format!("scales of {name}"), q.scales.as_slice(), n)?;
    if let Some(k) = scales.iter().position(|s| *s <= 0.0) {
        return Err(AbiError::rejected(format!(
            "scales of {name}: scale {k} is {} (scales must be positive)",
            scales[k]
        )));
    }
    if !q.zeros.is_empty() && q.zeros.len() != n {
        return Err(AbiError::rejected(format!(
            "zero points of {name}: expected {n} values (or none), got {}",
            q.zeros.len()
        )));
    }
    Ok(QParams {
        granularity,
        rows,
        cols,
        scales,
        zeros: q.zeros.to_vec(),
    })
}

extern "C" fn set_qparams(ctx: *const c_void, i: u32, q: AbiQParams<'_>) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let (name, rows, cols) = {
            let run = c.run.borrow();
            let l = &run.layers[i];
            (l.name.clone(), l.out_features, l.in_features)
        };
        let qp = qparams_from_abi(&name, rows, cols, &q)?;
        c.run.borrow_mut().layers[i].qparams = Some(qp);
        Ok(())
    })
}

extern "C" fn set_prev_op_qparams(ctx: *const c_void, q: AbiQParams<'_>) -> RResult<(), AbiError> {
    serve(ctx, |c| {
        let (name, rows, cols) = match &c.run.borrow().prev_op {
            None => return Err(no_prev_op(c)),
            Some(p) if p.kind != PrevOpKind::LINEAR || p.scheme.weights.is_none() => {
                return Err(AbiError::rejected(format!(
                    "qparams of prev_op {}: only a linear layer whose scheme quantizes weights has qparams",
                    p.name
                )))
            }
            Some(p) => (p.name.clone(), p.rows, p.cols),
        };
        let qp = qparams_from_abi(&name, rows, cols, &q)?;
        if let Some(p) = c.run.borrow_mut().prev_op.as_mut() {
            p.qparams = Some(qp);
        }
        Ok(())
    })
}

extern "C" fn report_metric(ctx: *const c_void, i: u32, key: RStr<'_>, value: f64) {
    let _ = serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let mut run = c.run.borrow_mut();
        let l = &mut run.layers[i];
        tracing::debug!(target: "gs_plugin", plugin = c.plugin, algorithm = c.algorithm, layer = %l.name, "{} = {value}", key.as_str());
        l.metrics
            .push((c.algorithm.to_string(), key.to_string(), value));
        Ok(())
    });
}
