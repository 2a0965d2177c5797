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
//! - groups, otherwise: each row's group scale is fitted when the group's first column (in
//!   processing order) is reached, to the group's values at that moment — already updated by
//!   the error feedback of every column quantized before. (The reference fits them at the
//!   same column but reads the group from the full `W`, which it updates only at block ends;
//!   reading the current values is what "the weights as they are when the group starts" means
//!   and loses nothing.)
//!
//! **Order** (`order`): `none` keeps the stored column order; `act` sorts columns by
//! descending `diag(H)` (`desc_act`); `group_aware` (the default, GAR: Gafni et al., "Dual
//! Precision Quantization for Efficient and Accurate Deep Neural Networks Inference", CVPRW
//! 2025, as GPTQModel's `act_group_aware`) sorts whole groups by the largest `diag(H)` of
//! their columns and the columns inside each group by descending `diag(H)`. A group's columns
//! then stay contiguous, so its scale is fitted after all the more important groups have been
//! compensated into it — most of `act` order's gain, with dynamic group scales and without a
//! `g_idx`. Without groups `group_aware` is `act`.
//!
//! A column always belongs to the group of its ORIGINAL index, so the returned qparams keep the
//! normal group-contiguous `[out, in]` layout and every returned weight is on its own group's
//! grid (no `g_idx` needed, whatever the order).
//!
//! The factorization (`perm`, `U`) depends only on `H`, the order and the group size, so
//! [`prepare`] runs once per subset and group size and is shared by the subset's layers
//! (q/k/v, gate/up).

use faer::linalg::matmul::matmul;
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Mat, Par, Side};
use gs_plugin_api::quant::{
    compute_qparams, fake_value, search_scale_zero, Granularity, QParams, QuantArgs, QuantError,
    QuantType,
};
use gs_plugin_api::{
    export_plugin, parse_params, Algorithm, PluginError, StatKind, StatsRequest, Subset,
};
use rayon::prelude::*;
use serde::Deserialize;

/// Column processing order, see the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// The stored column order (the original GPTQ).
    None,
    /// Descending `diag(H)` (act order, `desc_act`).
    Act,
    /// Whole groups by descending max `diag(H)`, columns within a group by descending
    /// `diag(H)` (GAR); `Act` for per-channel and per-tensor schemes.
    GroupAware,
}

/// `[[pipeline]] algorithm = "gptq"` parameters; the scheme itself comes from `[quant]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqParams {
    /// Dampening, as a fraction of the mean of `diag(H)`, added to the diagonal.
    pub damp: f64,
    /// Columns per lazy batch update.
    pub block_size: usize,
    /// Column processing order.
    pub order: Order,
    /// Group scales from the original weights up front instead of when a group starts.
    pub static_groups: bool,
    /// Times the dampening is multiplied by 10 after a failed Cholesky factorization.
    pub max_damp_retries: u32,
    /// Steps of the range search for dynamic group scales (0: plain min/max): the range is
    /// shrunk by `i / mse_grid`, `i = 0 ..= max_shrink · mse_grid`, and the scale with the
    /// least `Σ diag(H)_j (w_j − q_j)²` over the group is kept.
    pub mse_grid: u32,
    /// Largest fraction the range search may shrink a group's range by.
    pub max_shrink: f64,
}

impl Default for GptqParams {
    /// Measured on SmolLM2-135M W4A16 g64 (docs/RESULTS.md): group-aware order, dynamic group
    /// scales with the range search, 1 % dampening is the most accurate combination.
    fn default() -> Self {
        Self {
            damp: 0.01,
            block_size: 128,
            order: Order::GroupAware,
            static_groups: false,
            max_damp_retries: 5,
            mse_grid: 100,
            max_shrink: 0.2,
        }
    }
}

/// The TOML table as written; `act_order` is the name other tools use for `order = "act"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParams {
    damp: Option<f64>,
    block_size: Option<usize>,
    order: Option<Order>,
    act_order: Option<bool>,
    static_groups: Option<bool>,
    max_damp_retries: Option<u32>,
    mse_grid: Option<u32>,
    max_shrink: Option<f64>,
}

impl RawParams {
    fn resolve(self) -> Result<GptqParams, String> {
        let d = GptqParams::default();
        let order = match (self.order, self.act_order) {
            (Some(o), None) => o,
            (None, Some(true)) => Order::Act,
            (None, Some(false)) => Order::None,
            (None, None) => d.order,
            (Some(o), Some(a)) if (o == Order::Act) == a => o,
            (Some(o), Some(a)) => {
                return Err(format!(
                    "`act_order = {a}` contradicts `order = \"{}\"`; set only `order`",
                    o.name()
                ))
            }
        };
        let p = GptqParams {
            damp: self.damp.unwrap_or(d.damp),
            block_size: self.block_size.unwrap_or(d.block_size),
            order,
            static_groups: self.static_groups.unwrap_or(d.static_groups),
            max_damp_retries: self.max_damp_retries.unwrap_or(d.max_damp_retries),
            mse_grid: self.mse_grid.unwrap_or(d.mse_grid),
            max_shrink: self.max_shrink.unwrap_or(d.max_shrink),
        };
        p.validate()?;
        Ok(p)
    }
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::None => "none",
            Order::Act => "act",
            Order::GroupAware => "group_aware",
        }
    }
}

impl GptqParams {
    fn validate(&self) -> Result<(), String> {
        if !(self.damp.is_finite() && self.damp > 0.0) {
            return Err(format!(
                "`damp` must be positive and finite, got {}",
                self.damp
            ));
        }
        if self.block_size == 0 {
            return Err("`block_size` must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.max_shrink) {
            return Err(format!(
                "`max_shrink` must be in [0, 1), got {}",
                self.max_shrink
            ));
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

/// What GPTQ needs from `H` for one layer shape: shared by the layers of a subset.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Input columns.
    n: usize,
    /// `perm[j]` = original column processed at position `j`.
    perm: Vec<usize>,
    /// Inputs without calibration signal (`H[i, i] == 0`), original indices.
    dead: Vec<bool>,
    /// Upper Cholesky factor of the permuted, dampened `H⁻¹`, row-major f32 `[n, n]`.
    u: Vec<f32>,
    /// Absolute dampening added to the diagonal (after the retries).
    damp: f64,
    /// Group size the order was built for (`None`: no groups).
    group: Option<usize>,
    /// `diag(H)` in processing order (dead inputs: 1), the range search's importance.
    importance: Vec<f32>,
}

/// Processing order, inverse Cholesky factor and dampening of `h: [n, n]` (times `h_scale`).
///
/// `group` is the scheme's group size (the group-aware order needs it).
pub fn prepare(
    h: &[f32],
    n: usize,
    h_scale: f64,
    group: Option<usize>,
    params: &GptqParams,
    warn: &mut dyn FnMut(&str),
) -> Result<Prepared, String> {
    params.validate()?;
    if h.len() != n * n {
        return Err(format!("Hessian has {} values, expected {n}×{n}", h.len()));
    }
    if let Some(i) = h.iter().position(|x| !x.is_finite()) {
        return Err(format!("Hessian value {i} is not finite ({})", h[i]));
    }
    // Dead inputs (no calibration signal): `H[i, i] = 1` (and their weights zeroed later).
    let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] == 0.0).collect();
    // The orders sort dead inputs by their replaced diagonal (1), as the reference does.
    let diag: Vec<f64> = (0..n)
        .map(|i| {
            if dead[i] {
                1.0
            } else {
                f64::from(h[i * n + i]) * h_scale
            }
        })
        .collect();
    let perm = processing_order(&diag, params.order, group);
    // The scaled f64 Hessian, built once, already permuted.
    let hp = Mat::<f64>::from_fn(n, n, |i, j| {
        let (a, b) = (perm[i], perm[j]);
        if a == b && dead[a] {
            1.0
        } else {
            f64::from(h[a * n + b]) * h_scale
        }
    });
    let (u, damp) = inverse_cholesky_upper(&hp, params, warn)?;
    let importance = perm.iter().map(|&c| diag[c] as f32).collect();
    Ok(Prepared {
        n,
        perm,
        dead,
        u,
        damp,
        group,
        importance,
    })
}

/// `perm[j]` = the original column processed at position `j` (stable sorts: ties keep their
/// stored order).
pub fn processing_order(diag: &[f64], order: Order, group: Option<usize>) -> Vec<usize> {
    let n = diag.len();
    let mut perm: Vec<usize> = (0..n).collect();
    let by_diag_desc = |a: &usize, b: &usize| diag[*b].total_cmp(&diag[*a]);
    match (order, group) {
        (Order::None, _) => {}
        (Order::Act, _) | (Order::GroupAware, None) => perm.sort_by(by_diag_desc),
        (Order::GroupAware, Some(g)) => {
            let g = g.max(1);
            let mut groups: Vec<Vec<usize>> = (0..n.div_ceil(g))
                .map(|gi| {
                    let mut cols: Vec<usize> = (gi * g..((gi + 1) * g).min(n)).collect();
                    cols.sort_by(by_diag_desc);
                    cols
                })
                .collect();
            // Each group's score is its largest diagonal: its first column after the sort.
            groups.sort_by(|a, b| diag[b[0]].total_cmp(&diag[a[0]]));
            perm = groups.concat();
        }
    }
    perm
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
    args.validate().map_err(qerr)?;
    let prep = prepare(h, cols, h_scale, group_size(args), params, warn)?;
    quantize_prepared(w, rows, &prep, args, params)
}

/// The scheme's group size, if it has groups.
pub fn group_size(args: &QuantArgs) -> Option<usize> {
    match args.granularity {
        Granularity::Group(g) => Some(g as usize),
        _ => None,
    }
}

/// GPTQ of one `[rows, prep.n]` weight matrix with a prepared Hessian.
pub fn quantize_prepared(
    w: &[f32],
    rows: usize,
    prep: &Prepared,
    args: &QuantArgs,
    params: &GptqParams,
) -> Result<GptqOutput, String> {
    params.validate()?;
    args.validate().map_err(qerr)?;
    let n = prep.n;
    if w.len() != rows * n {
        return Err(format!(
            "weight has {} values, expected {rows}×{n}",
            w.len()
        ));
    }
    let group = group_size(args);
    if group != prep.group {
        return Err(format!(
            "the Hessian was prepared for group size {:?}, the scheme has {group:?}",
            prep.group
        ));
    }
    let (perm, u) = (&prep.perm, &prep.u);

    // Tensor and channel qparams: from the original weights.
    let fixed = match group {
        None => Some(compute_qparams(w, rows, n, args).map_err(qerr)?),
        Some(_) => None,
    };
    let mut w = w.to_vec();
    for (i, _) in prep.dead.iter().enumerate().filter(|(_, &d)| d) {
        for r in 0..rows {
            w[r * n + i] = 0.0;
        }
    }

    let n_groups = group.map_or(0, |g| n.div_ceil(g));
    let with_zeros = args.ty == QuantType::Int && !args.symmetric;
    // Group scales `[rows, n_groups]`.
    let mut gscales = vec![0f32; rows * n_groups];
    let mut gzeros = vec![0i32; rows * n_groups];
    let dynamic_groups = group.is_some() && !params.static_groups;
    if group.is_some() && params.static_groups {
        let qp = compute_qparams(&w, rows, n, args).map_err(qerr)?;
        gscales.copy_from_slice(&qp.scales);
        if with_zeros {
            gzeros.copy_from_slice(&qp.zeros);
        }
    }
    // Where each group starts in processing order, and its members' positions.
    let mut starts: Vec<Option<usize>> = vec![None; n];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
    if let (Some(g), true) = (group, dynamic_groups) {
        for (j, &c) in perm.iter().enumerate() {
            let gi = c / g;
            if members[gi].is_empty() {
                starts[j] = Some(gi);
            }
            members[gi].push(j);
        }
    }

    let mut wp = vec![0f32; rows * n];
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            wp[r * n + j] = w[r * n + c];
        }
    }
    drop(w);

    let bs = params.block_size;
    let mut loss = 0f64;
    let mut errs = vec![0f32; rows * bs];
    let gstride = n_groups.max(1);
    if n_groups == 0 {
        // One (unused) slot per row keeps the row zip below uniform.
        gscales = vec![0f32; rows];
        gzeros = vec![0i32; rows];
    }
    let mut b = 0;
    while b < n {
        let e = (b + bs).min(n);
        let fixed = fixed.as_ref();
        let (starts, members) = (&starts, &members);
        let block_loss = wp
            .par_chunks_mut(n)
            .zip(errs.par_chunks_mut(bs))
            .zip(gscales.par_chunks_mut(gstride))
            .zip(gzeros.par_chunks_mut(gstride))
            .enumerate()
            .map(|(r, (((row, err_row), srow), zrow))| {
                let mut l = 0f64;
                let (mut vals, mut imp) = (Vec::new(), Vec::new());
                for j in b..e {
                    let c = perm[j];
                    if let Some(gi) = starts[j] {
                        // The group starts: fit its scale to its current values. Members
                        // after this block have not received the block's errors yet (the
                        // lazy update comes at its end): add them here.
                        vals.clear();
                        imp.clear();
                        for &m in &members[gi] {
                            let mut v = row[m];
                            if m >= e {
                                for i in b..j {
                                    v -= err_row[i - b] * u[i * n + m];
                                }
                            }
                            vals.push(v);
                            imp.push(prep.importance[m]);
                        }
                        let (s, z) = search_scale_zero(
                            &vals,
                            &imp,
                            args,
                            params.mse_grid,
                            params.max_shrink as f32,
                        )?;
                        srow[gi] = s;
                        zrow[gi] = z;
                    }
                    let (s, z) = match (fixed, group) {
                        (Some(qp), _) => (qp.scale_for(r, c), qp.zero_for(r, c)),
                        (None, Some(g)) => (srow[c / g], zrow[c / g]),
                        (None, None) => unreachable!("tensor/channel qparams are fixed"),
                    };
                    let x = row[j];
                    let q = fake_value(x, s, z, args);
                    let err = (x - q) / u[j * n + j];
                    row[j] = q;
                    l += f64::from(err) * f64::from(err) / 2.0;
                    err_row[j - b] = err;
                    let urow = &u[j * n..(j + 1) * n];
                    for k in j + 1..e {
                        row[k] -= err * urow[k];
                    }
                }
                Ok(l)
            })
            // Summed in row order, not in rayon's split order: the loss is reported, and a
            // run's report must not depend on the number of threads.
            .collect::<Result<Vec<f64>, QuantError>>()
            .map_err(qerr)?;
        loss += block_loss.iter().sum::<f64>();
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
            n,
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
        damp: prep.damp,
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
        if let Some(f) = upper_factor_of_inverse(&hd) {
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = f[(i, j)] as f32;
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

/// The upper triangular `U` with `H⁻¹ = UᵀU`, or `None` when `H` is not positive definite.
///
/// One Cholesky in reversed order and one triangular inverse (⅔·n³ flops), where the reference
/// computes `cholesky(cholesky_inverse(cholesky(H)), upper=True)` (≈ 5/3·n³). With `J` the
/// reversal: `JHJ = L′L′ᵀ` gives `H = RRᵀ` with `R = JL′J` upper, so `H⁻¹ = R⁻ᵀR⁻¹` and, the
/// Cholesky factor being unique, `U = R⁻¹ = J·L′⁻¹·J`.
fn upper_factor_of_inverse(h: &Mat<f64>) -> Option<Mat<f64>> {
    let n = h.nrows();
    let reversed = Mat::<f64>::from_fn(n, n, |i, j| h[(n - 1 - i, n - 1 - j)]);
    let llt = reversed.llt(Side::Lower).ok()?;
    let mut u = Mat::<f64>::zeros(n, n);
    invert_lower_triangular(
        u.as_mut().reverse_rows_and_cols_mut(),
        llt.L(),
        faer::get_global_parallelism(),
    );
    Some(u)
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
        let raw: RawParams = parse_params(Self::NAME, params_toml)?;
        let params = raw
            .resolve()
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
        // The layers of a subset share `H`: one factorization per group size.
        let mut prepared: Vec<Prepared> = Vec::new();
        for i in 0..subset.len() {
            let layer = subset.layer(i)?;
            let Some(args) = layer.scheme.weights else {
                continue; // skipped by the manifest
            };
            let group = group_size(&args);
            if let Some(g) = group {
                if g == 0 || layer.in_features % g != 0 {
                    return Err(PluginError::unsupported(format!(
                        "gptq: {}: group size {g} does not divide its {} input columns",
                        layer.name, layer.in_features
                    )));
                }
            }
            let k =
                match prepared.iter().position(|p| p.group == group) {
                    Some(k) => k,
                    None => {
                        let h = subset.stat(StatKind::HESSIAN)?;
                        let mut warnings = Vec::new();
                        let prep = prepare(
                            h,
                            layer.in_features,
                            h_scale,
                            group,
                            &self.params,
                            &mut |m| warnings.push(m.to_string()),
                        );
                        for m in &warnings {
                            subset.warn(&format!("{}: {m}", subset.name()));
                        }
                        prepared.push(prep.map_err(|m| {
                            PluginError::numeric(format!("gptq: {}: {m}", layer.name))
                        })?);
                        prepared.len() - 1
                    }
                };
            let w = subset.weight(i)?;
            let out = quantize_prepared(w, layer.out_features, &prepared[k], &args, &self.params)
                .map_err(|m| PluginError::numeric(format!("gptq: {}: {m}", layer.name)))?;
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
