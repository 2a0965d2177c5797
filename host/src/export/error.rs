//! Errors of writing an output checkpoint.

use std::path::PathBuf;

use crate::model::{DType, ModelError};

/// An error while staging, writing or committing an output directory.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The output path resolves to the source model directory.
    #[error("output {} is the source model directory; choose another output path", output.display())]
    OutputIsSource {
        /// The output as given.
        output: PathBuf,
    },

    /// The output lies inside the source model directory.
    #[error("output {} is inside the source model directory {}; choose a path outside it", output.display(), source_dir.display())]
    OutputInsideSource {
        /// The output as given.
        output: PathBuf,
        /// The source model directory.
        source_dir: PathBuf,
    },

    /// The source model directory lies inside the output (replacing the output would delete it).
    #[error("source model directory {} is inside the output {}; choose an output that does not contain the model", source_dir.display(), output.display())]
    SourceInsideOutput {
        /// The output as given.
        output: PathBuf,
        /// The source model directory.
        source_dir: PathBuf,
    },

    /// The output directory exists and has contents.
    #[error("output {} already exists and is not empty; pass --force to replace it", path.display())]
    OutputNotEmpty {
        /// The output.
        path: PathBuf,
    },

    /// `--force` was given, but the non-empty output was not written by gs-host.
    #[error("output {} is not empty and was not written by gs-host (it has no {}); refusing to delete it even with --force: remove it yourself or choose another path", path.display(), super::RUN_RECORD)]
    ForceNotOurs {
        /// The output.
        path: PathBuf,
    },

    /// The output exists and is not a directory.
    #[error("output {} exists and is a file, not a directory; remove it or choose another path", path.display())]
    OutputIsFile {
        /// The output.
        path: PathBuf,
    },

    /// The output path cannot name a directory to create (e.g. `/` or `..`).
    #[error("invalid output path {}: {reason}", path.display())]
    InvalidOutput {
        /// The output as given.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },

    /// A file-system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "rename", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// An error reading the source model.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// `replace` named a tensor the source model does not have.
    #[error("cannot replace tensor \"{tensor}\": no such tensor in the source model at {}", model_dir.display())]
    UnknownTensor {
        /// The name given.
        tensor: String,
        /// The source model directory.
        model_dir: PathBuf,
    },

    /// `replace` got a number of values different from the tensor's element count.
    #[error("cannot replace tensor \"{tensor}\": its shape {shape:?} has {expected} elements but {found} values were given")]
    LengthMismatch {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its element count.
        expected: usize,
        /// Values given.
        found: usize,
    },

    /// `replace` was called twice for the same tensor.
    #[error("tensor \"{tensor}\" was already replaced in this export")]
    AlreadyReplaced {
        /// The tensor.
        tensor: String,
    },

    /// The tensor's source dtype cannot be written from `f32` values.
    #[error("cannot replace tensor \"{tensor}\": its dtype {dtype} cannot be written from f32 values (supported: BF16, F16, F32)")]
    UnsupportedDType {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },

    /// `add_file` got an unusable name.
    #[error("cannot add file \"{name}\" to the output: {reason}")]
    InvalidExtraFile {
        /// The name given.
        name: String,
        /// Why.
        reason: &'static str,
    },

    /// The written output does not match the source layout (a bug, reported rather than
    /// committed).
    #[error("written output failed verification: {0}")]
    Verification(String),

    /// A written checkpoint that does not decode (missing or inconsistent tensors or metadata).
    #[error("{}: {reason}", file.display())]
    BadCheckpoint {
        /// The file (or directory) at fault.
        file: PathBuf,
        /// What is wrong and what was expected.
        reason: String,
    },

    /// Something the format cannot store (found while writing; most cases are refused by
    /// `check_scheme` before any work).
    #[error("{0}")]
    Unsupported(String),
}

impl ExportError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ExportError {
        let path = path.into();
        move |source| ExportError::Io {
            action,
            path,
            source,
        }
    }
}
