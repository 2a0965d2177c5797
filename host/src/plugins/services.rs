//! The host side of the ABI: the services table and the per-subset context behind it.

use std::cell::RefCell;
use std::collections::HashMap;
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
    /// The read-only slices handed out in this call, checked after it (see [`Lent`]).
    lent: RefCell<Vec<Lent>>,
}

/// A read-only slice of host memory lent to a plugin, with a digest of its contents when
/// lent. Plugins can change host tensors only through the setters; a plugin that writes
/// through a lent pointer (a C plugin working in place, say) is caught when the host checks
/// the digest again — before a setter replaces the buffer, and after the call — and its
/// results are refused. Native code could still write elsewhere: this is an integrity check
/// against bugs, not a sandbox (docs/SECURITY.md).
struct Lent {
    what: String,
    ptr: usize,
    len: usize,
    digest: u64,
}

impl Lent {
    fn unchanged(&self) -> bool {
        // SAFETY: the buffer is alive: entries are checked and dropped before a setter replaces
        // their buffer, and the call's buffers outlive the call.
        let v = unsafe { std::slice::from_raw_parts(self.ptr as *const f32, self.len) };
        digest(v) == self.digest
    }
}

/// A fast 64-bit digest of the bit patterns of `v`: multiply-xor over 4 independent lanes
/// (about one multiply per value; collisions only matter for an accidental write, not against
/// an adversary).
fn digest(v: &[f32]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = [
        0x243F_6A88_85A3_08D3u64,
        0x1319_8A2E_0370_7344,
        0xA409_3822_299F_31D0,
        0x082E_FA98_EC4E_6C89,
    ];
    for quad in v.chunks(4) {
        for (lane, x) in h.iter_mut().zip(quad) {
            *lane = (*lane ^ u64::from(x.to_bits()))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    let folded = h
        .iter()
        .fold(0u64, |acc, l| (acc ^ l).wrapping_mul(K).rotate_left(17));
    folded ^ v.len() as u64
}

impl CallCtx<'_, '_> {
    /// `v` as a slice for the plugin, remembered with its digest (once per buffer).
    fn lend(&self, what: impl FnOnce() -> String, v: &[f32]) -> RSlice<'static, f32> {
        let ptr = v.as_ptr() as usize;
        let mut lent = self.lent.borrow_mut();
        if !lent.iter().any(|l| l.ptr == ptr && l.len == v.len()) {
            lent.push(Lent {
                what: what(),
                ptr,
                len: v.len(),
                digest: digest(v),
            });
        }
        static_slice(v)
    }

    /// Before `v`'s buffer is replaced or dropped: checks and forgets its lent entry.
    fn release(&self, v: &[f32]) {
        let ptr = v.as_ptr() as usize;
        let mut lent = self.lent.borrow_mut();
        if let Some(k) = lent.iter().position(|l| l.ptr == ptr && l.len == v.len()) {
            let l = lent.swap_remove(k);
            if !l.unchanged() {
                self.rejected.borrow_mut().push(modified_in_place(&l.what));
            }
        }
    }
}

fn modified_in_place(what: &str) -> String {
    format!("it wrote into {what} through the read-only slice the host lent (use the setters to change tensors)")
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
            lent: RefCell::new(Vec::new()),
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
        log_flush(&plugin_name, &self.name);
        for l in ctx.lent.take() {
            if !l.unchanged() {
                ctx.rejected.borrow_mut().push(modified_in_place(&l.what));
            }
        }
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

/// Plugin log messages per algorithm: a burst of [`LOG_BURST`], then [`LOG_PER_SECOND`]. A
/// plugin logging in a loop cannot flood the terminal or the log files; what is dropped is
/// counted and reported with the next message that passes.
const LOG_BURST: f64 = 50.0;
const LOG_PER_SECOND: f64 = 10.0;

struct LogBucket {
    tokens: f64,
    last: std::time::Instant,
    dropped: u64,
}

fn log_buckets() -> std::sync::MutexGuard<'static, HashMap<String, LogBucket>> {
    static BUCKETS: OnceLock<std::sync::Mutex<HashMap<String, LogBucket>>> = OnceLock::new();
    BUCKETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn log_dropped(plugin: &str, algorithm: &str, dropped: u64) {
    tracing::warn!(target: "gs_plugin", plugin, algorithm, "{dropped} log messages dropped (a plugin may log {LOG_BURST} messages at once, then {LOG_PER_SECOND} per second)");
}

/// Reports the messages of `plugin/algorithm` dropped since the last one that passed (at the
/// end of each call, so a flood is reported even if nothing follows it).
fn log_flush(plugin: &str, algorithm: &str) {
    let dropped = log_buckets()
        .get_mut(&format!("{plugin}/{algorithm}"))
        .map_or(0, |b| std::mem::take(&mut b.dropped));
    if dropped > 0 {
        log_dropped(plugin, algorithm, dropped);
    }
}

/// `Some(dropped before this one)` when a message of `key` may be logged now.
fn log_allowed(key: &str) -> Option<u64> {
    let mut buckets = log_buckets();
    let now = std::time::Instant::now();
    let b = buckets.entry(key.to_string()).or_insert(LogBucket {
        tokens: LOG_BURST,
        last: now,
        dropped: 0,
    });
    b.tokens =
        (b.tokens + now.duration_since(b.last).as_secs_f64() * LOG_PER_SECOND).min(LOG_BURST);
    b.last = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Some(std::mem::take(&mut b.dropped))
    } else {
        b.dropped += 1;
        None
    }
}

extern "C" fn log(ctx: *const c_void, level: LogLevel, message: RStr<'_>) {
    let _ = serve(ctx, |c| {
        let (p, a, m) = (c.plugin, c.algorithm, message.as_str());
        let Some(dropped) = log_allowed(&format!("{p}/{a}")) else {
            return Ok(());
        };
        if dropped > 0 {
            log_dropped(p, a, dropped);
        }
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
        let run = c.run.borrow();
        let l = &run.layers[i];
        Ok(c.lend(|| format!("the weight of {}", l.name), &l.weight))
    })
}

extern "C" fn layer_bias(
    ctx: *const c_void,
    i: u32,
) -> RResult<ROption<RSlice<'static, f32>>, AbiError> {
    serve(ctx, |c| {
        let i = layer_index(c, i)?;
        let run = c.run.borrow();
        let l = &run.layers[i];
        Ok(match &l.bias {
            Some(b) => RSome(c.lend(|| format!("the bias of {}", l.name), b)),
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
        c.release(&c.run.borrow().layers[i].weight);
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
        if let Some(old) = &c.run.borrow().layers[i].bias {
            c.release(old);
        }
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
        Some(p) => Ok(c.lend(|| format!("the weight of {}", p.name), &p.weight)),
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
        if let Some(p) = &c.run.borrow().prev_op {
            c.release(&p.weight);
        }
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
            .map(|v| {
                c.lend(
                    || format!("statistic {} of subset `{}`", kind.name(), c.info.name),
                    v,
                )
            })
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
