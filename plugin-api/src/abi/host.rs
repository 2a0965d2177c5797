//! The host-services table. Crosses the boundary erased (see the module docs of [`crate::abi`]).

use std::ffi::c_void;

use abi_stable::{
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr},
    StableAbi,
};

use super::{AbiQParams, LayerInfo, LogLevel, PluginError, StatKind, SubsetInfo, WeightOverride};

/// Services the host offers to a plugin while it transforms one subset.
///
/// Every function takes the host context `ctx` from the [`super::SubsetHandle`] first.
/// Slices returned by the host stay valid until the plugin calls a setter for the same object
/// or the transform call returns, whichever comes first.
///
/// v1.0 ends at `set_qparams` (`last_prefix_field`); later minor versions append below it only.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostServicesRef)))]
pub struct HostServices {
    /// Writes one line into the host's `tracing` log, tagged with the plugin and algorithm.
    pub log: extern "C" fn(ctx: *const c_void, level: LogLevel, message: RStr<'_>),
    /// Block, subset name, layer count, prev_op and inspected module.
    pub subset_info: extern "C" fn(ctx: *const c_void) -> SubsetInfo,
    /// Name, shape, bias presence and resolved scheme of layer `i` of the subset.
    pub layer_info: extern "C" fn(ctx: *const c_void, i: u32) -> RResult<LayerInfo, PluginError>,
    /// Current weight of layer `i`, f32 row-major `[out_features, in_features]`.
    pub layer_weight:
        extern "C" fn(ctx: *const c_void, i: u32) -> RResult<RSlice<'static, f32>, PluginError>,
    /// Current bias of layer `i`, `[out_features]`, if the layer has one.
    pub layer_bias: extern "C" fn(
        ctx: *const c_void,
        i: u32,
    ) -> RResult<ROption<RSlice<'static, f32>>, PluginError>,
    /// Replaces the weight of layer `i`; the host checks the length and that every value is finite.
    pub set_layer_weight: extern "C" fn(
        ctx: *const c_void,
        i: u32,
        weight: RSlice<'_, f32>,
    ) -> RResult<(), PluginError>,
    /// Replaces the bias of layer `i` (only for layers that have one).
    pub set_layer_bias: extern "C" fn(
        ctx: *const c_void,
        i: u32,
        bias: RSlice<'_, f32>,
    ) -> RResult<(), PluginError>,
    /// Weight of the prev_op: a norm's `[in_features]`, or a linear's `[in_features, prev_in]`.
    pub prev_op_weight:
        extern "C" fn(ctx: *const c_void) -> RResult<RSlice<'static, f32>, PluginError>,
    /// Replaces the prev_op weight (to fold input-channel scales into it).
    pub set_prev_op_weight:
        extern "C" fn(ctx: *const c_void, weight: RSlice<'_, f32>) -> RResult<(), PluginError>,
    /// One statistic of the subset input (see [`StatKind`] for shapes).
    pub stat: extern "C" fn(
        ctx: *const c_void,
        kind: StatKind,
    ) -> RResult<RSlice<'static, f32>, PluginError>,
    /// Number of calibration tokens behind the statistics.
    pub token_count: extern "C" fn(ctx: *const c_void) -> RResult<u64, PluginError>,
    /// Number of f32 values `module_forward` writes (`tokens × out_dim` of the inspected module).
    pub module_output_len: extern "C" fn(ctx: *const c_void) -> RResult<u64, PluginError>,
    /// Runs the inspected module on the subset input with some layers' weights replaced.
    pub module_forward: extern "C" fn(
        ctx: *const c_void,
        overrides: RSlice<'_, WeightOverride<'_>>,
        out: RSliceMut<'_, f32>,
    ) -> RResult<(), PluginError>,
    /// Records the quantization parameters chosen for layer `i` (used by real-format exports).
    #[sabi(last_prefix_field)]
    pub set_qparams: extern "C" fn(
        ctx: *const c_void,
        i: u32,
        qparams: AbiQParams<'_>,
    ) -> RResult<(), PluginError>,

    // ---- v1.1 ----
    /// Adds a named per-layer metric (e.g. quantization loss) to the log and the run report.
    pub report_metric: extern "C" fn(ctx: *const c_void, i: u32, key: RStr<'_>, value: f64),

    // ---- v1.2 ----
    /// Records new quantization parameters for the prev_op, when it is a linear layer whose
    /// scheme quantizes weights (an earlier subset quantized it). Folding per-channel factors
    /// into its output rows moves its grid (`gs_quant::QParams::scale_rows`); the plugin sets
    /// the moved qparams here and the rescaled weight with `set_prev_op_weight`. Checked like
    /// `set_qparams`; the weight must be on the new grid when the block is finalized.
    pub set_prev_op_qparams:
        extern "C" fn(ctx: *const c_void, qparams: AbiQParams<'_>) -> RResult<(), PluginError>,
}
