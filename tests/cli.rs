//! End-to-end runs of the real `gs-host` binary with real plugin `.so` files.

use std::path::{Path, PathBuf};

use gs_host::manifest::Manifest;
use gs_tests::*;
use safetensors::SafeTensors;

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Every tensor of a single-file f32 checkpoint.
fn read_f32_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), f32s(t.data())))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn is_block_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

#[test]
fn quickstart_quantizes_the_bundled_model_through_the_plugin_abi() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let manifest = work.path().join("quickstart.toml");
    // The shipped quickstart, pointed at the bundled model and a temporary output.
    let text = std::fs::read_to_string(root().join("examples/quickstart.toml"))
        .unwrap()
        .replace(
            "../assets/models/stories260K",
            &stories260k().display().to_string(),
        )
        .replace("../out/quickstart", &out.display().to_string())
        .replace("../assets/", &format!("{}/assets/", root().display()));
    std::fs::write(&manifest, text).unwrap();
    let before = tree_digest(&stories260k());

    let o = gs_host(work.path(), &["--manifest", manifest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("35 layers quantized"), "{}", stdout(&o));
    assert_eq!(
        tree_digest(&stories260k()),
        before,
        "the source model changed"
    );

    // The output is compressed-tensors: decoded, every block linear equals the shared
    // primitive applied with the manifest's scheme (exactly: the model is f32, so scales are
    // stored in f32 and no dtype rounding intervenes); every other tensor is byte-identical.
    let plan = Manifest::load(&manifest).unwrap().plan;
    let src = read_f32_tensors(&stories260k());
    let ckpt = gs_host::export::open_checkpoint(&out).unwrap();
    let mut quantized = 0;
    for (name, shape, w) in &src {
        let q = ckpt
            .tensor_f32(name)
            .unwrap()
            .expect("tensor in the output");
        assert_eq!(&q.shape, shape, "{name}");
        if is_block_linear(name) {
            let layer = name.trim_end_matches(".weight");
            let args = plan.scheme_for(layer).weights.expect("quantized");
            let (expected, _) = gs_quant::fake_quantize(w, shape[0], shape[1], &args).unwrap();
            // Equal as numbers: the output holds `(q − zp)·s` of the integer codes, where
            // fake_quantize keeps the sign of a negative value that rounds to 0 (−0.0).
            assert!(
                expected.iter().zip(q.values.iter()).all(|(a, b)| a == b),
                "{name} differs from gs_quant::fake_quantize"
            );
            assert_ne!(&w[..], &q.values[..], "{name} was not quantized");
            quantized += 1;
        } else {
            assert!(
                w.iter()
                    .zip(q.values.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} changed"
            );
        }
    }
    assert_eq!(quantized, 35);
    // The down_proj override (per-channel) took effect: one scale per row → at most 16
    // distinct magnitudes per row of int4 values.
    for file in [
        "config.json",
        "tokenizer.json",
        "LICENSE",
        "gs-run.json",
        "report.json",
        "report.svg",
        "model.safetensors.index.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing from the output");
    }
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("gs-run.json")).unwrap()).unwrap();
    assert_eq!(run["pipeline"][0]["algorithm"], "rtn");
    assert_eq!(run["pipeline"][0]["plugin"], "gs-rtn");
}

#[test]
fn the_frozen_v1_plugin_loads_and_runs_in_todays_host() {
    let so = fixture("plugin-v1", "gs_fixture_v1");
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(&so, lib_file(&plugins, "gs_fixture_v1")).unwrap();
    let out = work.path().join("out");
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &out,
            "[[pipeline]]\nalgorithm = \"v1_grid\"",
        ),
    );

    let o = gs_host(work.path(), &["plugins", "--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = stdout(&o);
    assert!(
        listing.contains("gs-fixture-v1") && listing.contains("gs-plugin-api 1.0.0"),
        "{listing}"
    );

    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for ((name, _, w), (_, _, q)) in read_f32_tensors(&stories260k())
        .iter()
        .zip(read_f32_tensors(&out).iter())
    {
        if is_block_linear(name) {
            let expected: Vec<f32> = w
                .iter()
                .map(|v| (v * 64.0).round_ties_even() / 64.0)
                .collect();
            assert_eq!(&expected, q, "{name}");
        }
    }
}

/// Runs one misbehaving algorithm on a copy of the model; returns stderr after checking that
/// the run failed, left no output behind and did not touch the source.
fn run_failing(algorithm: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    let out = work.path().join("out");
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &model,
            &out,
            &format!("[[pipeline]]\nalgorithm = \"{algorithm}\""),
        ),
    );
    let dir = misbehave_plugin().parent().unwrap().to_str().unwrap();
    let o = gs_host(
        work.path(),
        &["--manifest", m.to_str().unwrap(), "--plugin-dir", dir],
    );
    assert!(!o.status.success(), "{algorithm} should fail");
    assert!(!out.exists(), "{algorithm}: output left behind");
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "model" && n != "run.toml")
        .collect();
    assert!(leftovers.is_empty(), "{algorithm}: left {leftovers:?}");
    assert_eq!(tree_digest(&model), before, "{algorithm}: source changed");
    // 1 = a reported error; a panicking host would exit with 101, an abort with a signal.
    assert_eq!(o.status.code(), Some(1), "{algorithm}: {}", stderr(&o));
    stderr(&o)
}

#[test]
fn a_panicking_plugin_is_an_error_naming_it() {
    let e = run_failing("test_panic");
    assert!(
        e.contains("gs-test-misbehave")
            && e.contains("test_panic")
            && e.contains("deliberate panic in block 0"),
        "{e}"
    );
    let e = run_failing("test_panic_create");
    assert!(
        e.contains("gs-test-misbehave") && e.contains("deliberate panic while parsing"),
        "{e}"
    );
}

#[test]
fn a_nan_result_is_refused_even_when_the_plugin_ignores_the_refusal() {
    let e = run_failing("test_nan");
    assert!(
        e.contains("test_nan") && e.contains("NaN") && e.contains("finite"),
        "{e}"
    );
    assert!(e.contains("model.layers.0.self_attn.q_proj"), "{e}");
}

#[test]
fn a_wrong_shape_result_is_refused() {
    let e = run_failing("test_wrong_shape");
    assert!(
        e.contains("test_wrong_shape") && e.contains("expected 4096 values, got 4095"),
        "{e}"
    );
}

#[test]
fn a_plugin_that_writes_into_a_read_only_tensor_is_refused() {
    let e = run_failing("test_write_readonly");
    assert!(
        e.contains("test_write_readonly")
            && e.contains("wrote into the weight of model.layers.0.self_attn.k_proj")
            && e.contains("read-only"),
        "{e}"
    );
}

#[test]
fn plugin_log_messages_are_rate_limited() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &out,
            "[[pipeline]]\nalgorithm = \"test_log_flood\"",
        ),
    );
    let dir = misbehave_plugin().parent().unwrap().to_str().unwrap();
    let o = gs_host(
        work.path(),
        &["--manifest", m.to_str().unwrap(), "--plugin-dir", dir],
    );
    let err = stderr(&o);
    let flood = err.lines().filter(|l| l.contains("flood message")).count();
    // 10 000 messages in well under a second: the burst of 50 passes, the rest are dropped
    // (a slow machine may let a few more through at 10 per second).
    assert!((50..=70).contains(&flood), "{flood} lines:\n{err}");
    assert!(err.contains("flood message 0") && !err.contains("flood message 9999"));
    let dropped = 10_000 - flood;
    assert!(
        err.contains(&format!("{dropped} log messages dropped")),
        "{err}"
    );
}

#[test]
fn qparams_for_a_norm_prev_op_are_refused() {
    // Only a linear prev_op that an earlier subset quantized has qparams (plugin-api 1.2).
    let e = run_failing("test_norm_qparams");
    assert!(
        e.contains("test_norm_qparams")
            && e.contains("model.layers.0.input_layernorm")
            && e.contains("only a linear layer whose scheme quantizes weights"),
        "{e}"
    );
}

#[test]
fn an_algorithm_needing_statistics_without_calibration_is_refused_before_any_work() {
    let e = run_failing("test_needs_hessian");
    assert!(
        e.contains("test_needs_hessian") && e.contains("hessian") && e.contains("[calibration]"),
        "{e}"
    );
}

#[test]
fn a_manifest_typo_names_line_column_and_the_fix() {
    let work = tempfile::tempdir().unwrap();
    let text = manifest_text(
        &stories260k(),
        &work.path().join("out"),
        "[[pipeline]]\nalgorithm = \"rtn\"",
    )
    .replace("[export]\nformat", "[export]\nfromat");
    let m = write_manifest(work.path(), &text);
    let line = text.lines().position(|l| l.starts_with("fromat")).unwrap() + 1;
    for args in [vec!["check"], vec![]] {
        let mut a = args.clone();
        a.extend(["--manifest", m.to_str().unwrap()]);
        let o = gs_host(work.path(), &a);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&format!("run.toml:{line}:1")), "{e}");
        assert!(
            e.contains("fromat") && e.contains("did you mean `format`"),
            "{e}"
        );
    }
    assert!(!work.path().join("out").exists());
}

#[test]
fn an_existing_output_is_refused_and_kept_unless_forced() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), b"keep me").unwrap();
    let m = write_manifest(
        work.path(),
        &manifest_text(&model, &out, "[[pipeline]]\nalgorithm = \"rtn\""),
    );
    // Not ours: refused without --force, and even with it.
    for force in [false, true] {
        let mut args = vec!["--manifest", m.to_str().unwrap()];
        if force {
            args.push("--force");
        }
        let o = gs_host(work.path(), &args);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&out.display().to_string()), "{e}");
        assert!(
            e.contains(if force { "gs-run.json" } else { "--force" }),
            "{e}"
        );
        assert_eq!(std::fs::read(out.join("precious.txt")).unwrap(), b"keep me");
        assert_eq!(tree_digest(&model), before);
    }
    // A previous gs-host output is replaced with --force, and only with it.
    std::fs::remove_dir_all(&out).unwrap();
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(out.join("marker"), b"old run").unwrap();
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(out.join("marker").exists());
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("marker").exists());
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(tree_digest(&model), before);
}

#[test]
fn an_output_inside_the_source_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    for out in [model.join("quantized"), model.clone()] {
        let m = write_manifest(
            work.path(),
            &manifest_text(&model, &out, "[[pipeline]]\nalgorithm = \"rtn\""),
        );
        let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap(), "--force"]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("source"), "{e}");
        assert_eq!(tree_digest(&model), before);
    }
}

#[test]
fn the_template_plugin_runs_with_its_parameters() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &out,
            "[[pipeline]]\nalgorithm = \"clip_rtn\"\nparams = { clip_ratio = 0.9 }",
        ),
    );
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = Manifest::load(&m).unwrap().plan;
    for ((name, shape, w), (_, _, q)) in read_f32_tensors(&stories260k())
        .iter()
        .zip(read_f32_tensors(&out).iter())
    {
        if is_block_linear(name) {
            let args = plan
                .scheme_for(name.trim_end_matches(".weight"))
                .weights
                .unwrap();
            let clipped = gs_plugin_template::clip_rows(w, shape[1], 0.9);
            let (expected, _) =
                gs_quant::fake_quantize(&clipped, shape[0], shape[1], &args).unwrap();
            assert_eq!(&expected, q, "{name}");
        }
    }
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &out,
            "[[pipeline]]\nalgorithm = \"clip_rtn\"\nparams = { clip_ratio = 2.0 }",
        ),
    );
    let o = gs_host(work.path(), &["check", "--manifest", m.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("clip_ratio must be in (0, 1]"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn plugins_check_and_inspect_report_without_writing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(
        work.path(),
        &manifest_text(&stories260k(), &out, "[[pipeline]]\nalgorithm = \"rtn\""),
    );
    let o = gs_host(work.path(), &["plugins"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    let sha = gs_host::plugins::sha256_file(&rtn_plugin()).unwrap();
    assert!(
        s.contains("gs-rtn") && s.contains("rtn: round-to-nearest") && s.contains(&sha),
        "{s}"
    );

    let o = gs_host(work.path(), &["check", "--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("35 of 35 linear layers quantized"),
        "{}",
        stdout(&o)
    );
    assert!(!out.exists(), "check wrote output");

    let o = gs_host(work.path(), &["inspect", stories260k().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("LlamaForCausalLM") && s.contains("model.layers.0.mlp.down_proj.weight"),
        "{s}"
    );
}

#[test]
fn plugins_are_found_through_gs_plugin_path() {
    let so = fixture("plugin-v1", "gs_fixture_v1");
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("vendor");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&so, lib_file(&dir, "gs_fixture_v1")).unwrap();
    let path = std::env::join_paths([work.path().join("missing"), dir.clone()]).unwrap();
    let o = std::process::Command::new(gs_host_bin())
        .arg("plugins")
        .env("GS_PLUGIN_PATH", path)
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(
        s.contains("gs-fixture-v1") && s.contains("GS_PLUGIN_PATH"),
        "{s}"
    );
    assert!(
        s.contains("gs-rtn"),
        "the built-in plugins are still listed: {s}"
    );
}

#[test]
fn rtn_runs_block_by_block_on_calibration_data_with_the_same_result() {
    let work = tempfile::tempdir().unwrap();
    let data = root().join("assets/data/tinystories/tinystories-sample.txt");
    let calib = format!(
        "[calibration]\ndataset = \"{}\"\nnsamples = 16\nseqlen = 64\n\n[[pipeline]]\nalgorithm = \"rtn\"",
        data.display()
    );
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let m = write_manifest(work.path(), &manifest_text(&stories260k(), &a, &calib));
    let o = gs_host(work.path(), &["check", "--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("calibration 16 × 64 tokens"),
        "{}",
        stdout(&o)
    );
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = write_manifest(
        work.path(),
        &manifest_text(&stories260k(), &b, "[[pipeline]]\nalgorithm = \"rtn\""),
    );
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // RTN is data-free: the calibrated pass must not change its result.
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn the_output_error_measurement_is_optional_and_changes_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let data = root().join("assets/data/tinystories/tinystories-sample.txt");
    let run = |name: &str, run_section: &str| {
        let out = work.path().join(name);
        let pipeline = format!(
            "[calibration]\ndataset = \"{}\"\nnsamples = 16\nseqlen = 64\n\n[[pipeline]]\nalgorithm = \"gptq\"\n\n{run_section}",
            data.display()
        );
        let m = write_manifest(work.path(), &manifest_text(&stories260k(), &out, &pipeline));
        let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        let errors: Vec<Option<f64>> = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["rel_output_error"].as_f64())
            .collect();
        (
            std::fs::read(out.join("model.safetensors")).unwrap(),
            errors,
        )
    };
    let (with, errors) = run("with", "");
    let (without, none) = run("without", "[run]\noutput_error = false\n");
    assert_eq!(
        with, without,
        "the measurement must not change the checkpoint"
    );
    assert!(!errors.is_empty() && errors.iter().all(|e| e.is_some_and(|e| e > 0.0 && e < 1.0)));
    assert!(none.iter().all(Option::is_none), "{none:?}");
}

#[test]
fn eval_prints_the_perplexity_of_a_model_under_the_protocol() {
    let work = tempfile::tempdir().unwrap();
    let data = root().join("assets/data/tinystories/tinystories-sample.txt");
    let o = gs_host(
        work.path(),
        &[
            "eval",
            "--model",
            stories260k().to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seqlen",
            "256",
            "--windows",
            "20",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // 20 windows × 255 predicted tokens.
    assert!(
        stdout(&o).contains("5100 predicted tokens"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).starts_with("perplexity "), "{}", stdout(&o));

    let o = gs_host(
        work.path(),
        &[
            "eval",
            "--model",
            stories260k().to_str().unwrap(),
            "--data",
            "missing.txt",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.txt"), "{}", stderr(&o));
}

/// A manifest for the bundled model with `quant` and `export` bodies.
fn format_manifest(work: &Path, quant: &str, format: &str, output: &Path) -> PathBuf {
    let data = root().join("assets/data/tinystories/tinystories-sample.txt");
    write_manifest(
        work,
        &format!(
            "[model]\npath = \"{}\"\n[calibration]\ndataset = \"{}\"\nnsamples = 8\nseqlen = 64\n[quant]\n{quant}\n[[pipeline]]\nalgorithm = \"rtn\"\n[export]\nformat = \"{format}\"\noutput = \"{}\"\n[eval]\ndataset = \"{}\"\nseqlen = 128\nwindows = 4\n",
            stories260k().display(),
            data.display(),
            output.display(),
            data.display()
        ),
    )
}

#[test]
fn a_scheme_the_format_cannot_store_is_refused_before_any_work() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = format_manifest(
        work.path(),
        "[quant.weights]\nbits = 3\ngranularity = \"channel\"",
        "ascend",
        &out,
    );
    for cmd in ["check", "run"] {
        let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap(), cmd]);
        assert!(!o.status.success(), "{cmd}");
        let e = stderr(&o);
        assert!(
            e.contains("ascend") && e.contains("model.layers.0.") && e.contains("3"),
            "{cmd}: {e}"
        );
        assert!(!out.exists(), "{cmd} created the output");
    }
}

#[test]
fn an_output_inside_the_source_model_is_refused_before_any_work() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    let out = model.join("quantized");
    let text = std::fs::read_to_string(format_manifest(
        work.path(),
        "scheme = \"w8a16\"",
        "compressed-tensors",
        &out,
    ))
    .unwrap()
    .replace(
        &stories260k().display().to_string(),
        &model.display().to_string(),
    );
    let m = write_manifest(work.path(), &text);
    for cmd in ["check", "run"] {
        let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap(), cmd]);
        assert!(!o.status.success(), "{cmd}");
        assert!(
            stderr(&o).contains("inside the source model"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    assert_eq!(tree_digest(&model), before);
}

#[test]
fn a_run_writes_report_json_and_svg_with_all_three_evaluation_points() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = format_manifest(work.path(), "scheme = \"w8a8\"", "fake", &out);
    let o = gs_host(work.path(), &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 35);
    assert_eq!(layers[0]["name"], "model.layers.0.self_attn.q_proj");
    for l in layers {
        let e = l["rel_output_error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 1.0, "{l}");
    }
    let points: Vec<&str> = report["perplexity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap())
        .collect();
    assert_eq!(points, ["float", "fake_quant", "exported"]);
    let nll = |i: usize| report["perplexity"][i]["nll_sum"].as_f64().unwrap();
    assert_eq!(nll(1).to_bits(), nll(2).to_bits(), "exported ≠ fake_quant");
    assert_ne!(
        nll(1),
        nll(0),
        "the fake-quant model evaluated as the float one"
    );
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.contains("<svg"), "{svg}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("gs-run.json")).unwrap()).unwrap();
    assert_eq!(run["calibration"]["nsamples"], 8);
    assert!(run["manifest"]["sha256"].as_str().unwrap().len() == 64);
}

#[test]
fn plugins_verify_gives_each_library_a_verdict_and_fails_on_any_bad_one() {
    let work = tempfile::tempdir().unwrap();
    // Everything shipped verifies.
    let o = gs_host(work.path(), &["plugins", "--verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for name in ["gs-rtn", "gs-gptq", "gs-awq", "gs-smoothquant"] {
        assert!(s.contains(&format!("ok      {name} ")), "{s}");
    }
    // A wrong pin, a file that is not a library, an algorithm nobody provides.
    let bad = work.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("libjunk.so"), b"not a shared library").unwrap();
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &work.path().join("out"),
            &format!(
                "[[pipeline]]\nalgorithm = \"rtn\"\n\n[[pipeline]]\nalgorithm = \"no_such_algorithm\"\n\n\
                 [plugins.gs-rtn]\nsha256 = \"{}\"",
                "0".repeat(64)
            ),
        ),
    );
    let before = tree_digest(&stories260k());
    let o = gs_host(
        work.path(),
        &[
            "plugins",
            "--verify",
            "--manifest",
            m.to_str().unwrap(),
            "--plugin-dir",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    let s = stdout(&o);
    assert!(
        s.contains("FAILED") && s.contains("libgs_rtn") && s.contains("but the manifest pins"),
        "{s}"
    );
    assert!(s.contains("libjunk.so"), "{s}");
    assert!(
        s.contains("ok      gs-gptq "),
        "the others are still checked: {s}"
    );
    assert!(
        stderr(&o).contains("plugin check(s) failed"),
        "{}",
        stderr(&o)
    );
    // Nothing was run or written.
    assert!(!work.path().join("out").exists());
    assert_eq!(tree_digest(&stories260k()), before);
}
