//! Which subset statistics are valid for the block being processed.
//!
//! A subset's input is produced by the modules *upstream* of it in the block (for a pre-norm
//! decoder block: input_layernorm → q/k/v → attention → o_proj → post_attention_layernorm →
//! gate/up → down_proj). When a transform changes a module, every statistic of a subset whose
//! input is computed after that module is stale; the cache drops exactly those, and the next
//! request recomputes them. A statistic two plugins ask for is computed once.

use std::collections::BTreeMap;

use gs_plugin_api::{StatKind, StatsRequest};

use super::SubsetStats;

/// Statistics of one subset input `X` (`[tokens, k]`), as served to plugins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputStats {
    /// Input channels `k`.
    pub k: usize,
    /// Calibration tokens behind the statistics.
    pub tokens: u64,
    /// What was computed (a superset of what was requested).
    pub computed: StatsRequest,
    pub absmax: Vec<f32>,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean_abs: Vec<f32>,
    /// `XᵀX` summed over tokens, row-major `[k, k]`.
    pub hessian: Vec<f32>,
}

impl SubsetStats for InputStats {
    fn get(&self, kind: StatKind) -> Result<&[f32], String> {
        if !self.computed.contains(kind) {
            return Err(format!(
                "`{}` was not requested; declare it in required_stats",
                kind.name()
            ));
        }
        Ok(match kind {
            StatKind::ABSMAX => &self.absmax,
            StatKind::MIN => &self.min,
            StatKind::MAX => &self.max,
            StatKind::MEAN_ABS => &self.mean_abs,
            StatKind::HESSIAN => &self.hessian,
            _ => return Err(format!("unknown statistic code {}", kind.0)),
        })
    }

    fn token_count(&self) -> u64 {
        self.tokens
    }
}

/// Where in the block a subset's input is observed, in data-flow order.
pub type TapRank = usize;

/// The statistics cache of one block.
#[derive(Debug, Default)]
pub struct StatsCache {
    /// subset name → (tap rank, statistics).
    entries: BTreeMap<String, (TapRank, InputStats)>,
    /// How many times statistics were computed, per subset (tests and logs).
    computations: BTreeMap<String, usize>,
}

impl StatsCache {
    /// Cached statistics of `subset` if they cover `request`.
    pub fn get(&self, subset: &str, request: StatsRequest) -> Option<&InputStats> {
        self.entries
            .get(subset)
            .map(|(_, s)| s)
            .filter(|s| s.computed.0 & request.0 == request.0)
    }

    /// Whether `subset` needs computing for `request`.
    pub fn needs(&self, subset: &str, request: StatsRequest) -> bool {
        !request.is_empty() && self.get(subset, request).is_none()
    }

    /// Stores freshly computed statistics of `subset`, observed at `tap`.
    pub fn insert(&mut self, subset: &str, tap: TapRank, stats: InputStats) {
        *self.computations.entry(subset.to_string()).or_default() += 1;
        self.entries.insert(subset.to_string(), (tap, stats));
    }

    /// A module feeding tap `from` (and everything after it) changed: drop every statistic
    /// observed at a tap `>= from`. Returns the names of the dropped subsets.
    pub fn invalidate_from(&mut self, from: TapRank) -> Vec<String> {
        let stale: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (tap, _))| *tap >= from)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &stale {
            self.entries.remove(name);
        }
        stale
    }

    /// How many times the statistics of `subset` were computed in this block.
    pub fn computations(&self, subset: &str) -> usize {
        self.computations.get(subset).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(req: StatsRequest, v: f32) -> InputStats {
        InputStats {
            k: 1,
            tokens: 4,
            computed: req,
            absmax: vec![v],
            min: vec![-v],
            max: vec![v],
            mean_abs: vec![v / 2.0],
            hessian: vec![v * v],
        }
    }

    #[test]
    fn a_statistic_two_plugins_request_is_computed_once() {
        let mut c = StatsCache::default();
        let req = StatsRequest::ABSMAX | StatsRequest::HESSIAN;
        assert!(c.needs("qkv", req));
        c.insert("qkv", 0, stats(req, 2.0));
        // The second plugin asks for a subset of what is cached: served, not recomputed.
        assert!(!c.needs("qkv", StatsRequest::HESSIAN));
        assert!(!c.needs("qkv", StatsRequest::ABSMAX));
        assert_eq!(c.computations("qkv"), 1);
        let h = c.get("qkv", StatsRequest::HESSIAN).unwrap();
        assert_eq!(h.get(StatKind::HESSIAN).unwrap(), &[4.0]);
        // Something not computed is neither served nor faked.
        assert!(c.needs("qkv", StatsRequest::MEAN_ABS));
        assert!(h.get(StatKind::MEAN_ABS).unwrap_err().contains("mean_abs"));
    }

    #[test]
    fn an_upstream_change_drops_exactly_the_downstream_statistics() {
        let mut c = StatsCache::default();
        let req = StatsRequest::ABSMAX;
        for (name, tap) in [("qkv", 0), ("o", 1), ("gate_up", 2), ("down", 3)] {
            c.insert(name, tap, stats(req, 1.0));
        }
        // o_proj changed: it feeds post_attention_layernorm's input (tap 2) and later.
        let mut dropped = c.invalidate_from(2);
        dropped.sort();
        assert_eq!(dropped, ["down", "gate_up"]);
        assert!(!c.needs("qkv", req) && !c.needs("o", req));
        assert!(c.needs("gate_up", req) && c.needs("down", req));
        // A smoothing that rescales input_layernorm changes every input of the block.
        c.invalidate_from(0);
        assert!(["qkv", "o", "gate_up", "down"]
            .iter()
            .all(|s| c.needs(s, req)));
    }
}
