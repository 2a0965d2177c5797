//! AWQ end to end, through the real `gs_awq` plugin and the real CLI on stories260K: the scales
//! alone leave the float model unchanged, AWQ loses less than RTN, AWQ then GPTQ loses less than
//! GPTQ alone. The opt-in SmolLM2 accuracy table is at the end.
//!
//! Calibration: the 16 × 64 reference windows (`shared/reference/calib`); evaluation: the
//! bundled TinyStories sample. stories260K has 64 inputs everywhere but down_proj (172 = 4·43),
//! so its W4A16 uses groups of 32, and of 43 for down_proj.

use std::path::{Path, PathBuf};

use gs_tests::*;

/// `shared/` beside the repository (CI checks it out there too).
fn shared() -> PathBuf {
    root().join("../shared")
}

fn tinystories() -> PathBuf {
    root().join("assets/data/tinystories/tinystories-sample.txt")
}

/// Int4 symmetric, groups of 32 (43 for down_proj's 172 inputs).
const W4_G32: &str = "scheme = \"w4a16\"\nweights = { group_size = 32 }\n\n[[quant.override]]\npattern = 'down_proj'\nweights = { group_size = 43 }";

/// Runs `pipeline` (`[[pipeline]]` blocks) on the bundled model with the reference windows and
/// `quant` (the `[quant]` body), writes `format` and evaluates `points` on 80 windows of 256
/// tokens; returns report.json and the output directory.
fn run(
    work: &Path,
    quant: &str,
    pipeline: &str,
    format: &str,
    points: &str,
) -> (serde_json::Value, PathBuf) {
    let out = work.join("out");
    let text = format!(
        r#"[model]
path = "{model}"

[calibration]
dataset = "{calib}"
nsamples = 16
seqlen = 64

[quant]
{quant}

{pipeline}

[export]
format = "{format}"
output = "{out}"

[eval]
dataset = "{eval}"
seqlen = 256
windows = 80
points = [{points}]
"#,
        model = stories260k().display(),
        calib = shared()
            .join("reference/calib/stories260K-tinystories-16x64.json")
            .display(),
        out = out.display(),
        eval = tinystories().display(),
    );
    let m = write_manifest(work, &text);
    let o = gs_host(work, &["--manifest", m.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{pipeline}: {}", stderr(&o));
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (report, out)
}

/// The summed NLL of one evaluation point of a report.
fn nll(report: &serde_json::Value, point: &str) -> f64 {
    report["perplexity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == point)
        .unwrap_or_else(|| panic!("no {point} in {report}"))["nll_sum"]
        .as_f64()
        .unwrap()
}

/// The fake-quant NLL of `pipeline` with `quant`, written in the fake format.
fn fake_quant_nll(quant: &str, pipeline: &str) -> f64 {
    let work = tempfile::tempdir().unwrap();
    let (report, _) = run(work.path(), quant, pipeline, "fake", "\"fake_quant\"");
    nll(&report, "fake_quant")
}

/// One f32 tensor of a single-file safetensors model.
fn tensor(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const AWQ: &str = "[[pipeline]]\nalgorithm = \"awq\"";
const RTN: &str = "[[pipeline]]\nalgorithm = \"rtn\"";
const GPTQ: &str = "[[pipeline]]\nalgorithm = \"gptq\"";
const AWQ_FLOAT: &str = "[[pipeline]]\nalgorithm = \"awq\"\nparams = { quantize = false }";

#[test]
fn awq_scales_alone_leave_the_float_model_unchanged() {
    // No quantization, no clipping: only s and 1/s folded into the norms and up_proj. The fake
    // format leaves the layers no stage quantized in float, so the output is the scaled float
    // model, which must compute what the source does.
    let work = tempfile::tempdir().unwrap();
    let (report, out) = run(
        work.path(),
        W4_G32,
        "[[pipeline]]\nalgorithm = \"awq\"\nparams = { quantize = false, clip = false }",
        "fake",
        "\"float\", \"fake_quant\", \"exported\"",
    );
    let (float, fake, exported) = (
        nll(&report, "float"),
        nll(&report, "fake_quant"),
        nll(&report, "exported"),
    );
    assert_eq!(fake.to_bits(), exported.to_bits());
    // Only f32 rounding of the rescaled weights separates them.
    assert!(
        (fake - float).abs() <= 1e-6 * float,
        "NLL {fake} vs float {float}"
    );
    // And the scales were applied: the norms and the layers they feed changed.
    for (name, moved) in [
        ("model.layers.0.input_layernorm.weight", true),
        ("model.layers.2.post_attention_layernorm.weight", true),
        ("model.layers.2.mlp.up_proj.weight", true),
        ("model.layers.2.mlp.down_proj.weight", true),
        ("model.layers.2.self_attn.q_proj.weight", true),
        // o_proj: v_proj has 32 rows for its 64 inputs (grouped-query attention), not scaled.
        ("model.layers.2.self_attn.o_proj.weight", false),
    ] {
        let (a, b) = (tensor(&stories260k(), name), tensor(&out, name));
        assert_eq!(a.len(), b.len());
        assert_eq!(a != b, moved, "{name}");
    }
}

#[test]
fn awq_beats_rtn_on_stories260k() {
    let rtn = fake_quant_nll(W4_G32, RTN);
    let awq = fake_quant_nll(W4_G32, AWQ);
    let no_clip = fake_quant_nll(
        W4_G32,
        "[[pipeline]]\nalgorithm = \"awq\"\nparams = { clip = false }",
    );
    let asym = fake_quant_nll(
        &W4_G32
            .replace("group_size = 32 }", "group_size = 32, symmetric = false }")
            .replace("group_size = 43 }", "group_size = 43, symmetric = false }"),
        AWQ,
    );
    let asym_rtn = fake_quant_nll(
        &W4_G32
            .replace("group_size = 32 }", "group_size = 32, symmetric = false }")
            .replace("group_size = 43 }", "group_size = 43, symmetric = false }"),
        RTN,
    );
    eprintln!("stories260K W4 g32 NLL sums: RTN {rtn}, AWQ {awq}, AWQ without clipping {no_clip}; asymmetric: RTN {asym_rtn}, AWQ {asym}");
    assert!(awq < rtn, "AWQ {awq} is not below RTN {rtn}");
    assert!(no_clip < rtn, "AWQ without clipping {no_clip} vs RTN {rtn}");
    assert!(asym < asym_rtn, "asymmetric AWQ {asym} vs RTN {asym_rtn}");
}

#[test]
fn awq_then_gptq_helps_gptq_with_min_max_group_scales_on_stories260k_at_3_bits() {
    // At 4 bits (groups of 32) AWQ→GPTQ and GPTQ tie on this model. At 3 bits the AWQ scales
    // help GPTQ when GPTQ fits its group scales by min/max (`mse_grid = 0`). With GPTQ's
    // default range search, GPTQ alone is better here (printed, not asserted; the SmolLM2
    // comparison is the opt-in `tests/accuracy.rs`).
    let w3 = W4_G32.replace("{ group_size = 32 }", "{ bits = 3, group_size = 32 }");
    let plain = "[[pipeline]]\nalgorithm = \"gptq\"\nparams = { mse_grid = 0 }";
    let gptq = fake_quant_nll(&w3, plain);
    let awq_gptq = fake_quant_nll(&w3, &format!("{AWQ_FLOAT}\n\n{plain}"));
    let gptq_default = fake_quant_nll(&w3, GPTQ);
    let awq_gptq_default = fake_quant_nll(&w3, &format!("{AWQ_FLOAT}\n\n{GPTQ}"));
    let rtn = fake_quant_nll(&w3, RTN);
    eprintln!(
        "stories260K W3 g32 NLL sums: RTN {rtn}; min/max GPTQ {gptq}, AWQ→GPTQ {awq_gptq}; \
         default GPTQ {gptq_default}, AWQ→GPTQ {awq_gptq_default}"
    );
    assert!(
        awq_gptq < gptq,
        "AWQ→GPTQ {awq_gptq} is not below GPTQ {gptq} (mse_grid = 0)"
    );
    assert!(
        awq_gptq_default < rtn,
        "AWQ→GPTQ {awq_gptq_default} vs RTN {rtn}"
    );
}

#[test]
fn awq_refuses_a_scheme_it_cannot_serve_naming_the_layer() {
    let work = tempfile::tempdir().unwrap();
    let m = write_manifest(
        work.path(),
        &manifest_text(&stories260k(), &work.path().join("out"), AWQ).replace(
            "[quant]",
            &format!(
                "[calibration]\ndataset = \"{}\"\nnsamples = 2\nseqlen = 32\n\n[quant]",
                tinystories().display()
            ),
        ),
    );
    // manifest_text's scheme is per-channel int4.
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("awq: model.layers.0.self_attn.q_proj")
            && e.contains("per channel")
            && e.contains("group_size"),
        "{e}"
    );
    // Bad parameters are refused by `check`, before any work, naming the plugin and the key.
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &work.path().join("out"),
            "[[pipeline]]\nalgorithm = \"awq\"\nparams = { max_shrink = 1.5 }",
        ),
    );
    let o = gs_host(work.path(), &["check", "--manifest", m.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("gs-awq") && e.contains("max_shrink"), "{e}");
}

#[test]
fn gs_host_plugins_lists_awq() {
    let o = gs_host(&root(), &["plugins"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("gs-awq") && s.contains("awq"), "{s}");
}

/// Opt-in table on SmolLM2-135M (`GS_SMOLLM2_DIR`): W4A16 g64 with RTN, AWQ, GPTQ and
/// AWQ→GPTQ; `GS_AWQ_TABLE=full` adds the duo-scaling and clipping variants. The bars are in
/// `tests/accuracy.rs`; this prints the rows for exploring AWQ's parameters.
#[test]
#[ignore = "needs GS_SMOLLM2_DIR and several minutes in release"]
fn smollm2_w4a16_g64_accuracy_table() {
    let mut rows = vec![
        ("rtn", RTN.to_string()),
        ("awq", AWQ.to_string()),
        ("gptq", GPTQ.to_string()),
        ("awq→gptq", format!("{AWQ_FLOAT}\n\n{GPTQ}")),
    ];
    if std::env::var("GS_AWQ_TABLE").as_deref() == Ok("full") {
        for (name, params) in [
            ("awq duo_scaling", "duo_scaling = true"),
            ("awq clip = false", "clip = false"),
            ("awq duo, clip = false", "duo_scaling = true, clip = false"),
        ] {
            rows.push((
                name,
                format!("[[pipeline]]\nalgorithm = \"awq\"\nparams = {{ {params} }}"),
            ));
        }
    }
    println!("| pipeline | PPL (WikiText-2 test, 40 × 512) | wall |\n|---|---|---|");
    for (name, pipeline) in rows {
        smollm2_fake_quant_ppl(
            name,
            "scheme = \"w4a16\"\nweights = { group_size = 64 }",
            &pipeline,
        );
    }
}
