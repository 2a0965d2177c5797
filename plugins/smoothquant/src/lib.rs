//! SmoothQuant: per-channel smoothing that migrates activation outliers into the weights, so
//! that W8A8 activations quantize well (Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant:
//! Accurate and Efficient Post-Training Quantization for Large Language Models", ICML 2023,
//! arXiv:2211.10438).
//!
//! A *transform*, not a quantizer: it changes weights so that the float model is unchanged,
//! and a later stage (`rtn`, `gptq`) quantizes. Per smoothed subset (layers `W_k: [out_k, in]`
//! sharing the input `X: [tokens, in]`):
//!
//! 1. `a_j = max_t |X[t, j]|`, the host's `ABSMAX` statistic of the subset input over the
//!    calibration tokens (computed once per block, shared with other stages, recomputed after an
//!    upstream change);
//! 2. `w_j = max_k max_r |W_k[r, j]|`, over every layer of the subset (one `s` serves the shared
//!    input);
//! 3. `s_j = max(a_j^α / max(w_j, 1e-5)^(1−α), 1e-5)` ([`smooth::smoothing_scales`]);
//! 4. `W_k ← W_k · diag(s)`, and `1/s` folded into the op producing `X`: a norm's weight
//!    (`input_layernorm → q/k/v`, `post_attention_layernorm → gate/up`), or the output rows of the
//!    previous linear (`v_proj → o_proj`, `up_proj → down_proj`).
//!
//! Folding into the previous linear is exact only when its output rows *are* the subset's input
//! channels and it has no bias (the bias would need dividing too, which the host does not
//! expose through the prev_op). With grouped-query attention `v_proj` has fewer rows than
//! `o_proj` has inputs (heads share a value head), so `o` is skipped there with a warning.
//!
//! Row scaling leaves the previous linear's per-channel and per-group weight quantization
//! unchanged (each row's scale absorbs the factor), so smoothing `down` costs `up_proj`
//! nothing.
//!
//! What the stage refuses: a subset to smooth whose layers quantize weights but no activations
//! (a weight-only scheme such as `w8a16`/`w4a16`). Smoothing then only widens the weights'
//! ranges: at best a no-op, usually a loss. Layers left in float by `[[quant.override]] skip`
//! are not a reason to refuse (the subset is left alone).

pub mod smooth;

use std::collections::{BTreeMap, BTreeSet};

use gs_plugin_api::{
    export_plugin, parse_params, Algorithm, PluginError, PrevOpKind, StatKind, StatsRequest, Subset,
};
use serde::Deserialize;

use smooth::{column_absmax, divide_norm, divide_rows, scale_columns, smoothing_scales};

/// Subset names of the family files (`host/src/arch/*.toml`) this stage knows how to fold.
pub const SUBSETS: [&str; 4] = ["qkv", "o", "gate_up", "down"];

/// `[[pipeline]] algorithm = "smoothquant"` parameters; the scheme comes from `[quant]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothQuantParams {
    /// Migration strength `α` in `[0, 1]`: 0 leaves the activations' range alone, 1 moves all
    /// of it into the weights. The paper uses 0.5 for most models; 0.8–0.85 is common for
    /// Llama-like ones.
    pub alpha: f64,
    /// Which subsets to smooth. Default: the norm-fed ones, as the paper and llm-compressor do.
    pub subsets: Vec<String>,
}

impl Default for SmoothQuantParams {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            subsets: vec!["qkv".into(), "gate_up".into()],
        }
    }
}

impl SmoothQuantParams {
    fn validate(&self) -> Result<(), String> {
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err(format!(
                "`alpha` must be in [0, 1] (the migration strength: 0 leaves the activations \
                 alone, 1 moves all of their range into the weights), got {}",
                self.alpha
            ));
        }
        if self.subsets.is_empty() {
            return Err(format!(
                "`subsets` is empty, so there is nothing to smooth; list some of {}",
                SUBSETS.join(", ")
            ));
        }
        let mut seen = BTreeSet::new();
        for s in &self.subsets {
            if !SUBSETS.contains(&s.as_str()) {
                return Err(format!(
                    "`subsets` names an unknown subset {s:?}; valid names are {} (qkv and \
                     gate_up follow a norm, o and down follow v_proj and up_proj)",
                    SUBSETS.join(", ")
                ));
            }
            if !seen.insert(s.as_str()) {
                return Err(format!("`subsets` lists {s:?} twice"));
            }
        }
        Ok(())
    }
}

/// What the stage saw of one linear layer earlier in the block: a later subset whose prev_op
/// is this layer needs its output rows and whether it has a bias.
#[derive(Debug, Clone, Copy)]
struct SeenLinear {
    out_features: usize,
    has_bias: bool,
}

/// The SmoothQuant stage, configured by [`SmoothQuantParams`].
pub struct SmoothQuant {
    params: SmoothQuantParams,
    /// Layers of the current block's earlier subsets (subsets run in block order, qkv first).
    seen: BTreeMap<String, SeenLinear>,
    block: Option<usize>,
    /// Warnings already given (subset, reason): the same model shape would repeat them per block.
    warned: BTreeSet<(String, &'static str)>,
}

/// Why a subset listed in `subsets` is left alone.
enum Skip {
    /// Every layer is left in float by the manifest.
    AllFloat,
    /// The prev_op cannot take `1/s` exactly.
    NoFold(&'static str, String),
}

impl SmoothQuant {
    /// Whether this subset is smoothed; errors for a scheme the stage cannot serve.
    fn check_subset(&self, subset: &Subset<'_>) -> Result<Option<Skip>, PluginError> {
        let mut quantizes_weights = false;
        let mut quantizes_inputs = false;
        let mut in_features = None;
        for i in 0..subset.len() {
            let l = subset.layer(i)?;
            quantizes_weights |= l.scheme.weights.is_some();
            quantizes_inputs |= l.scheme.activations.is_some();
            in_features = Some(l.in_features);
        }
        if !quantizes_weights && !quantizes_inputs {
            return Ok(Some(Skip::AllFloat));
        }
        if !quantizes_inputs {
            return Err(PluginError::unsupported(format!(
                "smoothquant: subset `{}` is listed in `subsets`, but its layers' scheme quantizes \
                 weights only; SmoothQuant moves activation outliers into the weights, which only \
                 pays when activations are quantized (W8A8) and widens the weight ranges otherwise; \
                 use a scheme with quantized activations (e.g. w8a8 or w8a8_dynamic), or drop \
                 `{}` from `subsets` (or the smoothquant stage)",
                subset.name(),
                subset.name()
            )));
        }
        let k = in_features.unwrap_or(0);
        let prev = subset.prev_op_name().to_string();
        let kind = subset.prev_op();
        if kind == PrevOpKind::NORM {
            return Ok(None);
        }
        if kind != PrevOpKind::LINEAR {
            return Ok(Some(Skip::NoFold(
                "no-prev-op",
                format!("its input is not produced by a norm or a linear layer ({prev:?})"),
            )));
        }
        match self.seen.get(&prev) {
            None => Ok(Some(Skip::NoFold(
                "unseen",
                format!("its prev_op {prev} is not a layer of an earlier subset of this block"),
            ))),
            Some(p) if p.out_features != k => Ok(Some(Skip::NoFold(
                "shape",
                format!(
                    "{prev} has {} output rows for {k} input channels (grouped-query attention: \
                     heads share value rows, so one factor per input channel cannot be folded)",
                    p.out_features
                ),
            ))),
            Some(p) if p.has_bias => Ok(Some(Skip::NoFold(
                "bias",
                format!("{prev} has a bias, which would need the same division"),
            ))),
            Some(_) => Ok(None),
        }
    }

    fn remember(&mut self, subset: &Subset<'_>) -> Result<(), PluginError> {
        if self.block != Some(subset.block()) {
            self.seen.clear();
            self.block = Some(subset.block());
        }
        for i in 0..subset.len() {
            let l = subset.layer(i)?;
            self.seen.insert(
                l.name,
                SeenLinear {
                    out_features: l.out_features,
                    has_bias: l.has_bias,
                },
            );
        }
        Ok(())
    }

    fn warn_once(&mut self, subset: &Subset<'_>, reason: &'static str, message: &str) {
        if self.warned.insert((subset.name().to_string(), reason)) {
            subset.warn(&format!(
                "subset `{}` is not smoothed: {message} (same for every block like this one)",
                subset.name()
            ));
        } else {
            subset.debug(&format!(
                "block {} subset `{}` is not smoothed: {message}",
                subset.block(),
                subset.name()
            ));
        }
    }
}

impl Algorithm for SmoothQuant {
    const NAME: &'static str = "smoothquant";
    const SUMMARY: &'static str =
        "SmoothQuant: migrates activation outliers into the weights (run before rtn/gptq, W8A8)";

    fn from_params(params_toml: &str) -> Result<Self, PluginError> {
        let params: SmoothQuantParams = parse_params(Self::NAME, params_toml)?;
        params.validate().map_err(|m| {
            PluginError::invalid_params(format!("parameters of `smoothquant`: {m}"))
        })?;
        Ok(SmoothQuant {
            params,
            seen: BTreeMap::new(),
            block: None,
            warned: BTreeSet::new(),
        })
    }

    fn required_stats(&self) -> StatsRequest {
        StatsRequest::ABSMAX
    }

    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        self.remember(subset)?;
        if !self.params.subsets.iter().any(|s| s == subset.name()) {
            return Ok(());
        }
        match self.check_subset(subset)? {
            None => {}
            Some(Skip::AllFloat) => {
                subset.debug(&format!(
                    "block {} subset `{}`: every layer stays float, nothing to smooth",
                    subset.block(),
                    subset.name()
                ));
                return Ok(());
            }
            Some(Skip::NoFold(reason, message)) => {
                self.warn_once(subset, reason, &message);
                return Ok(());
            }
        }

        let n = subset.len();
        let k = subset.layer(0)?.in_features;
        let act = subset.stat(StatKind::ABSMAX)?.to_vec();
        let s = {
            let weights = (0..n)
                .map(|i| subset.weight(i))
                .collect::<Result<Vec<_>, _>>()?;
            let w_max = column_absmax(&weights, k);
            smoothing_scales(&act, &w_max, self.params.alpha).map_err(|m| {
                PluginError::numeric(format!(
                    "smoothquant: factors of subset `{}`: {m}",
                    subset.name()
                ))
            })?
        };
        for i in 0..n {
            let w = scale_columns(subset.weight(i)?, &s);
            subset.set_weight(i, &w)?;
        }
        let prev = subset.prev_op_weight()?;
        let folded = if subset.prev_op() == PrevOpKind::NORM {
            divide_norm(prev, &s)
        } else {
            divide_rows(prev, &s)
        };
        subset.set_prev_op_weight(&folded)?;

        let before = act.iter().fold(0.0f32, |m, a| m.max(*a));
        let after = act.iter().zip(&s).fold(0.0f32, |m, (a, sj)| m.max(a / sj));
        let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
        for i in 0..n {
            subset.report_metric(i, "input_absmax_before", f64::from(before));
            subset.report_metric(i, "input_absmax_after", f64::from(after));
            subset.report_metric(i, "smooth_scale_min", f64::from(lo));
            subset.report_metric(i, "smooth_scale_max", f64::from(hi));
        }
        subset.info(&format!(
            "block {} subset `{}`: α = {}, factors in [{lo:.3e}, {hi:.3e}], input max |x| \
             {before:.4} → {after:.4}, 1/s folded into {}",
            subset.block(),
            subset.name(),
            self.params.alpha,
            subset.prev_op_name()
        ));
        Ok(())
    }
}

export_plugin! {
    name: "gs-smoothquant",
    vendor: "gs-host",
    algorithms: [SmoothQuant],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match SmoothQuant::from_params(text) {
            Ok(_) => panic!("{text:?} was accepted"),
            Err(e) => e.message.to_string(),
        }
    }

    #[test]
    fn defaults_are_the_papers() {
        let a = SmoothQuant::from_params("").unwrap();
        assert_eq!(a.params.alpha, 0.5);
        assert_eq!(a.params.subsets, ["qkv", "gate_up"]);
        let b = SmoothQuant::from_params(
            "alpha = 0.85\nsubsets = [\"qkv\", \"o\", \"gate_up\", \"down\"]",
        )
        .unwrap();
        assert_eq!(b.params.alpha, 0.85);
        assert_eq!(b.params.subsets.len(), 4);
        // The ends of the range are valid strengths.
        for a in ["0", "1", "0.0", "1.0"] {
            assert!(
                SmoothQuant::from_params(&format!("alpha = {a}")).is_ok(),
                "{a}"
            );
        }
    }

    #[test]
    fn an_alpha_outside_the_unit_interval_is_refused_naming_the_plugin_and_key() {
        for a in ["1.5", "-0.1", "nan", "inf"] {
            let e = err(&format!("alpha = {a}"));
            assert!(
                e.contains("`smoothquant`") && e.contains("`alpha`") && e.contains("[0, 1]"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_subset_lists_are_refused_naming_the_plugin_and_key() {
        let e = err("subsets = [\"qkv\", \"mlp\"]");
        assert!(
            e.contains("`smoothquant`")
                && e.contains("`subsets`")
                && e.contains("\"mlp\"")
                && e.contains("gate_up"),
            "{e}"
        );
        let e = err("subsets = []");
        assert!(e.contains("`subsets` is empty"), "{e}");
        let e = err("subsets = [\"o\", \"o\"]");
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let e = err("strength = 0.5");
        assert!(e.contains("smoothquant") && e.contains("strength"), "{e}");
        let e = err("subsets = \"qkv\"");
        assert!(e.contains("smoothquant"), "{e}");
    }

    #[test]
    fn it_asks_the_host_for_the_input_absmax() {
        let a = SmoothQuant::from_params("").unwrap();
        assert!(a.required_stats().contains(StatKind::ABSMAX));
        assert!(!a.required_stats().contains(StatKind::HESSIAN));
    }
}
