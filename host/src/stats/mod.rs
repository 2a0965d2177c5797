//! Statistics of subset inputs, served to plugins through the host services.
//!
//! Plugins declare what they need ([`gs_plugin_api::StatsRequest`]); the host computes it in
//! one pass over the block's calibration inputs ([`Accumulator`]), keeps it in a per-block
//! [`StatsCache`] shared by every algorithm of the pipeline, and drops exactly the statistics a
//! transform made stale (`scheduler` runs the passes). Without `[calibration]` a stage that
//! requests statistics is refused before any work.

mod accumulate;
mod cache;

pub use accumulate::{Accumulator, XtxAccumulate};
pub use cache::{InputStats, StatsCache, TapRank};

use gs_plugin_api::StatKind;

/// Statistics of one subset input `X` (`[tokens, in_features]`).
pub trait SubsetStats {
    /// The statistic `kind` (shapes in [`StatKind`]); an error message if it cannot be served.
    fn get(&self, kind: StatKind) -> Result<&[f32], String>;
    /// Number of calibration tokens behind the statistics.
    fn token_count(&self) -> u64;
}
