//! The f32 CPU forward of one decoder block on SmolLM2-135M shapes (hidden 576, 9 heads / 3 KV
//! heads of 64, FFN 1536) with random weights, 32 sequences × 128 tokens, and a GEMM yardstick.
//!
//! Run with `cargo bench -p gs-benches --bench forward`. Counters: `block_forward` reports
//! tokens/s; `block_linears` and `gemm_2048` report FLOP/s (items = floating-point operations),
//! so `block_linears / gemm_2048` is the fraction of GEMM peak the linear layers reach.
//! Inputs are built before timing; every call goes through `CpuDevice` (faer, rayon pool).

use std::path::Path;

use divan::counter::ItemsCount;
use divan::{black_box, Bencher};
use gs_host::device::{AttnShape, CpuDevice, Device};
use gs_host::model::forward::{block_forward, BlockWeights, Linear};
use gs_host::model::ModelConfig;

fn main() {
    divan::main();
}

const N_SEQ: usize = 32;
const SEQLEN: usize = 128;
const TOKENS: usize = N_SEQ * SEQLEN;
const HIDDEN: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const FFN: usize = 1536;

/// SmolLM2-135M's config.json, reduced to what the forward reads.
const CONFIG: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": true
}"#;

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

/// A linear `[out, in]` with weights of variance ~1/in, so activations stay O(1).
fn linear(out: usize, inp: usize, seed: u32) -> Linear<'static> {
    let w = random(out * inp, seed, (3.0 / inp as f32).sqrt());
    Linear::new(w, None, out, inp).expect("consistent shape")
}

fn block() -> BlockWeights<'static> {
    BlockWeights {
        block: 0,
        input_norm: vec![1.0; HIDDEN].into(),
        q: linear(HEADS * HEAD_DIM, HIDDEN, 1),
        k: linear(KV_HEADS * HEAD_DIM, HIDDEN, 2),
        v: linear(KV_HEADS * HEAD_DIM, HIDDEN, 3),
        o: linear(HIDDEN, HEADS * HEAD_DIM, 4),
        q_norm: None,
        k_norm: None,
        post_attention_norm: vec![1.0; HIDDEN].into(),
        gate: linear(FFN, HIDDEN, 5),
        up: linear(FFN, HIDDEN, 6),
        down: linear(HIDDEN, FFN, 7),
    }
}

/// 2·m·k·n per linear layer of the block, for all tokens.
fn linear_flops(w: &BlockWeights<'_>) -> u64 {
    [&w.q, &w.k, &w.v, &w.o, &w.gate, &w.up, &w.down]
        .iter()
        .map(|l| 2 * (TOKENS * l.in_features * l.out_features) as u64)
        .sum()
}

/// One whole block (norms, q/k/v, RoPE, attention, o, SwiGLU MLP, residuals); tokens/s.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn block_forward_32x128(bencher: Bencher) {
    let cfg = ModelConfig::from_json_str(CONFIG, Path::new("smollm2-shapes/config.json"))
        .expect("valid config");
    let (w, dev) = (block(), CpuDevice::new());
    let h0 = random(TOKENS * HIDDEN, 8, 1.0);
    bencher
        .counter(ItemsCount::new(TOKENS))
        .with_inputs(|| h0.clone())
        .bench_local_refs(|h| {
            block_forward(&dev, &cfg, &w, h, N_SEQ, SEQLEN, &mut |_, _| {}).expect("forward")
        });
}

/// Only the block's seven linear layers (same shapes, same inputs sizes); FLOP/s.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn block_linears_32x128(bencher: Bencher) {
    let (w, dev) = (block(), CpuDevice::new());
    let x_h = random(TOKENS * HIDDEN, 9, 1.0);
    let x_q = random(TOKENS * HEADS * HEAD_DIM, 10, 1.0);
    let x_f = random(TOKENS * FFN, 11, 1.0);
    bencher
        .counter(ItemsCount::new(linear_flops(&w)))
        .bench_local(|| {
            for (l, x) in [
                (&w.q, &x_h),
                (&w.k, &x_h),
                (&w.v, &x_h),
                (&w.o, &x_q),
                (&w.gate, &x_h),
                (&w.up, &x_h),
                (&w.down, &x_f),
            ] {
                black_box(l.forward(&dev, x).expect("linear"));
            }
        });
}

/// Only the causal attention core (GQA, softmax), for the time split; tokens/s.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn attention_core_32x128(bencher: Bencher) {
    let dev = CpuDevice::new();
    let q = random(TOKENS * HEADS * HEAD_DIM, 12, 1.0);
    let k = random(TOKENS * KV_HEADS * HEAD_DIM, 13, 1.0);
    let v = random(TOKENS * KV_HEADS * HEAD_DIM, 14, 1.0);
    let shape = AttnShape {
        n_seq: N_SEQ,
        seqlen: SEQLEN,
        n_heads: HEADS,
        n_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        scale: 0.125,
    };
    let mut out = vec![0.0; q.len()];
    bencher.counter(ItemsCount::new(TOKENS)).bench_local(|| {
        dev.causal_attention(&q, &k, &v, &mut out, &shape)
            .expect("attention")
    });
}

/// The yardstick: one n = 2048 f32 GEMM through the same device call; FLOP/s (2·n³).
#[divan::bench(sample_count = 10, sample_size = 1)]
fn gemm_2048(bencher: Bencher) {
    const N: usize = 2048;
    let dev = CpuDevice::new();
    let (x, w) = (random(N * N, 15, 1.0), random(N * N, 16, 1.0));
    let mut out = vec![0.0; N * N];
    bencher
        .counter(ItemsCount::new(2 * (N as u64).pow(3)))
        .bench_local(|| dev.matmul_t(&x, &w, &mut out, N, N, N).expect("gemm"));
}
