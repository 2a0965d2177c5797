//! Test-only algorithms: some misbehave on purpose, others report what the host serves.

use gs_plugin_api::{export_plugin, Algorithm, PluginError, Subset};

/// Panics inside `transform`, in every block from `from_block = N` (default 0) on.
pub struct Panics {
    from_block: usize,
}
impl Algorithm for Panics {
    const NAME: &'static str = "test_panic";
    const SUMMARY: &'static str = "panics in transform";
    fn from_params(text: &str) -> Result<Self, PluginError> {
        // A one-key test parameter: no TOML parser needed.
        let from_block = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("from_block"))
            .filter_map(|r| r.trim().strip_prefix('='))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(Panics { from_block })
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        if subset.block() >= self.from_block {
            panic!("deliberate panic in block {}", subset.block());
        }
        Ok(())
    }
}

/// Panics while being constructed.
pub struct PanicsOnCreate;
impl Algorithm for PanicsOnCreate {
    const NAME: &'static str = "test_panic_create";
    const SUMMARY: &'static str = "panics in its constructor";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        panic!("deliberate panic while parsing parameters")
    }
    fn transform(&mut self, _: &mut Subset<'_>) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Writes a NaN into the first weight and ignores the host's refusal.
pub struct WritesNan;
impl Algorithm for WritesNan {
    const NAME: &'static str = "test_nan";
    const SUMMARY: &'static str = "returns a NaN weight and ignores the refusal";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(WritesNan)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        let mut w = subset.weight(0)?.to_vec();
        w[0] = f32::NAN;
        let _ignored = subset.set_weight(0, &w);
        Ok(())
    }
}

/// Writes into the weight slice the host lent read-only (as a C plugin working in place
/// might), then reports success.
pub struct WritesReadOnly;
impl Algorithm for WritesReadOnly {
    const NAME: &'static str = "test_write_readonly";
    const SUMMARY: &'static str = "writes through the read-only weight slice";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(WritesReadOnly)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        let w = subset.weight(1)?;
        // SAFETY (for this test only): the host's buffer is writable memory and nothing reads
        // it during the call; the point is to show the host notices.
        unsafe { *(w.as_ptr() as *mut f32).add(3) += 1.0 };
        Ok(())
    }
}

/// Logs 10 000 warnings in the first subset, then does nothing.
pub struct LogFlood;
impl Algorithm for LogFlood {
    const NAME: &'static str = "test_log_flood";
    const SUMMARY: &'static str = "logs in a loop";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(LogFlood)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        if subset.block() == 0 && subset.name() == "qkv" {
            for i in 0..10_000 {
                subset.warn(&format!("flood message {i}"));
            }
        }
        Ok(())
    }
}

/// Returns a weight one element short.
pub struct WrongShape;
impl Algorithm for WrongShape {
    const NAME: &'static str = "test_wrong_shape";
    const SUMMARY: &'static str = "returns a weight of the wrong length";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(WrongShape)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        let w = subset.weight(0)?;
        let short = w[..w.len() - 1].to_vec();
        subset.set_weight(0, &short)
    }
}

/// Never returns from `transform` (a hung algorithm; the host's `[run] stage_timeout_s` must
/// stop the run).
pub struct SleepsForever;
impl Algorithm for SleepsForever {
    const NAME: &'static str = "test_sleep";
    const SUMMARY: &'static str = "never returns from transform";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(SleepsForever)
    }
    fn transform(&mut self, _: &mut Subset<'_>) -> Result<(), PluginError> {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Asks for calibration statistics (a data-free host must refuse it up front).
pub struct NeedsStats;
impl Algorithm for NeedsStats {
    const NAME: &'static str = "test_needs_hessian";
    const SUMMARY: &'static str = "requires the Hessian statistic";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(NeedsStats)
    }
    fn required_stats(&self) -> gs_plugin_api::StatsRequest {
        gs_plugin_api::StatsRequest::HESSIAN
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        subset.stat(gs_plugin_api::StatKind::HESSIAN).map(|_| ())
    }
}

/// Reads the statistics of every subset and reports them as metrics, so tests can check what
/// the host served: `tokens`, `absmax_max` (max over channels) and `hessian_trace` (Σ diag).
pub struct StatsProbe;
impl Algorithm for StatsProbe {
    const NAME: &'static str = "test_stats_probe";
    const SUMMARY: &'static str = "reports the statistics it is served";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(StatsProbe)
    }
    fn required_stats(&self) -> gs_plugin_api::StatsRequest {
        gs_plugin_api::StatsRequest::ABSMAX | gs_plugin_api::StatsRequest::HESSIAN
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        use gs_plugin_api::StatKind;
        let tokens = subset.token_count()? as f64;
        let absmax = subset.stat(StatKind::ABSMAX)?;
        let absmax_max = absmax.iter().fold(0.0f32, |m, v| m.max(*v)) as f64;
        let k = absmax.len();
        let h = subset.stat(StatKind::HESSIAN)?;
        let trace: f64 = (0..k).map(|i| f64::from(h[i * k + i])).sum();
        for i in 0..subset.len() {
            subset.report_metric(i, "tokens", tokens);
            subset.report_metric(i, "absmax_max", absmax_max);
            subset.report_metric(i, "hessian_trace", trace);
        }
        Ok(())
    }
}

/// Doubles a norm prev_op (the input of its subset doubles), to test stale statistics.
pub struct DoubleNorm;
impl Algorithm for DoubleNorm {
    const NAME: &'static str = "test_double_norm";
    const SUMMARY: &'static str = "doubles every norm that feeds a subset";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(DoubleNorm)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        if subset.prev_op() != gs_plugin_api::PrevOpKind::NORM {
            return Ok(());
        }
        let w: Vec<f32> = subset.prev_op_weight()?.iter().map(|v| v * 2.0).collect();
        subset.set_prev_op_weight(&w)
    }
}

/// Sets qparams for a norm prev_op (the host must refuse: only a quantized linear has them) and
/// ignores the refusal.
pub struct NormQParams;
impl Algorithm for NormQParams {
    const NAME: &'static str = "test_norm_qparams";
    const SUMMARY: &'static str = "sets qparams for a norm prev_op and ignores the refusal";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(NormQParams)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        if subset.prev_op() != gs_plugin_api::PrevOpKind::NORM {
            return Ok(());
        }
        let n = subset.prev_op_weight()?.len();
        let qp = gs_plugin_api::quant::QParams::new(
            gs_plugin_api::quant::Granularity::Channel,
            n,
            1,
            vec![1.0; n],
            vec![],
        )
        .map_err(|e| PluginError::other(e.to_string()))?;
        let _ignored = subset.set_prev_op_qparams(&qp);
        Ok(())
    }
}

/// Calls the module-forward service and reports `Σ y²` of the inspected module's output: as
/// is (`out_sq`, and again as `out_sq_again`), and with the subset's first layer zeroed
/// (`out_sq_zero_first`).
pub struct ModuleProbe;
impl Algorithm for ModuleProbe {
    const NAME: &'static str = "test_module_probe";
    const SUMMARY: &'static str = "reports what the module-forward service computes";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(ModuleProbe)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        let sq = |y: Vec<f32>| y.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>();
        let out = sq(subset.module_forward(&[])?);
        let again = sq(subset.module_forward(&[])?);
        let zeros = vec![0.0f32; subset.weight(0)?.len()];
        let zero_first = sq(subset.module_forward(&[(0, &zeros)])?);
        for i in 0..subset.len() {
            subset.report_metric(i, "out_sq", out);
            subset.report_metric(i, "out_sq_again", again);
            subset.report_metric(i, "out_sq_zero_first", zero_first);
        }
        Ok(())
    }
}

export_plugin! {
    name: "gs-test-misbehave",
    vendor: "gs-host tests",
    algorithms: [
        Panics,
        PanicsOnCreate,
        WritesNan,
        WritesReadOnly,
        LogFlood,
        WrongShape,
        SleepsForever,
        NeedsStats,
        StatsProbe,
        DoubleNorm,
        NormQParams,
        ModuleProbe,
    ],
}
