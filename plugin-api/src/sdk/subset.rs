//! The safe view of one subset and the host services behind it.

use std::ffi::c_void;
use std::marker::PhantomData;

use abi_stable::{
    prefix_type::{PrefixRef, WithMetadata_},
    std_types::{RSlice, RSliceMut, RStr},
};
use gs_quant::{QParams, Scheme};

use crate::abi::{
    AbiQParams, HostServicesRef, HostServices_Prefix, LayerInfo, LogLevel, PluginError, PrevOpKind,
    StatKind, SubsetHandle, SubsetInfo, WeightOverride,
};

/// One layer of a subset as the plugin sees it.
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub has_bias: bool,
    /// The resolved scheme; `scheme.weights == None` means the manifest skips this layer.
    pub scheme: Scheme,
}

/// The subset being transformed: linear layers that share one input, plus the op producing it.
///
/// Getters borrow `self`, setters need `&mut self`, so a weight view can never alias a write.
pub struct Subset<'h> {
    services: HostServicesRef,
    ctx: *const c_void,
    info: SubsetInfo,
    _host: PhantomData<&'h ()>,
}

impl Subset<'_> {
    /// # Safety
    /// `handle` must come from the host for the duration of the current `transform_subset` call.
    pub unsafe fn from_handle(handle: SubsetHandle) -> Self {
        // The one place the erased table is viewed through this SDK's version of the prefix
        // type; its metadata tells the accessors which fields the host actually has.
        let services = HostServicesRef(unsafe {
            PrefixRef::from_raw(
                handle.services as *const WithMetadata_<HostServices_Prefix, HostServices_Prefix>,
            )
        });
        let info = (services.subset_info())(handle.ctx);
        Self {
            services,
            ctx: handle.ctx,
            info,
            _host: PhantomData,
        }
    }

    /// Decoder block index.
    pub fn block(&self) -> usize {
        self.info.block as usize
    }
    /// Subset name from the architecture file (`qkv`, `o`, `gate_up`, `down`).
    pub fn name(&self) -> &str {
        self.info.name.as_str()
    }
    /// Number of linear layers in the subset.
    pub fn len(&self) -> usize {
        self.info.n_layers as usize
    }
    pub fn is_empty(&self) -> bool {
        self.info.n_layers == 0
    }
    /// What produces the subset input (norm, linear, or nothing foldable).
    pub fn prev_op(&self) -> PrevOpKind {
        self.info.prev_op
    }
    /// Module name of the prev_op.
    pub fn prev_op_name(&self) -> &str {
        self.info.prev_op_name.as_str()
    }
    /// Module name of the inspected module (the module-forward service runs it).
    pub fn inspect_name(&self) -> &str {
        self.info.inspect_name.as_str()
    }

    /// Name, shape and scheme of layer `i`.
    pub fn layer(&self, i: usize) -> Result<Layer, PluginError> {
        let info: LayerInfo = (self.services.layer_info())(self.ctx, idx(i)?).into_result()?;
        Ok(Layer {
            name: info.name.into_string(),
            out_features: info.out_features as usize,
            in_features: info.in_features as usize,
            has_bias: info.has_bias,
            scheme: info.scheme.to_scheme()?,
        })
    }

    /// Weight of layer `i`, row-major `[out_features, in_features]`.
    pub fn weight(&self, i: usize) -> Result<&[f32], PluginError> {
        let s = (self.services.layer_weight())(self.ctx, idx(i)?).into_result()?;
        Ok(s.as_slice())
    }

    /// Bias of layer `i`, `[out_features]`, if it has one.
    pub fn bias(&self, i: usize) -> Result<Option<&[f32]>, PluginError> {
        let s = (self.services.layer_bias())(self.ctx, idx(i)?).into_result()?;
        Ok(s.into_option().map(|s| s.as_slice()))
    }

    /// Replaces the weight of layer `i` (`[out_features, in_features]`, all finite).
    pub fn set_weight(&mut self, i: usize, weight: &[f32]) -> Result<(), PluginError> {
        (self.services.set_layer_weight())(self.ctx, idx(i)?, RSlice::from_slice(weight))
            .into_result()
    }

    /// Replaces the bias of layer `i`.
    pub fn set_bias(&mut self, i: usize, bias: &[f32]) -> Result<(), PluginError> {
        (self.services.set_layer_bias())(self.ctx, idx(i)?, RSlice::from_slice(bias)).into_result()
    }

    /// Weight of the prev_op: a norm's `[in_features]` or a linear's `[in_features, prev_in]`.
    pub fn prev_op_weight(&self) -> Result<&[f32], PluginError> {
        Ok((self.services.prev_op_weight())(self.ctx)
            .into_result()?
            .as_slice())
    }

    /// Replaces the prev_op weight, e.g. after folding `1/s` into it.
    pub fn set_prev_op_weight(&mut self, weight: &[f32]) -> Result<(), PluginError> {
        (self.services.set_prev_op_weight())(self.ctx, RSlice::from_slice(weight)).into_result()
    }

    /// A statistic of the subset input, computed once by the host and shared by all algorithms.
    pub fn stat(&self, kind: StatKind) -> Result<&[f32], PluginError> {
        Ok((self.services.stat())(self.ctx, kind)
            .into_result()?
            .as_slice())
    }

    /// Calibration tokens behind the statistics.
    pub fn token_count(&self) -> Result<u64, PluginError> {
        (self.services.token_count())(self.ctx).into_result()
    }

    /// Runs the inspected module with the given candidate weights `(layer index, weight)`;
    /// the other layers keep their current weights. Returns `[tokens, out_dim]` values.
    pub fn module_forward(&self, overrides: &[(usize, &[f32])]) -> Result<Vec<f32>, PluginError> {
        let len = (self.services.module_output_len())(self.ctx).into_result()?;
        let mut out = vec![0.0f32; len as usize];
        let ov = overrides
            .iter()
            .map(|&(layer, w)| {
                Ok(WeightOverride {
                    layer: idx(layer)?,
                    weight: RSlice::from_slice(w),
                })
            })
            .collect::<Result<Vec<_>, PluginError>>()?;
        (self.services.module_forward())(
            self.ctx,
            RSlice::from_slice(&ov),
            RSliceMut::from_mut_slice(&mut out),
        )
        .into_result()?;
        Ok(out)
    }

    /// Records the quantization parameters chosen for layer `i`.
    pub fn set_qparams(&mut self, i: usize, q: &QParams) -> Result<(), PluginError> {
        (self.services.set_qparams())(self.ctx, idx(i)?, abi_qparams(q)).into_result()
    }

    /// Whether this host can record new qparams for the prev_op
    /// ([`Subset::set_prev_op_qparams`]); `false` on a host older than plugin-api 1.2.
    pub fn can_set_prev_op_qparams(&self) -> bool {
        self.services.set_prev_op_qparams().is_some()
    }

    /// Records new qparams for a linear prev_op that an earlier subset already quantized, after
    /// folding per-channel factors into its output rows (see `QParams::scale_rows`); set the
    /// rescaled weight with [`Subset::set_prev_op_weight`] too. `NOT_AVAILABLE` on a host older
    /// than plugin-api 1.2.
    pub fn set_prev_op_qparams(&mut self, q: &QParams) -> Result<(), PluginError> {
        match self.services.set_prev_op_qparams() {
            Some(f) => f(self.ctx, abi_qparams(q)).into_result(),
            None => Err(PluginError::not_available(
                "this gs-host (plugin-api older than 1.2) cannot record qparams of a prev_op",
            )),
        }
    }

    /// Adds a per-layer metric to the host's log and run report. Returns `false` (and does
    /// nothing) on a host older than plugin-api 1.1, which has no report.
    pub fn report_metric(&self, i: usize, key: &str, value: f64) -> bool {
        match (self.services.report_metric(), idx(i)) {
            (Some(f), Ok(i)) => {
                f(self.ctx, i, RStr::from_str(key), value);
                true
            }
            _ => false,
        }
    }

    /// Logs through the host's `tracing`, tagged with this plugin and algorithm.
    pub fn log(&self, level: LogLevel, message: &str) {
        (self.services.log())(self.ctx, level, RStr::from_str(message));
    }
    pub fn info(&self, message: &str) {
        self.log(LogLevel::INFO, message)
    }
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::WARN, message)
    }
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::DEBUG, message)
    }
}

/// The ABI view of `q` (borrows its scales and zero points).
fn abi_qparams(q: &QParams) -> AbiQParams<'_> {
    let (granularity, group_size) = match q.granularity {
        gs_quant::Granularity::Tensor => (0, 0),
        gs_quant::Granularity::Channel => (1, 0),
        gs_quant::Granularity::Group(g) => (2, g),
    };
    AbiQParams {
        granularity,
        group_size,
        scales: RSlice::from_slice(&q.scales),
        zeros: RSlice::from_slice(&q.zeros),
    }
}

fn idx(i: usize) -> Result<u32, PluginError> {
    u32::try_from(i).map_err(|_| PluginError::rejected(format!("layer index {i} out of range")))
}
