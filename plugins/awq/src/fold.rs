//! Folding `1/s` into the op that produces a subset's input, so that the float model is
//! unchanged: `x' = x·diag(1/s)` and `W' = W·diag(s)` give `x'·W'ᵀ = x·Wᵀ`.
//!
//! - A norm (`x = norm(h) ⊙ γ`): `γ' = γ / s`.
//! - A linear prev_op `W_p: [in, prev_in]` (`x = z·W_pᵀ`): output row `j` of `W_p` divided by
//!   `s_j`. If that layer is already quantized, dividing a whole row by `s_j` keeps it on a grid
//!   whose scales are divided by `s_j` ([`fold_into_quantized_rows`]).

use gs_plugin_api::quant::{dequantize_int, quantize_int, QParams, QuantArgs, QuantError};

/// `γ / s` (norm weight `γ: [in]`).
pub fn fold_into_norm(gamma: &[f32], s: &[f32]) -> Vec<f32> {
    gamma.iter().zip(s).map(|(g, s)| g / s).collect()
}

/// `diag(1/s)·W_p`: row `j` of `w: [rows, cols]` divided by `s_j` (`s: [rows]`).
pub fn fold_into_rows(w: &[f32], cols: usize, s: &[f32]) -> Vec<f32> {
    w.chunks_exact(cols.max(1))
        .zip(s)
        .flat_map(|(row, s)| row.iter().map(move |v| v / s))
        .collect()
}

/// [`fold_into_rows`] for a layer already quantized with `qp` (`w` on its grid): its codes are
/// kept and row `j`'s scales divided by `s_j`. Returns the weight on the moved grid and the
/// moved qparams.
pub fn fold_into_quantized_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    qp: &QParams,
    args: &QuantArgs,
    s: &[f32],
) -> Result<(Vec<f32>, QParams), QuantError> {
    let codes = quantize_int(w, rows, cols, qp, args)?;
    let mut moved = qp.clone();
    let inv: Vec<f32> = s.iter().map(|s| 1.0 / s).collect();
    moved.scale_rows(&inv)?;
    Ok((dequantize_int(&codes, &moved)?, moved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scale::scale_columns;
    use crate::testutil::{int4_group, matmul_t, random, rms_norm};
    use gs_plugin_api::quant::fake_quantize;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{i}: {x} vs {y}");
        }
    }

    #[test]
    fn a_norm_fold_leaves_the_float_subset_output_unchanged() {
        // h → RMSNorm ⊙ γ → [gate; up] (two layers sharing the input), before and after the fold.
        let (tokens, hidden, ffn) = (16, 8, 12);
        let h = random(tokens * hidden, 31);
        let gamma: Vec<f32> = random(hidden, 32).iter().map(|v| 1.0 + v.abs()).collect();
        let (gate, up) = (random(ffn * hidden, 33), random(ffn * hidden, 34));
        let s: Vec<f32> = (0..hidden).map(|j| 0.3 + 0.4 * j as f32).collect();
        let x = rms_norm(&h, &gamma, hidden);
        let x2 = rms_norm(&h, &fold_into_norm(&gamma, &s), hidden);
        for w in [&gate, &up] {
            let before = matmul_t(&x, w, tokens, hidden, ffn);
            let after = matmul_t(&x2, &scale_columns(w, hidden, &s), tokens, hidden, ffn);
            close(&after, &before, 1e-5);
        }
    }

    #[test]
    fn a_linear_fold_leaves_the_float_output_unchanged() {
        // z → up (W_p [ffn, hidden]) → ⊙ a (any per-channel gate, as silu(gate) in the MLP)
        // → down (W [hidden, ffn]): scales on the ffn channels.
        let (tokens, hidden, ffn) = (10, 6, 9);
        let z = random(tokens * hidden, 41);
        let a = random(tokens * ffn, 42);
        let (up, down) = (random(ffn * hidden, 43), random(hidden * ffn, 44));
        let s: Vec<f32> = (0..ffn)
            .map(|j| 2.0f32.powf(j as f32 / 3.0 - 1.0))
            .collect();
        let y = |up: &[f32], down: &[f32]| {
            let u = matmul_t(&z, up, tokens, hidden, ffn);
            let m: Vec<f32> = u.iter().zip(&a).map(|(u, a)| u * a).collect();
            matmul_t(&m, down, tokens, ffn, hidden)
        };
        let before = y(&up, &down);
        let after = y(
            &fold_into_rows(&up, hidden, &s),
            &scale_columns(&down, ffn, &s),
        );
        close(&after, &before, 1e-5);
    }

    #[test]
    fn a_quantized_prev_op_stays_on_its_moved_grid() {
        let (rows, cols) = (6, 8);
        let args = int4_group(4);
        let (wq, qp) = fake_quantize(&random(rows * cols, 51), rows, cols, &args).unwrap();
        let s: Vec<f32> = (0..rows).map(|j| 0.7 + 0.3 * j as f32).collect();
        let (moved, mqp) = fold_into_quantized_rows(&wq, rows, cols, &qp, &args, &s).unwrap();
        // The same float fold, up to f32 rounding, and exactly the codes of the original.
        close(&moved, &fold_into_rows(&wq, cols, &s), 1e-6);
        assert_eq!(
            quantize_int(&moved, rows, cols, &mqp, &args).unwrap(),
            quantize_int(&wq, rows, cols, &qp, &args).unwrap()
        );
        assert_eq!(
            dequantize_int(
                &quantize_int(&moved, rows, cols, &mqp, &args).unwrap(),
                &mqp
            )
            .unwrap(),
            moved
        );
    }
}
