use std::fs;
use std::path::{Path, PathBuf};

use gs_quant::{fake_quantize, ActArgs, Granularity, QuantArgs, QuantType, ScaleRule, Scheme};
use serde_json::{json, Value};

use super::rules::{deq_scale_i64, quant_bias};
use super::writer::stored_bias;
use super::*;
use crate::export::{
    begin, open_checkpoint, Codes, DecodedCheckpoint, ExportError, ExportOptions, Exporter,
    QuantLayer,
};
use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::testutil::{digests, source, values, Spec};
use crate::model::{f32_to_dtype_bytes, DType, Model, Weights};

// ---------------------------------------------------------------- helpers

fn int8(symmetric: bool, granularity: Granularity, scale_rule: ScaleRule) -> QuantArgs {
    QuantArgs {
        bits: 8,
        ty: QuantType::Int,
        symmetric,
        granularity,
        scale_rule,
    }
}

fn weights(bits: u8, symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits,
        ..int8(symmetric, granularity, ScaleRule::HalfRange)
    }
}

/// W8A8: int8 symmetric per-channel weights, int8 static per-tensor activations.
fn w8a8(act_symmetric: bool) -> Scheme {
    Scheme {
        weights: Some(weights(8, true, Granularity::Channel)),
        activations: Some(ActArgs {
            args: int8(act_symmetric, Granularity::Tensor, ScaleRule::HalfRange),
            dynamic: false,
        }),
        kv_cache: None,
    }
}

/// W8A8_DYNAMIC: int8 symmetric per-channel weights (Qmax here), per-token Qmax activations.
fn w8a8_dynamic() -> Scheme {
    Scheme {
        weights: Some(int8(true, Granularity::Channel, ScaleRule::Qmax)),
        activations: Some(ActArgs {
            args: int8(true, Granularity::Channel, ScaleRule::Qmax),
            dynamic: true,
        }),
        kv_cache: None,
    }
}

fn w8a16(granularity: Granularity) -> Scheme {
    Scheme {
        weights: Some(weights(8, true, granularity)),
        ..Scheme::default()
    }
}

/// A layer of `model` quantized with `scheme` (gs-quant RTN), finalized with Ascend's rules;
/// static activations get `(scale, zero)`.
fn quant_layer(model: &Model, name: &str, scheme: Scheme, calib: (f32, i32)) -> QuantLayer {
    let wname = format!("{name}.weight");
    let info = model.weights.info(&wname).unwrap();
    let (out, cols) = (info.shape()[0], info.shape()[1]);
    let w = model.weights.to_f32(&wname).unwrap();
    let (fake, qp) = fake_quantize(&w, out, cols, &scheme.weights.unwrap()).unwrap();
    let bname = format!("{name}.bias");
    let bias = model.weights.contains(&bname).then(|| {
        (
            model.weights.to_f32(&bname).unwrap(),
            model.weights.info(&bname).unwrap().dtype(),
        )
    });
    let input = scheme
        .activations
        .and_then(|a| ActQuant::from_scheme(&a, Some(calib)));
    QuantLayer::finalize(name, scheme, info.dtype(), &fake, &qp, bias, input, &RULES).unwrap()
}

fn options(model: &Model, max_shard_bytes: usize) -> ExportOptions {
    let family = crate::arch::family_for(&model.config.architectures, "config.json").unwrap();
    let mut linears: Vec<String> = (0..model.config.num_hidden_layers)
        .flat_map(|i| family.block_linears(i))
        .collect();
    linears.push("lm_head".into());
    ExportOptions {
        force: false,
        max_shard_bytes,
        linears,
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Both quantizers give the same numbers on a spread of inputs, including clamped ones.
fn same_numbers(a: &ActQuant, b: &ActQuant, cols: usize) {
    let x: Vec<f32> = values(4 * cols, 3).iter().map(|v| v * 3.0).collect();
    assert_eq!(
        bits(&a.apply(&x, cols).unwrap()),
        bits(&b.apply(&x, cols).unwrap())
    );
}

fn with_bias(spec: Spec, layer: &str, n: usize, seed: usize) -> Spec {
    let bytes = f32_to_dtype_bytes(&values(n, seed), DType::BF16).unwrap();
    spec.with_raw(&format!("{layer}.bias"), DType::BF16, &[n], bytes, 0)
}

fn description(dir: &Path) -> serde_json::Map<String, Value> {
    let v: Value = serde_json::from_slice(&fs::read(dir.join(DESCRIPTION_FILE)).unwrap()).unwrap();
    v.as_object().unwrap().clone()
}

// ------------------------------------------------------------- number rules

#[test]
fn deq_scale_i64_is_the_sign_extended_f32_bit_pattern() {
    // FORMATS.md B.4 / msModelSlim `deqscale2int64`: 0.0123f = 0x3C4985F0 is stored as
    // 1011451376 (= 0x3C4985F0 as a decimal int64).
    assert_eq!(0.0123f32.to_bits(), 0x3C49_85F0);
    assert_eq!(deq_scale_i64(0.0123), 1_011_451_376);
    // The view is int32, then sign-extended: a pattern with the top bit set stays negative.
    assert_eq!(deq_scale_i64(-2.0), i64::from(0xC000_0000u32 as i32));
}

#[test]
fn quant_bias_folds_the_bias_and_the_input_offset() {
    // quant_bias[n] = round(bias[n]/deq[n] − input_offset·Σ_k q[n,k]) (FORMATS.md B.4,
    // msModelSlim V1 on_w8a8_static), half to even (torch.round), with input_offset −3:
    // row 0: q = [1, −2, 3], Σ = 2, bias 1.0, deq 0.5:    1.0/0.5 − (−3)·2 = 2 + 6 = 8
    // row 1: q = [127, −128, 0], Σ = −1, bias −2, deq 0.25: −8 − (−3)·(−1) = −8 − 3 = −11
    // row 2: q = [0, 0, 1], Σ = 1, bias 0.375, deq 0.25:   1.5 + 3 = 4.5 → 4 (ties to even)
    let q = [1, -2, 3, 127, -128, 0, 0, 0, 1];
    let qb = quant_bias(&[1.0, -2.0, 0.375], &[0.5, 0.25, 0.25], -3, &q, 3).unwrap();
    assert_eq!(qb, vec![8, -11, 4]);
    // No bias, no offset: 0.
    assert_eq!(
        quant_bias(&[0.0; 3], &[0.5; 3], 0, &q, 3).unwrap(),
        vec![0; 3]
    );
    // A bias that does not fit int32 for its deq_scale is an error naming the row.
    let e = quant_bias(&[1.0], &[1e-12], 0, &[1], 1).unwrap_err();
    assert!(e.contains("row 0") && e.contains("int32"), "{e}");
}

#[test]
fn static_inputs_decode_as_asymmetric_with_the_same_numbers() {
    // ActQuant::apply with asymmetric args passes zeros = [0] to fake_quantize_with, which
    // rounds x/s + 0 into [−128, 127] exactly as symmetric qparams (no zeros) do.
    let sym = ActQuant::Static {
        args: int8(true, Granularity::Tensor, ScaleRule::HalfRange),
        scale: 0.0123,
        zero: 0,
    };
    let asym = ActQuant::Static {
        args: static_input_args(),
        scale: 0.0123,
        zero: 0,
    };
    same_numbers(&sym, &asym, 8);
}

// ------------------------------------------------------------- check_scheme

#[test]
fn check_scheme_accepts_what_vllm_ascend_loads() {
    for s in [
        w8a8(true),
        w8a8(false),
        w8a8_dynamic(),
        w8a16(Granularity::Channel),
        w8a16(Granularity::Group(128)),
        Scheme::default(),
    ] {
        check_scheme("model.layers.0.mlp.up_proj", &s).unwrap();
    }
    assert_eq!(AscendType::of_scheme(&w8a8(false)), AscendType::W8A8);
    assert_eq!(
        AscendType::of_scheme(&w8a8_dynamic()),
        AscendType::W8A8Dynamic
    );
    assert_eq!(
        AscendType::of_scheme(&w8a16(Granularity::Channel)),
        AscendType::W8A16
    );
}

#[test]
fn check_scheme_refusals_name_the_layer_and_the_way_out() {
    let layer = "model.layers.3.self_attn.o_proj";
    let refuse = |s: Scheme, needles: &[&str]| {
        let e = check_scheme(layer, &s).unwrap_err();
        assert!(e.starts_with(layer), "{e}");
        for n in needles {
            assert!(e.contains(n), "{n:?} not in: {e}");
        }
    };
    let w4a16 = Scheme {
        weights: Some(weights(4, true, Granularity::Group(128))),
        ..Scheme::default()
    };
    refuse(w4a16, &["W4A16", "vllm-ascend#6481", "compressed-tensors"]);
    let w3 = Scheme {
        weights: Some(weights(3, true, Granularity::Group(64))),
        ..Scheme::default()
    };
    refuse(w3, &["3-bit", "bits = 8", "compressed-tensors"]);
    let mut asym = w8a8(false);
    asym.weights = Some(weights(8, false, Granularity::Channel));
    refuse(
        asym,
        &["npu_quant_matmul has no weight offset", "symmetric = true"],
    );
    let asym16 = Scheme {
        weights: Some(weights(8, false, Granularity::Channel)),
        ..Scheme::default()
    };
    refuse(
        asym16,
        &["antiquant offset", "unverified", "symmetric = true"],
    );
    let fp8 = Scheme {
        weights: Some(QuantArgs {
            ty: QuantType::Float,
            ..int8(true, Granularity::Channel, ScaleRule::HalfRange)
        }),
        ..Scheme::default()
    };
    refuse(fp8, &["FP8", "compressed-tensors"]);
    let mut per_tensor = w8a16(Granularity::Channel);
    per_tensor.weights = Some(weights(8, true, Granularity::Tensor));
    refuse(per_tensor, &["per-tensor weight", "channel"]);
    let mut dyn_tensor = w8a8_dynamic();
    dyn_tensor.activations.as_mut().unwrap().args.granularity = Granularity::Tensor;
    refuse(dyn_tensor, &["dynamic per-tensor", "token"]);
    let mut dyn_asym = w8a8_dynamic();
    dyn_asym.activations.as_mut().unwrap().args.symmetric = false;
    refuse(dyn_asym, &["asymmetric dynamic", "symmetric = true"]);
    let mut half_range = w8a8_dynamic();
    half_range.activations.as_mut().unwrap().args.scale_rule = ScaleRule::HalfRange;
    refuse(half_range, &["absmax/127", "qmax"]);
    let mut kv = w8a8_dynamic();
    kv.kv_cache = Some(int8(true, Granularity::Tensor, ScaleRule::Qmax));
    refuse(kv, &["KV-cache"]);
    let mut grouped = w8a8_dynamic();
    grouped.weights = Some(weights(8, true, Granularity::Group(128)));
    refuse(grouped, &["per-group weights", "channel"]);
}

mod checks;
mod round_trip;
