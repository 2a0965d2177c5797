//! RTN: round-to-nearest quantization of every weight with its layer's scheme.
//!
//! Data-free: scales come from each group's/row's/tensor's min and max (the min-max observer of
//! `gs_quant::compute_qparams`), values are rounded half-to-even and clamped. The result is the
//! baseline every calibrated algorithm is compared with.

use gs_plugin_api::quant::{fake_quantize, QuantError};
use gs_plugin_api::{export_plugin, parse_params, Algorithm, PluginError, Subset};
use serde::Deserialize;

/// `[[pipeline]] algorithm = "rtn"` takes no parameters: the scheme comes from `[quant]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtnParams {}

pub struct Rtn;

impl Algorithm for Rtn {
    const NAME: &'static str = "rtn";
    const SUMMARY: &'static str = "round-to-nearest weight quantization (data-free baseline)";

    fn from_params(params_toml: &str) -> Result<Self, PluginError> {
        let _: RtnParams = parse_params(Self::NAME, params_toml)?;
        Ok(Rtn)
    }

    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        for i in 0..subset.len() {
            let layer = subset.layer(i)?;
            let Some(args) = layer.scheme.weights else {
                continue; // skipped by the manifest
            };
            let w = subset.weight(i)?;
            let (deq, qparams) = fake_quantize(w, layer.out_features, layer.in_features, &args)
                .map_err(|e| quant_error(&layer.name, e))?;
            let mse = mean_squared_error(w, &deq);
            subset.set_weight(i, &deq)?;
            subset.set_qparams(i, &qparams)?;
            subset.report_metric(i, "weight_mse", mse);
            subset.debug(&format!("{}: weight mse {mse:.3e}", layer.name));
        }
        Ok(())
    }
}

fn quant_error(layer: &str, e: QuantError) -> PluginError {
    PluginError::unsupported(format!("{layer}: {e}"))
}

/// `mean((a - b)²)` in f64.
fn mean_squared_error(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum();
    sum / a.len().max(1) as f64
}

export_plugin! {
    name: "gs-rtn",
    vendor: "gs-host",
    algorithms: [Rtn],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_parameters() {
        let e = Rtn::from_params("bits = 4").err().unwrap();
        assert!(e.message.contains("bits"), "{e}");
        assert!(Rtn::from_params("").is_ok());
    }

    #[test]
    fn mse_of_known_vectors() {
        // (1-0)² + (2-4)² = 5 over 2 values
        assert_eq!(mean_squared_error(&[1.0, 2.0], &[0.0, 4.0]), 2.5);
    }
}
