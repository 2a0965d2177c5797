//! `gs-host quantize`: the presets' expansions, end-to-end runs of the real binary with the
//! real plugin `.so` files, and the refusals of bad input.

use std::path::{Path, PathBuf};
use std::process::Output;

use gs_host::cli::presets;
use gs_host::manifest::{ExportFormat, Manifest};
use gs_quant::Granularity;
use gs_tests::*;
use sha2::{Digest, Sha256};

/// The pre-tokenized windows the anchor runs used (16 × 64 of TinyStories, seed 0), from the
/// shared reference assets beside the workspace.
fn reference_calib() -> PathBuf {
    root().join("../shared/reference/calib/stories260K-tinystories-16x64.json")
}

/// The reference windows as lists of ids.
fn reference_windows() -> Vec<Vec<u32>> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference_calib()).unwrap()).unwrap();
    json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w.as_array()
                .unwrap()
                .iter()
                .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
                .collect()
        })
        .collect()
}

/// `windows` as a `.jsonl` file, one `{"input_ids": [...]}` per line.
fn write_jsonl(path: &Path, windows: &[Vec<u32>]) {
    let text: String = windows
        .iter()
        .map(|w| format!("{}\n", serde_json::json!({ "input_ids": w })))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn quantize(cwd: &Path, args: &[&str]) -> Output {
    let mut all = vec!["quantize"];
    all.extend_from_slice(args);
    gs_host(cwd, &all)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failed run: exit status, no output, stderr containing every needle.
fn assert_refused(o: &Output, out: &Path, needles: &[&str]) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "should fail; stdout: {}", stdout(o));
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    assert!(!out.exists(), "the output was created: {e}");
    e
}

#[test]
fn help_lists_every_preset_with_its_summary_on_one_line() {
    let work = tempfile::tempdir().unwrap();
    let o = quantize(work.path(), &["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = stdout(&o);
    for p in presets::catalog().unwrap() {
        // clap aligns the summaries: `- name:   summary`.
        let listed = help.lines().any(|l| {
            l.trim()
                .strip_prefix(&format!("- {}:", p.name))
                .is_some_and(|rest| rest.trim() == p.summary())
        });
        assert!(listed, "{} not listed with its summary in {help}", p.name);
    }
}

/// Every preset × format through the binary's `--print-manifest`: the text parses as a
/// manifest with the preset's stages and the format; a combination the preset cannot store is
/// refused naming both, and nothing is written either way.
#[test]
fn print_manifest_of_every_preset_and_format_parses_or_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Relative options resolve against the process's working directory, which the OS reports
    // with symlinks resolved.
    let dir = tmp.path().canonicalize().unwrap();
    let out = dir.join("out");
    let calib = dir.join("calib.txt"); // never read by --print-manifest
    for p in presets::catalog().unwrap() {
        for format in ExportFormat::ALL {
            let o = quantize(
                &dir,
                &[
                    s(&stories260k()),
                    "--preset",
                    p.name,
                    "--out",
                    "out",
                    "--format",
                    format.name(),
                    "--calib",
                    "calib.txt",
                    "--print-manifest",
                ],
            );
            match p.refusal(format) {
                Some(reason) => {
                    assert_refused(&o, &out, &[p.name, format.name(), reason]);
                }
                None => {
                    assert!(
                        o.status.success(),
                        "{} {}: {}",
                        p.name,
                        format.name(),
                        stderr(&o)
                    );
                    let text = stdout(&o);
                    let m = Manifest::parse(&text, &dir.join("saved.toml"))
                        .unwrap_or_else(|e| panic!("{e}\n{text}"));
                    assert_eq!(m.export.format, format);
                    // Relative options became absolute paths (against the working directory).
                    assert_eq!(m.export.output, out);
                    assert_eq!(m.model.path, stories260k());
                    assert_eq!(m.calibration.as_ref().unwrap().dataset, calib);
                    assert!(
                        text.starts_with(&format!(
                            "# gs-host quantize {} --preset {} --out {} --format {} --calib {}\n",
                            stories260k().display(),
                            p.name,
                            out.display(),
                            format.name(),
                            calib.display()
                        )),
                        "{text}"
                    );
                    assert!(!out.exists());
                }
            }
        }
    }
}

/// stories260K's layers have 64 or 172 input columns: groups of 4 fit both.
fn run_preset(
    work: &Path,
    model: &Path,
    preset: &str,
    calib: &Path,
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        s(model),
        "--preset",
        preset,
        "--out",
        s(out),
        "--calib",
        s(calib),
        "--nsamples",
        "16",
        "--seqlen",
        "64",
        "--group-size",
        "4",
    ];
    args.extend_from_slice(extra);
    quantize(work, &args)
}

/// The bytes of every weight file of a checkpoint, in name order.
fn weight_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no weights in {}", dir.display());
    files
}

fn run_record(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("gs-run.json")).unwrap()).unwrap()
}

fn read_f32(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn block_linears() -> Vec<String> {
    let mut v = Vec::new();
    for b in 0..5 {
        for l in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ] {
            v.push(format!("model.layers.{b}.{l}"));
        }
        for l in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            v.push(format!("model.layers.{b}.{l}"));
        }
    }
    v
}

/// W4A16 RTN and GPTQ on stories260K with the reference calibration windows, given as the
/// `.json` file and as a `.jsonl` file of the same windows: both runs use exactly those
/// tokens, give the same checkpoint, and the compressed-tensors checkpoint decodes to int4
/// groups of 4; the source model is untouched.
#[test]
fn w4a16_rtn_and_gptq_run_end_to_end_on_the_reference_windows() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    let windows = reference_windows();
    let jsonl = work.path().join("calib.jsonl");
    write_jsonl(&jsonl, &windows);
    // gs-run.json's tokens_sha256: sha256 of the windows' ids as u32 little-endian, in order
    // (host/src/cli/commands.rs, provenance).
    let tokens: Vec<u8> = windows
        .iter()
        .take(16)
        .flatten()
        .flat_map(|id| id.to_le_bytes())
        .collect();
    let tokens_sha = format!("{:x}", Sha256::digest(&tokens));

    let mut rtn_weights = None;
    for preset in ["w4a16-rtn", "w4a16-gptq"] {
        let algorithm = preset.trim_start_matches("w4a16-");
        let a = work.path().join(format!("{preset}-json"));
        let b = work.path().join(format!("{preset}-jsonl"));
        for (calib, out) in [(reference_calib(), &a), (jsonl.clone(), &b)] {
            let o = run_preset(work.path(), &model, preset, &calib, out, &[]);
            assert!(o.status.success(), "{preset}: {}", stderr(&o));
            assert!(stdout(&o).contains("35 layers quantized"), "{}", stdout(&o));
            let run = run_record(out);
            assert_eq!(run["pipeline"][0]["algorithm"], algorithm);
            assert_eq!(run["calibration"]["tokens_sha256"], tokens_sha.as_str());
            assert_eq!(run["calibration"]["nsamples"], 16);
            assert_eq!(run["format"], "compressed-tensors");
        }
        assert_eq!(
            weight_bytes(&a),
            weight_bytes(&b),
            "{preset}: .json and .jsonl windows gave different checkpoints"
        );

        let ckpt = gs_host::export::open_checkpoint(&a).unwrap();
        assert_eq!(ckpt.format(), ExportFormat::CompressedTensors);
        let mut weights = Vec::new();
        for layer in block_linears() {
            let d = ckpt.decode_layer(&layer).unwrap();
            let (shape, src) = read_f32(&model, &format!("{layer}.weight"));
            assert_eq!(d.qparams.granularity, Granularity::Group(4), "{layer}");
            assert_eq!(d.qparams.scales.len(), shape[0] * shape[1] / 4, "{layer}");
            let gs_host::export::Codes::Int(codes) = &d.codes else {
                panic!("{layer}: not int codes");
            };
            // int4 symmetric: codes in [-8, 7], weights = code · scale of the code's group.
            assert!(codes.iter().all(|q| (-8..=7).contains(q)), "{layer}");
            for (i, (&q, &w)) in codes.iter().zip(&d.dequantized).enumerate() {
                let scale = d.qparams.scales[i / 4];
                assert_eq!(w, f32::from(q) * scale, "{layer}[{i}]");
            }
            let served = ckpt
                .tensor_f32(&format!("{layer}.weight"))
                .unwrap()
                .unwrap();
            assert_eq!(served.values, d.dequantized, "{layer}");
            assert_ne!(d.dequantized, src, "{layer} was not quantized");
            if preset == "w4a16-rtn" {
                // RTN is the shared primitive applied to each weight.
                let args = gs_quant::QuantArgs {
                    bits: 4,
                    ty: gs_quant::QuantType::Int,
                    symmetric: true,
                    granularity: Granularity::Group(4),
                    scale_rule: gs_quant::ScaleRule::HalfRange,
                };
                let (expected, _) =
                    gs_quant::fake_quantize(&src, shape[0], shape[1], &args).unwrap();
                assert!(
                    expected.iter().zip(&d.dequantized).all(|(x, y)| x == y),
                    "{layer} differs from gs_quant::fake_quantize"
                );
            }
            weights.push(d.dequantized);
        }
        match &rtn_weights {
            None => rtn_weights = Some(weights),
            // GPTQ compensates rounding errors with the calibration Hessian: not RTN's result.
            Some(rtn) => assert_ne!(rtn, &weights, "GPTQ gave RTN's weights"),
        }
    }
    assert_eq!(tree_digest(&model), before, "the source model changed");
}

/// The run records the expanded text it ran, byte for byte what `--print-manifest` prints;
/// that text saved to a file runs as is (from another directory) to the same checkpoint.
#[test]
fn the_printed_manifest_is_what_runs_and_runs_as_is() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let args = |print: bool| {
        let mut a = vec![
            s(&stories260k()).to_owned(),
            "--preset".into(),
            "w4a16-rtn".into(),
            "--out".into(),
            "out".into(),
            "--calib".into(),
            s(&reference_calib()).to_owned(),
            "--nsamples".into(),
            "8".into(),
            "--seqlen".into(),
            "64".into(),
            "--group-size".into(),
            "4".into(),
        ];
        if print {
            a.push("--print-manifest".into());
        }
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        quantize(work.path(), &a)
    };
    let printed = run(args(true));
    assert!(printed.status.success(), "{}", stderr(&printed));
    let text = stdout(&printed);

    let o = run(args(false));
    assert!(o.status.success(), "{}", stderr(&o));
    let record = run_record(&out)["manifest"].clone();
    assert_eq!(record["text"], text.as_str());
    assert_eq!(
        record["sha256"],
        format!("{:x}", Sha256::digest(text.as_bytes())).as_str()
    );
    assert!(
        record["command"]
            .as_str()
            .unwrap()
            .starts_with("gs-host quantize "),
        "{record}"
    );
    let first = weight_bytes(&out);

    // Saved elsewhere and run from a third directory: the same output path, the same weights.
    std::fs::rename(&out, work.path().join("first")).unwrap();
    let saved = work.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    let file = saved.join("run.toml");
    std::fs::write(&file, &text).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let o = gs_host(elsewhere.path(), &["--manifest", s(&file)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weight_bytes(&out), first);
}

#[test]
fn an_unknown_preset_lists_the_valid_ones() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = quantize(
        work.path(),
        &[s(&stories260k()), "--preset", "w4a16", "--out", s(&out)],
    );
    let names: Vec<&str> = presets::names().collect();
    let mut needles = vec!["w4a16"];
    needles.extend(&names);
    assert_refused(&o, &out, &needles);
}

#[test]
fn a_group_size_that_does_not_divide_a_layer_is_refused_with_the_sizes_that_fit() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // The preset's 128 does not divide stories260K's 64 columns; gcd(64, 172) = 4.
    let o = quantize(
        work.path(),
        &[s(&stories260k()), "--preset", "w4a16-rtn", "--out", s(&out)],
    );
    assert_refused(
        &o,
        &out,
        &[
            "preset w4a16-rtn's group size 128 (--group-size)",
            "64 input columns of model.layers.0.self_attn.q_proj",
            "fit every layer of this model: 1, 2, 4",
        ],
    );
    // 8 divides 64 but not down_proj's 172.
    let o = quantize(
        work.path(),
        &[
            s(&stories260k()),
            "--preset",
            "w4a16-rtn",
            "--out",
            s(&out),
            "--group-size",
            "8",
        ],
    );
    assert_refused(
        &o,
        &out,
        &["--group-size 8 does not divide the 172 input columns of model.layers.0.mlp.down_proj"],
    );
}

#[test]
fn a_calibrated_preset_without_calib_names_the_option() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for preset in ["w4a16-gptq", "w8a8-smoothquant", "w8a8-static-smoothquant"] {
        for print in [false, true] {
            let model = stories260k();
            let mut a = vec![s(&model), "--preset", preset, "--out", s(&out)];
            if print {
                a.push("--print-manifest");
            }
            let o = quantize(work.path(), &a);
            assert_refused(
                &o,
                &out,
                &[
                    &format!("preset {preset} needs calibration data"),
                    "--calib FILE",
                ],
            );
        }
    }
    // Calibration settings without data.
    let o = quantize(
        work.path(),
        &[
            s(&stories260k()),
            "--preset",
            "w4a16-rtn",
            "--out",
            s(&out),
            "--nsamples",
            "4",
        ],
    );
    assert_refused(&o, &out, &["--calib"]);
}

/// Bad `.jsonl` ids files: each error names the file and the 1-based line.
#[test]
fn bad_ids_files_are_refused_naming_file_and_line() {
    let work = tempfile::tempdir().unwrap();
    let model = copy_model(&work.path().join("model"));
    let before = tree_digest(&model);
    let out = work.path().join("out");
    let windows: Vec<Vec<u32>> = reference_windows().into_iter().take(16).collect();
    let line = |w: &[u32]| format!("{}\n", serde_json::json!({ "input_ids": w }));
    let good: String = windows.iter().map(|w| line(w)).collect();
    let mut short = windows.clone();
    short[2].pop();
    let mut out_of_vocab = windows.clone();
    out_of_vocab[4][10] = 512; // stories260K's vocab_size is 512
    let cases: [(&str, String, &str); 4] = [
        (
            "short.jsonl",
            short.iter().map(|w| line(w)).collect(),
            "short.jsonl, line 3: \"input_ids\" has 63 ids, expected seqlen = 64",
        ),
        (
            "vocab.jsonl",
            out_of_vocab.iter().map(|w| line(w)).collect(),
            "vocab.jsonl: line 5: input_ids[10] is 512, not below the vocabulary size 512",
        ),
        (
            "broken.jsonl",
            good.replacen("]}\n", "]\n", 2),
            "broken.jsonl, line 1: not valid JSON",
        ),
        (
            "mixed.jsonl",
            format!("{good}{{\"text\": \"Once upon a time\"}}\n"),
            "mixed.jsonl, line 17: record holds a text field",
        ),
    ];
    for (name, text, needle) in cases {
        let calib = work.path().join(name);
        std::fs::write(&calib, text).unwrap();
        let o = run_preset(work.path(), &model, "w4a16-gptq", &calib, &out, &[]);
        assert_refused(&o, &out, &[needle]);
    }
    assert_eq!(tree_digest(&model), before);
}

#[test]
fn an_existing_out_is_refused_and_kept() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), b"keep me").unwrap();
    let o = run_preset(
        work.path(),
        &stories260k(),
        "w4a16-rtn",
        &reference_calib(),
        &out,
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--out") && e.contains(s(&out)) && e.contains("--force"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("precious.txt")).unwrap(), b"keep me");
}

#[test]
fn group_size_with_a_per_channel_preset_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = quantize(
        work.path(),
        &[
            s(&stories260k()),
            "--preset",
            "w8a16-rtn",
            "--out",
            s(&out),
            "--group-size",
            "4",
        ],
    );
    assert_refused(
        &o,
        &out,
        &[
            "--group-size applies only to presets with per-group weights",
            "w8a16-rtn",
        ],
    );
}

#[test]
fn a_preset_the_format_cannot_store_is_refused_before_any_work() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = quantize(
        work.path(),
        &[
            s(&stories260k()),
            "--preset",
            "w4a16-gptq",
            "--out",
            s(&out),
            "--format",
            "ascend",
            "--calib",
            s(&reference_calib()),
        ],
    );
    assert_refused(
        &o,
        &out,
        &[
            "preset w4a16-gptq cannot be written as --format ascend",
            "4-bit weights",
            "w8a16-rtn",
        ],
    );
}

#[test]
fn quantize_takes_no_manifest() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let o = gs_host(
        work.path(),
        &[
            "--manifest",
            "run.toml",
            "quantize",
            s(&stories260k()),
            "--preset",
            "w4a16-rtn",
            "--out",
            s(&out),
        ],
    );
    assert_refused(&o, &out, &["quantize takes no --manifest"]);
}
