//! The GPTQ solve (`gs_gptq::gptq_quantize`: prepare + column sweep) of one SmolLM2-135M
//! layer of each shape that dominates its blocks, int4 groups of 64, default parameters
//! (group-aware order, dynamic group scales):
//! - `576x1536`: gate_proj / up_proj (`[out = 1536, in = 576]`: 576 input columns);
//! - `1536x576` as named by the issue: down_proj (`[out = 576, in = 1536]`).
//!
//! `H = XᵀX` of 4,096 random tokens (the 32 × 128 calibration windows), built before timing.
//! Run with `cargo bench -p gs-benches --bench gptq`. The whole SmolLM2 run is `benches/smollm2.rs`
//! (opt-in: it needs the model's shards).

use divan::{black_box, Bencher};
use gs_gptq::{gptq_quantize, GptqParams};
use gs_host::device::{CpuDevice, Device};
use gs_quant::{Granularity, QuantArgs, QuantType, ScaleRule};

fn main() {
    divan::main();
}

const TOKENS: usize = 32 * 128;

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

/// `(W [out, in], H [in, in])` with `H = XᵀX` of random tokens.
fn layer(out: usize, inp: usize) -> (Vec<f32>, Vec<f32>) {
    let w = random(out * inp, 1, (3.0 / inp as f32).sqrt());
    let x = random(TOKENS * inp, 2, 1.0);
    let mut h = vec![0f32; inp * inp];
    CpuDevice::new()
        .xtx_accumulate(&x, TOKENS, inp, &mut h)
        .expect("consistent shapes");
    (w, h)
}

fn w4_g64() -> QuantArgs {
    QuantArgs {
        bits: 4,
        ty: QuantType::Int,
        symmetric: true,
        granularity: Granularity::Group(64),
        scale_rule: ScaleRule::HalfRange,
    }
}

fn solve(bencher: Bencher, out: usize, inp: usize) {
    let (w, h) = layer(out, inp);
    let (args, params) = (w4_g64(), GptqParams::default());
    bencher.bench(|| {
        gptq_quantize(
            black_box(&w),
            out,
            inp,
            black_box(&h),
            2.0 / TOKENS as f64,
            &args,
            &params,
            &mut |_| {},
        )
        .expect("solvable")
    });
}

/// gate_proj / up_proj: 1536 rows × 576 input columns.
#[divan::bench(sample_count = 10)]
fn gptq_576x1536(bencher: Bencher) {
    solve(bencher, 1536, 576);
}

/// down_proj: 576 rows × 1536 input columns.
#[divan::bench(sample_count = 10)]
fn gptq_1536x576(bencher: Bencher) {
    solve(bencher, 576, 1536);
}
