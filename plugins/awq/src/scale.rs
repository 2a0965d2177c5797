//! The activation-aware scale search (AWQ §3.2; llm-awq `auto_scale.py`, AutoAWQ
//! `_search_best_scale`).
//!
//! The layers of a subset share one input `X: [tokens, in]`. For a per-input-channel scale
//! `s: [in]`, `X·Wᵀ = (X·diag(1/s))·(W·diag(s))ᵀ`: the prev_op absorbs `1/s`, the weights `s`.
//! Salient channels (large `x̄_j = mean_t |X[t, j]|`) get `s_j > 1`, so their weights lose less
//! to rounding. The search tries `s(α)` for each α and keeps the one whose quantized module
//! output is closest (MSE) to the float output:
//!
//! `L(α) = mean (f(X; {Q(W_i·diag(s))·diag(1/s)}) − f(X; {W_i}))²`, `f` = the inspected module.

use gs_plugin_api::quant::{fake_quantize_into, Granularity, QuantArgs, QuantError};
use rayon::prelude::*;

/// Floor of a scale before normalization (llm-awq's `clamp(min=1e-4)`).
const MIN_SCALE: f32 = 1e-4;
/// Added to `w̄^(1−α)` in duo scaling (AutoAWQ).
const DUO_EPS: f32 = 1e-4;
/// Added to a group's absmax when normalizing weights for `w̄` (AutoAWQ).
const GROUP_EPS: f32 = 1e-6;
/// Rows per parallel task when fake-quantizing.
const ROW_CHUNK: usize = 32;

/// Why a search could not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    /// gs-quant refused a layer (index within the subset).
    #[error("layer {layer} of the subset: {source}")]
    Quant {
        layer: usize,
        #[source]
        source: QuantError,
    },
    /// A buffer does not have the shape the search was told.
    #[error("{what}: expected {expected} values, got {actual}")]
    Shape {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// Every candidate's loss was NaN or infinite.
    #[error("no α gave a finite output error (losses {losses:?})")]
    NoFiniteLoss { losses: Vec<f64> },
}

/// One layer of a subset as the searches see it.
#[derive(Debug, Clone, Copy)]
pub struct SubsetLayer<'a> {
    /// Row-major `[rows, cols]`; `cols` is the subset's input width.
    pub weight: &'a [f32],
    pub rows: usize,
    /// The weight scheme; `None` for a layer the manifest leaves in float.
    pub args: Option<QuantArgs>,
}

/// `w̄_j`: mean over every row of every quantized layer of `|W[r, j]| / (max_{k ∈ group(j)}
/// |W[r, k]| + 1e-6)` — AutoAWQ's normalized weight mean, `[cols]`. All ones when no layer is
/// quantized.
pub fn weight_mean(layers: &[SubsetLayer<'_>], cols: usize) -> Vec<f32> {
    let mut sum = vec![0f64; cols];
    let mut rows = 0usize;
    for l in layers {
        let Some(args) = l.args else { continue };
        let g = match args.granularity {
            Granularity::Group(g) => g as usize,
            _ => cols,
        }
        .max(1);
        for row in l.weight.chunks_exact(cols) {
            for (c0, group) in row.chunks(g).enumerate() {
                let m = group.iter().fold(0f32, |m, v| m.max(v.abs())) + GROUP_EPS;
                for (k, v) in group.iter().enumerate() {
                    sum[c0 * g + k] += f64::from(v.abs() / m);
                }
            }
        }
        rows += l.rows;
    }
    if rows == 0 {
        return vec![1.0; cols];
    }
    sum.iter().map(|s| (s / rows as f64) as f32).collect()
}

/// `s(α)`, `[in]`: `x̄^α` (or, with `w_mean`, `x̄^α / (w̄^(1−α) + 1e-4)`), floored at `1e-4`,
/// divided by `√(max s · min s)` so the scales straddle 1; non-finite values become 1.
pub fn scales_for(alpha: f32, x_mean: &[f32], w_mean: Option<&[f32]>) -> Vec<f32> {
    let mut s: Vec<f32> = match w_mean {
        None => x_mean.iter().map(|x| x.powf(alpha)).collect(),
        Some(w) => x_mean
            .iter()
            .zip(w)
            .map(|(x, w)| x.powf(alpha) / (w.powf(1.0 - alpha) + DUO_EPS))
            .collect(),
    };
    s.iter_mut().for_each(|v| *v = v.max(MIN_SCALE));
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    let norm = (hi * lo).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// `out = RTN(w)` for `w: [rows, cols]` (gs-quant's min/max fake quantization), rows in
/// parallel; the scheme's scales are per row or per group of a row, so row blocks are
/// independent (tensor granularity is refused).
pub fn fake_quantize_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    args: &QuantArgs,
    out: &mut [f32],
) -> Result<(), QuantError> {
    if args.granularity == Granularity::Tensor {
        return Err(QuantError::GranularityMismatch {
            args: Granularity::Channel,
            qparams: Granularity::Tensor,
        });
    }
    for (what, len) in [("weights", w.len()), ("output", out.len())] {
        if len != rows * cols {
            return Err(QuantError::LengthMismatch {
                what,
                expected: rows * cols,
                actual: len,
            });
        }
    }
    if cols == 0 {
        return Ok(());
    }
    w.par_chunks(ROW_CHUNK * cols)
        .zip(out.par_chunks_mut(ROW_CHUNK * cols))
        .try_for_each(|(src, dst)| {
            fake_quantize_into(src, src.len() / cols, cols, args, dst).map(|_| ())
        })
}

/// `out = Q(W·diag(s))·diag(1/s)`: what the layer computes with AWQ scale `s` after the
/// prev_op absorbed `1/s`, expressed in the original input space. `w: [rows, cols]`, `s: [cols]`.
pub fn scaled_fake_quant(
    w: &[f32],
    rows: usize,
    cols: usize,
    s: &[f32],
    args: &QuantArgs,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let scaled = scale_columns(w, cols, s);
    fake_quantize_rows(&scaled, rows, cols, args, out)?;
    out.par_chunks_mut(cols.max(1)).for_each(|row| {
        for (v, s) in row.iter_mut().zip(s) {
            *v /= s;
        }
    });
    Ok(())
}

/// `W·diag(s)`: column `j` of `w: [rows, cols]` times `s_j`.
pub fn scale_columns(w: &[f32], cols: usize, s: &[f32]) -> Vec<f32> {
    let mut out = w.to_vec();
    out.par_chunks_mut(cols.max(1)).for_each(|row| {
        for (v, s) in row.iter_mut().zip(s) {
            *v *= s;
        }
    });
    out
}

/// Candidate weights handed to the loss: `(layer index within the subset, weight)`.
pub type Overrides<'a> = [(usize, &'a [f32])];

/// The result of [`search_scales`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSearch {
    /// The α with the smallest loss (the first one on ties).
    pub alpha: f32,
    /// `s(α)`, `[in]`.
    pub scales: Vec<f32>,
    /// Its loss.
    pub loss: f64,
    /// Loss with `s = 1` (plain round-to-nearest), for the log.
    pub unscaled_loss: f64,
    /// `(α, loss)` of every candidate, in grid order.
    pub losses: Vec<(f32, f64)>,
}

/// The α grid search over one subset.
///
/// - `layers`: the subset's layers (weights `[rows, cols]`); only quantized ones get a
///   candidate, float ones keep their weights (`W·diag(s)·diag(1/s) = W`).
/// - `x_mean`: `x̄ = mean_t |X[t, j]|`, `[cols]`; `w_mean`: `w̄` for duo scaling (see
///   [`weight_mean`]).
/// - `loss`: the output error of the inspected module with candidate weights `(layer index,
///   Q(W·diag(s))·diag(1/s))`, against its output with the current weights.
pub fn search_scales<E: From<SearchError>>(
    layers: &[SubsetLayer<'_>],
    cols: usize,
    x_mean: &[f32],
    w_mean: Option<&[f32]>,
    alphas: &[f32],
    loss: &mut dyn FnMut(&Overrides<'_>) -> Result<f64, E>,
) -> Result<ScaleSearch, E> {
    let shape = |what, expected, actual| {
        if expected == actual {
            Ok(())
        } else {
            Err(SearchError::Shape {
                what,
                expected,
                actual,
            })
        }
    };
    shape("activation means", cols, x_mean.len())?;
    if let Some(w) = w_mean {
        shape("weight means", cols, w.len())?;
    }
    for l in layers {
        shape("layer weight", l.rows * cols, l.weight.len())?;
    }
    let quantized: Vec<(usize, QuantArgs)> = layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.args.map(|a| (i, a)))
        .collect();
    let mut candidates: Vec<Vec<f32>> = quantized
        .iter()
        .map(|&(i, _)| vec![0f32; layers[i].weight.len()])
        .collect();
    let mut evaluate = |s: &[f32]| -> Result<f64, E> {
        for (&(i, args), out) in quantized.iter().zip(candidates.iter_mut()) {
            let l = &layers[i];
            scaled_fake_quant(l.weight, l.rows, cols, s, &args, out)
                .map_err(|source| SearchError::Quant { layer: i, source })?;
        }
        let overrides: Vec<(usize, &[f32])> = quantized
            .iter()
            .zip(&candidates)
            .map(|(&(i, _), c)| (i, c.as_slice()))
            .collect();
        loss(&overrides)
    };
    let mut losses = Vec::with_capacity(alphas.len());
    let mut best: Option<(f32, Vec<f32>, f64)> = None;
    let mut unscaled = None;
    for &alpha in alphas {
        let s = scales_for(alpha, x_mean, w_mean);
        let l = evaluate(&s)?;
        losses.push((alpha, l));
        if s.iter().all(|v| *v == 1.0) {
            unscaled = Some(l);
        }
        if l.is_finite() && best.as_ref().is_none_or(|(_, _, b)| l < *b) {
            best = Some((alpha, s, l));
        }
    }
    let Some((alpha, scales, loss_best)) = best else {
        return Err(SearchError::NoFiniteLoss {
            losses: losses.iter().map(|(_, l)| *l).collect(),
        }
        .into());
    };
    let unscaled_loss = match unscaled {
        Some(l) => l,
        None => evaluate(&vec![1.0; cols])?,
    };
    Ok(ScaleSearch {
        alpha,
        scales,
        loss: loss_best,
        unscaled_loss,
        losses,
    })
}

/// `mean((a − b)²)` in f64.
pub fn mean_squared_error(a: &[f32], b: &[f32]) -> f64 {
    let sum: f64 = a
        .par_chunks(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(x, y)| {
                    let d = f64::from(*x) - f64::from(*y);
                    d * d
                })
                .sum::<f64>()
        })
        .sum();
    sum / a.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{int4_group, matmul_t, random};
    use gs_plugin_api::quant::fake_quantize;

    #[test]
    fn scales_follow_the_reference_formula() {
        // x̄ = [1, 4, 16], α = 0.5: x̄^α = [1, 2, 4]; √(4·1) = 2 → [0.5, 1, 2].
        assert_eq!(
            scales_for(0.5, &[1.0, 4.0, 16.0], None),
            vec![0.5, 1.0, 2.0]
        );
        // α = 0 is plain RTN: every scale 1 (also for a dead channel, 0^0 = 1 as in torch).
        assert_eq!(scales_for(0.0, &[0.0, 3.0, 7.0], None), vec![1.0; 3]);
        // A dead channel at α = 1 is floored at 1e-4 before normalizing:
        // [1e-4, 1, 100] / √(100·1e-4) = [1e-3, 10, 1000].
        let s = scales_for(1.0, &[0.0, 1.0, 100.0], None);
        for (got, want) in s.iter().zip([1e-3f32, 10.0, 1000.0]) {
            assert!((got / want - 1.0).abs() < 1e-6, "{s:?}");
        }
        // Duo, α = 0.5: x̄^½ / (w̄^½ + 1e-4) with x̄ = [4, 4], w̄ = [1, 0.25] →
        // [2 / 1.0001, 2 / 0.5001]; normalized by √(product).
        let s = scales_for(0.5, &[4.0, 4.0], Some(&[1.0, 0.25]));
        let raw = [2.0 / 1.0001f64, 2.0 / 0.5001];
        let norm = (raw[0] * raw[1]).sqrt();
        for (got, r) in s.iter().zip(raw) {
            assert!((f64::from(*got) - r / norm).abs() < 1e-6, "{s:?}");
        }
    }

    #[test]
    fn weight_mean_normalizes_each_group_by_its_absmax() {
        // One layer [2, 4], groups of 2. Row 0: groups (1, −2) and (4, 0) → |w|/max =
        // (0.5, 1) and (1, 0); row 1: (3, 3) and (−1, 1) → (1, 1), (1, 1). Means over the 2 rows
        // (the 1e-6 in the denominator moves them by < 1e-6).
        let w = [1.0, -2.0, 4.0, 0.0, 3.0, 3.0, -1.0, 1.0];
        let l = SubsetLayer {
            weight: &w,
            rows: 2,
            args: Some(int4_group(2)),
        };
        let m = weight_mean(&[l], 4);
        for (got, want) in m.iter().zip([0.75f32, 1.0, 1.0, 0.5]) {
            assert!((got - want).abs() < 1e-5, "{m:?}");
        }
        // A float layer does not count.
        let f = SubsetLayer { args: None, ..l };
        assert_eq!(weight_mean(&[f], 4), vec![1.0; 4]);
    }

    #[test]
    fn scaled_candidate_is_the_quantized_scaled_weight_in_input_space() {
        let (rows, cols) = (3, 8);
        let w = random(rows * cols, 1);
        let s: Vec<f32> = (0..cols).map(|j| 0.5 + j as f32 * 0.25).collect();
        let args = int4_group(4);
        let mut got = vec![0f32; rows * cols];
        scaled_fake_quant(&w, rows, cols, &s, &args, &mut got).unwrap();
        // Independently: scale, fake-quantize with gs-quant, unscale.
        let ws: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i % cols]).collect();
        let (q, _) = fake_quantize(&ws, rows, cols, &args).unwrap();
        let want: Vec<f32> = q.iter().enumerate().map(|(i, v)| v / s[i % cols]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_search_keeps_the_alpha_of_least_output_error() {
        // A linear layer with one salient input channel: y = X·Wᵀ, X [64, 16], column 3 of X
        // 30× larger, while a weight of 8 on a quiet channel sets every row's range. Scaling the
        // salient channel up (α > 0) gives its weights a finer grid at little cost to the others,
        // so it must beat plain RTN (α = 0).
        let (tokens, rows, cols) = (64, 8, 16);
        let mut x = random(tokens * cols, 2);
        for t in 0..tokens {
            x[t * cols + 3] *= 30.0;
        }
        let mut w = random(rows * cols, 3);
        for r in 0..rows {
            w[r * cols] = 8.0;
        }
        let y = matmul_t(&x, &w, tokens, cols, rows);
        let x_mean: Vec<f32> = (0..cols)
            .map(|j| (0..tokens).map(|t| x[t * cols + j].abs()).sum::<f32>() / tokens as f32)
            .collect();
        let layer = SubsetLayer {
            weight: &w,
            rows,
            args: Some(int4_group(8)),
        };
        let alphas: Vec<f32> = (0..11).map(|i| i as f32 / 10.0).collect();
        let mut calls = 0;
        let r = search_scales::<SearchError>(&[layer], cols, &x_mean, None, &alphas, &mut |ov| {
            calls += 1;
            assert_eq!(ov.len(), 1);
            assert_eq!(ov[0].0, 0);
            Ok(mean_squared_error(
                &matmul_t(&x, ov[0].1, tokens, cols, rows),
                &y,
            ))
        })
        .unwrap();
        // α = 0 gives s = 1, so the unscaled loss needs no extra call.
        assert_eq!(calls, alphas.len());
        assert_eq!(r.losses.len(), alphas.len());
        assert_eq!(r.unscaled_loss, r.losses[0].1);
        let min = r
            .losses
            .iter()
            .map(|(_, l)| *l)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(r.loss, min);
        assert!(r.alpha > 0.0 && r.loss < 0.5 * r.unscaled_loss, "{r:?}");
        assert_eq!(r.scales, scales_for(r.alpha, &x_mean, None));
    }

    #[test]
    fn the_search_reports_shapes_and_non_finite_losses() {
        let w = [0.5f32; 8];
        let layer = SubsetLayer {
            weight: &w,
            rows: 2,
            args: Some(int4_group(4)),
        };
        let e =
            search_scales::<SearchError>(&[layer], 4, &[1.0; 3], None, &[0.5], &mut |_| Ok(0.0))
                .unwrap_err();
        assert_eq!(
            e,
            SearchError::Shape {
                what: "activation means",
                expected: 4,
                actual: 3
            }
        );
        let e =
            search_scales::<SearchError>(&[layer], 4, &[1.0; 4], None, &[0.0, 1.0], &mut |_| {
                Ok(f64::NAN)
            })
            .unwrap_err();
        assert!(matches!(e, SearchError::NoFiniteLoss { .. }), "{e}");
    }
}
