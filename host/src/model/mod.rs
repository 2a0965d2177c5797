//! Loading a Hugging Face checkpoint: `config.json` plus safetensors weights, memory-mapped.
//!
//! [`Model::open`] validates the config and every shard header up front, so later stages can
//! rely on names, dtypes, shapes and byte ranges; tensor data is only read when asked for
//! ([`Weights::raw_bytes`], [`Weights::to_f32`]). The source files are never written.

mod config;
mod dtype;
mod error;
pub mod fakequant;
pub mod forward;
mod header;
mod inspect;
#[cfg(test)]
pub(crate) mod testutil;
mod weights;

use std::path::{Path, PathBuf};

pub use config::{ModelConfig, RopeScaling};
pub use dtype::{dtype_bytes_to_f32, f32_to_dtype_bytes, DType, DTypeError};
pub use error::ModelError;
pub(crate) use header::{encode_header, HeaderTensor};
pub use inspect::{DTypeTotals, ModelSummary, TensorSummary};
pub use weights::{Shard, TensorInfo, Weights, INDEX_FILE, SINGLE_FILE};

/// File name of the model configuration inside a model directory.
pub const CONFIG_FILE: &str = "config.json";

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Model {
    /// The directory, as given to [`Model::open`].
    pub dir: PathBuf,
    /// Its parsed `config.json`.
    pub config: ModelConfig,
    /// Its memory-mapped weights.
    pub weights: Weights,
}

impl Model {
    /// Opens `dir`: parses `config.json` and maps the safetensors weights (see
    /// [`Weights::open`]). Consistency between config and tensors (e.g. layer count) is left to
    /// the architecture code.
    pub fn open(dir: &Path) -> Result<Model, ModelError> {
        let weights = Weights::open(dir)?;
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        tracing::info!(
            dir = %dir.display(),
            architecture = config.architecture(),
            layers = config.num_hidden_layers,
            tensors = weights.len(),
            shards = weights.shards().len(),
            "opened model"
        );
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// A summary for `gs-host inspect` (see [`ModelSummary`]).
    pub fn summary(&self) -> ModelSummary {
        ModelSummary::new(self)
    }
}
