//! What the writer and the decoder refuse, and the tied-embedding copy.

use super::*;

#[test]
fn tied_embeddings_get_an_lm_head_copy() {
    // vLLM-Ascend looks up desc["lm_head.weight"] for the tied ParallelLMHead too
    // (modelslim_config.py is_layer_skipped_ascend / get_linear_quant_type), and msModelSlim
    // V1 writes both tensors (BufferedSafetensorsWriter._dedupe_shared_storage).
    let mut spec = Spec::llama(DType::BF16, 1);
    spec.tensors.retain(|t| t.name != "lm_head.weight");
    spec.config["tie_word_embeddings"] = json!(true);
    let (root, src) = source(&spec);
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    let changed = values(128, 77);
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 20),
    )
    .unwrap();
    ex.tensor("model.embed_tokens.weight", &changed).unwrap();
    let o = quant_layer(
        &model,
        "model.layers.0.self_attn.o_proj",
        w8a16(Granularity::Channel),
        (0.0, 0),
    );
    ex.layer(&o).unwrap();
    ex.finish().unwrap();
    let w = Weights::open_with_index(&out, NAMING.index).unwrap();
    assert_eq!(
        w.raw_bytes("lm_head.weight").unwrap(),
        w.raw_bytes("model.embed_tokens.weight").unwrap()
    );
    assert_eq!(
        w.raw_bytes("lm_head.weight").unwrap(),
        &f32_to_dtype_bytes(&changed, DType::BF16).unwrap()[..]
    );
    let desc = description(&out);
    assert_eq!(desc["lm_head.weight"], "FLOAT");
    assert_eq!(desc["model_quant_type"], "W8A16");
    assert_eq!(desc["group_size"], 0);
}

#[test]
fn one_group_size_per_model() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &root.path().join("out"),
        &options(&model, 1 << 20),
    )
    .unwrap();
    let a = quant_layer(
        &model,
        "model.layers.0.self_attn.o_proj",
        w8a16(Granularity::Group(4)),
        (0.0, 0),
    );
    let b = quant_layer(
        &model,
        "model.layers.0.mlp.down_proj",
        w8a16(Granularity::Group(8)),
        (0.0, 0),
    );
    ex.layer(&a).unwrap();
    let e = ex.layer(&b).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.o_proj uses groups of 4 and model.layers.0.mlp.down_proj groups of 8"),
        "{e}"
    );
    // A group size that does not divide the input width cannot be stored.
    let c = quant_layer(
        &model,
        "model.layers.1.mlp.down_proj",
        w8a16(Granularity::Group(3)),
        (0.0, 0),
    );
    let e = ex.layer(&c).unwrap_err().to_string();
    assert!(e.contains("does not divide"), "{e}");
}

#[test]
fn fused_layers_need_one_type_and_one_input_scale() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let export = |layers: Vec<QuantLayer>| -> ExportError {
        let mut ex = begin(
            ExportFormat::Ascend,
            &model,
            &root.path().join("out"),
            &options(&model, 1 << 20),
        )
        .unwrap();
        for l in &layers {
            ex.layer(l).unwrap();
        }
        ex.finish().unwrap_err()
    };
    let q = |s, c| quant_layer(&model, "model.layers.0.self_attn.q_proj", s, c);
    let k = |s, c| quant_layer(&model, "model.layers.0.self_attn.k_proj", s, c);
    let v = |s, c| quant_layer(&model, "model.layers.0.self_attn.v_proj", s, c);
    // k and v stay FLOAT.
    let e = export(vec![q(w8a8(false), (0.01, 1))]).to_string();
    assert!(
        e.contains("q_proj is W8A8") && e.contains("FLOAT") && e.contains("fuses"),
        "{e}"
    );
    let e = export(vec![
        q(w8a8(false), (0.01, 1)),
        k(w8a8(false), (0.01, 2)),
        v(w8a8(false), (0.01, 1)),
    ])
    .to_string();
    assert!(e.contains("input scales") && e.contains("k_proj"), "{e}");
    assert!(!root.path().join("out").exists());
}

#[test]
fn a_layer_without_its_bias_or_calibration_is_refused() {
    let spec = with_bias(
        Spec::llama(DType::BF16, 1),
        "model.layers.0.self_attn.o_proj",
        8,
        5,
    );
    let (root, src) = source(&spec);
    let model = Model::open(&src).unwrap();
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &root.path().join("out"),
        &options(&model, 1 << 20),
    )
    .unwrap();
    let mut l = quant_layer(
        &model,
        "model.layers.0.self_attn.o_proj",
        w8a8(false),
        (0.01, 0),
    );
    l.bias = None;
    let e = ex.layer(&l).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.o_proj.bias"), "{e}");
    let mut l = quant_layer(
        &model,
        "model.layers.0.mlp.down_proj",
        w8a8(false),
        (0.01, 0),
    );
    l.input = None;
    let e = ex.layer(&l).unwrap_err().to_string();
    assert!(e.contains("down_proj") && e.contains("static input"), "{e}");
}

#[test]
fn detect_and_bad_descriptions() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let out = root.path().join("out");
    assert!(!detect(&src));
    begin(
        ExportFormat::Ascend,
        &model,
        &out,
        &options(&model, 1 << 20),
    )
    .unwrap()
    .finish()
    .unwrap();
    assert!(detect(&out));
    let ckpt = AscendCheckpoint::open(&out).unwrap();
    assert!(ckpt.quantized_layers().is_empty());
    assert_eq!(description(&out)["model_quant_type"], "FLOAT");

    let desc_path = out.join(DESCRIPTION_FILE);
    let original = description(&out);
    let reopen = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| -> String {
        let mut d = original.clone();
        edit(&mut d);
        fs::write(&desc_path, serde_json::to_vec(&d).unwrap()).unwrap();
        AscendCheckpoint::open(&out).unwrap_err().to_string()
    };
    let e = reopen(&|d| {
        d.remove("model_quant_type");
    });
    assert!(
        e.contains(DESCRIPTION_FILE) && e.contains("\"model_quant_type\""),
        "{e}"
    );
    let e = reopen(&|d| {
        d.insert("group_size".into(), json!(-1));
    });
    assert!(e.contains("\"group_size\""), "{e}");
    let e = reopen(&|d| {
        d.insert("model.layers.0.mlp.up_proj.weight".into(), json!("W4A16"));
    });
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("W4A16"),
        "{e}"
    );
    let e = reopen(&|d| {
        d.insert("model.extra.weight".into(), json!("FLOAT"));
    });
    assert!(
        e.contains("model.extra.weight") && e.contains("no weight file"),
        "{e}"
    );
    let e = reopen(&|d| {
        d.insert("kv_cache_type".into(), json!("C8"));
    });
    assert!(e.contains("kv_cache_type"), "{e}");
    fs::write(&desc_path, b"not json").unwrap();
    let e = AscendCheckpoint::open(&out).unwrap_err().to_string();
    assert!(
        e.contains(DESCRIPTION_FILE) && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn fp8_codes_are_not_written() {
    let (root, src) = source(&Spec::llama(DType::BF16, 1));
    let model = Model::open(&src).unwrap();
    let mut ex = begin(
        ExportFormat::Ascend,
        &model,
        &root.path().join("out"),
        &options(&model, 1 << 20),
    )
    .unwrap();
    let mut l = quant_layer(
        &model,
        "model.layers.0.mlp.down_proj",
        w8a16(Granularity::Channel),
        (0.0, 0),
    );
    l.scheme.weights.as_mut().unwrap().ty = QuantType::Float;
    l.codes = Codes::Fp8(vec![0; 128]);
    let e = ex.layer(&l).unwrap_err().to_string();
    assert!(e.contains("down_proj") && e.contains("FP8"), "{e}");
}

#[test]
fn one_group_size_per_model_is_checked_before_any_work() {
    // quant_model_description.json has a single `group_size` (msModelSlim ascendv1_saver).
    let layers = vec![
        ("a".to_string(), w8a16(Granularity::Group(64))),
        ("b".to_string(), w8a16(Granularity::Channel)),
        ("c".to_string(), w8a16(Granularity::Group(64))),
    ];
    crate::export::ascend::check_plan(&layers).unwrap();
    let mut mixed = layers;
    mixed.push(("d".to_string(), w8a16(Granularity::Group(128))));
    let e = crate::export::ascend::check_plan(&mixed).unwrap_err();
    assert!(
        e.contains("a uses groups of 64") && e.contains("d groups of 128"),
        "{e}"
    );
}
