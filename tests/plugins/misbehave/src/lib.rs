//! Algorithms that misbehave on purpose (tests only; never shipped).

use gs_plugin_api::{export_plugin, Algorithm, PluginError, Subset};

/// Panics inside `transform`.
pub struct Panics;
impl Algorithm for Panics {
    const NAME: &'static str = "test_panic";
    const SUMMARY: &'static str = "panics in transform";
    fn from_params(_: &str) -> Result<Self, PluginError> {
        Ok(Panics)
    }
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        panic!("deliberate panic in block {}", subset.block());
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

export_plugin! {
    name: "gs-test-misbehave",
    vendor: "gs-host tests",
    algorithms: [Panics, PanicsOnCreate, WritesNan, WrongShape, NeedsStats],
}
