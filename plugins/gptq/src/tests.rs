use super::*;
use gs_plugin_api::quant::{
    dequantize_value, fake_quantize, fake_quantize_with, quantize_value, scale_zero, ScaleRule,
};

fn args(bits: u8, symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits,
        ty: QuantType::Int,
        symmetric,
        granularity,
        scale_rule: ScaleRule::Qmax,
    }
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

fn identity(n: usize) -> Vec<f32> {
    let mut h = vec![0f32; n * n];
    for i in 0..n {
        h[i * n + i] = 1.0;
    }
    h
}

/// `XᵀX` of `tokens` rows whose columns share common factors (strongly correlated) and whose
/// scales differ per column (so act_order has an order to follow).
fn correlated_hessian(n: usize, tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = Lcg(seed);
    let mix = rng.vec(4 * n);
    let col_scale: Vec<f32> = (0..n)
        .map(|j| 0.2 + 2.0 * ((j * 7) % n) as f32 / n as f32)
        .collect();
    let mut h = vec![0f64; n * n];
    for _ in 0..tokens {
        let f = rng.vec(4);
        let x: Vec<f64> = (0..n)
            .map(|j| {
                let shared: f32 = (0..4).map(|k| f[k] * mix[k * n + j]).sum();
                f64::from((shared + 0.2 * rng.next()) * col_scale[j])
            })
            .collect();
        for a in 0..n {
            for b in 0..n {
                h[a * n + b] += x[a] * x[b];
            }
        }
    }
    h.iter().map(|&v| v as f32).collect()
}

/// `tr((W − Q) H (W − Q)ᵀ)`, the layer output error GPTQ minimizes.
fn output_error(w: &[f32], q: &[f32], h: &[f32], rows: usize, n: usize) -> f64 {
    let mut total = 0f64;
    for r in 0..rows {
        let d: Vec<f64> = (0..n)
            .map(|j| f64::from(w[r * n + j]) - f64::from(q[r * n + j]))
            .collect();
        for a in 0..n {
            for b in 0..n {
                total += d[a] * f64::from(h[a * n + b]) * d[b];
            }
        }
    }
    total
}

fn run(w: &[f32], rows: usize, n: usize, h: &[f32], a: &QuantArgs, p: &GptqParams) -> GptqOutput {
    gptq_quantize(w, rows, n, h, 1.0, a, p, &mut |m| {
        panic!("unexpected warning: {m}")
    })
    .unwrap()
}

fn params(act_order: bool, static_groups: bool, block_size: usize) -> GptqParams {
    GptqParams {
        order: if act_order { Order::Act } else { Order::None },
        static_groups,
        mse_grid: 0,
        block_size,
        ..GptqParams::default()
    }
}

fn schemes() -> Vec<QuantArgs> {
    vec![
        args(4, true, Granularity::Channel),
        args(4, false, Granularity::Channel),
        args(4, true, Granularity::Group(8)),
        args(4, false, Granularity::Group(8)),
        args(3, false, Granularity::Group(5)),
        args(8, true, Granularity::Tensor),
    ]
}

/// The returned weights are on the grid of the returned qparams, bit for bit.
fn assert_on_grid(out: &GptqOutput, rows: usize, n: usize, a: &QuantArgs) {
    out.qparams.check_for(a).unwrap();
    let again = fake_quantize_with(&out.weight, rows, n, &out.qparams, a).unwrap();
    assert_eq!(again, out.weight, "{a:?}");
}

#[test]
fn identity_hessian_equals_rtn() {
    let (rows, n) = (6, 24);
    let w = Lcg(1).vec(rows * n);
    let h = identity(n);
    for a in schemes() {
        let (rtn, rtn_qp) = fake_quantize(&w, rows, n, &a).unwrap();
        for p in [
            params(false, false, 128),
            params(false, false, 5),
            params(true, false, 7),
        ] {
            let out = run(&w, rows, n, &h, &a, &p);
            assert_eq!(out.weight, rtn, "{a:?} {p:?}");
            assert_eq!(out.qparams, rtn_qp, "{a:?} {p:?}");
        }
    }
}

#[test]
fn correlated_hessian_beats_rtn() {
    let (rows, n) = (16, 32);
    let w = Lcg(2).vec(rows * n);
    let h = correlated_hessian(n, 256, 3);
    for a in [
        args(4, true, Granularity::Group(8)),
        args(4, false, Granularity::Group(8)),
        args(4, true, Granularity::Channel),
        args(3, false, Granularity::Group(8)),
    ] {
        let (rtn, _) = fake_quantize(&w, rows, n, &a).unwrap();
        let rtn_err = output_error(&w, &rtn, &h, rows, n);
        for p in [
            params(false, false, 128),
            params(false, false, 8),
            params(false, false, 3),
            params(true, false, 128),
            params(true, true, 128),
            params(true, true, 5),
            params(false, true, 16),
        ] {
            let out = run(&w, rows, n, &h, &a, &p);
            let err = output_error(&w, &out.weight, &h, rows, n);
            assert!(
                err < 0.8 * rtn_err,
                "{a:?} {p:?}: gptq {err:.4e} vs rtn {rtn_err:.4e}"
            );
            assert_on_grid(&out, rows, n, &a);
            assert!(out.loss.is_finite() && out.loss > 0.0);
        }
    }
}

#[test]
fn output_on_the_grid_of_the_qparams() {
    let (rows, n) = (5, 37);
    let w = Lcg(4).vec(rows * n);
    let h = correlated_hessian(n, 100, 5);
    for a in schemes() {
        for p in [
            params(false, false, 128),
            params(false, false, 4),
            params(true, false, 128),
            params(true, false, 6),
            params(true, true, 6),
        ] {
            let out = run(&w, rows, n, &h, &a, &p);
            assert_on_grid(&out, rows, n, &a);
        }
    }
}

#[test]
fn block_size_does_not_change_the_result_without_groups() {
    let (rows, n) = (8, 40);
    let w = Lcg(6).vec(rows * n);
    let h = correlated_hessian(n, 200, 7);
    let a = args(4, true, Granularity::Channel);
    let reference = run(&w, rows, n, &h, &a, &params(false, false, 1));
    for bs in [3, 16, 40, 128] {
        let out = run(&w, rows, n, &h, &a, &params(false, false, bs));
        let rel = (out.loss - reference.loss).abs() / reference.loss;
        assert!(rel < 1e-3, "block {bs}: {} vs {}", out.loss, reference.loss);
    }
}

#[test]
fn hessian_scale_changes_only_the_loss() {
    let (rows, n) = (4, 16);
    let w = Lcg(8).vec(rows * n);
    let h = correlated_hessian(n, 64, 9);
    let a = args(4, false, Granularity::Group(4));
    let p = GptqParams::default();
    let one = gptq_quantize(&w, rows, n, &h, 1.0, &a, &p, &mut |_| {}).unwrap();
    let scaled = gptq_quantize(&w, rows, n, &h, 4.0, &a, &p, &mut |_| {}).unwrap();
    let diff = one
        .weight
        .iter()
        .zip(&scaled.weight)
        .filter(|(x, y)| x != y)
        .count();
    assert!(diff <= 1, "{diff} weights differ");
    assert!((scaled.loss / one.loss - 4.0).abs() < 1e-3);
}

#[test]
fn dead_columns_are_zeroed() {
    let (rows, n) = (4, 12);
    let w = Lcg(10).vec(rows * n);
    let mut h = correlated_hessian(n, 64, 11);
    for dead in [2, 7] {
        for k in 0..n {
            h[dead * n + k] = 0.0;
            h[k * n + dead] = 0.0;
        }
    }
    for a in schemes() {
        for p in [
            params(false, false, 128),
            params(true, false, 5),
            params(true, true, 5),
        ] {
            let out = run(&w, rows, n, &h, &a, &p);
            for r in 0..rows {
                assert_eq!(out.weight[r * n + 2], 0.0);
                assert_eq!(out.weight[r * n + 7], 0.0);
            }
            assert_on_grid(&out, rows, n, &a);
        }
    }
    // An all-zero Hessian (no calibration signal): every column dead, all weights zero.
    let out = run(
        &w,
        rows,
        n,
        &vec![0.0; n * n],
        &args(4, true, Granularity::Channel),
        &GptqParams::default(),
    );
    assert!(out.weight.iter().all(|&x| x == 0.0));
}

#[test]
fn dampening_retries_then_fails_clearly() {
    let (rows, n) = (2, 2);
    let w = vec![0.3, -0.2, 0.1, 0.5];
    let a = args(4, true, Granularity::Channel);
    // Eigenvalues 2.05 and -0.05: 1% dampening fails, 10% works.
    let h = vec![1.0, 1.05, 1.05, 1.0];
    let mut warnings = Vec::new();
    let out = gptq_quantize(&w, rows, n, &h, 1.0, &a, &GptqParams::default(), &mut |m| {
        warnings.push(m.to_string())
    })
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("×10"), "{}", warnings[0]);
    assert!((out.damp - 0.1).abs() < 1e-9);

    // Negative definite: every retry fails.
    let h = vec![-1.0, 0.0, 0.0, -1.0];
    let mut warnings = Vec::new();
    let p = GptqParams {
        max_damp_retries: 3,
        ..GptqParams::default()
    };
    let e = gptq_quantize(&w, rows, n, &h, 1.0, &a, &p, &mut |m| {
        warnings.push(m.to_string())
    })
    .unwrap_err();
    assert_eq!(warnings.len(), 3);
    assert!(e.contains("Cholesky"), "{e}");
}

#[test]
fn params_defaults_and_refusals() {
    let g = Gptq::from_params("").unwrap();
    assert_eq!(g.params, GptqParams::default());
    assert_eq!(
        GptqParams::default(),
        GptqParams {
            damp: 0.01,
            block_size: 128,
            order: Order::GroupAware,
            static_groups: false,
            max_damp_retries: 5,
            mse_grid: 100,
            max_shrink: 0.2,
        }
    );
    let g = Gptq::from_params(
        "damp = 0.1\nblock_size = 64\norder = \"act\"\nstatic_groups = true\nmax_damp_retries = 2\n\
         mse_grid = 0\nmax_shrink = 0.1",
    )
    .unwrap();
    assert_eq!(
        g.params,
        GptqParams {
            damp: 0.1,
            block_size: 64,
            order: Order::Act,
            static_groups: true,
            max_damp_retries: 2,
            mse_grid: 0,
            max_shrink: 0.1,
        }
    );
    // `act_order`, the other tools' name, selects the act order or none.
    assert_eq!(
        Gptq::from_params("act_order = true").unwrap().params.order,
        Order::Act
    );
    assert_eq!(
        Gptq::from_params("act_order = false").unwrap().params.order,
        Order::None
    );
    assert!(Gptq::from_params("act_order = true\norder = \"act\"").is_ok());
    let e = Gptq::from_params("act_order = true\norder = \"none\"")
        .err()
        .unwrap();
    assert!(
        e.message.contains("act_order") && e.message.contains("order"),
        "{e}"
    );
    let e = Gptq::from_params("order = \"random\"").err().unwrap();
    assert!(e.message.contains("group_aware"), "{e}");
    let e = Gptq::from_params("bits = 4").err().unwrap();
    assert!(e.message.contains("bits"), "{e}");
    let e = Gptq::from_params("block_size = 0").err().unwrap();
    assert!(
        e.message.contains("gptq") && e.message.contains("block_size"),
        "{e}"
    );
    let e = Gptq::from_params("max_shrink = 1.0").err().unwrap();
    assert!(
        e.message.contains("gptq") && e.message.contains("max_shrink"),
        "{e}"
    );
    let e = Gptq::from_params("damp = -1.0").err().unwrap();
    assert!(
        e.message.contains("gptq") && e.message.contains("damp"),
        "{e}"
    );
    assert_eq!(g.required_stats(), StatsRequest::HESSIAN);
}

#[test]
fn bad_shapes_are_errors() {
    let a = args(4, true, Granularity::Channel);
    let p = GptqParams::default();
    assert!(gptq_quantize(&[0.0; 6], 2, 3, &[0.0; 4], 1.0, &a, &p, &mut |_| {}).is_err());
    assert!(gptq_quantize(&[0.0; 5], 2, 3, &[0.0; 9], 1.0, &a, &p, &mut |_| {}).is_err());
}

#[test]
fn two_columns_by_hand() {
    // One row, H = [[4, 2], [2, 3]], int4 symmetric per channel (Qmax rule: s = absmax / 7).
    let w = [0.71f32, 0.9];
    let h = [4.0f32, 2.0, 2.0, 3.0];
    let a = args(4, true, Granularity::Channel);
    let p = GptqParams::default();
    let out = run(&w, 1, 2, &h, &a, &p);

    let lambda = 0.01 * (4.0 + 3.0) / 2.0;
    let (h00, h01, h11) = (4.0 + lambda, 2.0, 3.0 + lambda);
    let det = h00 * h11 - h01 * h01;
    let (i00, i01, i11) = (h11 / det, -h01 / det, h00 / det);
    let u00 = f64::sqrt(i00);
    let u01 = i01 / u00;
    let u11 = f64::sqrt(i11 - u01 * u01);
    let s = 0.9f32 / 7.0;
    let q0 = (0.71f32 / s).round_ties_even().clamp(-8.0, 7.0) * s;
    let err0 = (0.71 - f64::from(q0)) / u00;
    let w1 = 0.9 - err0 * u01;
    let q1 = ((w1 as f32) / s).round_ties_even().clamp(-8.0, 7.0) * s;
    let err1 = (w1 - f64::from(q1)) / u11;
    assert_eq!(out.weight, vec![q0, q1]);
    // (With two columns the absmax column sits on the grid, so the shift of w1 cannot change
    // its rounding; the loss checks that the compensated w1 is the one quantized.)
    let loss = (err0 * err0 + err1 * err1) / 2.0;
    assert!(
        (out.loss - loss).abs() < 1e-5 * loss,
        "{} vs {loss}",
        out.loss
    );
    assert!((out.damp - lambda).abs() < 1e-12);
}

/// `cargo test -p gs-plugin-gptq -- --ignored`: a 1024×1024 layer (g128, act_order) end to end.
#[test]
#[ignore = "a few seconds; run by hand for timing"]
fn large_layer_smoke() {
    let (rows, n) = (1024, 1024);
    let w = Lcg(12).vec(rows * n);
    let h = correlated_hessian(n, 64, 13);
    let a = args(4, true, Granularity::Group(128));
    let t = std::time::Instant::now();
    let out = run(&w, rows, n, &h, &a, &params(true, false, 128));
    eprintln!("1024×1024 gptq: {:?}, loss {:.3e}", t.elapsed(), out.loss);
    assert_on_grid(&out, rows, n, &a);
}

#[test]
fn processing_orders_by_hand() {
    let diag = [1.0, 5.0, 3.0, 2.0, 4.0, 0.5];
    assert_eq!(
        processing_order(&diag, Order::None, Some(2)),
        [0, 1, 2, 3, 4, 5]
    );
    // Descending diagonal.
    assert_eq!(
        processing_order(&diag, Order::Act, Some(2)),
        [1, 4, 2, 3, 0, 5]
    );
    // Groups {0,1} (max 5), {2,3} (max 3), {4,5} (max 4) → {0,1}, {4,5}, {2,3}, each sorted.
    assert_eq!(
        processing_order(&diag, Order::GroupAware, Some(2)),
        [1, 0, 4, 5, 2, 3]
    );
    // A short last group: {0,1,2,3} (max 5), {4,5} (max 4).
    assert_eq!(
        processing_order(&diag, Order::GroupAware, Some(4)),
        [1, 2, 3, 0, 4, 5]
    );
    // Without groups the group-aware order is the act order.
    assert_eq!(
        processing_order(&diag, Order::GroupAware, None),
        processing_order(&diag, Order::Act, None)
    );
}

/// `(H + λI)⁻¹` by Gauss–Jordan elimination in f64.
fn inverse(h: &[f64], n: usize) -> Vec<f64> {
    let mut a = h.to_vec();
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for c in 0..n {
        let p = a[c * n + c];
        for k in 0..n {
            a[c * n + k] /= p;
            inv[c * n + k] /= p;
        }
        for r in 0..n {
            if r != c {
                let f = a[r * n + c];
                for k in 0..n {
                    a[r * n + k] -= f * a[c * n + k];
                    inv[r * n + k] -= f * inv[c * n + k];
                }
            }
        }
    }
    inv
}

/// GPTQ as the OBQ update of Frantar et al. (2022, eqs. 2–3), one row at a time, no blocks,
/// no Cholesky: quantize the next column `j` of `order`, spread `(w_j − q_j) / Hinv[j,j] ·
/// Hinv[j, :]` on the remaining columns, then remove `j` from `Hinv`
/// (`Hinv −= Hinv[:, j] Hinv[j, :] / Hinv[j, j]`). O(n³) per row.
/// Group scales: static (from the original row) or fitted when the group's first column is
/// reached, to the row's current values. Int schemes only.
fn reference_gptq(
    w: &[f32],
    rows: usize,
    n: usize,
    h: &[f32],
    a: &QuantArgs,
    p: &GptqParams,
) -> Vec<f32> {
    let mean_diag = (0..n).map(|i| f64::from(h[i * n + i])).sum::<f64>() / n as f64;
    let mut hd: Vec<f64> = h.iter().map(|&x| f64::from(x)).collect();
    for i in 0..n {
        hd[i * n + i] += p.damp * mean_diag;
    }
    let diag: Vec<f64> = (0..n).map(|i| f64::from(h[i * n + i])).collect();
    let g = group_size(a);
    let order = processing_order(&diag, p.order, g);
    let (qmin, qmax) = a.int_range();
    let fixed = compute_qparams(w, rows, n, a).unwrap();
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        let mut hinv = inverse(&hd, n);
        let mut row: Vec<f64> = w[r * n..(r + 1) * n]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let mut scale: Vec<Option<(f32, i32)>> = vec![None; n];
        let mut done = vec![false; n];
        for &j in &order {
            let (s, z) = match g {
                None => (fixed.scale_for(r, j), fixed.zero_for(r, j)),
                Some(_) if p.static_groups => (fixed.scale_for(r, j), fixed.zero_for(r, j)),
                Some(g) => *scale[j / g].get_or_insert_with(|| {
                    let cols = (j / g * g)..((j / g + 1) * g).min(n);
                    let lo = cols
                        .clone()
                        .map(|c| row[c] as f32)
                        .fold(f32::INFINITY, f32::min);
                    let hi = cols
                        .map(|c| row[c] as f32)
                        .fold(f32::NEG_INFINITY, f32::max);
                    scale_zero(lo, hi, a).unwrap()
                }),
            };
            let q = dequantize_value(quantize_value(row[j] as f32, s, z, qmin, qmax), s, z);
            let err = (row[j] - f64::from(q)) / hinv[j * n + j];
            row[j] = f64::from(q);
            done[j] = true;
            for k in 0..n {
                if !done[k] {
                    row[k] -= err * hinv[j * n + k];
                }
            }
            let pivot = hinv[j * n + j];
            let col: Vec<f64> = (0..n).map(|i| hinv[i * n + j]).collect();
            let rowj: Vec<f64> = (0..n).map(|k| hinv[j * n + k]).collect();
            for i in 0..n {
                for k in 0..n {
                    hinv[i * n + k] -= col[i] * rowj[k] / pivot;
                }
            }
        }
        for k in 0..n {
            out[r * n + k] = row[k] as f32;
        }
    }
    out
}

#[test]
fn blocked_cholesky_gptq_equals_the_obq_reference() {
    let (rows, n) = (6, 24);
    let w = Lcg(21).vec(rows * n);
    let h = correlated_hessian(n, 200, 22);
    // (scheme, order, static groups, block size)
    let cases = [
        (args(4, true, Granularity::Channel), Order::None, false, 128),
        (args(4, false, Granularity::Channel), Order::Act, false, 5),
        (args(4, true, Granularity::Group(8)), Order::None, true, 7),
        (
            args(4, true, Granularity::Group(8)),
            Order::None,
            false,
            128,
        ),
        (
            args(4, false, Granularity::Group(6)),
            Order::GroupAware,
            false,
            5,
        ),
        (args(3, true, Granularity::Group(8)), Order::Act, false, 16),
        (args(4, true, Granularity::Group(8)), Order::Act, true, 128),
    ];
    for (a, order, static_groups, block_size) in cases {
        let p = GptqParams {
            order,
            static_groups,
            block_size,
            mse_grid: 0,
            ..GptqParams::default()
        };
        let ours = run(&w, rows, n, &h, &a, &p);
        let reference = reference_gptq(&w, rows, n, &h, &a, &p);
        // f32 (ours) against f64 (reference) arithmetic may round a value lying within an ulp
        // of a rounding boundary differently; the rest must agree to float precision.
        let same = ours
            .weight
            .iter()
            .zip(&reference)
            .filter(|(x, y)| (**x - **y).abs() <= 1e-5 * (1.0 + y.abs()))
            .count();
        assert!(
            same as f64 >= 0.98 * (rows * n) as f64,
            "{a:?} {order:?} static {static_groups}: {same} of {} weights agree",
            rows * n
        );
        let (e_ours, e_ref) = (
            output_error(&w, &ours.weight, &h, rows, n),
            output_error(&w, &reference, &h, rows, n),
        );
        assert!(
            (e_ours - e_ref).abs() <= 0.02 * e_ref,
            "{a:?} {order:?}: output error {e_ours:.5e} vs reference {e_ref:.5e}"
        );
    }
}

#[test]
fn group_aware_order_keeps_groups_contiguous_and_beats_natural_order() {
    let (rows, n) = (16, 32);
    let w = Lcg(31).vec(rows * n);
    let h = correlated_hessian(n, 256, 32);
    let a = args(4, true, Granularity::Group(8));
    let natural = run(&w, rows, n, &h, &a, &params(false, false, 128));
    let gar = run(
        &w,
        rows,
        n,
        &h,
        &a,
        &GptqParams {
            order: Order::GroupAware,
            mse_grid: 0,
            ..GptqParams::default()
        },
    );
    assert_on_grid(&gar, rows, n, &a);
    let (e_nat, e_gar) = (
        output_error(&w, &natural.weight, &h, rows, n),
        output_error(&w, &gar.weight, &h, rows, n),
    );
    assert!(
        e_gar < e_nat,
        "group-aware {e_gar:.4e} vs natural {e_nat:.4e}"
    );
    let diag: Vec<f64> = (0..n).map(|i| f64::from(h[i * n + i])).collect();
    let perm = processing_order(&diag, Order::GroupAware, Some(8));
    for chunk in perm.chunks(8) {
        assert!(chunk.iter().all(|c| c / 8 == chunk[0] / 8), "{perm:?}");
    }
}

#[test]
fn the_range_search_never_loses_on_its_own_objective_and_stays_on_grid() {
    let (rows, n) = (12, 32);
    let w = Lcg(41).vec(rows * n);
    let h = correlated_hessian(n, 256, 42);
    for a in [
        args(4, true, Granularity::Group(8)),
        args(3, false, Granularity::Group(8)),
    ] {
        let plain = run(
            &w,
            rows,
            n,
            &h,
            &a,
            &GptqParams {
                mse_grid: 0,
                ..GptqParams::default()
            },
        );
        let searched = run(&w, rows, n, &h, &a, &GptqParams::default());
        assert_on_grid(&searched, rows, n, &a);
        // Shrinking is allowed, never required: some scale must differ, none may grow.
        assert_ne!(searched.qparams.scales, plain.qparams.scales, "{a:?}");
        let (e_plain, e_search) = (
            output_error(&w, &plain.weight, &h, rows, n),
            output_error(&w, &searched.weight, &h, rows, n),
        );
        assert!(
            e_search < 1.05 * e_plain,
            "{a:?}: searched {e_search:.4e} vs min/max {e_plain:.4e}"
        );
    }
}

#[test]
fn the_upper_factor_of_the_inverse_satisfies_its_definition() {
    // UᵀU·H = I with U upper triangular and a positive diagonal (the factor the reference
    // gets from torch.linalg.cholesky(H⁻¹, upper=True)).
    let n = 37;
    let h = correlated_hessian(n, 100, 5);
    let hm = Mat::<f64>::from_fn(n, n, |i, j| {
        f64::from(h[i * n + j]) + if i == j { 0.1 } else { 0.0 }
    });
    let u = upper_factor_of_inverse(&hm).expect("positive definite");
    for i in 0..n {
        assert!(u[(i, i)] > 0.0);
        for j in 0..i {
            assert_eq!(u[(i, j)], 0.0, "U[{i}, {j}] is below the diagonal");
        }
    }
    let product = u.transpose() * &u * &hm;
    for i in 0..n {
        for j in 0..n {
            let expected = if i == j { 1.0 } else { 0.0 };
            assert!(
                (product[(i, j)] - expected).abs() < 1e-9,
                "({i}, {j}): {}",
                product[(i, j)]
            );
        }
    }
    // Not positive definite: refused, so the caller can raise the dampening.
    let mut singular = hm.clone();
    singular[(3, 3)] = -1.0;
    assert!(upper_factor_of_inverse(&singular).is_none());
}
