//! [`CpuDevice`]: faer GEMMs (parallel on the rayon pool) and rayon loops for the rest.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{check_len, check_matmul_t, check_xtx, checked_mul, AttnShape, Device, DeviceError};

/// Elementwise ops below this many elements per rayon task are not worth splitting further.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;
/// Rows of `x` converted to f64 at a time by [`CpuDevice::xtx_accumulate_f64`].
const XTX_F64_ROWS: usize = 256;

/// The CPU backend.
#[derive(Debug, Clone, Copy)]
pub struct CpuDevice {
    /// Parallelism of the large GEMMs.
    par: Par,
}

impl CpuDevice {
    /// GEMMs use every thread of the current rayon pool (call inside `pool.install` to bind
    /// the device to another pool); the other ops run on that pool too.
    pub fn new() -> CpuDevice {
        CpuDevice {
            par: Par::rayon(rayon::current_num_threads()),
        }
    }

    /// GEMMs on the calling thread only (the other ops still use the rayon pool).
    pub fn sequential() -> CpuDevice {
        CpuDevice { par: Par::Seq }
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new()
    }
}

impl Device for CpuDevice {
    fn name(&self) -> &str {
        "cpu"
    }

    fn matmul_t(
        &self,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), DeviceError> {
        check_matmul_t(x.len(), w.len(), out.len(), (m, k, n))?;
        gemm_xwt(x, w, out, m, k, n, self.par);
        Ok(())
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32]) -> Result<(), DeviceError> {
        let n = bias.len();
        if n == 0 || out.len() % n != 0 {
            return Err(DeviceError::Invalid {
                op: "add_bias",
                message: format!(
                    "out has {} elements, not a multiple of the bias length {n}",
                    out.len()
                ),
            });
        }
        out.par_chunks_exact_mut(n)
            .with_min_len(rows_per_task(n))
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), DeviceError> {
        const OP: &str = "rms_norm";
        let d = weight.len();
        if d == 0 || x.len() % d != 0 {
            return Err(DeviceError::Invalid {
                op: OP,
                message: format!(
                    "x has {} elements, not a multiple of the weight length {d}",
                    x.len()
                ),
            });
        }
        check_len(OP, "out", out.len(), x.len(), || {
            format!("[rows={}, d={d}]", x.len() / d)
        })?;
        x.par_chunks_exact(d)
            .zip(out.par_chunks_exact_mut(d))
            .with_min_len(rows_per_task(d))
            .for_each(|(x, y)| rms_norm_row(x, weight, eps, y));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut [f32],
        seqlen: usize,
        n_heads: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(), DeviceError> {
        const OP: &str = "rope";
        if head_dim == 0 || head_dim % 2 != 0 || seqlen == 0 || n_heads == 0 {
            return Err(DeviceError::Invalid {
                op: OP,
                message: format!(
                    "head_dim ({head_dim}) must be even and positive, seqlen ({seqlen}) and \
                     n_heads ({n_heads}) positive"
                ),
            });
        }
        let width = checked_mul(OP, &[n_heads, head_dim])?;
        let table = checked_mul(OP, &[seqlen, head_dim])?;
        let shape = || format!("cos/sin [seqlen={seqlen}, head_dim={head_dim}]");
        check_len(OP, "cos", cos.len(), table, shape)?;
        check_len(OP, "sin", sin.len(), table, shape)?;
        if x.len() % (width * seqlen) != 0 {
            return Err(DeviceError::Invalid {
                op: OP,
                message: format!(
                    "x has {} elements, not a multiple of seqlen·n_heads·head_dim = {}",
                    x.len(),
                    width * seqlen
                ),
            });
        }
        x.par_chunks_exact_mut(width)
            .enumerate()
            .with_min_len(rows_per_task(width))
            .for_each(|(row, x)| {
                let p = row % seqlen;
                let (c, s) = (
                    &cos[p * head_dim..(p + 1) * head_dim],
                    &sin[p * head_dim..(p + 1) * head_dim],
                );
                x.chunks_exact_mut(head_dim)
                    .for_each(|head| rotate_half_rope(head, c, s));
            });
        Ok(())
    }

    fn causal_attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        shape: &AttnShape,
    ) -> Result<(), DeviceError> {
        const OP: &str = "causal_attention";
        let &AttnShape {
            n_seq,
            seqlen,
            n_heads,
            n_kv_heads,
            head_dim,
            ..
        } = shape;
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || seqlen == 0 || head_dim == 0 {
            return Err(DeviceError::Invalid {
                op: OP,
                message: format!(
                    "n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}); seqlen \
                     ({seqlen}) and head_dim ({head_dim}) must be positive"
                ),
            });
        }
        let tokens = checked_mul(OP, &[n_seq, seqlen])?;
        let q_len = checked_mul(OP, &[tokens, n_heads, head_dim])?;
        let kv_len = checked_mul(OP, &[tokens, n_kv_heads, head_dim])?;
        let desc = || format!("{shape:?}");
        check_len(OP, "q", q.len(), q_len, desc)?;
        check_len(OP, "k", k.len(), kv_len, desc)?;
        check_len(OP, "v", v.len(), kv_len, desc)?;
        check_len(OP, "out", out.len(), q_len, desc)?;
        if tokens == 0 {
            return Ok(());
        }
        let q_seq = seqlen * n_heads * head_dim;
        let kv_seq = seqlen * n_kv_heads * head_dim;
        out.par_chunks_exact_mut(q_seq)
            .zip(q.par_chunks_exact(q_seq))
            .zip(k.par_chunks_exact(kv_seq).zip(v.par_chunks_exact(kv_seq)))
            .for_each(|((out, q), (k, v))| attention_one_sequence(q, k, v, out, shape));
        Ok(())
    }

    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), DeviceError> {
        const OP: &str = "silu_mul";
        let shape = || format!("[{}] elementwise", gate.len());
        check_len(OP, "up", up.len(), gate.len(), shape)?;
        check_len(OP, "out", out.len(), gate.len(), shape)?;
        out.par_iter_mut()
            .zip(gate.par_iter().zip(up.par_iter()))
            .with_min_len(MIN_ELEMS_PER_TASK)
            .for_each(|(y, (&g, &u))| *y = silu(g) * u);
        Ok(())
    }

    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), DeviceError> {
        check_len("add", "x", x.len(), acc.len(), || {
            format!("[{}] elementwise", acc.len())
        })?;
        acc.par_iter_mut()
            .zip(x.par_iter())
            .with_min_len(MIN_ELEMS_PER_TASK)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn xtx_accumulate(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f32],
    ) -> Result<(), DeviceError> {
        const OP: &str = "xtx_accumulate";
        check_xtx(OP, x.len(), h.len(), m, k)?;
        syrk_lower_add(x, h, m, k, self.par);
        Ok(())
    }

    fn xtx_accumulate_f64(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f64],
    ) -> Result<(), DeviceError> {
        const OP: &str = "xtx_accumulate_f64";
        check_xtx(OP, x.len(), h.len(), m, k)?;
        if k == 0 {
            return Ok(());
        }
        // Converting a bounded number of rows at a time keeps the f64 copy small.
        let mut x64 = Vec::with_capacity(XTX_F64_ROWS.min(m) * k);
        for rows in x.chunks(XTX_F64_ROWS * k) {
            x64.clear();
            x64.extend(rows.iter().map(|&v| f64::from(v)));
            gemm_xtx_add(&x64, h, rows.len() / k, k, 1.0, self.par);
        }
        Ok(())
    }
}

/// `out[m,n] = x[m,k] · w[n,k]ᵀ` (lengths already checked).
fn gemm_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, par: Par) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let x = MatRef::from_row_major_slice(x, m, k);
    let wt = MatRef::from_row_major_slice(w, n, k).transpose();
    let out = MatMut::from_row_major_slice_mut(out, m, n);
    matmul(out, Accum::Replace, x, wt, 1.0f32, par);
}

/// `h[k,k] += x[m,k]ᵀ · x[m,k]` for f32 or f64 (lengths already checked; `one` = 1).
fn gemm_xtx_add<T>(x: &[T], h: &mut [T], m: usize, k: usize, one: T, par: Par)
where
    T: faer::traits::ComplexField + faer::traits::Conjugate<Canonical = T>,
{
    if m == 0 || k == 0 {
        return;
    }
    let x = MatRef::from_row_major_slice(x, m, k);
    let h = MatMut::from_row_major_slice_mut(h, k, k);
    matmul(h, Accum::Add, x.transpose(), x, one, par);
}

/// `h += xᵀx` for a symmetric `h`, computing only the lower triangle (half the GEMM) and
/// mirroring it.
fn syrk_lower_add(x: &[f32], h: &mut [f32], m: usize, k: usize, par: Par) {
    if m == 0 || k == 0 {
        return;
    }
    let xm = MatRef::from_row_major_slice(x, m, k);
    {
        let hm = MatMut::from_row_major_slice_mut(h, k, k);
        triangular::matmul(
            hm,
            BlockStructure::TriangularLower,
            Accum::Add,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm,
            BlockStructure::Rectangular,
            1.0f32,
            par,
        );
    }
    for i in 0..k {
        for j in i + 1..k {
            h[i * k + j] = h[j * k + i];
        }
    }
}

/// Rows of width `width` per rayon task so a task holds about [`MIN_ELEMS_PER_TASK`] elements.
fn rows_per_task(width: usize) -> usize {
    (MIN_ELEMS_PER_TASK / width.max(1)).max(1)
}

/// `y = w · x / sqrt(mean(x²) + eps)`, in transformers' order: `x · rsqrt(var + eps)`, then
/// `· w`. The mean of squares is summed in f64, which is at least as accurate as torch's
/// pairwise f32 reduction.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let var = (sum_sq / x.len() as f64) as f32;
    let r = 1.0 / (var + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = w * (x * r);
    }
}

/// One head `x[head_dim]` at one position: `x·cos + rotate_half(x)·sin`.
fn rotate_half_rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        // rotate_half(x) = [-x₂, x₁]
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

/// `silu(x) = x · σ(x) = x / (1 + e^-x)` (torch's CPU formula).
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Attention of one sequence, every query head in parallel. `q, out: [seqlen, Hq·D]`,
/// `k, v: [seqlen, Hkv·D]`.
fn attention_one_sequence(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], s: &AttnShape) {
    let (l, d) = (s.seqlen, s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let heads: Vec<Vec<f32>> = (0..s.n_heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let q_h = MatRef::from_row_major_slice_with_stride(&q[h * d..], l, d, s.n_heads * d);
            let k_g = MatRef::from_row_major_slice_with_stride(&k[g * d..], l, d, s.n_kv_heads * d);
            let v_g = MatRef::from_row_major_slice_with_stride(&v[g * d..], l, d, s.n_kv_heads * d);
            // scores[l,l] = q_h · k_gᵀ, then scaled (transformers scales after the product).
            let mut p = vec![0.0f32; l * l];
            let scores = MatMut::from_row_major_slice_mut(&mut p, l, l);
            matmul(
                scores,
                Accum::Replace,
                q_h,
                k_g.transpose(),
                1.0f32,
                Par::Seq,
            );
            for (i, row) in p.chunks_exact_mut(l).enumerate() {
                causal_softmax_row(row, i, s.scale);
            }
            let mut o = vec![0.0f32; l * d];
            let p = MatRef::from_row_major_slice(&p, l, l);
            let o_mat = MatMut::from_row_major_slice_mut(&mut o, l, d);
            matmul(o_mat, Accum::Replace, p, v_g, 1.0f32, Par::Seq);
            o
        })
        .collect();
    for (i, row) in out.chunks_exact_mut(s.n_heads * d).enumerate() {
        for (h, o) in heads.iter().enumerate() {
            row[h * d..(h + 1) * d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
    }
}

/// Row `i` of the attention matrix: `softmax(scale · row[..=i])`, zero after `i` (the causal
/// mask; transformers adds `f32::MIN` there, whose exponential is exactly 0).
fn causal_softmax_row(row: &mut [f32], i: usize, scale: f32) {
    let (keep, masked) = row.split_at_mut(i + 1);
    let mut max = f32::NEG_INFINITY;
    for x in keep.iter_mut() {
        *x *= scale;
        max = max.max(*x);
    }
    let mut sum = 0.0f32;
    for x in keep.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    keep.iter_mut().for_each(|x| *x *= inv);
    masked.fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (a 64-bit LCG), so failures reproduce.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn devices() -> [CpuDevice; 2] {
        [CpuDevice::new(), CpuDevice::sequential()]
    }

    #[test]
    fn matmul_t_is_x_times_w_transposed() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (17, 64, 33), (130, 70, 90)] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let mut naive = vec![0.0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    naive[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                }
            }
            for dev in devices() {
                let mut out = vec![f32::NAN; m * n];
                dev.matmul_t(&x, &w, &mut out, m, k, n).unwrap();
                let err = max_abs_diff(&out, &naive);
                assert!(err < 1e-5 * k as f32, "{m}x{k}x{n}: {err}");
            }
        }
    }

    #[test]
    fn matmul_t_rejects_wrong_lengths_naming_the_operand() {
        let dev = CpuDevice::new();
        let mut out = vec![0.0; 6];
        let err = dev
            .matmul_t(&[0.0; 6], &[0.0; 5], &mut out, 2, 3, 2)
            .unwrap_err();
        assert_eq!(
            err,
            DeviceError::Shape {
                op: "matmul_t",
                operand: "w",
                expected: 6,
                found: 5,
                shape: "x [m=2, k=3], w [n=2, k=3], out [m=2, n=2]".into()
            }
        );
        assert!(err
            .to_string()
            .contains("operand w has 5 elements, expected 6"));
        // k = 0: an empty sum.
        let mut out = vec![1.0; 4];
        dev.matmul_t(&[], &[], &mut out, 2, 0, 2).unwrap();
        assert_eq!(out, [0.0; 4]);
    }

    #[test]
    fn add_bias_adds_to_every_row() {
        let dev = CpuDevice::new();
        let mut out = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        dev.add_bias(&mut out, &[10.0, 20.0, 30.0]).unwrap();
        assert_eq!(out, [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
        assert!(dev.add_bias(&mut out, &[1.0; 4]).is_err());
        assert!(dev.add_bias(&mut out, &[]).is_err());
    }

    #[test]
    fn rms_norm_matches_the_definition() {
        let dev = CpuDevice::new();
        let (rows, d) = (37, 24);
        let x = random(rows * d, 3);
        let w = random(d, 4);
        let eps = 1e-5f32;
        let mut out = vec![0.0; rows * d];
        dev.rms_norm(&x, &w, eps, &mut out).unwrap();
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = f64::from(w[j]) * f64::from(row[j]) / (ms + f64::from(eps)).sqrt();
                assert!((f64::from(out[r * d + j]) - want).abs() < 1e-5, "{r},{j}");
            }
        }
        // A row of zeros stays zero (eps keeps the division finite).
        let mut z = vec![1.0; d];
        dev.rms_norm(&vec![0.0; d], &w, eps, &mut z).unwrap();
        assert_eq!(z, vec![0.0; d]);
        assert!(dev
            .rms_norm(&x[..d + 1], &w, eps, &mut out[..d + 1])
            .is_err());
        assert!(dev.rms_norm(&x, &w, eps, &mut out[..d]).is_err());
    }

    #[test]
    fn rope_rotates_half_pairs_by_the_position_angle() {
        let dev = CpuDevice::new();
        let (n_seq, seqlen, heads, hd) = (2, 5, 3, 8);
        let width = heads * hd;
        let x0 = random(n_seq * seqlen * width, 5);
        let cos = random(seqlen * hd, 6);
        let sin = random(seqlen * hd, 7);
        let mut x = x0.clone();
        dev.rope(&mut x, seqlen, heads, hd, &cos, &sin).unwrap();
        for t in 0..n_seq * seqlen {
            let p = t % seqlen;
            for h in 0..heads {
                let head = &x0[t * width + h * hd..t * width + (h + 1) * hd];
                // rotate_half(x) = cat(-x[half..], x[..half])
                let rot: Vec<f32> = (0..hd)
                    .map(|j| {
                        if j < hd / 2 {
                            -head[j + hd / 2]
                        } else {
                            head[j - hd / 2]
                        }
                    })
                    .collect();
                for j in 0..hd {
                    let want = head[j] * cos[p * hd + j] + rot[j] * sin[p * hd + j];
                    assert_eq!(x[t * width + h * hd + j], want, "t {t} h {h} j {j}");
                }
            }
        }
        // With HF-style tables (angle θ(p, j mod half), duplicated halves) it is a true
        // rotation of each pair (x_j, x_{j+half}): norms are kept.
        let angle = |i: usize| 0.3 * ((i / hd) * hd + (i % hd) % (hd / 2)) as f32;
        let c: Vec<f32> = (0..seqlen * hd).map(|i| angle(i).cos()).collect();
        let s: Vec<f32> = (0..seqlen * hd).map(|i| angle(i).sin()).collect();
        let mut x = x0.clone();
        dev.rope(&mut x, seqlen, heads, hd, &c, &s).unwrap();
        for (a, b) in x.chunks(hd).zip(x0.chunks(hd)) {
            for j in 0..hd / 2 {
                let (na, nb) = (a[j].hypot(a[j + hd / 2]), b[j].hypot(b[j + hd / 2]));
                assert!((na - nb).abs() < 1e-5, "{na} vs {nb}");
            }
        }
        // Odd head_dim and bad tables are refused.
        assert!(dev
            .rope(&mut x, seqlen, heads * 2, hd / 2 + 1, &cos, &sin)
            .is_err());
        assert!(dev
            .rope(&mut x, seqlen, heads, hd, &cos[1..], &sin)
            .is_err());
        assert!(dev
            .rope(&mut x[1..], seqlen, heads, hd, &cos, &sin)
            .is_err());
    }

    /// The definition: per sequence, per query head, with explicit repeat_kv and mask.
    fn naive_attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> Vec<f32> {
        let (l, d, hq, hkv) = (s.seqlen, s.head_dim, s.n_heads, s.n_kv_heads);
        let mut out = vec![0.0f32; q.len()];
        for seq in 0..s.n_seq {
            for h in 0..hq {
                let g = h / (hq / hkv);
                for i in 0..l {
                    let ti = seq * l + i;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let tj = seq * l + j;
                            let dot: f64 = (0..d)
                                .map(|c| {
                                    f64::from(q[ti * hq * d + h * d + c])
                                        * f64::from(k[tj * hkv * d + g * d + c])
                                })
                                .sum();
                            dot * f64::from(s.scale)
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let o: f64 = (0..=i)
                            .map(|j| e[j] / z * f64::from(v[(seq * l + j) * hkv * d + g * d + c]))
                            .sum();
                        out[ti * hq * d + h * d + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn causal_attention_with_grouped_kv_heads_matches_the_definition() {
        for (n_seq, seqlen, hq, hkv, d) in [(1, 1, 1, 1, 2), (2, 7, 4, 2, 8), (3, 19, 6, 3, 16)] {
            let shape = AttnShape {
                n_seq,
                seqlen,
                n_heads: hq,
                n_kv_heads: hkv,
                head_dim: d,
                scale: (d as f32).powf(-0.5),
            };
            let t = n_seq * seqlen;
            let q = random(t * hq * d, 8)
                .iter()
                .map(|x| 3.0 * x)
                .collect::<Vec<_>>();
            let k = random(t * hkv * d, 9)
                .iter()
                .map(|x| 3.0 * x)
                .collect::<Vec<_>>();
            let v = random(t * hkv * d, 10);
            let want = naive_attention(&q, &k, &v, &shape);
            for dev in devices() {
                let mut out = vec![f32::NAN; q.len()];
                dev.causal_attention(&q, &k, &v, &mut out, &shape).unwrap();
                let err = max_abs_diff(&out, &want);
                assert!(err < 1e-5, "{shape:?}: {err}");
            }
        }
    }

    #[test]
    fn causal_attention_does_not_look_ahead_or_across_sequences() {
        let dev = CpuDevice::new();
        let shape = AttnShape {
            n_seq: 2,
            seqlen: 4,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
        };
        let q = random(8 * 8, 11);
        let k = random(8 * 4, 12);
        let mut v = random(8 * 4, 13);
        let mut before = vec![0.0; 64];
        dev.causal_attention(&q, &k, &v, &mut before, &shape)
            .unwrap();
        // Changing the last token of sequence 0 changes only that token's output.
        v[3 * 4..4 * 4].iter_mut().for_each(|x| *x += 1.0);
        let mut after = vec![0.0; 64];
        dev.causal_attention(&q, &k, &v, &mut after, &shape)
            .unwrap();
        for t in 0..8 {
            let same = before[t * 8..(t + 1) * 8] == after[t * 8..(t + 1) * 8];
            assert_eq!(same, t != 3, "token {t}");
        }
        // The first token attends only to itself: its output is its value row.
        assert_eq!(&after[..4], &v[..4]);
        assert_eq!(&after[4..8], &v[..4]);
        let bad = AttnShape {
            n_kv_heads: 3,
            ..shape
        };
        assert!(dev.causal_attention(&q, &k, &v, &mut after, &bad).is_err());
        assert!(dev
            .causal_attention(&q, &k[1..], &v, &mut after, &shape)
            .is_err());
    }

    #[test]
    fn silu_mul_and_add_are_elementwise() {
        let dev = CpuDevice::new();
        let n = 40_000; // more than one rayon task
        let g = random(n, 14).iter().map(|x| 8.0 * x).collect::<Vec<_>>();
        let u = random(n, 15);
        let mut out = vec![0.0; n];
        dev.silu_mul(&g, &u, &mut out).unwrap();
        for i in 0..n {
            let want = f64::from(g[i]) / (1.0 + (-f64::from(g[i])).exp()) * f64::from(u[i]);
            assert!((f64::from(out[i]) - want).abs() < 1e-6, "{i}");
        }
        let mut acc = u.clone();
        dev.add(&mut acc, &g).unwrap();
        assert!(acc.iter().zip(&u).zip(&g).all(|((a, u), g)| *a == u + g));
        assert!(dev.silu_mul(&g, &u[1..], &mut out).is_err());
        assert!(dev.add(&mut acc, &g[1..]).is_err());
    }

    #[test]
    fn xtx_accumulates_the_gram_matrix_in_f32_and_f64() {
        let dev = CpuDevice::new();
        let (m, k) = (600, 20); // more than one f64 chunk
        let x = random(m * k, 16);
        let mut naive = vec![0.0f64; k * k];
        for r in 0..m {
            for i in 0..k {
                for j in 0..k {
                    naive[i * k + j] += f64::from(x[r * k + i]) * f64::from(x[r * k + j]);
                }
            }
        }
        let mut h32 = vec![1.0f32; k * k];
        let mut h64 = vec![1.0f64; k * k];
        // Two calls accumulate: h = 1 + 2·XᵀX.
        for _ in 0..2 {
            dev.xtx_accumulate(&x, m, k, &mut h32).unwrap();
            dev.xtx_accumulate_f64(&x, m, k, &mut h64).unwrap();
        }
        for i in 0..k * k {
            let want = 1.0 + 2.0 * naive[i];
            assert!((h64[i] - want).abs() < 1e-9 * want.abs().max(1.0), "{i}");
            assert!((f64::from(h32[i]) - want).abs() < 1e-3, "{i}");
        }
        assert!(dev.xtx_accumulate(&x, m, k + 1, &mut h32).is_err());
        assert!(dev.xtx_accumulate_f64(&x, m, k, &mut h64[1..]).is_err());
    }

    #[test]
    fn cpu_device_is_usable_as_a_trait_object() {
        let dev: Box<dyn Device> = Box::new(CpuDevice::default());
        assert_eq!(dev.name(), "cpu");
        let mut out = [0.0f32; 1];
        dev.matmul_t(&[2.0], &[3.0], &mut out, 1, 1, 1).unwrap();
        assert_eq!(out, [6.0]);
    }
}
