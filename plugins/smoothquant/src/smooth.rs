//! The SmoothQuant transform (Xiao et al., 2022, eq. 4), on plain row-major slices.
//!
//! A subset's layers `W_k: [out_k, in]` share the input `X: [tokens, in]`. With per-channel
//! smoothing factors `s: [in]`,
//!
//! ```text
//! Y_k = X · W_kᵀ = (X · diag(s)⁻¹) · (W_k · diag(s))ᵀ
//! ```
//!
//! `X · diag(s)⁻¹` is folded into the op producing `X` (a norm's weight, or the output rows of
//! the previous linear), `W_k · diag(s)` into the layers' input columns, so the float model is
//! unchanged and no extra op runs at inference.

use rayon::prelude::*;

/// Lower bound of the weight column maxima and of the factors, as the reference
/// (mit-han-lab/smoothquant `smooth_ln_fcs`) clamps both: a column of zeros gets a very large
/// factor (its input channel contributes nothing, so it is shrunk out of the activation range)
/// instead of a division by zero.
pub const MIN_SCALE: f64 = 1e-5;

/// `max_k max_r |W_k[r, j]|`: the largest magnitude of every input column over all the
/// subset's layers, `[cols]`. Each `w` is row-major `[rows, cols]`.
pub fn column_absmax(weights: &[&[f32]], cols: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; cols];
    if cols == 0 {
        return m;
    }
    for w in weights {
        for row in w.chunks_exact(cols) {
            for (mj, v) in m.iter_mut().zip(row) {
                *mj = mj.max(v.abs());
            }
        }
    }
    m
}

/// The smoothing factors `s_j = max(a_j^α / max(w_j, 1e-5)^(1−α), 1e-5)`, `[in]`, from the
/// activation maxima `a_j = max_t |X[t, j]|` and the weight column maxima `w_j`
/// ([`column_absmax`]). Computed in f64; `α` is the migration strength in `[0, 1]`.
///
/// After smoothing both sides have the same range per channel when `α = 0.5`:
/// `a_j / s_j = w_j · s_j = √(a_j w_j)`.
pub fn smoothing_scales(
    act_absmax: &[f32],
    weight_absmax: &[f32],
    alpha: f64,
) -> Result<Vec<f32>, String> {
    if act_absmax.len() != weight_absmax.len() {
        return Err(format!(
            "{} activation maxima for {} weight columns",
            act_absmax.len(),
            weight_absmax.len()
        ));
    }
    act_absmax
        .iter()
        .zip(weight_absmax)
        .enumerate()
        .map(|(j, (&a, &w))| {
            let a = f64::from(a);
            let w = f64::from(w).max(MIN_SCALE);
            let s = (a.powf(alpha) / w.powf(1.0 - alpha)).max(MIN_SCALE);
            let s = s as f32;
            if s.is_finite() && s > 0.0 {
                Ok(s)
            } else {
                Err(format!(
                    "channel {j}: factor {s} from activation max {a} and weight max {w}"
                ))
            }
        })
        .collect()
}

/// `W · diag(s)`: column `j` of `w: [rows, s.len()]` multiplied by `s_j`.
pub fn scale_columns(w: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = w.to_vec();
    if s.is_empty() {
        return out;
    }
    out.par_chunks_mut(s.len()).for_each(|row| {
        for (v, sj) in row.iter_mut().zip(s) {
            *v *= sj;
        }
    });
    out
}

/// `diag(s)⁻¹ · W`: row `i` of the previous linear `w: [s.len(), cols]` divided by `s_i`, so
/// its output channel `i` (this subset's input channel `i`) is divided by `s_i`.
pub fn divide_rows(w: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = w.to_vec();
    if s.is_empty() {
        return out;
    }
    let cols = w.len() / s.len();
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(s.par_iter())
        .for_each(|(row, si)| row.iter_mut().for_each(|v| *v /= si));
    out
}

/// `γ ⊘ s`: a norm's per-channel weight divided by the factors.
pub fn divide_norm(gamma: &[f32], s: &[f32]) -> Vec<f32> {
    gamma.iter().zip(s).map(|(g, sj)| g / sj).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_maxima_are_taken_over_every_layer() {
        // W1 = [[1, -5], [-2, 0.5]], W2 = [[0.25, 3]]: column 0 → max(1, 2, 0.25) = 2,
        // column 1 → max(5, 0.5, 3) = 5.
        let w1 = [1.0, -5.0, -2.0, 0.5];
        let w2 = [0.25, 3.0];
        assert_eq!(column_absmax(&[&w1, &w2], 2), [2.0, 5.0]);
    }

    #[test]
    fn factors_follow_the_paper() {
        // s_j = a_j^α / w_j^(1−α) (SmoothQuant eq. 4). α = 0.5: √4/√1 = 2, √1/√4 = 0.5,
        // √9/√9 = 1.
        let s = smoothing_scales(&[4.0, 1.0, 9.0], &[1.0, 4.0, 9.0], 0.5).unwrap();
        assert_eq!(s, [2.0, 0.5, 1.0]);
        // α = 1: s = a (all of the range moves to the weights); α = 0: s = 1/w.
        assert_eq!(
            smoothing_scales(&[4.0, 1.0], &[1.0, 4.0], 1.0).unwrap(),
            [4.0, 1.0]
        );
        assert_eq!(
            smoothing_scales(&[4.0, 1.0], &[1.0, 4.0], 0.0).unwrap(),
            [1.0, 0.25]
        );
        // α = 0.75: 16^0.75 / 16^0.25 = 8 / 2 = 4.
        assert_eq!(smoothing_scales(&[16.0], &[16.0], 0.75).unwrap(), [4.0]);
    }

    #[test]
    fn after_smoothing_at_half_strength_both_sides_share_the_range() {
        // a_j / s_j = w_j · s_j = √(a_j w_j).
        let (a, w) = ([8.0f32, 0.5, 3.0], [2.0f32, 0.125, 12.0]);
        let s = smoothing_scales(&a, &w, 0.5).unwrap();
        for j in 0..3 {
            let g = (a[j] * w[j]).sqrt();
            assert!((a[j] / s[j] - g).abs() <= 1e-6 * g, "{j}");
            assert!((w[j] * s[j] - g).abs() <= 1e-6 * g, "{j}");
        }
    }

    #[test]
    fn degenerate_channels_are_clamped_like_the_reference() {
        // smooth_ln_fcs: w.clamp(min=1e-5), s.clamp(min=1e-5).
        // Zero weight column, a = 4, α = 0.5: √4 / √1e-5 = 2 / 0.0031623 = 632.46.
        let s = smoothing_scales(&[4.0], &[0.0], 0.5).unwrap();
        let expected = 2.0 / 1e-5f64.sqrt();
        assert!((f64::from(s[0]) - expected).abs() < 1e-3, "{s:?}");
        // Dead activation channel: 0^0.5 / w = 0 → 1e-5.
        assert_eq!(smoothing_scales(&[0.0], &[3.0], 0.5).unwrap(), [1e-5]);
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        assert!(smoothing_scales(&[1.0, 2.0], &[1.0], 0.5).is_err());
    }

    #[test]
    fn column_scaling_and_row_division_are_diagonal_products() {
        // [[1, 2], [3, 4]] · diag(2, 0.5) = [[2, 1], [6, 2]].
        assert_eq!(
            scale_columns(&[1.0, 2.0, 3.0, 4.0], &[2.0, 0.5]),
            [2.0, 1.0, 6.0, 2.0]
        );
        // diag(2, 0.5)⁻¹ · [[1, 2, 3], [4, 5, 6]] = [[0.5, 1, 1.5], [8, 10, 12]].
        assert_eq!(
            divide_rows(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2.0, 0.5]),
            [0.5, 1.0, 1.5, 8.0, 10.0, 12.0]
        );
        assert_eq!(divide_norm(&[1.0, 3.0], &[2.0, 0.5]), [0.5, 6.0]);
    }

    /// Deterministic values in [-1, 1).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// `y = x · wᵀ` for `x: [t, k]`, `w: [n, k]`, in f64.
    fn matmul_t(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
        let mut y = Vec::new();
        for xr in x.chunks_exact(k) {
            for wr in w.chunks_exact(k) {
                y.push(
                    xr.iter()
                        .zip(wr)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum(),
                );
            }
        }
        y
    }

    /// RMSNorm of each row of `h: [t, k]` times `γ` (Llama's `LlamaRMSNorm`).
    fn rms_norm(h: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
        let k = gamma.len();
        let mut out = Vec::with_capacity(h.len());
        for row in h.chunks_exact(k) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / k as f32;
            let r = 1.0 / (ms + eps).sqrt();
            out.extend(row.iter().zip(gamma).map(|(v, g)| v * r * g));
        }
        out
    }

    fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn folding_into_a_norm_leaves_the_float_output_unchanged() {
        // (RMSNorm(h) ⊙ γ/s) · (W · diag(s))ᵀ == (RMSNorm(h) ⊙ γ) · Wᵀ, with outlier channels
        // so the factors span orders of magnitude.
        let (t, k, n) = (16, 12, 7);
        let mut rng = Lcg(7);
        let mut h = rng.vec(t * k);
        for row in h.chunks_exact_mut(k) {
            row[3] *= 60.0;
            row[8] *= 25.0;
        }
        let gamma: Vec<f32> = rng.vec(k).iter().map(|v| 1.0 + 0.5 * v).collect();
        let w1 = rng.vec(n * k);
        let w2 = rng.vec(3 * k);
        let x = rms_norm(&h, &gamma, 1e-5);
        let a: Vec<f32> = (0..k)
            .map(|j| (0..t).fold(0.0f32, |m, r| m.max(x[r * k + j].abs())))
            .collect();
        let s = smoothing_scales(&a, &column_absmax(&[&w1, &w2], k), 0.8).unwrap();
        let spread = s.iter().cloned().fold(0.0f32, f32::max)
            / s.iter().cloned().fold(f32::INFINITY, f32::min);
        assert!(spread > 4.0, "{s:?}");
        let gamma_s = divide_norm(&gamma, &s);
        let x_s = rms_norm(&h, &gamma_s, 1e-5);
        for w in [&w1, &w2] {
            let before = matmul_t(&x, w, k);
            let after = matmul_t(&x_s, &scale_columns(w, &s), k);
            assert!(max_rel_diff(&after, &before) < 1e-6);
        }
        // The smoothed input has a smaller range than the original.
        let range = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(range(&x_s) < range(&x));
    }

    #[test]
    fn folding_into_the_previous_linear_leaves_the_float_output_unchanged() {
        // (h · (diag(s)⁻¹ P)ᵀ) · (W · diag(s))ᵀ == (h · Pᵀ) · Wᵀ (v_proj → o_proj,
        // up_proj → down_proj).
        let (t, d, k, n) = (10, 6, 9, 5);
        let mut rng = Lcg(11);
        let h = rng.vec(t * d);
        let mut p = rng.vec(k * d);
        for v in &mut p[2 * d..3 * d] {
            *v *= 40.0; // an outlier output channel of the previous linear
        }
        let w = rng.vec(n * k);
        let x: Vec<f32> = matmul_t(&h, &p, d).iter().map(|v| *v as f32).collect();
        let a: Vec<f32> = (0..k)
            .map(|j| (0..t).fold(0.0f32, |m, r| m.max(x[r * k + j].abs())))
            .collect();
        let s = smoothing_scales(&a, &column_absmax(&[&w], k), 0.5).unwrap();
        let x_s: Vec<f32> = matmul_t(&h, &divide_rows(&p, &s), d)
            .iter()
            .map(|v| *v as f32)
            .collect();
        let before = matmul_t(&x, &w, k);
        let after = matmul_t(&x_s, &scale_columns(&w, &s), k);
        assert!(max_rel_diff(&after, &before) < 1e-6);
    }
}
