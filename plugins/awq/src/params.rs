//! `[[pipeline]] algorithm = "awq"` parameters.

use serde::Deserialize;

/// The parameters of the `awq` stage (TOML `[pipeline.params]`); the scheme comes from `[quant]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwqParams {
    /// Points of the α grid `α_i = i / (grid − 1)`, `i = 0 … grid − 1` (0 and 1 included).
    pub grid: usize,
    /// A fixed α in `[0, 1]` instead of the grid search (one candidate per subset).
    pub alpha: Option<f64>,
    /// AutoAWQ's `s = x̄^α / w̄^(1−α)` (`w̄` = mean of the group-normalized |W|) instead of
    /// llm-awq's `s = x̄^α`.
    pub duo_scaling: bool,
    /// Search a clipping range per weight group after scaling.
    pub clip: bool,
    /// Denominator of the shrink grid: candidate ranges are `1 − i / clip_grid` of the group's.
    pub clip_grid: usize,
    /// Largest shrink tried (exclusive, as llm-awq): `i < max_shrink · clip_grid`.
    pub max_shrink: f64,
    /// `true`: finish with round-to-nearest (gs-quant) and set qparams. `false`: leave the scaled
    /// and clipped weights in float for a following quantizing stage (`gptq`, `rtn`).
    pub quantize: bool,
}

impl Default for AwqParams {
    fn default() -> Self {
        Self {
            grid: 20,
            alpha: None,
            duo_scaling: false,
            clip: true,
            clip_grid: 20,
            max_shrink: 0.5,
            quantize: true,
        }
    }
}

impl AwqParams {
    /// Checks every value; the message names the key and what it must be.
    pub fn validate(&self) -> Result<(), String> {
        if self.grid < 2 {
            return Err(format!(
                "`grid` must be at least 2 (α runs over grid points from 0 to 1), got {}",
                self.grid
            ));
        }
        if let Some(a) = self.alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err(format!("`alpha` must be in [0, 1], got {a}"));
            }
        }
        if self.clip_grid == 0 {
            return Err("`clip_grid` must be at least 1, got 0".into());
        }
        if !(0.0..1.0).contains(&self.max_shrink) {
            return Err(format!(
                "`max_shrink` must be in [0, 1) (the fraction of a group's range that clipping may remove), got {}",
                self.max_shrink
            ));
        }
        Ok(())
    }

    /// The α candidates: the fixed `alpha`, or the grid `i / (grid − 1)`.
    pub fn alphas(&self) -> Vec<f32> {
        match self.alpha {
            Some(a) => vec![a as f32],
            None => (0..self.grid)
                .map(|i| i as f32 / (self.grid - 1) as f32)
                .collect(),
        }
    }

    /// The clipping shrink factors `1 − i / clip_grid` for `i < max_shrink · clip_grid`
    /// (llm-awq's `range(int(max_shrink * n_grid))`); always at least `1` (no clipping).
    pub fn shrinks(&self) -> Vec<f32> {
        let n = ((self.max_shrink * self.clip_grid as f64).floor() as usize).max(1);
        (0..n)
            .map(|i| 1.0 - i as f32 / self.clip_grid as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_the_references_grids() {
        let p = AwqParams::default();
        p.validate().unwrap();
        // 20 points from 0 to 1 in steps of 1/19.
        let a = p.alphas();
        assert_eq!(a.len(), 20);
        assert_eq!((a[0], a[19]), (0.0, 1.0));
        assert_eq!(a[1], 1.0 / 19.0);
        // llm-awq auto_clip: range(int(0.5 * 20)) → 1, 0.95, …, 0.55.
        let s = p.shrinks();
        assert_eq!(s.len(), 10);
        assert_eq!((s[0], s[9]), (1.0, 1.0 - 9.0 / 20.0));
        // max_shrink 0: only the unclipped range.
        let none = AwqParams {
            max_shrink: 0.0,
            ..p.clone()
        };
        assert_eq!(none.shrinks(), vec![1.0]);
        let fixed = AwqParams {
            alpha: Some(0.5),
            ..p
        };
        assert_eq!(fixed.alphas(), vec![0.5]);
    }

    #[test]
    fn bad_values_name_the_key() {
        for (p, key) in [
            (
                AwqParams {
                    grid: 1,
                    ..Default::default()
                },
                "`grid`",
            ),
            (
                AwqParams {
                    alpha: Some(1.5),
                    ..Default::default()
                },
                "`alpha`",
            ),
            (
                AwqParams {
                    alpha: Some(-0.1),
                    ..Default::default()
                },
                "`alpha`",
            ),
            (
                AwqParams {
                    clip_grid: 0,
                    ..Default::default()
                },
                "`clip_grid`",
            ),
            (
                AwqParams {
                    max_shrink: 1.0,
                    ..Default::default()
                },
                "`max_shrink`",
            ),
            (
                AwqParams {
                    max_shrink: f64::NAN,
                    ..Default::default()
                },
                "`max_shrink`",
            ),
        ] {
            let e = p.validate().unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }
}
