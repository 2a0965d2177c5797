//! Small deterministic helpers for the unit tests.

use gs_plugin_api::quant::{Granularity, QuantArgs, QuantType, ScaleRule};

/// Int4 symmetric, groups of `g`, compressed-tensors' scale rule.
pub fn int4_group(g: u32) -> QuantArgs {
    QuantArgs {
        bits: 4,
        ty: QuantType::Int,
        symmetric: true,
        granularity: Granularity::Group(g),
        scale_rule: ScaleRule::HalfRange,
    }
}

/// `n` values in about [-2, 2] (xorshift).
pub fn random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 4.0
        })
        .collect()
}

/// `x·wᵀ` for `x: [m, k]`, `w: [n, k]` → `[m, n]`.
pub fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
        }
    }
    y
}

/// `xᵀx` for `x: [m, k]` → `[k, k]`.
pub fn xtx(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut h = vec![0f32; k * k];
    for t in 0..m {
        for a in 0..k {
            for b in 0..k {
                h[a * k + b] += x[t * k + a] * x[t * k + b];
            }
        }
    }
    h
}

/// Row-wise `x / rms(x) ⊙ γ` (eps 1e-6) for `h: [tokens, hidden]`.
pub fn rms_norm(h: &[f32], gamma: &[f32], hidden: usize) -> Vec<f32> {
    h.chunks_exact(hidden)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let r = 1.0 / (ms + 1e-6).sqrt();
            row.iter().zip(gamma).map(move |(v, g)| v * r * g)
        })
        .collect()
}
