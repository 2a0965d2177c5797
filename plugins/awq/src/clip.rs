//! The per-group clipping search (llm-awq `auto_clip.py`; LLMC's asymmetric variant).
//!
//! After scaling, each group `w_g` (one row, `g` input columns) is clamped to a shrunk range
//! before round-to-nearest when that lowers the group's share of the layer output error:
//!
//! `err_g(lo, hi) = Σ_t (x_{t,g} · (w_g − Q(clamp(w_g, lo, hi))))² = e_g H_gg e_gᵀ`,
//!
//! with `H = Σ_t x_tᵀ x_t` (the host's Hessian statistic) and `H_gg` its diagonal `g × g` block:
//! llm-awq's objective (`mean_t`, on 512 sampled tokens) on all calibration tokens, without
//! touching them. After scaling the layer input is `x/s`, so the blocks come from
//! `H' = diag(1/s) H diag(1/s)`.
//!
//! Candidates (`f` runs over the shrink factors `1, 1 − 1/clip_grid, …`):
//! - symmetric schemes: `[−f·absmax, f·absmax]` (llm-awq; only the absmax matters to them);
//! - asymmetric schemes: `[f_lo·min, f_hi·max]` with `f_lo` and `f_hi` searched separately
//!   (every pair). llm-awq clips asymmetric groups symmetrically too, which wastes part of
//!   the grid when a group is lopsided; LLMC shrinks each side toward zero from its own
//!   extreme (with one factor for both, the diagonal of this grid).
//!
//! The first candidate (`f = 1`) is the unclipped range, so clipping never makes the
//! objective worse.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use gs_plugin_api::quant::{Granularity, QuantArgs, QuantError};
use rayon::prelude::*;

use crate::scale::fake_quantize_rows;

/// Why a clipping search could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClipError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The search handles group schemes whose group size divides the input width.
    #[error("clipping needs a group scheme whose group size divides the {cols} input columns, got {granularity:?}")]
    Granularity {
        granularity: Granularity,
        cols: usize,
    },
    #[error("{what}: expected {expected} values, got {actual}")]
    Shape {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
}

/// The diagonal `g × g` blocks of `H' = diag(1/s) H diag(1/s)`, one per group of input columns.
#[derive(Debug, Clone)]
pub struct GroupHessians {
    g: usize,
    blocks: Vec<Mat<f32>>,
}

impl GroupHessians {
    /// From `h: [cols, cols]` (row-major) and the AWQ scales `s: [cols]` (`None`: unscaled).
    pub fn new(h: &[f32], cols: usize, g: usize, s: Option<&[f32]>) -> Result<Self, ClipError> {
        if g == 0 || cols % g != 0 {
            return Err(ClipError::Granularity {
                granularity: Granularity::Group(g as u32),
                cols,
            });
        }
        check_len("Hessian", cols * cols, h.len())?;
        if let Some(s) = s {
            check_len("scales", cols, s.len())?;
        }
        let inv = |j: usize| s.map_or(1.0, |s| 1.0 / s[j]);
        let blocks = (0..cols / g)
            .map(|b| {
                let o = b * g;
                Mat::from_fn(g, g, |i, j| {
                    h[(o + i) * cols + o + j] * inv(o + i) * inv(o + j)
                })
            })
            .collect();
        Ok(Self { g, blocks })
    }

    /// Group size.
    pub fn group_size(&self) -> usize {
        self.g
    }

    /// `err[r, b] = e_{r,b} H_bb e_{r,b}ᵀ` for `e: [rows, cols]`, written to `err: [rows, groups]`
    /// as f64. One GEMM per group: `(E_b · H_bb)` row-wise dotted with `E_b`.
    pub fn group_errors(&self, e: &[f32], rows: usize, err: &mut [f64]) {
        let (g, n) = (self.g, self.blocks.len());
        let cols = g * n;
        let mut prod = Mat::<f32>::zeros(rows, g);
        for (b, hb) in self.blocks.iter().enumerate() {
            let eb = MatRef::from_row_major_slice_with_stride(&e[b * g..], rows, g, cols);
            matmul(
                prod.as_mut(),
                Accum::Replace,
                eb,
                hb.as_ref(),
                1.0f32,
                Par::rayon(0),
            );
            for r in 0..rows {
                let er = &e[r * cols + b * g..r * cols + (b + 1) * g];
                err[r * n + b] = er
                    .iter()
                    .enumerate()
                    .map(|(k, v)| f64::from(*v) * f64::from(prod[(r, k)]))
                    .sum();
            }
        }
    }
}

/// The clipping range chosen for every group, and what it saved.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipRanges {
    /// Lower and upper bound per group, `[rows, groups]`.
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
    /// `Σ_groups err` without clipping and with the chosen ranges.
    pub err_unclipped: f64,
    pub err_clipped: f64,
}

/// Searches the clipping range of every group of `w: [rows, cols]` for the group scheme `args`
/// (see the module docs), with the shrink factors `shrinks` (`shrinks[0]` must be 1).
pub fn search_clip(
    w: &[f32],
    rows: usize,
    cols: usize,
    args: &QuantArgs,
    hessians: &GroupHessians,
    shrinks: &[f32],
) -> Result<ClipRanges, ClipError> {
    let g = hessians.g;
    if args.granularity != Granularity::Group(g as u32) || cols != g * hessians.blocks.len() {
        return Err(ClipError::Granularity {
            granularity: args.granularity,
            cols,
        });
    }
    check_len("weights", rows * cols, w.len())?;
    let n = cols / g;
    // Each group's extremes.
    let (mut mn, mut mx) = (vec![0f32; rows * n], vec![0f32; rows * n]);
    for (i, group) in w.chunks_exact(g).enumerate() {
        mn[i] = group.iter().copied().fold(f32::INFINITY, f32::min);
        mx[i] = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    }
    let candidates: Vec<(f32, f32)> = if args.symmetric {
        shrinks.iter().map(|&f| (f, f)).collect()
    } else {
        shrinks
            .iter()
            .flat_map(|&lo| shrinks.iter().map(move |&hi| (lo, hi)))
            .collect()
    };
    let bounds = |i: usize, (f_lo, f_hi): (f32, f32)| -> (f32, f32) {
        if args.symmetric {
            let m = mn[i].abs().max(mx[i].abs());
            (-f_lo * m, f_hi * m)
        } else {
            (f_lo * mn[i], f_hi * mx[i])
        }
    };
    let mut best_err = vec![f64::INFINITY; rows * n];
    let mut best = vec![(1f32, 1f32); rows * n];
    let (mut clamped, mut q, mut e) = (
        vec![0f32; w.len()],
        vec![0f32; w.len()],
        vec![0f32; w.len()],
    );
    let mut err = vec![0f64; rows * n];
    let mut err_unclipped = 0.0;
    for (k, &c) in candidates.iter().enumerate() {
        clamped
            .par_chunks_mut(g)
            .zip(w.par_chunks(g))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (lo, hi) = bounds(i, c);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s.clamp(lo, hi);
                }
            });
        fake_quantize_rows(&clamped, rows, cols, args, &mut q)?;
        e.par_iter_mut()
            .zip(w.par_iter().zip(&q))
            .for_each(|(e, (w, q))| *e = w - q);
        hessians.group_errors(&e, rows, &mut err);
        if k == 0 {
            err_unclipped = err.iter().sum();
        }
        for i in 0..rows * n {
            if err[i] < best_err[i] {
                best_err[i] = err[i];
                best[i] = c;
            }
        }
    }
    let (lo, hi): (Vec<f32>, Vec<f32>) = (0..rows * n).map(|i| bounds(i, best[i])).unzip();
    Ok(ClipRanges {
        lo,
        hi,
        err_unclipped,
        err_clipped: best_err.iter().sum(),
    })
}

/// Clamps every group of `w: [rows, cols]` (groups of `g` columns) to its range.
pub fn apply_clip(w: &mut [f32], g: usize, ranges: &ClipRanges) {
    w.par_chunks_mut(g.max(1))
        .zip(ranges.lo.par_iter().zip(&ranges.hi))
        .for_each(|(group, (lo, hi))| {
            for v in group {
                *v = v.clamp(*lo, *hi);
            }
        });
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), ClipError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ClipError::Shape {
            what,
            expected,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{int4_group, random, xtx};
    use gs_plugin_api::quant::fake_quantize;

    #[test]
    fn the_group_quadratic_form_is_the_token_mean_of_the_group_output_error() {
        // llm-awq: err_g = mean_t (x_{t,g} · e_g)² over tokens; with H = Σ_t x_tᵀ x_t that is
        // e_g H_gg e_gᵀ / n. After scaling, the input is x/s: H' = diag(1/s) H diag(1/s).
        let (tokens, rows, cols, g) = (40, 3, 12, 4);
        let x = random(tokens * cols, 7);
        let e = random(rows * cols, 8);
        let s: Vec<f32> = (0..cols).map(|j| 0.5 + 0.1 * j as f32).collect();
        let h = xtx(&x, tokens, cols);
        let hs = GroupHessians::new(&h, cols, g, Some(&s)).unwrap();
        let mut err = vec![0f64; rows * cols / g];
        hs.group_errors(&e, rows, &mut err);
        for r in 0..rows {
            for b in 0..cols / g {
                let direct: f64 = (0..tokens)
                    .map(|t| {
                        let dot: f64 = (b * g..(b + 1) * g)
                            .map(|j| f64::from(x[t * cols + j] / s[j]) * f64::from(e[r * cols + j]))
                            .sum();
                        dot * dot
                    })
                    .sum::<f64>()
                    / tokens as f64;
                let via_h = err[r * cols / g + b] / tokens as f64;
                assert!(
                    (via_h - direct).abs() <= 1e-5 * direct.max(1e-12),
                    "row {r} group {b}: {via_h} vs {direct}"
                );
            }
        }
    }

    #[test]
    fn clipping_never_loses_and_helps_a_group_with_an_outlier() {
        // Row 0, group 0 holds one large weight whose input channel is silent: shrinking the
        // range below it gives the other weights a finer grid at almost no cost.
        let (tokens, rows, cols, g) = (64, 2, 8, 8);
        let mut x = random(tokens * cols, 11);
        for t in 0..tokens {
            x[t * cols] *= 1e-3;
        }
        let mut w = random(rows * cols, 12);
        w[0] = 20.0;
        let h = xtx(&x, tokens, cols);
        let hs = GroupHessians::new(&h, cols, g, None).unwrap();
        let shrinks: Vec<f32> = (0..10).map(|i| 1.0 - i as f32 / 20.0).collect();
        for symmetric in [true, false] {
            let args = QuantArgs {
                symmetric,
                ..int4_group(g as u32)
            };
            let r = search_clip(&w, rows, cols, &args, &hs, &shrinks).unwrap();
            assert!(r.err_clipped <= r.err_unclipped);
            assert!(r.hi[0] < 20.0, "{symmetric}: {r:?}");
            assert!(r.err_clipped < 0.5 * r.err_unclipped, "{symmetric}: {r:?}");
            // The reported error is the error of what apply + RTN produce.
            let mut c = w.clone();
            apply_clip(&mut c, g, &r);
            let (q, _) = fake_quantize(&c, rows, cols, &args).unwrap();
            let e: Vec<f32> = w.iter().zip(&q).map(|(a, b)| a - b).collect();
            let mut err = vec![0f64; rows];
            hs.group_errors(&e, rows, &mut err);
            let total: f64 = err.iter().sum();
            assert!((total - r.err_clipped).abs() <= 1e-9 * total.max(1.0));
        }
    }

    #[test]
    fn asymmetric_sides_shrink_separately() {
        // A lopsided group: max 20 on a silent input, min −1 on a very loud one. Cutting the top
        // is nearly free, cutting the bottom is not: the best pair is off the diagonal that one
        // shared factor (LLMC) would search.
        let (tokens, cols, g) = (64, 8, 8);
        let mut x = random(tokens * cols, 21);
        for t in 0..tokens {
            x[t * cols] *= 1e-3;
            x[t * cols + 1] *= 100.0;
        }
        let mut w: Vec<f32> = random(cols, 22).iter().map(|v| v.abs() * 0.5).collect();
        w[0] = 20.0;
        w[1] = -1.0;
        let h = xtx(&x, tokens, cols);
        let hs = GroupHessians::new(&h, cols, g, None).unwrap();
        let shrinks: Vec<f32> = (0..10).map(|i| 1.0 - i as f32 / 20.0).collect();
        let args = QuantArgs {
            symmetric: false,
            ..int4_group(8)
        };
        let r = search_clip(&w, 1, cols, &args, &hs, &shrinks).unwrap();
        assert!(r.hi[0] < 20.0, "{r:?}");
        assert_eq!(r.lo[0], -1.0, "{r:?}");
    }

    #[test]
    fn shapes_are_checked() {
        assert!(matches!(
            GroupHessians::new(&[0.0; 36], 6, 4, None),
            Err(ClipError::Granularity { .. })
        ));
        assert!(matches!(
            GroupHessians::new(&[0.0; 30], 6, 3, None),
            Err(ClipError::Shape { .. })
        ));
        let hs = GroupHessians::new(&[0.0; 16], 4, 2, None).unwrap();
        assert!(matches!(
            search_clip(&[0.0; 8], 2, 4, &int4_group(4), &hs, &[1.0]),
            Err(ClipError::Granularity { .. })
        ));
    }
}
