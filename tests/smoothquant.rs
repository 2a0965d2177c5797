//! SmoothQuant end to end: the real `.so` through the ABI and the real CLI, on the bundled
//! stories260K (5 blocks, 8 heads / 4 KV heads) with 16 × 64 calibration windows of the
//! bundled TinyStories text and 40 evaluation windows of 256 tokens.
//!
//! - smoothing alone leaves the float model unchanged, and the written weights are exactly the
//!   fold `γ/s`, `W·diag(s)` (products `γ_j · W[r, j]` preserved);
//! - `o` is smoothed only where `v_proj` has one row per `o_proj` input (an MHA copy of the
//!   model), and skipped with a warning under grouped-query attention;
//! - SmoothQuant → RTN / GPTQ with the three MindIE activation schemes, against RTN alone;
//! - the round trip through the Ascend and compressed-tensors exports;
//! - parameter and scheme errors name the plugin and the key.
//!
//! The opt-in SmolLM2 accuracy table is `smollm2_accuracy_table` at the end (ignored).

use std::path::{Path, PathBuf};

use gs_host::export::open_checkpoint;
use gs_tests::*;
use serde_json::Value;

fn tinystories() -> PathBuf {
    root().join("assets/data/tinystories/tinystories-sample.txt")
}

/// One finished CLI run.
struct Run {
    out: PathBuf,
    report: Value,
    record: Value,
    stderr: String,
    _work: tempfile::TempDir,
}

impl Run {
    /// Sum of NLL at an evaluation point (`float`, `fake_quant`, `exported`).
    fn nll(&self, point: &str) -> f64 {
        self.entry(point, "nll_sum")
    }

    fn ppl(&self, point: &str) -> f64 {
        self.entry(point, "ppl")
    }

    fn entry(&self, point: &str, key: &str) -> f64 {
        self.report["perplexity"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["point"] == point))
            .and_then(|p| p[key].as_f64())
            .unwrap_or_else(|| panic!("no `{point}` {key} in {}", self.report))
    }

    /// The run record's entry of `layer`.
    fn layer(&self, layer: &str) -> &Value {
        self.record["layers"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["name"] == layer))
            .unwrap_or_else(|| panic!("{layer} not in gs-run.json"))
    }

    /// The metric `key` of `layer` reported by `algorithm`.
    fn metric(&self, layer: &str, algorithm: &str, key: &str) -> Option<f64> {
        self.layer(layer)["metrics"]
            .as_array()?
            .iter()
            .find(|m| m["algorithm"] == algorithm && m["key"] == key)
            .and_then(|m| m["value"].as_f64())
    }

    /// The calibrated static input scale of `layer`.
    fn input_scale(&self, layer: &str) -> f64 {
        self.layer(layer)["input"]["scale"]
            .as_f64()
            .unwrap_or_else(|| panic!("{layer} has no static input scale"))
    }

    /// A tensor of the written checkpoint, decoded.
    fn tensor(&self, name: &str) -> Vec<f32> {
        read_tensor(&self.out, name)
    }
}

fn read_tensor(dir: &Path, name: &str) -> Vec<f32> {
    let ckpt = open_checkpoint(dir).unwrap();
    ckpt.tensor_f32(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not in {}", dir.display()))
        .values
        .into_owned()
}

/// Runs `gs-host run` on `model` with the `[quant]` body `quant`, the `[[pipeline]]` blocks
/// `pipeline`, export `format`, and every evaluation point; panics with stderr on failure.
fn run(model: &Path, quant: &str, pipeline: &str, format: &str) -> Run {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(work.path(), &manifest(model, quant, pipeline, format, &out));
    let o = gs_host(work.path(), &["run", "--manifest", &m.to_string_lossy()]);
    assert!(
        o.status.success(),
        "{quant} / {pipeline} / {format}: {}",
        stderr(&o)
    );
    let json = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(f)).unwrap()).unwrap()
    };
    Run {
        report: json("report.json"),
        record: json("gs-run.json"),
        stderr: stderr(&o),
        out,
        _work: work,
    }
}

fn manifest(model: &Path, quant: &str, pipeline: &str, format: &str, out: &Path) -> String {
    format!(
        "[model]\npath = \"{}\"\n[calibration]\ndataset = \"{data}\"\nnsamples = 16\nseqlen = 64\n\
         [quant]\n{quant}\n{pipeline}\n[export]\nformat = \"{format}\"\noutput = \"{}\"\n\
         [eval]\ndataset = \"{data}\"\nseqlen = 256\nwindows = 40\n",
        model.display(),
        out.display(),
        data = tinystories().display(),
    )
}

fn sq(params: &str) -> String {
    format!("[[pipeline]]\nalgorithm = \"smoothquant\"\nparams = {{ {params} }}\n")
}

const RTN: &str = "[[pipeline]]\nalgorithm = \"rtn\"\n";
const GPTQ: &str = "[[pipeline]]\nalgorithm = \"gptq\"\n\
                    params = { damp = 0.01, act_order = true, static_groups = true }\n";
const ALL_SUBSETS: &str = "subsets = [\"qkv\", \"o\", \"gate_up\", \"down\"]";

fn layer(block: usize, module: &str) -> String {
    format!("model.layers.{block}.{module}")
}

/// `max |a − b| / max |b|`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Checks that `(prev, w)` in `out` is the fold of `(prev, w)` in `src` by one positive factor
/// per channel: `prev'_j · W'[r, j] == prev_j · W[r, j]` (the factor cancels) and that the
/// factors are not all 1. `per_channel`: the prev_op's values per channel (1 for a norm).
fn assert_folded(src: &Path, out: &Path, prev: &str, w: &str, per_channel: usize) {
    let (p0, p1) = (read_tensor(src, prev), read_tensor(out, prev));
    let (w0, w1) = (read_tensor(src, w), read_tensor(out, w));
    let k = p0.len() / per_channel; // channels
    let per = |p: &[f32], wv: &[f32]| -> Vec<f32> {
        // every product prev[j, c] · W[r, j]
        let mut v = Vec::new();
        for j in 0..k {
            for c in 0..per_channel {
                for r in 0..wv.len() / k {
                    v.push(p[j * per_channel + c] * wv[r * k + j]);
                }
            }
        }
        v
    };
    assert!(
        rel_diff(&per(&p1, &w1), &per(&p0, &w0)) < 1e-5,
        "{prev} · {w} changed"
    );
    assert!(rel_diff(&p1, &p0) > 1e-3, "{prev} was not smoothed");
    assert!(rel_diff(&w1, &w0) > 1e-3, "{w} was not smoothed");
}

#[test]
fn smoothing_alone_leaves_the_float_model_unchanged() {
    // No quantizing stage and the fake format: nothing is quantized (the quantized formats
    // would refuse the unquantized layers), so `fake_quant` is the smoothed float model.
    let model = stories260k();
    let r = run(
        &model,
        "scheme = \"w8a8\"",
        &sq(&format!("alpha = 0.5, {ALL_SUBSETS}")),
        "fake",
    );
    let (float, smoothed) = (r.nll("float"), r.nll("fake_quant"));
    assert!(
        (smoothed - float).abs() <= 1e-5 * float,
        "float NLL {float} vs smoothed {smoothed}"
    );
    assert_eq!(r.nll("exported").to_bits(), smoothed.to_bits());
    assert!(r.layer(&layer(0, "self_attn.q_proj"))["input"].is_null());
    // stories260K has 4 KV heads for 8 heads: `o` cannot take the fold, and says so once.
    assert_eq!(
        r.stderr.matches("subset `o` is not smoothed").count(),
        1,
        "{}",
        r.stderr
    );
    for b in 0..5 {
        for w in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
            assert_folded(
                &model,
                &r.out,
                &layer(b, "input_layernorm.weight"),
                &layer(b, &format!("{w}.weight")),
                1,
            );
        }
        assert_folded(
            &model,
            &r.out,
            &layer(b, "post_attention_layernorm.weight"),
            &layer(b, "mlp.gate_proj.weight"),
            1,
        );
        // o: untouched (GQA).
        assert_eq!(
            read_tensor(&r.out, &layer(b, "self_attn.o_proj.weight")),
            read_tensor(&model, &layer(b, "self_attn.o_proj.weight"))
        );
    }
    // down alone (up_proj's columns then keep their source values): up_proj's rows are
    // divided by the factors of down_proj's columns.
    let r = run(
        &model,
        "scheme = \"w8a8\"",
        &sq("subsets = [\"down\"]"),
        "fake",
    );
    let (float, smoothed) = (r.nll("float"), r.nll("fake_quant"));
    assert!(
        (smoothed - float).abs() <= 1e-5 * float,
        "{float} vs {smoothed}"
    );
    for b in 0..5 {
        assert_folded(
            &model,
            &r.out,
            &layer(b, "mlp.up_proj.weight"),
            &layer(b, "mlp.down_proj.weight"),
            64,
        );
    }
}

/// A copy of stories260K with multi-head instead of grouped-query attention: each of the 4 KV
/// heads' `k_proj`/`v_proj` rows repeated for the 2 query heads that share it (transformers'
/// `repeat_kv`: query head `h` reads KV head `h / 2`). The model computes the same function.
fn mha_copy(dir: &Path) -> PathBuf {
    let dst = copy_model(dir);
    let bytes = std::fs::read(stories260k().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (head_dim, heads, kv_heads, hidden) = (8, 8, 4, 64);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data().to_vec();
        if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            assert_eq!(view.shape(), [kv_heads * head_dim, hidden]);
            let row = hidden * 4; // bytes of one f32 row
            let mut out = Vec::with_capacity(heads * head_dim * row);
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                out.extend_from_slice(&data[kv * head_dim * row..(kv + 1) * head_dim * row]);
            }
            tensors.push((name, vec![heads * head_dim, hidden], out));
        } else {
            tensors.push((name, view.shape().to_vec(), data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(views, meta, &dst.join("model.safetensors")).unwrap();
    let cfg_path = dst.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["num_key_value_heads"] = serde_json::json!(heads);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dst
}

#[test]
fn o_is_smoothed_through_v_proj_when_every_head_has_its_own_value_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = mha_copy(&dir.path().join("mha"));
    let r = run(
        &model,
        "scheme = \"w8a8\"",
        &sq("subsets = [\"o\"]"),
        "fake",
    );
    // The MHA copy is the same model (its float perplexity is stories260K's 4.2873) ...
    assert!((r.ppl("float") - 4.2873).abs() < 5e-5, "{}", r.ppl("float"));
    // ... and smoothing o through v_proj's rows leaves it unchanged.
    let (float, smoothed) = (r.nll("float"), r.nll("fake_quant"));
    assert!(
        (smoothed - float).abs() <= 1e-5 * float,
        "{float} vs {smoothed}"
    );
    assert!(!r.stderr.contains("not smoothed"), "{}", r.stderr);
    for b in 0..5 {
        assert_folded(
            &model,
            &r.out,
            &layer(b, "self_attn.v_proj.weight"),
            &layer(b, "self_attn.o_proj.weight"),
            64,
        );
        // Nothing else moved.
        for t in ["input_layernorm.weight", "self_attn.q_proj.weight"] {
            assert_eq!(
                read_tensor(&r.out, &layer(b, t)),
                read_tensor(&model, &layer(b, t))
            );
        }
    }
}

const SMOOTHED: [&str; 6] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[test]
fn smoothquant_then_rtn_with_static_per_tensor_activations() {
    // MindIE O3 / Ascend W8A8: int8 per-channel weights, static per-tensor asymmetric int8
    // activations with a calibrated scale and offset.
    let model = stories260k();
    let quant = "scheme = \"w8a8\"";
    let rtn = run(&model, quant, RTN, "fake");
    let subsets = "subsets = [\"qkv\", \"gate_up\", \"down\"]";
    let smoothed = run(
        &model,
        quant,
        &format!("{}{RTN}", sq(&format!("alpha = 0.5, {subsets}"))),
        "fake",
    );
    // What smoothing is for: the largest input magnitude of every smoothed layer shrinks, and
    // with it the static scale calibrated after the pipeline (block 0 sees the same input in
    // both runs; later blocks nearly the same).
    for b in 0..5 {
        for l in SMOOTHED {
            let name = layer(b, l);
            let before = smoothed
                .metric(&name, "smoothquant", "input_absmax_before")
                .unwrap();
            let after = smoothed
                .metric(&name, "smoothquant", "input_absmax_after")
                .unwrap();
            assert!(after < before, "{name}: {before} → {after}");
            let (s_rtn, s_sq) = (rtn.input_scale(&name), smoothed.input_scale(&name));
            assert!(s_sq < s_rtn, "{name}: static scale {s_rtn} → {s_sq}");
        }
    }
    // On stories260K static W8A8 costs little (4.2873 → 4.3236 with RTN). Smoothing qkv,
    // gate_up and down at α = 0.5 gives 4.3178; the default subsets alone (qkv, gate_up) give
    // 4.3274, no better than RTN on this tiny model (measured; see the report).
    let (p_rtn, p_sq) = (rtn.ppl("fake_quant"), smoothed.ppl("fake_quant"));
    assert!(p_sq < p_rtn, "SQ+RTN {p_sq} vs RTN {p_rtn}");
    assert_eq!(
        smoothed.nll("exported").to_bits(),
        smoothed.nll("fake_quant").to_bits()
    );
}

#[test]
fn smoothquant_then_gptq_with_per_token_dynamic_activations() {
    // MindIE O1 / W8A8_DYNAMIC: per-token dynamic activations. Nearly lossless on
    // stories260K whatever the pipeline (RTN 4.2914, SQ 0.8 → GPTQ 4.2941 against float
    // 4.2873): the check is that the composed pipeline stays there.
    let model = stories260k();
    let r = run(
        &model,
        "scheme = \"w8a8_dynamic\"",
        &format!("{}{GPTQ}", sq("alpha = 0.8")),
        "fake",
    );
    let (float, q) = (r.ppl("float"), r.ppl("fake_quant"));
    assert!(q > float && q < 1.005 * float, "float {float}, SQ+GPTQ {q}");
    // GPTQ saw the smoothed weights: its loss is reported for every layer after the fold.
    for b in 0..5 {
        for l in SMOOTHED.iter().filter(|l| **l != "mlp.down_proj") {
            let name = layer(b, l);
            assert!(r.metric(&name, "smoothquant", "smooth_scale_max").is_some());
            assert!(r.metric(&name, "gptq", "gptq_loss").is_some(), "{name}");
        }
    }
}

#[test]
fn per_tensor_dynamic_activations_run_end_to_end_in_the_fake_format_only() {
    // MindIE O2: one scale per tensor computed at run time. gs-host simulates it and the fake
    // format records it; neither quantized format can store it.
    let model = stories260k();
    let quant = "scheme = \"w8a8\"\nactivations = { dynamic = true, granularity = \"tensor\" }";
    let pipeline = format!("{}{RTN}", sq("alpha = 0.5"));
    let r = run(&model, quant, &pipeline, "fake");
    let input = &r.layer(&layer(2, "mlp.down_proj"))["input"];
    assert_eq!(input["dynamic"], true);
    assert_eq!(input["granularity"], "tensor");
    let (float, q) = (r.ppl("float"), r.ppl("fake_quant"));
    assert!(q > float && q < 1.02 * float, "float {float}, O2 {q}");
    assert_eq!(r.nll("exported").to_bits(), r.nll("fake_quant").to_bits());
    for format in ["compressed-tensors", "ascend"] {
        let work = tempfile::tempdir().unwrap();
        let m = write_manifest(
            work.path(),
            &manifest(&model, quant, &pipeline, format, &work.path().join("o")),
        );
        let o = gs_host(work.path(), &["check", "--manifest", &m.to_string_lossy()]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{format} accepted per-tensor dynamic");
        assert!(e.contains(format) && e.contains("dynamic"), "{format}: {e}");
    }
}

#[test]
fn smoothed_checkpoints_round_trip_through_ascend_and_compressed_tensors() {
    // The exported checkpoint (smoothed norms + quantized layers) decodes to exactly what was
    // evaluated: the reloaded perplexity equals the fake-quant one bit for bit.
    let model = stories260k();
    let cases = [
        ("ascend", "scheme = \"w8a8\""),
        (
            "ascend",
            "scheme = \"w8a8\"\nactivations = { symmetric = true }",
        ),
        (
            "ascend",
            "scheme = \"w8a8_dynamic\"\nactivations = { scale_rule = \"qmax\" }",
        ),
        ("compressed-tensors", "scheme = \"w8a8\""),
        ("compressed-tensors", "scheme = \"w8a8_dynamic\""),
    ];
    for (format, quant) in cases {
        let r = run(
            &model,
            quant,
            &format!("{}{RTN}", sq(&format!("alpha = 0.8, {ALL_SUBSETS}"))),
            format,
        );
        assert_eq!(
            r.nll("exported").to_bits(),
            r.nll("fake_quant").to_bits(),
            "{format} {quant}: exported {} vs fake_quant {}",
            r.ppl("exported"),
            r.ppl("fake_quant")
        );
        // The smoothed norm is what the checkpoint holds.
        let norm = layer(3, "post_attention_layernorm.weight");
        let (src, out) = (read_tensor(&model, &norm), r.tensor(&norm));
        assert!(rel_diff(&out, &src) > 1e-3, "{format}: {norm} not smoothed");
        assert!(
            r.ppl("fake_quant") < 1.05 * r.ppl("float"),
            "{format} {quant}"
        );
    }
}

#[test]
fn bad_parameters_and_schemes_are_refused_naming_the_plugin_and_the_key() {
    let model = stories260k();
    let check = |quant: &str, pipeline: &str, cmd: &str| -> String {
        let work = tempfile::tempdir().unwrap();
        let m = write_manifest(
            work.path(),
            &manifest(&model, quant, pipeline, "fake", &work.path().join("o")),
        );
        let o = gs_host(work.path(), &[cmd, "--manifest", &m.to_string_lossy()]);
        assert!(!o.status.success(), "{pipeline} accepted");
        stderr(&o)
    };
    let e = check("scheme = \"w8a8\"", &sq("alpha = 1.2"), "check");
    assert!(
        e.contains("smoothquant") && e.contains("`alpha`") && e.contains("[0, 1]"),
        "{e}"
    );
    let e = check(
        "scheme = \"w8a8\"",
        &sq("subsets = [\"qkv\", \"attn\"]"),
        "check",
    );
    assert!(
        e.contains("smoothquant") && e.contains("`subsets`") && e.contains("\"attn\""),
        "{e}"
    );
    // A weight-only scheme: smoothing cannot help it, and the run says which key to change.
    let e = check("scheme = \"w8a16\"", &format!("{}{RTN}", sq("")), "run");
    assert!(
        e.contains("smoothquant")
            && e.contains("weights only")
            && e.contains("`subsets`")
            && e.contains("w8a8"),
        "{e}"
    );
    // Data-free: the input maxima need calibration data.
    let work = tempfile::tempdir().unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[quant]\nscheme = \"w8a8_dynamic\"\n{}\
         [export]\nformat = \"fake\"\noutput = \"{}\"\n",
        model.display(),
        sq(""),
        work.path().join("o").display()
    );
    let m = write_manifest(work.path(), &text);
    let o = gs_host(work.path(), &["check", "--manifest", &m.to_string_lossy()]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("smoothquant") && e.contains("[calibration]"),
        "{e}"
    );
}

#[test]
fn gs_host_plugins_lists_smoothquant() {
    let work = tempfile::tempdir().unwrap();
    let o = gs_host(work.path(), &["plugins"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains("gs-smoothquant") && out.contains("algorithm:  smoothquant:"),
        "{out}"
    );
    assert!(smoothquant_plugin().exists());
}

/// Opt-in table on SmolLM2-135M (`GS_SMOLLM2_DIR`): SmoothQuant variants under static and
/// dynamic W8A8. The bars are in `tests/accuracy.rs`; this prints more rows, among them
/// SmoothQuant with llm-compressor's GPTQ settings, held to its recipe (d)'s 29.1687, and static
/// W8A8 held to msModelSlim's anti-outlier m2 figure (44.5374).
#[test]
#[ignore = "needs GS_SMOLLM2_DIR with the SmolLM2-135M shards; minutes in release"]
fn smollm2_accuracy_table() {
    let gptq = "[[pipeline]]\nalgorithm = \"gptq\"\n\
                params = { damp = 0.01, act_order = true, static_groups = true }\n";
    let down = "subsets = [\"qkv\", \"gate_up\", \"down\"]";
    let static_asym = "scheme = \"w8a8\"";
    let dynamic = "scheme = \"w8a8_dynamic\"";
    let runs: Vec<(&str, &str, String)> = vec![
        ("RTN, static per-tensor asym", static_asym, RTN.to_string()),
        (
            "SQ 0.5 (qkv, gate_up) + RTN, static",
            static_asym,
            format!("{}{RTN}", sq("alpha = 0.5")),
        ),
        (
            "SQ 0.8 (qkv, gate_up, down) + RTN, static",
            static_asym,
            format!("{}{RTN}", sq(&format!("alpha = 0.8, {down}"))),
        ),
        (
            "SQ 0.8 (qkv, gate_up) + GPTQ (act, static groups), token dynamic",
            dynamic,
            format!("{}{gptq}", sq("alpha = 0.8")),
        ),
    ];
    println!("| run | PPL | wall |\n|---|---|---|");
    let table: Vec<f64> = runs
        .iter()
        .map(|(label, quant, pipeline)| smollm2_fake_quant_ppl(label, quant, pipeline))
        .collect();
    let (rtn_static, sq_static, sq_gptq) = (table[0], table[2], table[3]);
    assert!(
        sq_static < 44.5374 && sq_static < 0.75 * rtn_static,
        "static W8A8: SQ {sq_static} vs RTN {rtn_static} (msModelSlim m2: 44.5374)"
    );
    assert!(
        sq_gptq <= 29.1687,
        "SQ + GPTQ W8A8 dynamic {sq_gptq} > llm-compressor's 29.1687"
    );
}
