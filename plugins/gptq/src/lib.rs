//! GPTQ: weights quantized one column at a time, the rounding error of each column compensated
//! on the columns not yet quantized through the inverse Hessian of the layer input
//! (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", 2022).
//!
//! Per layer, with weights `W: [out, in]` and the host's Hessian `H: [in, in]`:
//!
//! 1. Hessian scale: the host serves `H = Σ xᵀx` summed over the calibration tokens. GPTQ's
//!    result does not depend on the scale of `H` (the dampening is relative to the mean diagonal,
//!    and `err · Hinv[j, k] / Hinv[j, j]` is scale-free); only the reported loss does. `H` is
//!    multiplied by `2 / tokens` so `gptq_loss` is the number the reference implementation
//!    (`H = 2/n · XᵀX`) reports.
//! 2. Dead inputs (`H[i, i] == 0`): `H[i, i] = 1` and `W[:, i] = 0`.
//! 3. `H += damp · mean(diag H) · I`; when a Cholesky factorization fails the dampening is
//!    multiplied by 10, up to `max_damp_retries` times (each retry logs a warning).
//! 4. `act_order`: columns processed by descending `diag(H)`, the permutation undone at the end.
//! 5. `U` = upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`), computed in f64 with faer.
//! 6. Columns swept in blocks of `block_size`: column `j` is quantized, `err = (w − q) / U[j, j]`,
//!    the rest of the block gets `−err · U[j, k]` at once, the columns after the block get the
//!    block's errors in one GEMM (`W[:, end..] −= Err · U[block, end..]`).
//!
//! Scales and zero points always come from gs-quant (`compute_qparams`, `scale_zero`) and values
//! are rounded by its `quantize_value` / `round_to_fp8_e4m3`:
//! - tensor and channel granularity: from the original weights, up front;
//! - groups, `static_groups = true`: from the weights (dead columns zeroed) up front;
//! - groups, otherwise: a group's scales are computed from the weights as they are at the start
//!   of the block where the group's first column (in processing order) is quantized, as the
//!   reference does (it reads the group from the full `W`, which is updated at block ends).
//!
//! With `act_order`, a column always belongs to the group of its ORIGINAL index, so the returned
//! qparams keep the normal group-contiguous `[out, in]` layout and every returned weight is on its
//! own group's grid (no `g_idx` needed). Without `static_groups`, such a group's scales are
//! computed when its first column is reached, from all of its columns' current values.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, Par, Side};
use gs_plugin_api::quant::{
    compute_qparams, dequantize_value, quantize_value, round_to_fp8_e4m3, scale_zero, Granularity,
    QParams, QuantArgs, QuantError, QuantType,
};
use gs_plugin_api::{
    export_plugin, parse_params, Algorithm, PluginError, StatKind, StatsRequest, Subset,
};
use rayon::prelude::*;
use serde::Deserialize;

/// `[[pipeline]] algorithm = "gptq"` parameters; the scheme itself comes from `[quant]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptqParams {
    /// Dampening, as a fraction of the mean of `diag(H)`, added to the diagonal.
    pub damp: f64,
    /// Columns per lazy batch update.
    pub block_size: usize,
    /// Process columns by descending `diag(H)`.
    pub act_order: bool,
    /// Group scales from the original weights up front instead of when a group starts.
    pub static_groups: bool,
    /// Times the dampening is multiplied by 10 after a failed Cholesky factorization.
    pub max_damp_retries: u32,
}

impl Default for GptqParams {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block_size: 128,
            act_order: false,
            static_groups: false,
            max_damp_retries: 5,
        }
    }
}

impl GptqParams {
    fn validate(&self) -> Result<(), String> {
        if !(self.damp.is_finite() && self.damp > 0.0) {
            return Err(format!(
                "damp must be positive and finite, got {}",
                self.damp
            ));
        }
        if self.block_size == 0 {
            return Err("block_size must be at least 1".into());
        }
        Ok(())
    }
}

/// The result of [`gptq_quantize`].
#[derive(Debug, Clone)]
pub struct GptqOutput {
    /// Dequantized weights, `[rows, cols]`, original column order.
    pub weight: Vec<f32>,
    /// Qparams describing `weight` exactly, normal `[rows, cols]` layout.
    pub qparams: QParams,
    /// `Σ err² / 2` with `err = (w − q) / U[j, j]`, as the reference reports it.
    pub loss: f64,
    /// Absolute dampening added to the diagonal (after the retries).
    pub damp: f64,
}

/// GPTQ of one `[rows, cols]` weight matrix with Hessian `h: [cols, cols]`.
///
/// `h_scale` multiplies `h` (only the loss depends on it). `warn` receives one message per
/// dampening retry. Errors are plain messages; the caller adds the layer name.
#[allow(clippy::too_many_arguments)]
pub fn gptq_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    h_scale: f64,
    args: &QuantArgs,
    params: &GptqParams,
    warn: &mut dyn FnMut(&str),
) -> Result<GptqOutput, String> {
    params.validate()?;
    args.validate().map_err(qerr)?;
    if w.len() != rows * cols {
        return Err(format!(
            "weight has {} values, expected {rows}×{cols}",
            w.len()
        ));
    }
    if h.len() != cols * cols {
        return Err(format!(
            "Hessian has {} values, expected {cols}×{cols}",
            h.len()
        ));
    }
    if let Some(i) = h.iter().position(|x| !x.is_finite()) {
        return Err(format!("Hessian value {i} is not finite ({})", h[i]));
    }
    let n = cols;

    // Tensor and channel qparams: from the original weights.
    let fixed = match args.granularity {
        Granularity::Tensor | Granularity::Channel => {
            Some(compute_qparams(w, rows, cols, args).map_err(qerr)?)
        }
        Granularity::Group(_) => None,
    };

    // Dead inputs (no calibration signal): weights zeroed, `H[i, i] = 1`. The scaled f64
    // Hessian is built once, already permuted, below (one `n²` f64 copy, not two).
    let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] == 0.0).collect();
    // act_order sorts dead inputs by their replaced diagonal (1), as the reference does.
    let diag: Vec<f64> = (0..n)
        .map(|i| {
            if dead[i] {
                1.0
            } else {
                f64::from(h[i * n + i]) * h_scale
            }
        })
        .collect();
    let mut w = w.to_vec();
    for (i, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
        for r in 0..rows {
            w[r * n + i] = 0.0;
        }
    }

    let group = match args.granularity {
        Granularity::Group(g) => Some(g as usize),
        _ => None,
    };
    let n_groups = group.map_or(0, |g| n.div_ceil(g));
    let with_zeros = args.ty == QuantType::Int && !args.symmetric;
    // Group scales `[rows, n_groups]`; `ready[g]` once computed.
    let mut gscales = vec![0f32; rows * n_groups];
    let mut gzeros = vec![0i32; rows * n_groups];
    let mut ready = vec![false; n_groups];
    if group.is_some() && params.static_groups {
        let qp = compute_qparams(&w, rows, cols, args).map_err(qerr)?;
        gscales.copy_from_slice(&qp.scales);
        if with_zeros {
            gzeros.copy_from_slice(&qp.zeros);
        }
        ready.fill(true);
    }

    // Processing order.
    let mut perm: Vec<usize> = (0..n).collect();
    if params.act_order {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    let mut inv_perm = vec![0usize; n];
    for (j, &c) in perm.iter().enumerate() {
        inv_perm[c] = j;
    }
    let mut wp = vec![0f32; rows * n];
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            wp[r * n + j] = w[r * n + c];
        }
    }
    drop(w);
    let hp = Mat::<f64>::from_fn(n, n, |i, j| {
        let (a, b) = (perm[i], perm[j]);
        if a == b && dead[a] {
            1.0
        } else {
            f64::from(h[a * n + b]) * h_scale
        }
    });

    let (u, damp) = inverse_cholesky_upper(&hp, params, warn)?;
    drop(hp);

    let (qmin, qmax) = match args.ty {
        QuantType::Int => args.int_range(),
        QuantType::Float => (0, 0),
    };
    let fake = |x: f32, s: f32, z: i32| -> f32 {
        match args.ty {
            QuantType::Int => dequantize_value(quantize_value(x, s, z, qmin, qmax), s, z),
            QuantType::Float => round_to_fp8_e4m3(x / s) * s,
        }
    };

    let bs = params.block_size;
    let mut loss = 0f64;
    let mut errs = vec![0f32; rows * bs];
    let mut b = 0;
    while b < n {
        let e = (b + bs).min(n);
        // Groups starting in this block: scales from W as it is now.
        if let Some(g) = group {
            for &c in &perm[b..e] {
                let gi = c / g;
                if ready[gi] {
                    continue;
                }
                let members: Vec<usize> = (gi * g..((gi + 1) * g).min(n))
                    .map(|c| inv_perm[c])
                    .collect();
                for r in 0..rows {
                    let row = &wp[r * n..(r + 1) * n];
                    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                    for &j in &members {
                        lo = lo.min(row[j]);
                        hi = hi.max(row[j]);
                    }
                    let (s, z) = scale_zero(lo, hi, args).map_err(qerr)?;
                    gscales[r * n_groups + gi] = s;
                    gzeros[r * n_groups + gi] = z;
                }
                ready[gi] = true;
            }
        }
        let (gscales, gzeros) = (&gscales, &gzeros);
        let fixed = fixed.as_ref();
        let perm = &perm;
        let u = &u;
        let block_loss: f64 = wp
            .par_chunks_mut(n)
            .zip(errs.par_chunks_mut(bs))
            .enumerate()
            .map(|(r, (row, err_row))| {
                let mut l = 0f64;
                for j in b..e {
                    let c = perm[j];
                    let (s, z) = match (fixed, group) {
                        (Some(qp), _) => (qp.scale_for(r, c), qp.zero_for(r, c)),
                        (None, Some(g)) => {
                            let k = r * n_groups + c / g;
                            (gscales[k], gzeros[k])
                        }
                        (None, None) => unreachable!("tensor/channel qparams are fixed"),
                    };
                    let x = row[j];
                    let q = fake(x, s, z);
                    let err = (x - q) / u[j * n + j];
                    row[j] = q;
                    l += f64::from(err) * f64::from(err) / 2.0;
                    err_row[j - b] = err;
                    let urow = &u[j * n..(j + 1) * n];
                    for k in j + 1..e {
                        row[k] -= err * urow[k];
                    }
                }
                l
            })
            .sum();
        loss += block_loss;
        if e < n {
            lazy_update(&mut wp, &errs, u, n, b, e, bs);
        }
        b = e;
    }

    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            out[r * n + c] = wp[r * n + j];
        }
    }
    let qparams = match (fixed, group) {
        (Some(qp), _) => qp,
        (None, Some(g)) => QParams::new(
            Granularity::Group(g as u32),
            rows,
            cols,
            gscales,
            if with_zeros { gzeros } else { Vec::new() },
        )
        .map_err(qerr)?,
        (None, None) => unreachable!("tensor/channel qparams are fixed"),
    };
    Ok(GptqOutput {
        weight: out,
        qparams,
        loss,
        damp,
    })
}

/// `W[:, e..] −= Err · U[b..e, e..]` (the columns after a block get the block's errors), by
/// chunks of rows: each chunk's product is one faer GEMM into an owned matrix.
fn lazy_update(
    wp: &mut [f32],
    errs: &[f32],
    u: &[f32],
    n: usize,
    b: usize,
    e: usize,
    err_stride: usize,
) {
    const CHUNK: usize = 256;
    let bw = e - b;
    let tail = n - e;
    let u_sub = Mat::<f32>::from_fn(bw, tail, |i, k| u[(b + i) * n + e + k]);
    wp.par_chunks_mut(CHUNK * n)
        .zip(errs.par_chunks(CHUNK * err_stride))
        .for_each(|(w_rows, e_rows)| {
            let m = w_rows.len() / n;
            let err = Mat::<f32>::from_fn(m, bw, |r, i| e_rows[r * err_stride + i]);
            let mut prod = Mat::<f32>::zeros(m, tail);
            matmul(
                prod.as_mut(),
                Accum::Replace,
                err.as_ref(),
                u_sub.as_ref(),
                1.0f32,
                Par::Seq,
            );
            for r in 0..m {
                let row = &mut w_rows[r * n + e..(r + 1) * n];
                for (k, x) in row.iter_mut().enumerate() {
                    *x -= prod[(r, k)];
                }
            }
        });
}

/// `U` (row-major f32 `[n, n]`) with `(H + λI)⁻¹ = UᵀU`, and `λ`; retries with 10× dampening.
fn inverse_cholesky_upper(
    h: &Mat<f64>,
    params: &GptqParams,
    warn: &mut dyn FnMut(&str),
) -> Result<(Vec<f32>, f64), String> {
    let n = h.nrows();
    let mean_diag = if n == 0 {
        0.0
    } else {
        (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64
    };
    let mut frac = params.damp;
    let mut attempt = 0;
    loop {
        let lambda = frac * mean_diag;
        let mut hd = h.clone();
        for i in 0..n {
            hd[(i, i)] += lambda;
        }
        let factor = hd
            .llt(Side::Lower)
            .ok()
            .map(|llt| llt.inverse())
            .and_then(|inv| inv.llt(Side::Lower).ok());
        if let Some(llt) = factor {
            let l = llt.L();
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = l[(j, i)] as f32;
                }
            }
            if u.iter().all(|x| x.is_finite()) && (0..n).all(|i| u[i * n + i] > 0.0) {
                return Ok((u, lambda));
            }
        }
        if attempt >= params.max_damp_retries {
            return Err(format!(
                "Cholesky factorization failed with dampening {frac} of the mean diagonal \
                 after {attempt} retries"
            ));
        }
        warn(&format!(
            "Cholesky factorization failed with dampening {frac} of the mean diagonal; \
             retrying with {} (×10)",
            frac * 10.0
        ));
        frac *= 10.0;
        attempt += 1;
    }
}

fn qerr(e: QuantError) -> String {
    e.to_string()
}

/// The GPTQ algorithm, configured by [`GptqParams`].
pub struct Gptq {
    params: GptqParams,
}

impl Algorithm for Gptq {
    const NAME: &'static str = "gptq";
    const SUMMARY: &'static str =
        "GPTQ: Hessian-aware column-by-column quantization with error compensation";

    fn from_params(params_toml: &str) -> Result<Self, PluginError> {
        let params: GptqParams = parse_params(Self::NAME, params_toml)?;
        params
            .validate()
            .map_err(|m| PluginError::invalid_params(format!("parameters of `gptq`: {m}")))?;
        Ok(Gptq { params })
    }

    fn required_stats(&self) -> StatsRequest {
        StatsRequest::HESSIAN
    }

    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
        let tokens = subset.token_count()?;
        // Only the reported loss depends on this scale (see the crate docs).
        let h_scale = 2.0 / tokens.max(1) as f64;
        for i in 0..subset.len() {
            let layer = subset.layer(i)?;
            let Some(args) = layer.scheme.weights else {
                continue; // skipped by the manifest
            };
            let h = subset.stat(StatKind::HESSIAN)?;
            let w = subset.weight(i)?;
            let mut warnings = Vec::new();
            let result = gptq_quantize(
                w,
                layer.out_features,
                layer.in_features,
                h,
                h_scale,
                &args,
                &self.params,
                &mut |m| warnings.push(m.to_string()),
            );
            for m in &warnings {
                subset.warn(&format!("{}: {m}", layer.name));
            }
            let out = result.map_err(|m| PluginError::numeric(format!("{}: {m}", layer.name)))?;
            subset.set_weight(i, &out.weight)?;
            subset.set_qparams(i, &out.qparams)?;
            subset.report_metric(i, "gptq_loss", out.loss);
            subset.info(&format!(
                "{}: gptq loss {:.4e} (damp {:.3e})",
                layer.name, out.loss, out.damp
            ));
        }
        Ok(())
    }
}

export_plugin! {
    name: "gs-gptq",
    vendor: "gs-host",
    algorithms: [Gptq],
}

#[cfg(test)]
mod tests;
