//! Export → decode round trips and the files they leave.

use super::*;

/// Layer 0: q/k/v W8A8 with asymmetric static inputs (q, k with a bias), o W8A8 with a
/// symmetric input and a bias, gate/up W8A8_DYNAMIC, down W8A16 per channel. Layer 1: every
/// linear W8A16 in groups of 4, except o_proj, skipped and handed over as a changed FLOAT
/// tensor. The final norm is changed too.
#[test]
fn round_trip_mixed_bf16_is_bit_exact() {
    let mut spec = Spec::llama(DType::BF16, 2);
    spec = with_bias(spec, "model.layers.0.self_attn.q_proj", 8, 50);
    spec = with_bias(spec, "model.layers.0.self_attn.k_proj", 4, 51);
    spec = with_bias(spec, "model.layers.0.self_attn.o_proj", 8, 52);
    let (root, src) = source(&spec);
    let before = digests(&src);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let asym_in = (0.0123, -7);
    let sym_in = (0.02, 0);

    let l0 = |m: &str| format!("model.layers.0.{m}");
    let l1 = |m: &str| format!("model.layers.1.{m}");
    let mut layers = vec![
        quant_layer(&model, &l0("self_attn.q_proj"), w8a8(false), asym_in),
        quant_layer(&model, &l0("self_attn.k_proj"), w8a8(false), asym_in),
        quant_layer(&model, &l0("self_attn.v_proj"), w8a8(false), asym_in),
        quant_layer(&model, &l0("self_attn.o_proj"), w8a8(true), sym_in),
        quant_layer(&model, &l0("mlp.gate_proj"), w8a8_dynamic(), (0.0, 0)),
        quant_layer(&model, &l0("mlp.up_proj"), w8a8_dynamic(), (0.0, 0)),
        quant_layer(
            &model,
            &l0("mlp.down_proj"),
            w8a16(Granularity::Channel),
            (0.0, 0),
        ),
    ];
    for m in [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ] {
        layers.push(quant_layer(
            &model,
            &l1(m),
            w8a16(Granularity::Group(4)),
            (0.0, 0),
        ));
    }
    let skipped = l1("self_attn.o_proj.weight");
    let skipped_values: Vec<f32> = values(64, 9).iter().map(|v| v * 0.37 + 1e-3).collect();
    let norm_values: Vec<f32> = values(8, 11).iter().map(|v| v + 1.0001).collect();

    let mut ex: Box<dyn Exporter + '_> =
        begin(ExportFormat::Ascend, &model, &out, &options(&model, 600)).unwrap();
    for l in &layers {
        ex.layer(l).unwrap();
    }
    ex.tensor(&skipped, &skipped_values).unwrap();
    ex.tensor("model.norm.weight", &norm_values).unwrap();
    ex.add_file("gs-run.json", b"{}").unwrap();
    assert!(!out.exists());
    let summary = ex.finish().unwrap();
    assert_eq!(summary.output, out);
    assert!(summary.shards > 1, "{summary:?}");
    assert_eq!(summary.replaced, layers.len() + 3 + 2);
    assert_eq!(summary.added_files, [PathBuf::from("gs-run.json")]);
    assert_eq!(digests(&src), before, "source directory changed");

    // Opened through the generic entry point.
    let ckpt = open_checkpoint(&out).unwrap();
    assert_eq!(ckpt.format(), ExportFormat::Ascend);
    let names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
    assert_eq!(ckpt.quantized_layers(), names);
    for l in &layers {
        let d = ckpt.decode_layer(&l.name).unwrap();
        assert_eq!(d.name, l.name);
        assert_eq!(d.codes, l.codes, "{}", l.name);
        assert_eq!(d.qparams.granularity, l.qparams.granularity, "{}", l.name);
        assert_eq!(
            (d.qparams.rows, d.qparams.cols),
            (l.out_features, l.in_features)
        );
        assert_eq!(
            bits(&d.qparams.scales),
            bits(&l.qparams.scales),
            "{}",
            l.name
        );
        assert_eq!(d.qparams.zeros, l.qparams.zeros, "{}", l.name);
        assert_eq!(bits(&d.dequantized), bits(&l.dequantized), "{}", l.name);
        let bias = l.bias.as_ref().map(|(b, dt)| stored_bias(b, *dt));
        assert_eq!(d.bias, bias, "{}", l.name);
        // Unchanged bf16 biases are stored exactly.
        if let Some((b, _)) = &l.bias {
            assert_eq!(bits(d.bias.as_ref().unwrap()), bits(b));
        }
        let t = ckpt
            .tensor_f32(&format!("{}.weight", l.name))
            .unwrap()
            .unwrap();
        assert_eq!(t.shape, [l.out_features, l.in_features]);
        assert_eq!(bits(&t.values), bits(&l.dequantized), "{}", l.name);
        let input = ckpt.input_quant(&l.name).unwrap();
        assert_eq!(input, d.input, "{}", l.name);
        match (l.input, input) {
            (
                Some(ActQuant::Static { scale, zero, args }),
                Some(
                    got @ ActQuant::Static {
                        scale: s,
                        zero: z,
                        args: a,
                    },
                ),
            ) => {
                assert_eq!((scale.to_bits(), zero), (s.to_bits(), z));
                assert!(!a.symmetric && a.granularity == Granularity::Tensor && a.bits == 8);
                assert_eq!(args.granularity, a.granularity);
                same_numbers(&l.input.unwrap(), &got, l.in_features);
            }
            (want, got) => assert_eq!(want, got, "{}", l.name),
        }
    }
    // Float tensors: as handed over (rounded to bf16), or byte-identical to the source.
    let w = Weights::open_with_index(&out, NAMING.index).unwrap();
    let bf16 = |v: &[f32]| -> Vec<u32> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_f32().to_bits())
            .collect()
    };
    assert_eq!(w.info(&skipped).unwrap().dtype(), DType::BF16);
    assert_eq!(
        bits(&ckpt.tensor_f32(&skipped).unwrap().unwrap().values),
        bf16(&skipped_values)
    );
    assert_eq!(
        bits(
            &ckpt
                .tensor_f32("model.norm.weight")
                .unwrap()
                .unwrap()
                .values
        ),
        bf16(&norm_values)
    );
    for t in &spec.tensors {
        let quantized = names.iter().any(|n| t.name.starts_with(&format!("{n}.")));
        if quantized || t.name == skipped || t.name == "model.norm.weight" {
            continue;
        }
        assert_eq!(w.raw_bytes(&t.name).unwrap(), &t.bytes[..], "{}", t.name);
        assert_eq!(w.info(&t.name).unwrap().dtype(), t.dtype);
    }
    assert!(ckpt.input_quant("lm_head").unwrap().is_none());
    assert!(ckpt.decode_layer("lm_head").is_err());
    // Other files: copied, config.json unchanged (it had no quantization_config).
    for f in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "original/params.json",
    ] {
        assert_eq!(
            fs::read(out.join(f)).unwrap(),
            fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(fs::read(out.join("gs-run.json")).unwrap(), b"{}");
}

#[test]
fn description_order_types_and_global_keys() {
    let spec = with_bias(
        Spec::llama(DType::BF16, 1),
        "model.layers.0.self_attn.o_proj",
        8,
        5,
    );
    let (root, src) = source(&spec);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 20),
    )
    .unwrap();
    let o = quant_layer(
        &model,
        "model.layers.0.self_attn.o_proj",
        w8a8(false),
        (0.01, 3),
    );
    ex.layer(&o).unwrap();
    let down = quant_layer(
        &model,
        "model.layers.1.mlp.down_proj",
        w8a16(Granularity::Group(8)),
        (0.0, 0),
    );
    ex.layer(&down).unwrap();
    ex.tensor("model.embed_tokens.weight", &values(128, 1))
        .unwrap();
    ex.finish().unwrap();

    let text = fs::read_to_string(out.join(DESCRIPTION_FILE)).unwrap();
    assert!(
        text.contains("\n    \"version\": \"1.0.0\""),
        "indent 4: {text}"
    );
    let desc = description(&out);
    let keys: Vec<&str> = desc.keys().map(String::as_str).collect();
    let n = keys.len();
    // Global keys last, in msModelSlim V1's order (ascendv1.py post_run).
    assert_eq!(
        keys[n - 5..],
        [
            "version",
            "model_quant_type",
            "metadata",
            "group_size",
            "optional"
        ]
    );
    assert_eq!(desc["version"], "1.0.0");
    assert_eq!(desc["model_quant_type"], "W8A8"); // W8A16 < W8A8 in QUANT_TYPE_PRIORITY
    assert_eq!(desc["metadata"], json!({}));
    assert_eq!(desc["group_size"], 8);
    assert_eq!(desc["optional"], json!({}));
    // Decoder-layer entries first (by block), then embed_tokens, norm, lm_head (observed in
    // msModelSlim 26.1.0 V1 output).
    let tensors = &keys[..n - 5];
    assert_eq!(
        tensors[tensors.len() - 3..],
        [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight"
        ]
    );
    let blocks: Vec<usize> = tensors[..tensors.len() - 3]
        .iter()
        .map(|k| {
            k.strip_prefix("model.layers.").unwrap()[..1]
                .parse()
                .unwrap()
        })
        .collect();
    assert!(blocks.windows(2).all(|w| w[0] <= w[1]), "{tensors:?}");
    // One entry per stored tensor.
    let w = Weights::open_with_index(&out, NAMING.index).unwrap();
    assert_eq!(w.len(), tensors.len());
    // Per-linear order: msModelSlim V1's W8A8 (weight, quant_bias, input_scale, input_offset,
    // deq_scale), then weight_scale/weight_offset as its W8A8_MIX, then the FLOAT bias.
    let p = "model.layers.0.self_attn.o_proj";
    let at = keys
        .iter()
        .position(|k| *k == format!("{p}.weight"))
        .unwrap();
    let want: Vec<String> = [
        "weight",
        "quant_bias",
        "input_scale",
        "input_offset",
        "deq_scale",
        "weight_scale",
        "weight_offset",
        "bias",
    ]
    .iter()
    .map(|s| format!("{p}.{s}"))
    .collect();
    assert_eq!(
        keys[at..at + 8],
        want.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    for k in &want[..7] {
        assert_eq!(desc[k.as_str()], "W8A8", "{k}");
    }
    assert_eq!(desc[format!("{p}.bias").as_str()], "FLOAT");
    let d = "model.layers.1.mlp.down_proj";
    assert_eq!(desc[format!("{d}.weight").as_str()], "W8A16");
    assert_eq!(desc[format!("{d}.weight_scale").as_str()], "W8A16");
    assert_eq!(desc["model.layers.1.mlp.up_proj.weight"], "FLOAT");
    assert_eq!(desc["model.layers.0.input_layernorm.weight"], "FLOAT");
    // Dtypes and shapes (FORMATS.md B.3), bf16 model: deq_scale F32.
    let shape = |n: &str| {
        (
            w.info(n).unwrap().dtype(),
            w.info(n).unwrap().shape().to_vec(),
        )
    };
    assert_eq!(shape(&format!("{p}.weight")), (DType::I8, vec![8, 8]));
    assert_eq!(shape(&format!("{p}.quant_bias")), (DType::I32, vec![8]));
    assert_eq!(shape(&format!("{p}.input_scale")), (DType::F32, vec![1]));
    assert_eq!(shape(&format!("{p}.input_offset")), (DType::F32, vec![1]));
    assert_eq!(shape(&format!("{p}.deq_scale")), (DType::F32, vec![8]));
    assert_eq!(
        shape(&format!("{p}.weight_scale")),
        (DType::F32, vec![8, 1])
    );
    assert_eq!(
        shape(&format!("{p}.weight_offset")),
        (DType::F32, vec![8, 1])
    );
    assert_eq!(shape(&format!("{p}.bias")), (DType::F32, vec![8]));
    assert_eq!(
        shape(&format!("{d}.weight_scale")),
        (DType::F32, vec![8, 2])
    );
    assert_eq!(
        shape(&format!("{d}.weight_offset")),
        (DType::F32, vec![8, 2])
    );
    assert_eq!(w.to_f32(&format!("{p}.input_offset")).unwrap(), [3.0]);
    assert_eq!(w.to_f32(&format!("{d}.weight_offset")).unwrap(), [0.0; 16]);
    let deq = w.to_f32(&format!("{p}.deq_scale")).unwrap();
    let want_deq: Vec<f32> = o.qparams.scales.iter().map(|s| 0.01f32 * s).collect();
    assert_eq!(bits(&deq), bits(&want_deq));
}

#[test]
fn shards_have_no_metadata_and_use_the_ascend_index() {
    let (root, src) = source(&Spec::llama(DType::BF16, 2));
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let ex = begin(ExportFormat::Ascend, &model, &out, &options(&model, 300)).unwrap();
    let summary = ex.finish().unwrap();
    let index: Value = serde_json::from_slice(
        &fs::read(out.join("quant_model_weights.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let n = summary.shards;
    assert!(n > 1);
    let mut files: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    files.sort();
    let want: Vec<String> = (1..=n)
        .map(|k| format!("quant_model_weights-{k:05}-of-{n:05}.safetensors"))
        .collect();
    assert_eq!(
        files, want,
        "only the Ascend shards: vLLM loads every *.safetensors"
    );
    assert!(!out.join("model.safetensors.index.json").exists());
    assert_eq!(index["metadata"]["total_size"], summary.tensor_bytes);
    for f in &files {
        let bytes = fs::read(out.join(f)).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + len]).unwrap();
        assert!(!header.contains("__metadata__"), "{f}: {header}");
    }
}

#[test]
fn fp16_model_stores_deq_scale_as_i64_and_the_decoder_checks_the_dtype() {
    let mut spec = Spec::llama(DType::F16, 1);
    spec.config["torch_dtype"] = json!("float16");
    let (root, src) = source(&spec);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let name = "model.layers.1.self_attn.o_proj";
    let l = quant_layer(&model, name, w8a8(false), (0.0123, -5));
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 20),
    )
    .unwrap();
    ex.layer(&l).unwrap();
    ex.finish().unwrap();

    let w = Weights::open_with_index(&out, NAMING.index).unwrap();
    let dname = format!("{name}.deq_scale");
    assert_eq!(w.info(&dname).unwrap().dtype(), DType::I64);
    let stored: Vec<i64> = w
        .raw_bytes(&dname)
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<i64> = l
        .qparams
        .scales
        .iter()
        .map(|s| deq_scale_i64(0.0123 * s))
        .collect();
    assert_eq!(stored, want);
    let ckpt = AscendCheckpoint::open(&out).unwrap();
    let d = ckpt.decode_layer(name).unwrap();
    assert_eq!(bits(&d.dequantized), bits(&l.dequantized));

    // The same files under a bf16 config: the deq_scale dtype no longer matches.
    let mut cfg: Value =
        serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    cfg["torch_dtype"] = json!("bfloat16");
    fs::write(out.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = AscendCheckpoint::open(&out)
        .unwrap()
        .decode_layer(name)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&dname) && e.contains("I64") && e.contains("F32"),
        "{e}"
    );
}

#[test]
fn tampered_quant_bias_is_reported() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let name = "model.layers.0.self_attn.o_proj";
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 30),
    )
    .unwrap();
    ex.layer(&quant_layer(&model, name, w8a8(false), (0.01, 4)))
        .unwrap();
    ex.finish().unwrap();
    // Flip the first quant_bias value in place.
    let shard = out.join("quant_model_weights-00001-of-00001.safetensors");
    let w = Weights::open_with_index(&out, NAMING.index).unwrap();
    let range = w.info(&format!("{name}.quant_bias")).unwrap().file_range();
    drop(w);
    let mut bytes = fs::read(&shard).unwrap();
    bytes[range.start] ^= 1;
    fs::write(&shard, bytes).unwrap();
    let e = AscendCheckpoint::open(&out)
        .unwrap()
        .decode_layer(name)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{name}.quant_bias[0]")), "{e}");
}

#[test]
fn config_json_loses_its_quantization_config() {
    let mut spec = Spec::llama(DType::BF16, 1);
    spec.config["quantization_config"] = json!({"quant_method": "fp8"});
    spec.config["text_config"] = json!({"quantization_config": {"bits": 4}, "hidden_size": 8});
    let (root, src) = source(&spec);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 20),
    )
    .unwrap()
    .finish()
    .unwrap();
    let cfg: Value = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(cfg["text_config"], json!({"hidden_size": 8}));
    assert_eq!(cfg["architectures"], spec.config["architectures"]);
    // A checkpoint whose config.json still has one is refused by the decoder.
    fs::write(
        out.join("config.json"),
        serde_json::to_vec(&spec.config).unwrap(),
    )
    .unwrap();
    let e = AscendCheckpoint::open(&out).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("quantization_config"),
        "{e}"
    );
}

#[test]
fn w8a8_without_weight_scale_is_recovered_from_deq_scale() {
    // msModelSlim V1 writes no weight_scale for W8A8: the decoder recovers it as
    // deq_scale / input_scale (FORMATS.md Part C, Ascend 3), exact only to f32 rounding.
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let name = "model.layers.0.self_attn.o_proj";
    let l = quant_layer(&model, name, w8a8(false), (0.0123, -7));
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 30),
    )
    .unwrap();
    ex.layer(&l).unwrap();
    ex.finish().unwrap();

    // Rewrite the output as V1 would have written it.
    let dropped = [
        format!("{name}.weight_scale"),
        format!("{name}.weight_offset"),
    ];
    let shard = out.join("quant_model_weights-00001-of-00001.safetensors");
    let bytes = fs::read(&shard).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !dropped.contains(n))
        .collect();
    let tmp = out.join("v1.tmp");
    safetensors::serialize_to_file(kept, None, &tmp).unwrap();
    fs::rename(&tmp, &shard).unwrap();
    let index_path = out.join(NAMING.index);
    let mut index: Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let mut desc = description(&out);
    for n in &dropped {
        index["weight_map"].as_object_mut().unwrap().remove(n);
        desc.remove(n);
    }
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(
        out.join(DESCRIPTION_FILE),
        serde_json::to_vec(&desc).unwrap(),
    )
    .unwrap();

    let d = AscendCheckpoint::open(&out)
        .unwrap()
        .decode_layer(name)
        .unwrap();
    assert_eq!(d.codes, l.codes);
    for (got, want) in d.qparams.scales.iter().zip(&l.qparams.scales) {
        // (0.0123·s)/0.0123: two roundings, within 2 ulp of s.
        assert!(
            (got - want).abs() <= 2.0 * f32::EPSILON * want,
            "{got} vs {want}"
        );
    }
    for (got, want) in d.dequantized.iter().zip(&l.dequantized) {
        assert!(
            (got - want).abs() <= 2.0 * f32::EPSILON * want.abs(),
            "{got} vs {want}"
        );
    }
}
