//! AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight
//! Quantization for LLM Compression and Acceleration", MLSys 2024, arXiv:2306.00978).
//!
//! `[[pipeline]] algorithm = "awq"`, for integer weight-only group schemes (W2–W8 A16 with a
//! `group_size`). Per subset (the layers sharing one input, plus the op producing it):
//!
//! 1. **Scale search** ([`scale`]). `s(α) = x̄^α`, normalized by `√(max s · min s)`, with
//!    `x̄_j = mean_t |X[t, j]|` (the host's `MEAN_ABS` statistic); with `duo_scaling`,
//!    `s(α) = x̄^α / (w̄^(1−α) + 1e-4)` (AutoAWQ; `w̄` = mean of `|W|` normalized by its group's
//!    absmax over all rows of the subset's quantized layers). For each α of the grid the
//!    host's module-forward service runs the inspected module (attention for q/k/v, the MLP
//!    for gate/up, the layer itself for o and down) with `Q(W·diag(s))·diag(1/s)` for every
//!    quantized layer; the α with the smallest output MSE against the current weights wins.
//! 2. **Fold.** The subset's weights become `W·diag(s)` (float layers too: they share the
//!    input) and `1/s` goes into the prev_op ([`fold`]): a norm's `γ`, or the output rows of
//!    the previous linear (`v_proj → o_proj`, `up_proj → down_proj`). Before quantization the
//!    float model is unchanged.
//! 3. **Clip search** ([`clip`]). Per group, the range is shrunk by `1 − i/clip_grid` when that
//!    lowers `e_g H'_gg e_gᵀ` (`e = w − Q(clamp(w))`, `H' = diag(1/s)·XᵀX·diag(1/s)` from the
//!    host's Hessian): llm-awq's per-group output error on all calibration tokens. Symmetric
//!    schemes shrink `±absmax`; asymmetric ones shrink the minimum and the maximum separately
//!    (every pair of factors), LLMC's improvement. q_proj and k_proj are not clipped (their
//!    outputs meet in `q·kᵀ`, which the per-layer objective does not see), as in llm-awq.
//! 4. **Quantize** (`quantize = true`): round-to-nearest with gs-quant, qparams set. With
//!    `quantize = false` the scaled and clipped float weights are left for the next stage
//!    (`awq` then `gptq` is the AWQ→GPTQ recipe).
//!
//! Parameters (`[pipeline.params]`, unknown keys are errors):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `grid` | 20 | α candidates `i/(grid−1)`, `i = 0…grid−1`: 0 and 1 included (llm-awq uses `i/20`, up to 0.95) |
//! | `alpha` | none | a fixed α in [0, 1] instead of the search (one module forward per subset instead of `grid`) |
//! | `duo_scaling` | false | AutoAWQ's `x̄^α / w̄^(1−α)`; the `w4a16-awq-gptq` preset turns it on. On SmolLM2-135M W4A16 g64 it measured better both alone (36.47 against 37.22) and before GPTQ (32.34 against 32.57): docs/RESULTS.md |
//! | `clip` | true | run the clipping search |
//! | `clip_grid` | 20 | shrink step `1/clip_grid` |
//! | `max_shrink` | 0.5 | shrink factors `1 − i/clip_grid` for `i < max_shrink·clip_grid` (1 … 0.55 by default), in [0, 1) |
//! | `quantize` | true | finish with RTN and set qparams; `false` leaves float weights for a later stage |
//!
//! Where a scale cannot be folded the subset is still clipped and quantized, unscaled:
//! - the previous linear's output rows do not match the subset's inputs (grouped-query
//!   attention: `v_proj` has fewer rows than `o_proj` has inputs) — skipped as llm-awq does;
//! - the previous linear has a bias (no host service rescales a prev_op's bias);
//! - the previous linear was already quantized by this stage and the host is older than
//!   plugin-api 1.2 (it cannot record the moved grid, see `Subset::set_prev_op_qparams`).
//!
//! With `quantize = true` a single stage quantizes `v_proj` (or `up_proj`) in its own subset
//! before the `o` (`down`) subset folds `1/s` into its rows. Dividing a whole row of a
//! quantized matrix by `s_j` keeps it exactly on a grid whose scales are divided by `s_j`
//! (`QParams::scale_rows`), which the plugin records with `set_prev_op_qparams`; the result is
//! the same as scaling first and quantizing after. Each subset's statistics and module input
//! are computed by the host with the block's current (already transformed) layers, so the
//! `down` search sees the quantized gate/up (llm-awq captures every input once from the float
//! block).
//!
//! The clip search uses the Hessian instead of llm-awq's 512 sampled tokens: the same
//! objective on every token, one `g × g` quadratic form per group (GEMMs per group column).
//! The asymmetric search costs `n²` candidates instead of `n` (`n = max_shrink·clip_grid`).

pub mod clip;
pub mod fold;
pub mod params;
pub mod scale;
#[cfg(test)]
mod testutil;

use std::collections::HashMap;

use gs_plugin_api::quant::{fake_quantize, Granularity, QParams, QuantArgs, QuantType};
use gs_plugin_api::{
    export_plugin, parse_params, Algorithm, Layer, PluginError, PrevOpKind, StatKind, StatsRequest,
    Subset,
};

use clip::{apply_clip, search_clip, ClipError, GroupHessians};
use params::AwqParams;
use scale::{
    mean_squared_error, scale_columns, search_scales, weight_mean, SearchError, SubsetLayer,
};

impl From<SearchError> for PluginError {
    fn from(e: SearchError) -> Self {
        PluginError::numeric(format!("awq scale search: {e}"))
    }
}

/// A layer this stage has seen in the current block (the later subsets fold into some of them).
#[derive(Debug, Clone)]
struct Seen {
    out_features: usize,
    has_bias: bool,
    /// Qparams this stage set, when it quantized the layer.
    quantized: Option<(QParams, QuantArgs)>,
}

/// Where this subset's `1/s` goes.
enum Fold {
    Norm,
    Rows {
        cols: usize,
    },
    QuantizedRows {
        cols: usize,
        qparams: QParams,
        args: QuantArgs,
    },
}

/// The AWQ algorithm, configured by [`AwqParams`].
pub struct Awq {
    params: AwqParams,
    block: Option<usize>,
    seen: HashMap<String, Seen>,
}

impl Algorithm for Awq {
    const NAME: &'static str = "awq";
    const SUMMARY: &'static str =
        "AWQ: activation-aware per-channel scales (grid search of α) and weight clipping";

    fn from_params(params_toml: &str) -> Result<Self, PluginError> {
        let params: AwqParams = parse_params(Self::NAME, params_toml)?;
        params
            .validate()
            .map_err(|m| PluginError::invalid_params(format!("parameters of `awq`: {m}")))?;
        Ok(Awq {
            params,
            block: None,
            seen: HashMap::new(),
        })
    }

    fn required_stats(&self) -> StatsRequest {
        if self.params.clip {
            StatsRequest::MEAN_ABS | StatsRequest::HESSIAN
        } else {
            StatsRequest::MEAN_ABS
        }
    }

    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        if self.block != Some(subset.block()) {
            self.block = Some(subset.block());
            self.seen.clear();
        }
        let layers = (0..subset.len())
            .map(|i| subset.layer(i))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(cols) = layers.first().map(|l| l.in_features) else {
            return Ok(());
        };
        let targets = layers
            .iter()
            .map(target_args)
            .collect::<Result<Vec<_>, _>>()?;
        let fold = self.fold_target(subset, cols);
        for l in &layers {
            self.seen.insert(
                l.name.clone(),
                Seen {
                    out_features: l.out_features,
                    has_bias: l.has_bias,
                    quantized: None,
                },
            );
        }
        if targets.iter().all(Option::is_none) {
            subset.debug(&format!(
                "subset `{}`: no layer is quantized, nothing to do",
                subset.name()
            ));
            return Ok(());
        }
        let mut weights = (0..layers.len())
            .map(|i| subset.weight(i).map(<[f32]>::to_vec))
            .collect::<Result<Vec<_>, _>>()?;
        let fold = match fold {
            Ok(f) => Some(f),
            Err((gqa, reason)) => {
                let m = format!("subset `{}`: not scaled: {reason}", subset.name());
                if gqa {
                    subset.info(&m);
                } else {
                    subset.warn(&m);
                }
                None
            }
        };

        // 1. Scale search.
        let search = match fold {
            None => None,
            Some(_) => {
                let x_mean = subset.stat(StatKind::MEAN_ABS)?.to_vec();
                let views: Vec<SubsetLayer<'_>> = weights
                    .iter()
                    .zip(&layers)
                    .zip(&targets)
                    .map(|((w, l), a)| SubsetLayer {
                        weight: w,
                        rows: l.out_features,
                        args: *a,
                    })
                    .collect();
                let w_mean = self.params.duo_scaling.then(|| weight_mean(&views, cols));
                let y_ref = subset.module_forward(&[])?;
                let sub: &Subset<'_> = subset;
                let r = search_scales::<PluginError>(
                    &views,
                    cols,
                    &x_mean,
                    w_mean.as_deref(),
                    &self.params.alphas(),
                    &mut |ov| Ok(mean_squared_error(&sub.module_forward(ov)?, &y_ref)),
                )?;
                Some(r)
            }
        };
        if let Some(r) = &search {
            subset.info(&format!(
                "subset `{}`: α = {:.3}, output mse {:.4e} (unscaled {:.4e})",
                subset.name(),
                r.alpha,
                r.loss,
                r.unscaled_loss
            ));
        }
        // Clip objectives from the input statistics as served (before the fold changes them).
        let hessians = if self.params.clip {
            let h = subset.stat(StatKind::HESSIAN)?;
            let mut by_group = HashMap::new();
            for (l, a) in layers.iter().zip(&targets) {
                if let (Some(g), true) = (a.and_then(group_size), clipped(&l.name)) {
                    if let std::collections::hash_map::Entry::Vacant(e) = by_group.entry(g) {
                        let hs = GroupHessians::new(
                            h,
                            cols,
                            g,
                            search.as_ref().map(|r| r.scales.as_slice()),
                        )
                        .map_err(|e| clip_error(&l.name, e))?;
                        e.insert(hs);
                    }
                }
            }
            by_group
        } else {
            HashMap::new()
        };

        // 2. Fold.
        let mut changed = vec![false; layers.len()];
        if let (Some(r), Some(fold)) = (&search, fold) {
            let s = &r.scales;
            for (w, c) in weights.iter_mut().zip(changed.iter_mut()) {
                *w = scale_columns(w, cols, s);
                *c = true;
            }
            let prev = subset.prev_op_weight()?.to_vec();
            match fold {
                Fold::Norm => subset.set_prev_op_weight(&fold::fold_into_norm(&prev, s))?,
                Fold::Rows { cols: pc } => {
                    subset.set_prev_op_weight(&fold::fold_into_rows(&prev, pc, s))?
                }
                Fold::QuantizedRows {
                    cols: pc,
                    qparams,
                    args,
                } => {
                    let name = subset.prev_op_name().to_string();
                    let (w, moved) =
                        fold::fold_into_quantized_rows(&prev, cols, pc, &qparams, &args, s)
                            .map_err(|e| PluginError::numeric(format!("awq: {name}: {e}")))?;
                    subset.set_prev_op_qparams(&moved)?;
                    subset.set_prev_op_weight(&w)?;
                    if let Some(seen) = self.seen.get_mut(&name) {
                        seen.quantized = Some((moved, args));
                    }
                }
            }
        }

        // 3. Clip.
        for (i, l) in layers.iter().enumerate() {
            let Some(args) = targets[i] else { continue };
            let Some(hs) = group_size(args).and_then(|g| hessians.get(&g)) else {
                continue;
            };
            if !clipped(&l.name) {
                continue;
            }
            let ranges = search_clip(
                &weights[i],
                l.out_features,
                cols,
                &args,
                hs,
                &self.params.shrinks(),
            )
            .map_err(|e| clip_error(&l.name, e))?;
            apply_clip(&mut weights[i], hs.group_size(), &ranges);
            changed[i] = true;
            let ratio = if ranges.err_unclipped > 0.0 {
                ranges.err_clipped / ranges.err_unclipped
            } else {
                1.0
            };
            subset.report_metric(i, "awq_clip_error_ratio", ratio);
            subset.debug(&format!(
                "{}: clipping keeps {:.3} of the unclipped output error",
                l.name, ratio
            ));
        }

        // 4. Quantize, or hand the float weights on.
        for (i, l) in layers.iter().enumerate() {
            if let Some(r) = &search {
                if targets[i].is_some() {
                    subset.report_metric(i, "awq_alpha", f64::from(r.alpha));
                    subset.report_metric(i, "awq_mse", r.loss);
                    subset.report_metric(i, "awq_mse_unscaled", r.unscaled_loss);
                }
            }
            match targets[i] {
                Some(args) if self.params.quantize => {
                    let (q, qp) = fake_quantize(&weights[i], l.out_features, cols, &args)
                        .map_err(|e| PluginError::numeric(format!("awq: {}: {e}", l.name)))?;
                    subset.set_weight(i, &q)?;
                    subset.set_qparams(i, &qp)?;
                    if let Some(seen) = self.seen.get_mut(&l.name) {
                        seen.quantized = Some((qp, args));
                    }
                }
                _ if changed[i] => subset.set_weight(i, &weights[i])?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Awq {
    /// Where this subset's `1/s` can go, or `Err((is the grouped-query case, why not))`.
    fn fold_target(&self, subset: &Subset<'_>, cols: usize) -> Result<Fold, (bool, String)> {
        let kind = subset.prev_op();
        let name = subset.prev_op_name();
        if kind == PrevOpKind::NORM {
            let n = subset
                .prev_op_weight()
                .map_err(|e| (false, e.to_string()))?
                .len();
            if n != cols {
                return Err((
                    false,
                    format!("norm {name} has {n} weights, the subset {cols} inputs"),
                ));
            }
            return Ok(Fold::Norm);
        }
        if kind != PrevOpKind::LINEAR {
            return Err((false, "its input has no foldable prev_op".into()));
        }
        let Some(seen) = self.seen.get(name) else {
            return Err((
                false,
                format!("prev_op {name} was not part of an earlier subset of this block, so its shape and bias are unknown"),
            ));
        };
        if seen.out_features != cols {
            return Err((
                true,
                format!(
                    "{name} has {} output rows but the subset {cols} inputs (grouped-query attention), as llm-awq skips it",
                    seen.out_features
                ),
            ));
        }
        if seen.has_bias {
            return Err((
                false,
                format!("{name} has a bias, which no host service lets a plugin rescale"),
            ));
        }
        let len = subset
            .prev_op_weight()
            .map_err(|e| (false, e.to_string()))?
            .len();
        let pc = len / cols;
        match &seen.quantized {
            None => Ok(Fold::Rows { cols: pc }),
            Some(_) if !subset.can_set_prev_op_qparams() => Err((
                false,
                format!("{name} is already quantized and this gs-host cannot record its moved grid (plugin-api older than 1.2)"),
            )),
            Some((qparams, args)) => Ok(Fold::QuantizedRows {
                cols: pc,
                qparams: qparams.clone(),
                args: *args,
            }),
        }
    }
}

/// The weight args of a layer AWQ quantizes, `None` for a float layer; an error naming the
/// layer for a scheme AWQ cannot serve.
fn target_args(layer: &Layer) -> Result<Option<QuantArgs>, PluginError> {
    let Some(a) = layer.scheme.weights else {
        return Ok(None);
    };
    let refuse = |what: String| {
        PluginError::unsupported(format!(
            "awq: {}: {what}; AWQ serves integer weight-only group schemes (2 to 8 bits, a [quant.weights] group_size that divides the input columns): change the scheme or skip the layer in [[quant.override]]",
            layer.name
        ))
    };
    if layer.scheme.activations.is_some() {
        return Err(refuse("its scheme also quantizes activations".into()));
    }
    if a.ty != QuantType::Int {
        return Err(refuse("its weights are FP8".into()));
    }
    if !(2..=8).contains(&a.bits) {
        return Err(refuse(format!("its weights have {} bits", a.bits)));
    }
    match a.granularity {
        Granularity::Group(g) if g > 0 && layer.in_features % g as usize == 0 => Ok(Some(a)),
        Granularity::Group(g) => Err(refuse(format!(
            "its group size {g} does not divide its {} input columns",
            layer.in_features
        ))),
        Granularity::Channel => Err(refuse("its weights are quantized per channel".into())),
        Granularity::Tensor => Err(refuse("its weights are quantized per tensor".into())),
    }
}

fn group_size(a: QuantArgs) -> Option<usize> {
    match a.granularity {
        Granularity::Group(g) => Some(g as usize),
        _ => None,
    }
}

/// llm-awq does not clip q_proj and k_proj: their outputs meet in `q·kᵀ`.
fn clipped(layer: &str) -> bool {
    let last = layer.rsplit('.').next().unwrap_or(layer);
    !(last.starts_with("q_") || last.starts_with("k_") || last == "query" || last == "key")
}

fn clip_error(layer: &str, e: ClipError) -> PluginError {
    PluginError::numeric(format!("awq: {layer}: clipping search: {e}"))
}

export_plugin! {
    name: "gs-awq",
    vendor: "gs-host",
    algorithms: [Awq],
}

#[cfg(test)]
mod tests {
    use super::*;
    use gs_plugin_api::quant::{ActArgs, ScaleRule, Scheme};

    #[test]
    fn parameters_are_parsed_and_checked_naming_awq_and_the_key() {
        let a = Awq::from_params("grid = 10\nduo_scaling = true\nquantize = false").unwrap();
        assert_eq!(a.params.grid, 10);
        assert!(a.params.duo_scaling && !a.params.quantize);
        for (text, key) in [
            ("grid = 1", "grid"),
            ("alpha = 2.0", "alpha"),
            ("clip_grid = 0", "clip_grid"),
            ("max_shrink = 1.0", "max_shrink"),
            ("max_shrink = -0.1", "max_shrink"),
            ("gird = 20", "gird"),
        ] {
            let e = Awq::from_params(text).err().unwrap();
            assert!(
                e.message.contains("`awq`") && e.message.contains(key),
                "{text}: {e}"
            );
        }
        assert_eq!(
            Awq::from_params("").unwrap().required_stats(),
            StatsRequest::MEAN_ABS | StatsRequest::HESSIAN
        );
        assert_eq!(
            Awq::from_params("clip = false").unwrap().required_stats(),
            StatsRequest::MEAN_ABS
        );
    }

    fn layer(weights: Option<QuantArgs>, act: bool, in_features: usize) -> Layer {
        Layer {
            name: "model.layers.0.mlp.down_proj".into(),
            out_features: 4,
            in_features,
            has_bias: false,
            scheme: Scheme {
                weights,
                activations: act.then_some(ActArgs {
                    args: QuantArgs {
                        bits: 8,
                        ty: QuantType::Int,
                        symmetric: true,
                        granularity: Granularity::Channel,
                        scale_rule: ScaleRule::HalfRange,
                    },
                    dynamic: true,
                }),
                kv_cache: None,
            },
        }
    }

    #[test]
    fn schemes_awq_cannot_serve_are_refused_naming_the_layer() {
        let g64 = testutil::int4_group(64);
        assert_eq!(
            target_args(&layer(Some(g64), false, 128)).unwrap(),
            Some(g64)
        );
        assert_eq!(target_args(&layer(None, false, 128)).unwrap(), None);
        let w3 = QuantArgs { bits: 3, ..g64 };
        assert_eq!(target_args(&layer(Some(w3), false, 128)).unwrap(), Some(w3));
        for (l, what) in [
            (
                layer(Some(g64), false, 172),
                "group size 64 does not divide its 172",
            ),
            (layer(Some(g64), true, 128), "also quantizes activations"),
            (
                layer(
                    Some(QuantArgs {
                        granularity: Granularity::Channel,
                        ..g64
                    }),
                    false,
                    128,
                ),
                "per channel",
            ),
            (
                layer(
                    Some(QuantArgs {
                        ty: QuantType::Float,
                        bits: 8,
                        ..g64
                    }),
                    false,
                    128,
                ),
                "FP8",
            ),
            (
                layer(Some(QuantArgs { bits: 1, ..g64 }), false, 128),
                "1 bits",
            ),
        ] {
            let e = target_args(&l).unwrap_err();
            assert_eq!(e.kind, gs_plugin_api::ErrorKind::UNSUPPORTED);
            assert!(
                e.message.contains("awq: model.layers.0.mlp.down_proj") && e.message.contains(what),
                "{e}"
            );
        }
    }

    #[test]
    fn q_and_k_are_not_clipped() {
        assert!(!clipped("model.layers.3.self_attn.q_proj"));
        assert!(!clipped("model.layers.3.self_attn.k_proj"));
        assert!(clipped("model.layers.3.self_attn.v_proj"));
        assert!(clipped("model.layers.3.mlp.down_proj"));
    }
}
