//! The AWQ searches for one SmolLM2-shaped subset (hidden 576, FFN 1536), random data, 32 × 128
//! calibration tokens, W4A16 groups of 64 — the pure search functions of `gs_awq`.
//!
//! Run with `cargo bench -p gs-benches --bench awq`.
//! - `scale_search_gate_up`: the 20-point α grid over gate/up, each candidate scored by the MLP
//!   forward of gs-host (`mlp_forward` through `CpuDevice`), i.e. what the module-forward service
//!   runs for this subset, plus the quantization of the candidates; `scale_candidates_gate_up`
//!   is the same search with a free loss (the plugin's own share).
//! - `clip_search_*`: the per-group clipping search of one layer with its Hessian (10 shrink
//!   factors; 100 pairs for the asymmetric scheme).

use std::borrow::Cow;

use divan::{black_box, Bencher};
use gs_awq::clip::{search_clip, GroupHessians};
use gs_awq::scale::{mean_squared_error, search_scales, SearchError, SubsetLayer};
use gs_host::device::{CpuDevice, Device};
use gs_host::model::forward::{mlp_forward, BlockWeights, Linear};
use gs_quant::{Granularity, QuantArgs, QuantType, ScaleRule};

fn main() {
    divan::main();
}

const TOKENS: usize = 32 * 128;
const HIDDEN: usize = 576;
const FFN: usize = 1536;

const W4_G64: QuantArgs = QuantArgs {
    bits: 4,
    ty: QuantType::Int,
    symmetric: true,
    granularity: Granularity::Group(64),
    scale_rule: ScaleRule::HalfRange,
};

/// Deterministic values uniform in [-scale, scale) (xorshift; no RNG dependency).
fn random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = 0x9E37_79B9u32 ^ seed.wrapping_mul(0x85EB_CA6B);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Activations with a few loud channels, as LLM residual streams have.
fn activations(tokens: usize, width: usize) -> Vec<f32> {
    let mut x = random(tokens * width, 1, 1.0);
    for row in x.chunks_exact_mut(width) {
        for j in (0..width).step_by(97) {
            row[j] *= 20.0;
        }
    }
    x
}

fn linear(out: usize, inp: usize, seed: u32) -> Linear<'static> {
    Linear::new(
        random(out * inp, seed, (3.0 / inp as f32).sqrt()),
        None,
        out,
        inp,
    )
    .expect("consistent shape")
}

fn mlp() -> BlockWeights<'static> {
    let unused = || linear(1, 1, 0);
    BlockWeights {
        block: 0,
        input_norm: vec![1.0; HIDDEN].into(),
        q: unused(),
        k: unused(),
        v: unused(),
        o: unused(),
        q_norm: None,
        k_norm: None,
        post_attention_norm: vec![1.0; HIDDEN].into(),
        gate: linear(FFN, HIDDEN, 5),
        up: linear(FFN, HIDDEN, 6),
        down: linear(HIDDEN, FFN, 7),
    }
}

fn mean_abs(x: &[f32], width: usize) -> Vec<f32> {
    let mut m = vec![0f32; width];
    for row in x.chunks_exact(width) {
        for (m, v) in m.iter_mut().zip(row) {
            *m += v.abs();
        }
    }
    let n = (x.len() / width) as f32;
    m.iter().map(|v| v / n).collect()
}

fn hessian(dev: &CpuDevice, x: &[f32], width: usize) -> Vec<f32> {
    let mut h = vec![0f64; width * width];
    dev.xtx_accumulate_f64(x, x.len() / width, width, &mut h)
        .expect("xtx");
    h.iter().map(|v| *v as f32).collect()
}

#[divan::bench(sample_count = 5)]
fn scale_search_gate_up(bencher: Bencher) {
    let dev = CpuDevice::new();
    let w = mlp();
    let x = activations(TOKENS, HIDDEN);
    let x_mean = mean_abs(&x, HIDDEN);
    let y_ref = mlp_forward(&dev, &w, &x).expect("forward");
    let alphas: Vec<f32> = (0..20).map(|i| i as f32 / 19.0).collect();
    bencher.bench_local(|| {
        let layers = [
            SubsetLayer {
                weight: &w.gate.weight,
                rows: FFN,
                args: Some(W4_G64),
            },
            SubsetLayer {
                weight: &w.up.weight,
                rows: FFN,
                args: Some(W4_G64),
            },
        ];
        let r = search_scales::<SearchError>(&layers, HIDDEN, &x_mean, None, &alphas, &mut |ov| {
            let mut c = w.borrowed();
            c.gate.weight = Cow::Borrowed(ov[0].1);
            c.up.weight = Cow::Borrowed(ov[1].1);
            Ok(mean_squared_error(
                &mlp_forward(&dev, &c, &x).expect("forward"),
                &y_ref,
            ))
        })
        .expect("search");
        black_box(r.alpha)
    });
}

/// The same search with a free loss: what the plugin adds to the 20 forwards (scaling and
/// fake-quantizing both layers per α).
#[divan::bench(sample_count = 5)]
fn scale_candidates_gate_up(bencher: Bencher) {
    let w = mlp();
    let x_mean = mean_abs(&activations(TOKENS, HIDDEN), HIDDEN);
    let alphas: Vec<f32> = (0..20).map(|i| i as f32 / 19.0).collect();
    bencher.bench_local(|| {
        let layers = [
            SubsetLayer {
                weight: &w.gate.weight,
                rows: FFN,
                args: Some(W4_G64),
            },
            SubsetLayer {
                weight: &w.up.weight,
                rows: FFN,
                args: Some(W4_G64),
            },
        ];
        let r = search_scales::<SearchError>(&layers, HIDDEN, &x_mean, None, &alphas, &mut |ov| {
            Ok(f64::from(black_box(ov[0].1[0])).abs())
        })
        .expect("search");
        black_box(r.alpha)
    });
}

fn clip_bench(bencher: Bencher, rows: usize, cols: usize, symmetric: bool) {
    let dev = CpuDevice::new();
    let x = activations(TOKENS, cols);
    let h = hessian(&dev, &x, cols);
    let hs = GroupHessians::new(&h, cols, 64, None).expect("blocks");
    let w = random(rows * cols, 9, 0.05);
    let args = QuantArgs {
        symmetric,
        ..W4_G64
    };
    let shrinks: Vec<f32> = (0..10).map(|i| 1.0 - i as f32 / 20.0).collect();
    bencher.bench_local(|| {
        let r = search_clip(&w, rows, cols, &args, &hs, &shrinks).expect("search");
        black_box(r.err_clipped)
    });
}

/// gate_proj `[1536, 576]`, symmetric.
#[divan::bench(sample_count = 5)]
fn clip_search_gate(bencher: Bencher) {
    clip_bench(bencher, FFN, HIDDEN, true);
}

/// down_proj `[576, 1536]`, symmetric.
#[divan::bench(sample_count = 5)]
fn clip_search_down(bencher: Bencher) {
    clip_bench(bencher, HIDDEN, FFN, true);
}

/// gate_proj, asymmetric: min and max shrunk separately (100 candidate pairs).
#[divan::bench(sample_count = 3)]
fn clip_search_gate_asymmetric(bencher: Bencher) {
    clip_bench(bencher, FFN, HIDDEN, false);
}
