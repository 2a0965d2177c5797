//! Statistics of subset inputs, served to plugins through the host services.
//!
//! Plugins declare what they need ([`gs_plugin_api::StatsRequest`]); the host computes it once
//! per subset input and shares it between every algorithm of the pipeline. This version runs
//! data-free pipelines only, so no statistics source exists yet: a plugin that asks for one
//! gets a `NOT_AVAILABLE` error naming the missing `[calibration]` support.

use gs_plugin_api::StatKind;

/// Statistics of one subset input `X` (`[tokens, in_features]`).
pub trait SubsetStats {
    /// The statistic `kind` (shapes in [`StatKind`]); an error message if it cannot be served.
    fn get(&self, kind: StatKind) -> Result<&[f32], String>;
    /// Number of calibration tokens behind the statistics.
    fn token_count(&self) -> u64;
}
