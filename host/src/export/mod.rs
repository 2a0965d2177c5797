//! Writing output checkpoints safely, and reading them back.
//!
//! Every export goes through [`Staging`]: files are written to a hidden sibling directory of
//! the output and renamed into place only when complete, so the output path never holds a
//! half-written result and the source model is never touched. One module per format:
//!
//! - [`fake`]: the source layout with quantize-dequantize values, for evaluation anywhere;
//! - [`compressed_tensors`]: vLLM / SGLang / transformers (`pack-quantized`, `int-quantized`,
//!   `float-quantized`);
//! - [`ascend`]: msModelSlim AscendV1 for vLLM-Ascend and MindIE.
//!
//! Each writer is an [`Exporter`]; each format also has a decoder ([`open_checkpoint`]) that
//! reads the written files back into f32 weights and input quantizers, used by the `exported`
//! evaluation point and by the round-trip tests: the reader is the writer's test.

use std::path::Path;

use gs_quant::{QParams, Scheme};

use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::forward::TensorSource;
use crate::model::{Model, ModelConfig};

/// The run record every gs-host output holds (provenance: manifest, plugins, per-layer
/// metrics). `--force` replaces only directories that contain it.
pub const RUN_RECORD: &str = "gs-run.json";

pub mod ascend;
pub mod compressed_tensors;
mod error;
pub mod fake;
mod files;
mod layer;
mod staging;
mod writer;

pub use error::ExportError;
pub use fake::{ExportSummary, FakeQuantExport};
pub use layer::{dequantize, model_scale_dtype, Codes, FinalizeError, NumberRules, QuantLayer};
pub use staging::{discard_uncommitted, Staging};
pub use writer::{ShardNaming, ShardedWriter, WrittenShards};

#[allow(unused_imports)] // used by the format modules
pub(crate) use files::{add_extra_file, copy_source_files};

/// Default limit of tensor bytes per output shard (transformers' `save_pretrained` default).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Settings every export takes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Replace an existing output that gs-host wrote.
    pub force: bool,
    /// Tensor bytes per shard (quantized formats; `fake` keeps the source's shards).
    pub max_shard_bytes: usize,
    /// Every linear module of the model that a format may have to list (block linears in
    /// block order, then `lm_head`), e.g. for compressed-tensors' `ignore`.
    pub linears: Vec<String>,
}

/// A format writer. The scheduler hands it, block by block, every quantized layer and every
/// other tensor the pipeline changed; [`finish`](Exporter::finish) copies what was not
/// handed over from the source, writes the format's metadata and commits the output.
pub trait Exporter {
    /// The final output path.
    fn output(&self) -> &Path;
    /// A changed tensor that is not part of a quantized layer (a norm weight a smoothing stage
    /// scaled, a skipped layer's weight), stored in its source dtype.
    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), ExportError>;
    /// A quantized linear layer, with its bias.
    fn layer(&mut self, layer: &QuantLayer) -> Result<(), ExportError>;
    /// An extra file (e.g. the run record); see [`Staging`] for what is refused.
    fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError>;
    /// Completes and commits the output.
    fn finish(self: Box<Self>) -> Result<ExportSummary, ExportError>;
}

/// Starts an export of `model` to `output` in `format`.
pub fn begin<'m>(
    format: ExportFormat,
    model: &'m Model,
    output: &Path,
    options: &ExportOptions,
) -> Result<Box<dyn Exporter + 'm>, ExportError> {
    Ok(match format {
        ExportFormat::Fake => Box::new(FakeQuantExport::begin(model, output, options.force)?),
        ExportFormat::CompressedTensors => Box::new(
            compressed_tensors::CompressedTensorsExport::begin(model, output, options)?,
        ),
        ExportFormat::Ascend => Box::new(ascend::AscendExport::begin(model, output, options)?),
    })
}

/// How `format` stores the numbers of a quantized layer (see [`QuantLayer::finalize`]).
pub fn number_rules(format: ExportFormat) -> NumberRules {
    match format {
        ExportFormat::Fake => fake::RULES,
        ExportFormat::CompressedTensors => compressed_tensors::RULES,
        ExportFormat::Ascend => ascend::RULES,
    }
}

/// Whether `format` can express `scheme` for `layer`; the error says why not and what to do.
/// Checked for every layer before any work.
pub fn check_scheme(format: ExportFormat, layer: &str, scheme: &Scheme) -> Result<(), String> {
    match format {
        ExportFormat::Fake => Ok(()),
        ExportFormat::CompressedTensors => compressed_tensors::check_scheme(layer, scheme),
        ExportFormat::Ascend => ascend::check_scheme(layer, scheme),
    }
}

/// Whole-model rules of `format` over every linear's scheme (e.g. Ascend's single
/// `group_size`); checked before any work.
pub fn check_plan(format: ExportFormat, layers: &[(String, Scheme)]) -> Result<(), String> {
    match format {
        ExportFormat::Ascend => ascend::check_plan(layers),
        _ => Ok(()),
    }
}

/// One quantized layer read back from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedLayer {
    /// Module name.
    pub name: String,
    pub codes: Codes,
    /// As stored (scales widened to f32).
    pub qparams: QParams,
    /// `(q − zp)·s` as the format's reference dequantizes: `[out, in]`.
    pub dequantized: Vec<f32>,
    /// The float bias, if the layer has one.
    pub bias: Option<Vec<f32>>,
    /// The input quantizer the checkpoint describes.
    pub input: Option<ActQuant>,
}

/// A written checkpoint opened for reading: [`TensorSource`] gives every tensor of the
/// original model by its original name (`<layer>.weight` decoded), so the forward pass runs
/// on it unchanged.
pub trait DecodedCheckpoint: TensorSource {
    /// The format's name as in the manifest.
    fn format(&self) -> ExportFormat;
    /// The checkpoint's config.json.
    fn config(&self) -> &ModelConfig;
    /// Module names of the quantized linear layers.
    fn quantized_layers(&self) -> Vec<String>;
    /// Decodes one quantized layer.
    fn decode_layer(&self, name: &str) -> Result<DecodedLayer, ExportError>;
    /// The input quantizer of linear `layer` (`None`: float input or not a quantized layer).
    fn input_quant(&self, layer: &str) -> Result<Option<ActQuant>, ExportError>;
}

/// Opens a checkpoint written by any format: compressed-tensors when config.json has a
/// `quantization_config` with `quant_method = "compressed-tensors"`, Ascend when
/// `quant_model_description.json` exists, otherwise a float or `fake` checkpoint (input
/// quantizers from the run record, if any).
pub fn open_checkpoint(dir: &Path) -> Result<Box<dyn DecodedCheckpoint>, ExportError> {
    if ascend::detect(dir) {
        return Ok(Box::new(ascend::AscendCheckpoint::open(dir)?));
    }
    if compressed_tensors::detect(dir)? {
        return Ok(Box::new(
            compressed_tensors::CompressedTensorsCheckpoint::open(dir)?,
        ));
    }
    Ok(Box::new(fake::FakeCheckpoint::open(dir)?))
}
