//! Template plugin: *clipped* round-to-nearest.
//!
//! Each weight row is clipped to `clip_ratio × max|w|` before min-max quantization, a simple
//! guard against outliers stretching the scale. It is deliberately small: it shows every piece a
//! real algorithm needs — parameters, the subset loop, the shared primitives, host-checked
//! results, quantization parameters, metrics and logging.

use gs_plugin_api::quant::fake_quantize;
use gs_plugin_api::{export_plugin, parse_params, Algorithm, PluginError, Subset};
use serde::Deserialize;

/// Parameters from the manifest: `[[pipeline]] algorithm = "clip_rtn"` + `params = { … }`.
/// `deny_unknown_fields` turns a typo into an error that names the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipRtnParams {
    /// Fraction of each row's absolute maximum kept, in (0, 1]; 1.0 is plain RTN.
    #[serde(default = "default_clip_ratio")]
    pub clip_ratio: f32,
}

fn default_clip_ratio() -> f32 {
    1.0
}

pub struct ClipRtn {
    clip_ratio: f32,
}

impl Algorithm for ClipRtn {
    const NAME: &'static str = "clip_rtn";
    const SUMMARY: &'static str =
        "template: clip each row to clip_ratio·max|w|, then round to nearest";

    fn from_params(params_toml: &str) -> Result<Self, PluginError> {
        let p: ClipRtnParams = parse_params(Self::NAME, params_toml)?;
        if !(p.clip_ratio > 0.0 && p.clip_ratio <= 1.0) {
            return Err(PluginError::invalid_params(format!(
                "clip_rtn: clip_ratio must be in (0, 1], got {}",
                p.clip_ratio
            )));
        }
        Ok(ClipRtn {
            clip_ratio: p.clip_ratio,
        })
    }

    // Data-free: no statistics needed (the default of `required_stats`).

    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        for i in 0..subset.len() {
            let layer = subset.layer(i)?;
            let Some(args) = layer.scheme.weights else {
                continue; // the manifest skips this layer
            };
            let (rows, cols) = (layer.out_features, layer.in_features);
            let clipped = clip_rows(subset.weight(i)?, cols, self.clip_ratio);
            // Never re-implement rounding or scales: the shared primitives define them.
            let (deq, qparams) = fake_quantize(&clipped, rows, cols, &args)
                .map_err(|e| PluginError::unsupported(format!("{}: {e}", layer.name)))?;
            subset.set_weight(i, &deq)?; // the host checks shape and finiteness
            subset.set_qparams(i, &qparams)?;
            subset.report_metric(i, "clip_ratio", f64::from(self.clip_ratio));
        }
        subset.debug(&format!(
            "block {} subset {}: clipped at {}",
            subset.block(),
            subset.name(),
            self.clip_ratio
        ));
        Ok(())
    }
}

/// Clips each row of `w` (`[rows, cols]`, row-major) to `±ratio · max_j |w[r, j]|`.
pub fn clip_rows(w: &[f32], cols: usize, ratio: f32) -> Vec<f32> {
    let mut out = w.to_vec();
    for row in out.chunks_mut(cols.max(1)) {
        let limit = ratio * row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for v in row {
            *v = v.clamp(-limit, limit);
        }
    }
    out
}

export_plugin! {
    name: "gs-plugin-template",
    vendor: "gs-host (template)",
    algorithms: [ClipRtn],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_each_row_to_its_own_limit() {
        // row 0: max|w| = 4 → limit 2; row 1: max|w| = 1 → limit 0.5
        let w = [4.0, -1.0, 1.0, -3.0, 0.25, -1.0, 0.5, 1.0];
        let c = clip_rows(&w, 4, 0.5);
        assert_eq!(c, [2.0, -1.0, 1.0, -2.0, 0.25, -0.5, 0.5, 0.5]);
    }

    #[test]
    fn parameters_are_checked() {
        assert!(ClipRtn::from_params("").is_ok());
        assert_eq!(
            ClipRtn::from_params("clip_ratio = 0.9").unwrap().clip_ratio,
            0.9
        );
        let e = ClipRtn::from_params("clip_ratio = 1.5").err().unwrap();
        assert!(e.message.contains("(0, 1]"), "{e}");
        let e = ClipRtn::from_params("clip = 0.5").err().unwrap();
        assert!(e.message.contains("clip"), "{e}");
    }
}
