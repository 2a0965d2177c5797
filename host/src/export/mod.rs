//! Writing output checkpoints safely.
//!
//! Every export goes through [`Staging`]: files are written to a hidden sibling directory of
//! the output and renamed into place only when complete, so the output path never holds a
//! half-written result and the source model is never touched. [`FakeQuantExport`] writes the
//! `fake` format: the source layout with some tensors' values replaced.

/// The run record every gs-host output holds (provenance: manifest, plugins, per-layer
/// metrics). `--force` replaces only directories that contain it.
pub const RUN_RECORD: &str = "gs-run.json";

mod error;
mod fake;
mod staging;

pub use error::ExportError;
pub use fake::{ExportSummary, FakeQuantExport};
pub use staging::Staging;
