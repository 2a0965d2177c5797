//! Evaluation: what a recipe costs in accuracy.
//!
//! - [`perplexity`]: the perplexity protocol, block by block, on any [`TensorSource`]
//!   (`crate::model::forward::TensorSource`) — the source checkpoint, the pipeline's working
//!   weights, or a decoded export;
//! - [`report`]: the per-layer report (`report.json`, `report.svg`) of a run.

pub mod perplexity;
pub mod report;

pub use perplexity::{perplexity, window_nll, EvalStream, InputQuant, Nll};
