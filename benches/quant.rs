//! Throughput of the gs-quant hot paths on one 4096×4096 f32 weight matrix (a 7B-class projection).
//!
//! Run with `cargo bench -p gs-benches`. Inputs are built before timing starts; the timed closure
//! is the library call alone (including its output allocation). Counters report elements/s.

use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use gs_quant::{
    fake_quantize, fake_quantize_into, pack_int32_rows, quantize_int, Granularity, QuantArgs,
    QuantType, ScaleRule,
};

fn main() {
    divan::main();
}

const ROWS: usize = 4096;
const COLS: usize = 4096;
const N: usize = ROWS * COLS;

/// Deterministic weights, roughly uniform in [-0.05, 0.05] (xorshift; no RNG dependency).
fn weights() -> Vec<f32> {
    let mut s = 0x9E37_79B9u32;
    (0..N)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect()
}

const INT4_G128: QuantArgs = QuantArgs {
    bits: 4,
    ty: QuantType::Int,
    symmetric: true,
    granularity: Granularity::Group(128),
    scale_rule: ScaleRule::HalfRange,
};

const INT8_CHANNEL: QuantArgs = QuantArgs {
    bits: 8,
    ty: QuantType::Int,
    symmetric: true,
    granularity: Granularity::Channel,
    scale_rule: ScaleRule::HalfRange,
};

const FP8_CHANNEL: QuantArgs = QuantArgs {
    bits: 8,
    ty: QuantType::Float,
    symmetric: true,
    granularity: Granularity::Channel,
    scale_rule: ScaleRule::HalfRange,
};

/// fake_quantize = min/max qparams + quantize + dequantize, 4096×4096.
#[divan::bench_group(sample_count = 20)]
mod fake_quantize_4096x4096 {
    use super::*;

    fn run(bencher: Bencher, args: &QuantArgs) {
        let w = weights();
        bencher
            .counter(ItemsCount::new(N))
            .bench_local(|| fake_quantize(black_box(&w), ROWS, COLS, black_box(args)).unwrap());
    }

    #[divan::bench]
    fn int4_group128_sym(bencher: Bencher) {
        run(bencher, &INT4_G128);
    }

    #[divan::bench]
    fn int8_channel_sym(bencher: Bencher) {
        run(bencher, &INT8_CHANNEL);
    }

    #[divan::bench]
    fn fp8_channel(bencher: Bencher) {
        run(bencher, &FP8_CHANNEL);
    }

    /// The same as `int4_group128_sym`, writing into a reused buffer (no page faults on output).
    #[divan::bench]
    fn int4_group128_sym_into_reused_buffer(bencher: Bencher) {
        let w = weights();
        let mut out = vec![0f32; N];
        bencher.counter(ItemsCount::new(N)).bench_local(|| {
            fake_quantize_into(black_box(&w), ROWS, COLS, &INT4_G128, &mut out).unwrap()
        });
    }
}

/// compressed-tensors pack-quantized of int4 values, 4096×4096 → 4096×512 words.
#[divan::bench(sample_count = 20)]
fn pack_int32_rows_int4_4096x4096(bencher: Bencher) {
    let w = weights();
    let (_, qp) = fake_quantize(&w, ROWS, COLS, &INT4_G128).unwrap();
    let q = quantize_int(&w, ROWS, COLS, &qp, &INT4_G128).unwrap();
    bencher
        .counter(ItemsCount::new(N))
        .bench_local(|| pack_int32_rows(black_box(&q), ROWS, COLS, 4).unwrap());
}
