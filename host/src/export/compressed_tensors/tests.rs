//! Tests of the compressed-tensors writer and decoder. Golden values are worked out by hand in
//! the comments, from the rule cited there.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use gs_quant::{
    fake_quantize, ActArgs, Granularity, QParams, QuantArgs, QuantType, ScaleRule, Scheme,
};
use serde_json::{json, Value};

use super::config::{py_float_repr, python_json, quantization_config_json, GroupSpec};
use super::writer::layer_tensors;
use super::*;
use crate::export::{
    begin, open_checkpoint, Codes, DecodedCheckpoint, ExportError, ExportOptions, QuantLayer,
};
use crate::manifest::ExportFormat;
use crate::model::fakequant::ActQuant;
use crate::model::forward::TensorSource;
use crate::model::testutil::{digests, edit_index, source, values, Spec};
use crate::model::{f32_to_dtype_bytes, DType, Model, Weights};

// ---------------------------------------------------------------- helpers

fn int(bits: u8, symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits,
        ty: QuantType::Int,
        symmetric,
        granularity,
        scale_rule: ScaleRule::HalfRange,
    }
}

fn fp8(granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits: 8,
        ty: QuantType::Float,
        symmetric: true,
        granularity,
        scale_rule: ScaleRule::HalfRange,
    }
}

fn scheme(w: QuantArgs, act: Option<(QuantArgs, bool)>) -> Scheme {
    Scheme {
        weights: Some(w),
        activations: act.map(|(args, dynamic)| ActArgs { args, dynamic }),
        kv_cache: None,
    }
}

/// 3/128: exact in bf16 (1.5·2⁻⁶), f16 and f32, so a stored static scale is the evaluated one.
const STATIC_SCALE: f32 = 0.0234375;

/// A supported scheme with the input quantizer a calibrated layer would carry.
#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    scheme: Scheme,
    input: Option<ActQuant>,
}

fn cases() -> Vec<Case> {
    let static_act = |args: QuantArgs, zero: i32| ActQuant::Static {
        args,
        scale: STATIC_SCALE,
        zero,
    };
    let i8t_sym = int(8, true, Granularity::Tensor);
    let i8t_asym = int(8, false, Granularity::Tensor);
    let i8tok = int(8, true, Granularity::Channel);
    vec![
        Case {
            label: "W4A16 g4 sym",
            scheme: scheme(int(4, true, Granularity::Group(4)), None),
            input: None,
        },
        Case {
            label: "W4A16 g4 asym",
            scheme: scheme(int(4, false, Granularity::Group(4)), None),
            input: None,
        },
        Case {
            label: "W8A16 channel sym",
            scheme: scheme(int(8, true, Granularity::Channel), None),
            input: None,
        },
        Case {
            label: "W8A16 channel asym",
            scheme: scheme(int(8, false, Granularity::Channel), None),
            input: None,
        },
        Case {
            label: "W8A8 static sym",
            scheme: scheme(int(8, true, Granularity::Channel), Some((i8t_sym, false))),
            input: Some(static_act(i8t_sym, 0)),
        },
        Case {
            label: "W8A8 static asym acts",
            scheme: scheme(int(8, true, Granularity::Channel), Some((i8t_asym, false))),
            input: Some(static_act(i8t_asym, -3)),
        },
        Case {
            label: "W8A8 dynamic per token",
            scheme: scheme(int(8, true, Granularity::Channel), Some((i8tok, true))),
            input: Some(ActQuant::Dynamic(i8tok)),
        },
        Case {
            label: "FP8 static",
            scheme: scheme(
                fp8(Granularity::Tensor),
                Some((fp8(Granularity::Tensor), false)),
            ),
            input: Some(static_act(fp8(Granularity::Tensor), 0)),
        },
        Case {
            label: "FP8 dynamic",
            scheme: scheme(
                fp8(Granularity::Channel),
                Some((fp8(Granularity::Channel), true)),
            ),
            input: Some(ActQuant::Dynamic(fp8(Granularity::Channel))),
        },
        Case {
            label: "FP8 weights only",
            scheme: scheme(fp8(Granularity::Channel), None),
            input: None,
        },
    ]
}

/// Block linears in module order, then `lm_head` (what the scheduler passes as `linears`).
fn linears() -> Vec<String> {
    let mut v = Vec::new();
    for b in 0..2 {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            v.push(format!("model.layers.{b}.{m}"));
        }
    }
    v.push("lm_head".into());
    v
}

fn options() -> ExportOptions {
    ExportOptions {
        force: false,
        max_shard_bytes: 1 << 20,
        linears: linears(),
    }
}

/// `name` quantized with `scheme` the way the pipeline does it: fake-quantize with the
/// primitives, then finalize with the format's number rules.
fn quant_layer(model: &Model, name: &str, scheme: Scheme, input: Option<ActQuant>) -> QuantLayer {
    let wname = format!("{name}.weight");
    let info = model.weights.info(&wname).unwrap();
    let (out, inp) = (info.shape()[0], info.shape()[1]);
    let w = model.weights.to_f32(&wname).unwrap();
    let (fake, qp) = fake_quantize(&w, out, inp, &scheme.weights.unwrap()).unwrap();
    let bname = format!("{name}.bias");
    let bias = model.weights.info(&bname).ok().map(|i| {
        (
            model
                .weights
                .to_f32(&bname)
                .unwrap()
                .iter()
                .map(|b| b * 0.5)
                .collect(),
            i.dtype(),
        )
    });
    QuantLayer::finalize(name, scheme, info.dtype(), &fake, &qp, bias, input, &RULES).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The tensor names of a safetensors file in header order, `__metadata__` first if present.
fn header_keys(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // serde_json keeps the file's key order (preserve_order).
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.keys().cloned().collect()
}

/// Exports `layers` (each `(name, case)`) of a fresh model of `spec`, plus a changed norm
/// weight and an added file, and checks everything that must hold for every scheme.
fn export_and_check(
    spec: &Spec,
    layers: &[(&str, Case)],
) -> (tempfile::TempDir, PathBuf, Vec<QuantLayer>) {
    let (root, src) = source(spec);
    let before = digests(&src);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let mut export = begin(ExportFormat::CompressedTensors, &model, &out, &options()).unwrap();
    let mut written = Vec::new();
    for (name, case) in layers {
        let l = quant_layer(&model, name, case.scheme, case.input);
        export.layer(&l).unwrap();
        written.push(l);
    }
    let norm: Vec<f32> = values(8, 99).iter().map(|v| v * 1.2345 + 1e-4).collect();
    export.tensor("model.norm.weight", &norm).unwrap();
    export.add_file("gs-run.json", b"{}").unwrap();
    assert!(!out.exists());
    let summary = export.finish().unwrap();
    assert_eq!(summary.output, out);
    assert_eq!(summary.replaced, layers.len() + 1);
    assert_eq!(summary.added_files, [PathBuf::from("gs-run.json")]);

    let ck = CompressedTensorsCheckpoint::open(&out).unwrap();
    assert_eq!(
        ck.quantized_layers(),
        layers
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    for l in &written {
        let label = format!("{} ({:?} model)", l.name, l.weight_dtype);
        let d = ck.decode_layer(&l.name).unwrap();
        assert_eq!(d.codes, l.codes, "{label}");
        assert_eq!(bits(&d.qparams.scales), bits(&l.qparams.scales), "{label}");
        assert_eq!(d.qparams.zeros, l.qparams.zeros, "{label}");
        assert_eq!(d.qparams.granularity, l.qparams.granularity, "{label}");
        assert_eq!(bits(&d.dequantized), bits(&l.dequantized), "{label}");
        assert_eq!(d.bias, l.bias.as_ref().map(|(b, _)| b.clone()), "{label}");
        assert_eq!(d.input, l.input, "{label}");
        assert_eq!(ck.input_quant(&l.name).unwrap(), l.input, "{label}");
        let t = ck
            .tensor_f32(&format!("{}.weight", l.name))
            .unwrap()
            .unwrap();
        assert_eq!(t.shape, [l.out_features, l.in_features], "{label}");
        assert_eq!(bits(&t.values), bits(&l.dequantized), "{label}");
    }
    // Unchanged tensors are byte-identical; the changed one is stored in its dtype.
    let w = Weights::open(&out).unwrap();
    let quantized: BTreeSet<String> = layers.iter().map(|(n, _)| format!("{n}.weight")).collect();
    let biases: BTreeSet<String> = written
        .iter()
        .filter(|l| l.bias.is_some())
        .map(|l| format!("{}.bias", l.name))
        .collect();
    for t in &spec.tensors {
        if quantized.contains(&t.name) {
            // Packed layers have no `weight` left; the others hold their codes there.
            let layer = t.name.strip_suffix(".weight").unwrap();
            match w.info(&t.name) {
                Ok(i) => assert!(matches!(i.dtype(), DType::I8 | DType::F8E4M3), "{}", t.name),
                Err(_) => assert!(w.contains(&format!("{layer}.weight_packed")), "{}", t.name),
            }
        } else if t.name == "model.norm.weight" {
            let expected = f32_to_dtype_bytes(&norm, t.dtype).unwrap();
            assert_eq!(w.raw_bytes(&t.name).unwrap(), &expected[..]);
        } else if !biases.contains(&t.name) {
            let info = w.info(&t.name).unwrap();
            assert_eq!(
                (info.dtype(), info.shape()),
                (t.dtype, &t.shape[..]),
                "{}",
                t.name
            );
            assert_eq!(w.raw_bytes(&t.name).unwrap(), &t.bytes[..], "{}", t.name);
        }
    }
    for f in [
        "tokenizer.json",
        "generation_config.json",
        "LICENSE",
        "original/params.json",
    ] {
        assert_eq!(
            fs::read(out.join(f)).unwrap(),
            fs::read(src.join(f)).unwrap(),
            "{f}"
        );
        assert!(summary.copied_files.contains(&PathBuf::from(f)), "{f}");
    }
    assert_eq!(fs::read(out.join("gs-run.json")).unwrap(), b"{}");
    assert_eq!(digests(&src), before, "source directory changed");
    let reopened = open_checkpoint(&out).unwrap();
    assert_eq!(reopened.format(), ExportFormat::CompressedTensors);
    (root, out, written)
}

fn quantization_config(out: &Path) -> Value {
    let v: Value = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    v["quantization_config"].clone()
}

// ---------------------------------------------------------------- round trips

#[test]
fn every_supported_scheme_round_trips_bit_exactly_bf16_f16_f32() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        // A biased layer checks that X.bias keeps its name and dtype next to the quantized form.
        let spec = Spec::llama(dtype, 2).with_raw(
            "model.layers.0.self_attn.q_proj.bias",
            dtype,
            &[8],
            f32_to_dtype_bytes(&values(8, 7), dtype).unwrap(),
            0,
        );
        for case in cases() {
            let layers: Vec<(String, Case)> =
                linears()[..14].iter().map(|n| (n.clone(), case)).collect();
            let refs: Vec<(&str, Case)> = layers.iter().map(|(n, c)| (n.as_str(), *c)).collect();
            let (_root, out, _) = export_and_check(&spec, &refs);
            let qc = quantization_config(&out);
            // One group covers every quantized layer: `Linear`, and only lm_head ignored.
            assert_eq!(
                qc["config_groups"]["group_0"]["targets"],
                json!(["Linear"]),
                "{}",
                case.label
            );
            assert_eq!(qc["ignore"], json!(["lm_head"]), "{}", case.label);
            let bias = Weights::open(&out).unwrap();
            let info = bias.info("model.layers.0.self_attn.q_proj.bias").unwrap();
            assert_eq!(
                (info.dtype(), info.shape()),
                (dtype, &[8][..]),
                "{}",
                case.label
            );
        }
    }
}

#[test]
fn mixed_schemes_get_one_group_each_with_exact_targets_and_the_rest_is_ignored() {
    let spec = Spec::llama(DType::BF16, 1);
    let c = cases();
    let (w4, w8a8, fp8) = (c[0], c[6], c[7]);
    let layers = [
        ("model.layers.0.self_attn.q_proj", w4),
        ("model.layers.0.self_attn.k_proj", w4),
        ("model.layers.0.self_attn.v_proj", w4),
        ("model.layers.0.mlp.down_proj", w8a8),
        ("model.layers.1.mlp.gate_proj", fp8),
        ("model.layers.1.mlp.up_proj", fp8),
        ("model.layers.1.self_attn.o_proj", w4),
    ];
    let (_root, out, _) = export_and_check(&spec, &layers);
    let qc = quantization_config(&out);
    // Groups in module order of their first layer (`from_pretrained` walks named_modules).
    assert_eq!(
        qc["config_groups"]["group_0"]["targets"],
        json!([
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.o_proj"
        ])
    );
    assert_eq!(
        qc["config_groups"]["group_1"]["targets"],
        json!(["model.layers.0.mlp.down_proj"])
    );
    assert_eq!(
        qc["config_groups"]["group_2"]["targets"],
        json!(["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"])
    );
    assert_eq!(qc["config_groups"]["group_0"]["format"], "pack-quantized");
    assert_eq!(qc["config_groups"]["group_1"]["format"], "int-quantized");
    assert_eq!(qc["config_groups"]["group_2"]["format"], "float-quantized");
    assert_eq!(qc["format"], "mixed-precision");
    // Every linear that is not quantized, in module order, lm_head last.
    assert_eq!(
        qc["ignore"],
        json!([
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.mlp.down_proj",
            "lm_head"
        ])
    );
}

// ---------------------------------------------------------------- golden layouts

/// A hand-made layer: codes, one scale per row or group, optional zero points.
fn manual_layer(
    w: QuantArgs,
    out: usize,
    inp: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
) -> QuantLayer {
    let qparams = QParams::new(w.granularity, out, inp, scales, zeros).unwrap();
    QuantLayer {
        name: "m.x".into(),
        scheme: scheme(w, None),
        weight_args: w,
        weight_dtype: DType::BF16,
        out_features: out,
        in_features: inp,
        dequantized: crate::export::dequantize(&Codes::Int(codes.clone()), &qparams).unwrap(),
        codes: Codes::Int(codes),
        qparams,
        bias: None,
        input: None,
    }
}

#[test]
fn packing_order_weight_shape_and_scale_layout() {
    // pack_to_int32: u = q + 8, element i at bits 4i, LSB first:
    // q = [-8,-1,0,1,7,3,-2,5] → u = [0,7,8,9,15,11,6,13] → nibbles from the top 13,6,11,15,9,8,7,0
    // = 0xD6BF9870, stored little-endian: 70 98 BF D6.
    let q = vec![-8, -1, 0, 1, 7, 3, -2, 5];
    let l = manual_layer(
        int(4, true, Granularity::Channel),
        1,
        8,
        q,
        vec![0.5],
        vec![],
    );
    let (spec, t) = layer_tensors(&l).unwrap();
    assert_eq!(spec.format, CtFormat::Pack);
    let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["m.x.weight_packed", "m.x.weight_scale", "m.x.weight_shape"]
    );
    assert_eq!((t[0].dtype, &t[0].shape[..]), (DType::I32, &[1, 1][..]));
    assert_eq!(t[0].bytes, [0x70, 0x98, 0xBF, 0xD6]);
    // Channel scale [out, 1] in the model dtype: bf16 0.5 = 0x3F00.
    assert_eq!((t[1].dtype, &t[1].shape[..]), (DType::BF16, &[1, 1][..]));
    assert_eq!(t[1].bytes, [0x00, 0x3F]);
    // weight_shape is I64 [2] = [out, in] = [1, 8].
    assert_eq!((t[2].dtype, &t[2].shape[..]), (DType::I64, &[2][..]));
    assert_eq!(t[2].bytes, [1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn asymmetric_zero_points_are_packed_along_the_output_dimension() {
    // Zero points [out = 8, groups = 2], packed along dim 0 (pack_to_int32(..., packed_dim=0)):
    // column 0 holds rows' zeros [-8,-1,0,1,7,3,-2,5] → the word 0xD6BF9870 (as above);
    // column 1 holds 7 everywhere → u = 15 in every nibble → 0xFFFFFFFF.
    // Shape [ceil(8·4/32), 2] = [1, 2], row-major: 70 98 BF D6 FF FF FF FF.
    let col0 = [-8, -1, 0, 1, 7, 3, -2, 5];
    let zeros: Vec<i32> = col0.iter().flat_map(|&z| [z, 7]).collect();
    let l = manual_layer(
        int(4, false, Granularity::Group(4)),
        8,
        8,
        vec![0; 64],
        vec![1.0; 16],
        zeros,
    );
    let (_, t) = layer_tensors(&l).unwrap();
    let zp = t
        .iter()
        .find(|t| t.name == "m.x.weight_zero_point")
        .unwrap();
    assert_eq!((zp.dtype, &zp.shape[..]), (DType::I32, &[1, 2][..]));
    assert_eq!(zp.bytes, [0x70, 0x98, 0xBF, 0xD6, 0xFF, 0xFF, 0xFF, 0xFF]);
    // Group scales [out, in/gs] = [8, 2].
    let s = t.iter().find(|t| t.name == "m.x.weight_scale").unwrap();
    assert_eq!(s.shape, [8, 2]);
}

#[test]
fn shard_header_is_metadata_then_dtype_descending_then_name() {
    let spec = Spec::llama(DType::BF16, 1);
    let c = cases();
    let (_root, out, _) = export_and_check(
        &spec,
        &[
            ("model.layers.0.self_attn.q_proj", c[1]),
            ("model.layers.1.mlp.down_proj", c[4]),
        ],
    );
    let keys = header_keys(&out.join("model-00001-of-00001.safetensors"));
    assert_eq!(keys[0], "__metadata__");
    // safetensors ≥ 0.6 (the serializer save_file calls) sorts by dtype, descending in the
    // enum order … I8 < … < BF16 < I32 < … < F32 < … < I64, then by name; so the I64
    // weight_shape first, then the I32 packed words and zero points, then BF16, then I8.
    let pos = |k: &str| keys.iter().position(|x| x == k).unwrap();
    let q = "model.layers.0.self_attn.q_proj";
    let d = "model.layers.1.mlp.down_proj";
    assert_eq!(pos(&format!("{q}.weight_shape")), 1);
    assert!(pos(&format!("{q}.weight_packed")) < pos(&format!("{q}.weight_zero_point")));
    assert!(pos(&format!("{q}.weight_zero_point")) < pos("lm_head.weight"));
    assert!(pos("lm_head.weight") < pos(&format!("{q}.weight_scale")));
    assert!(pos(&format!("{q}.weight_scale")) < pos(&format!("{d}.input_scale")));
    assert_eq!(keys.last().unwrap(), &format!("{d}.weight"), "I8 last");
    let meta: Value = {
        let bytes = fs::read(out.join("model-00001-of-00001.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        serde_json::from_slice::<Value>(&bytes[8..8 + n]).unwrap()["__metadata__"].clone()
    };
    assert_eq!(meta, json!({"format": "pt"}));
}

// ---------------------------------------------------------------- config.json

fn spec_of(s: Scheme) -> GroupSpec {
    GroupSpec::of(&s.weights.unwrap(), s.activations.as_ref())
}

/// Every QuantizationArgs field, as `model_dump()` writes it (compressed-tensors
/// `quant_args.py`; the field serializer writes `zp_dtype` only for asymmetric args).
fn args(
    bits: u8,
    ty: &str,
    sym: bool,
    strategy: &str,
    group: Value,
    dynamic: bool,
    observer: Value,
) -> Value {
    json!({
        "actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": group,
        "num_bits": bits, "observer": observer, "observer_kwargs": {}, "scale_dtype": null,
        "strategy": strategy, "symmetric": sym, "type": ty,
        "zp_dtype": if sym { Value::Null } else { json!("torch.int8") },
    })
}

fn whole_config(group: Value, format: &str) -> Value {
    json!({
        "config_groups": {"group_0": group},
        "format": format,
        "global_compression_ratio": null,
        "ignore": ["lm_head"],
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    })
}

#[test]
fn quantization_config_of_the_presets() {
    let ignore = vec!["lm_head".to_string()];
    let linear = vec!["Linear".to_string()];
    let mm = json!("memoryless_minmax");
    // W4A16 preset (`_int_wnam(4)`): group 128, symmetric, pack-quantized.
    let w4a16 = spec_of(scheme(int(4, true, Granularity::Group(128)), None));
    assert_eq!(
        quantization_config_json(&[(w4a16, linear.clone())], &ignore),
        whole_config(
            json!({"format": "pack-quantized", "input_activations": null, "output_activations": null,
                   "targets": ["Linear"], "weights": args(4, "int", true, "group", json!(128), false, mm.clone())}),
            "pack-quantized"
        )
    );
    // W8A8 preset (INT8_W8A8): channel int8 weights, dynamic symmetric per-token int8 inputs.
    let w8a8 = spec_of(scheme(
        int(8, true, Granularity::Channel),
        Some((int(8, true, Granularity::Channel), true)),
    ));
    assert_eq!(
        quantization_config_json(&[(w8a8, linear.clone())], &ignore),
        whole_config(
            json!({"format": "int-quantized",
                   "input_activations": args(8, "int", true, "token", Value::Null, true, Value::Null),
                   "output_activations": null, "targets": ["Linear"],
                   "weights": args(8, "int", true, "channel", Value::Null, false, mm.clone())}),
            "int-quantized"
        )
    );
    // W8A8 with static asymmetric per-tensor inputs: zp_dtype written for the inputs only.
    let static_asym = spec_of(scheme(
        int(8, true, Granularity::Channel),
        Some((int(8, false, Granularity::Tensor), false)),
    ));
    assert_eq!(
        quantization_config_json(&[(static_asym, linear.clone())], &ignore),
        whole_config(
            json!({"format": "int-quantized",
                   "input_activations": args(8, "int", false, "tensor", Value::Null, false, json!("static_minmax")),
                   "output_activations": null, "targets": ["Linear"],
                   "weights": args(8, "int", true, "channel", Value::Null, false, mm.clone())}),
            "int-quantized"
        )
    );
    // FP8 preset: tensor FP8 weights, static tensor FP8 inputs with `static_minmax`.
    let fp8s = spec_of(scheme(
        fp8(Granularity::Tensor),
        Some((fp8(Granularity::Tensor), false)),
    ));
    assert_eq!(
        quantization_config_json(&[(fp8s, linear)], &ignore),
        whole_config(
            json!({"format": "float-quantized",
                   "input_activations": args(8, "float", true, "tensor", Value::Null, false, json!("static_minmax")),
                   "output_activations": null, "targets": ["Linear"],
                   "weights": args(8, "float", true, "tensor", Value::Null, false, mm)}),
            "float-quantized"
        )
    );
}

#[test]
fn config_json_is_written_as_python_json_dump_sorted_indent_2() {
    // json.dump(indent=2, sort_keys=True): repr floats (1e-05, 10000.0, 1e+16), ensure_ascii
    // escapes in lowercase hex, empty containers inline, no trailing newline.
    let v = json!({"b": 1e-5, "a": [1, {"x": 10000.0}], "c": "é\n\u{1F600}", "d": {}, "e": [],
                   "f": 0.1, "g": 1e16, "h": -2.5e-7, "i": 0.0001, "j": 1e15});
    let expected = "{\n  \"a\": [\n    1,\n    {\n      \"x\": 10000.0\n    }\n  ],\n  \"b\": 1e-05,\n  \"c\": \"\\u00e9\\n\\ud83d\\ude00\",\n  \"d\": {},\n  \"e\": [],\n  \"f\": 0.1,\n  \"g\": 1e+16,\n  \"h\": -2.5e-07,\n  \"i\": 0.0001,\n  \"j\": 1000000000000000.0\n}";
    assert_eq!(python_json(&v), expected);
    assert_eq!(py_float_repr(1.5e300), "1.5e+300");
    assert_eq!(py_float_repr(-0.0), "-0.0");
    assert_eq!(py_float_repr(123.456), "123.456");
}

#[test]
fn written_config_json_keeps_the_source_keys_and_is_sorted() {
    let spec = Spec::llama(DType::BF16, 1);
    let (_root, out, _) =
        export_and_check(&spec, &[("model.layers.0.self_attn.q_proj", cases()[0])]);
    let text = fs::read_to_string(out.join("config.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        python_json(&v),
        text,
        "byte-identical to a sorted json.dump"
    );
    assert!(text.contains("\"rms_norm_eps\": 1e-05"));
    for (k, val) in spec.config.as_object().unwrap() {
        assert_eq!(&v[k], val, "{k}");
    }
    assert!(!text.ends_with('\n'));
}

// ---------------------------------------------------------------- scheme checks

#[test]
fn schemes_vllm_cannot_load_are_refused_with_the_layer_and_a_remedy() {
    let l = "model.layers.3.mlp.up_proj";
    let refused = [
        (
            scheme(
                int(8, false, Granularity::Channel),
                Some((int(8, true, Granularity::Channel), true)),
            ),
            "symmetric weights",
        ),
        (
            scheme(int(4, true, Granularity::Tensor), None),
            "per-channel or per-group",
        ),
        (
            scheme(int(3, false, Granularity::Group(4)), None),
            "4 or 8 bits",
        ),
        (
            scheme(int(1, true, Granularity::Group(4)), None),
            "2 to 8 bits",
        ),
        (scheme(fp8(Granularity::Group(4)), None), "per-group FP8"),
        (
            scheme(
                int(8, true, Granularity::Channel),
                Some((int(8, true, Granularity::Tensor), true)),
            ),
            "dynamic per-token",
        ),
        (
            scheme(
                int(8, true, Granularity::Channel),
                Some((int(8, true, Granularity::Channel), false)),
            ),
            "static per-tensor",
        ),
        (
            scheme(
                int(8, true, Granularity::Channel),
                Some((fp8(Granularity::Channel), true)),
            ),
            "same type",
        ),
        (
            scheme(
                int(8, true, Granularity::Group(4)),
                Some((int(8, true, Granularity::Channel), true)),
            ),
            "per-group int8",
        ),
        (
            scheme(
                int(6, true, Granularity::Channel),
                Some((int(8, true, Granularity::Channel), true)),
            ),
            "8-bit",
        ),
        (
            scheme(
                int(8, true, Granularity::Channel),
                Some((int(4, true, Granularity::Channel), true)),
            ),
            "8 bits",
        ),
        (
            scheme(
                int(8, true, Granularity::Channel),
                Some((
                    QuantArgs {
                        scale_rule: ScaleRule::Qmax,
                        ..int(8, true, Granularity::Channel)
                    },
                    true,
                )),
            ),
            "half_range",
        ),
        (
            Scheme {
                kv_cache: Some(fp8(Granularity::Tensor)),
                ..scheme(fp8(Granularity::Tensor), None)
            },
            "kv_cache",
        ),
    ];
    for (s, remedy) in refused {
        let e = check_scheme(l, &s).unwrap_err();
        assert!(e.contains(l) && e.contains(remedy), "{s:?}: {e}");
    }
    for case in cases() {
        check_scheme(l, &case.scheme).unwrap_or_else(|e| panic!("{}: {e}", case.label));
    }
    // W4A8 int is refused: vLLM reads an int8 `weight_packed` that no compressor writes.
    let w4a8 = scheme(
        int(4, true, Granularity::Group(4)),
        Some((int(8, true, Granularity::Channel), true)),
    );
    assert!(check_scheme(l, &w4a8)
        .unwrap_err()
        .contains("8-bit weights"));
    // Skipped layers are always fine.
    check_scheme(l, &Scheme::default()).unwrap();
}

#[test]
fn static_inputs_need_a_calibrated_representable_scale() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let mut export = begin(
        ExportFormat::CompressedTensors,
        &model,
        &root.path().join("out"),
        &options(),
    )
    .unwrap();
    let c = cases()[4];
    let name = "model.layers.0.self_attn.q_proj";
    let e = export
        .layer(&quant_layer(&model, name, c.scheme, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains(name) && e.contains("calibrated"), "{e}");
    let bad = ActQuant::Static {
        args: int(8, true, Granularity::Tensor),
        scale: 0.1,
        zero: 0,
    };
    let e = export
        .layer(&quant_layer(&model, name, c.scheme, Some(bad)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(name) && e.contains("not representable in BF16"),
        "{e}"
    );
    let e = export.add_file("config.json", b"{}").unwrap_err();
    assert!(matches!(e, ExportError::InvalidExtraFile { .. }), "{e}");
}

// ---------------------------------------------------------------- decoder errors

fn edit_config(out: &Path, edit: impl FnOnce(&mut Value)) {
    let path = out.join("config.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_bad_quantization_config_names_the_file_and_key() {
    let spec = Spec::llama(DType::BF16, 1);
    let (_root, out, _) =
        export_and_check(&spec, &[("model.layers.0.self_attn.q_proj", cases()[0])]);
    assert!(detect(&out).unwrap());
    edit_config(&out, |v| {
        v["quantization_config"]["quantization_status"] = json!("frozen")
    });
    let e = CompressedTensorsCheckpoint::open(&out).unwrap_err();
    let ExportError::BadCheckpoint { file, reason } = &e else {
        panic!("{e}")
    };
    assert_eq!(file, &out.join("config.json"));
    assert!(
        reason.contains("quantization_status") && reason.contains("\"frozen\""),
        "{reason}"
    );

    edit_config(&out, |v| {
        v["quantization_config"]["quantization_status"] = json!("compressed");
        v["quantization_config"]["format"] = json!("nvfp4-pack-quantized");
    });
    let e = CompressedTensorsCheckpoint::open(&out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("quantization_config.format"),
        "{e}"
    );

    edit_config(&out, |v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    assert!(!detect(&out).unwrap());
}

#[test]
fn a_missing_weight_scale_names_the_shard_and_the_tensor() {
    let spec = Spec::llama(DType::BF16, 1);
    let (_root, out, _) =
        export_and_check(&spec, &[("model.layers.0.self_attn.q_proj", cases()[1])]);
    let missing = "model.layers.0.self_attn.q_proj.weight_scale";
    let shard = out.join("model-00001-of-00001.safetensors");
    {
        let w = Weights::open(&out).unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = w
            .iter()
            .filter(|(n, _)| *n != missing)
            .map(|(n, i)| {
                let v = safetensors::tensor::TensorView::new(
                    i.dtype().to_safetensors(),
                    i.shape().to_vec(),
                    w.raw_bytes(n).unwrap(),
                )
                .unwrap();
                (n.to_string(), v)
            })
            .collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &out.join("tmp.safetensors")).unwrap();
    }
    fs::rename(out.join("tmp.safetensors"), &shard).unwrap();
    edit_index(&out, |v| {
        v["weight_map"].as_object_mut().unwrap().remove(missing);
    });
    let e = CompressedTensorsCheckpoint::open(&out).unwrap_err();
    let ExportError::BadCheckpoint { file, reason } = &e else {
        panic!("{e}")
    };
    assert_eq!(file, &shard);
    assert!(
        reason.contains(&format!("\"{missing}\" is missing")),
        "{reason}"
    );
}

#[test]
fn a_zero_point_on_a_symmetric_layer_is_refused() {
    let spec = Spec::llama(DType::BF16, 1);
    let (_root, out, _) =
        export_and_check(&spec, &[("model.layers.0.self_attn.q_proj", cases()[1])]);
    // Declare the asymmetric group symmetric: its stored zero points are now unexpected.
    edit_config(&out, |v| {
        v["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = json!(true)
    });
    let e = CompressedTensorsCheckpoint::open(&out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q_proj.weight_zero_point") && e.contains("symmetric"),
        "{e}"
    );
}
