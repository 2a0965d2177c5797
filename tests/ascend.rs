//! The quantization pipeline on Ascend NPUs through the AscendCL emulator (a test stand-in on
//! host memory: it proves the call protocol, layouts and the host-side reduction, not NPU
//! numerics or speed). The model is the bundled stories260K; the calibration is 24 windows of
//! 64 tokens, i.e. two forward chunks per block of 1024 and 512 tokens, so two devices get an
//! uneven share.
//!
//! The `AscendDevice` converts GEMM inputs to f16 (what CANN documents for `aclblasGemmEx`):
//! results that depend on the calibration forward differ from the CPU's f32 within the bounds
//! stated at each test, with the figures measured when they were set.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gs_tests::ascend_emulator::{emulator_home, emulator_lib, Variant};
use gs_tests::*;

/// A GPTQ or RTN manifest on the bundled model, calibrated on 24 × 64 tokens, evaluated
/// (fake-quant perplexity) on 4 windows of 128 tokens; `extra` is appended (e.g. `[device]`).
fn manifest(algorithm: &str, format: &str, out: &Path, extra: &str) -> String {
    let data = root().join("assets/data/tinystories/tinystories-sample.txt");
    format!(
        r#"[model]
path = "{model}"

[calibration]
dataset = "{data}"
nsamples = 24
seqlen = 64

[quant]
scheme = "w4a16"
weights = {{ group_size = 4 }}

[[pipeline]]
algorithm = "{algorithm}"

[export]
format = "{format}"
output = "{out}"

[eval]
dataset = "{data}"
seqlen = 128
windows = 4
points = ["fake_quant"]
{extra}"#,
        model = stories260k().display(),
        data = data.display(),
        out = out.display(),
    )
}

/// Runs the built `gs-host` with `args` in `dir`, the emulator as the AscendCL runtime with
/// `devices` NPUs, and its counters written to `dir/<name>-stats.txt` at `aclFinalize`.
fn run_on_emulator(dir: &Path, name: &str, args: &[&str], devices: u32) -> (Output, PathBuf) {
    let stats = dir.join(format!("{name}-stats.txt"));
    let home = emulator_home(Variant::Full);
    let mut cmd = Command::new(gs_host_bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn");
    for var in [
        "GS_ASCENDCL_LIB",
        "ASCEND_TOOLKIT_HOME",
        "LD_LIBRARY_PATH",
        "ASCEND_RT_VISIBLE_DEVICES",
        "GSEMU_FAIL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("ASCEND_HOME_PATH", home)
        .env("GSEMU_DEVICES", devices.to_string())
        .env("GSEMU_STATS", &stats);
    (cmd.output().expect("gs-host runs"), stats)
}

/// The emulator's `GSEMU_STATS` file: counter name → value.
fn read_stats(path: &Path) -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no emulator stats at {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Everything acquired was released: as many finalizes as inits, no allocation, stream,
/// context or device left, no protocol error (the counters are cumulative for the process).
fn assert_released(stats: &BTreeMap<String, i64>, what: &str) {
    for (name, want) in [
        ("allocs_live", 0),
        ("streams_live", 0),
        ("contexts_live", 0),
        ("devices_live", 0),
        ("protocol_errors", 0),
    ] {
        assert_eq!(stats.get(name), Some(&want), "{what}: {name} in {stats:?}");
    }
    for (made, gone) in [
        ("mallocs", "frees"),
        ("streams_created", "streams_destroyed"),
        ("contexts_created", "contexts_destroyed"),
        ("devices_set", "devices_reset"),
        ("init", "finalize"),
    ] {
        assert_eq!(stats[made], stats[gone], "{what}: {made} vs {gone}");
    }
}

/// [`assert_released`] for a process that initialized the runtime once.
fn assert_balanced(stats: &BTreeMap<String, i64>, what: &str) {
    assert_eq!(stats.get("init"), Some(&1), "{what}: init in {stats:?}");
    assert_released(stats, what);
}

/// The CPU run of `text` (written as `cpu.toml` in `dir`).
fn run_cpu(dir: &Path, text: &str) {
    let m = dir.join("cpu.toml");
    std::fs::write(&m, text).unwrap();
    let o = gs_host(dir, &["--manifest", m.to_str().unwrap()]);
    assert!(o.status.success(), "CPU run: {}", stderr(&o));
}

fn safetensors_digests(dir: &Path) -> BTreeMap<PathBuf, String> {
    tree_digest(dir)
        .into_iter()
        .filter(|(p, _)| p.extension() == Some(OsStr::new("safetensors")))
        .collect()
}

fn fake_quant_ppl(out: &Path) -> f64 {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    report["perplexity"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["point"] == "fake_quant"))
        .and_then(|p| p["ppl"].as_f64())
        .expect("a fake_quant perplexity in report.json")
}

/// The `ascend:<id>: N GEMMs …` line the run prints per NPU.
fn gemms_of(stdout: &str, id: u32) -> u64 {
    let prefix = format!("ascend:{id}: ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{stdout}"));
    line[prefix.len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no GEMM count in {line}"))
}

#[test]
fn rtn_through_the_emulated_npu_writes_the_cpu_checkpoint_byte_for_byte() {
    // RTN quantizes weights only: the calibration forward (output errors, propagation) and
    // the evaluation run on the NPU, but the checkpoint must not change at all.
    let work = tempfile::tempdir().unwrap();
    let (cpu_out, npu_out) = (work.path().join("cpu"), work.path().join("npu"));
    run_cpu(
        work.path(),
        &manifest("rtn", "compressed-tensors", &cpu_out, ""),
    );
    let m = write_manifest(
        work.path(),
        &manifest("rtn", "compressed-tensors", &npu_out, ""),
    );
    let (o, stats) = run_on_emulator(
        work.path(),
        "rtn",
        &["--manifest", m.to_str().unwrap(), "--device", "ascend:0"],
        1,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cpu = safetensors_digests(&cpu_out);
    assert!(!cpu.is_empty());
    assert_eq!(cpu, safetensors_digests(&npu_out));
    let stats = read_stats(&stats);
    assert_balanced(&stats, "rtn");
    assert!(stats["gemms_run"] > 0, "{stats:?}");
    assert_eq!(gemms_of(&stdout(&o), 0) as i64, stats["gemms_run"]);
}

/// The f32 tensors of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Over the quantized weights of two fake-format checkpoints of the bundled model: the share
/// of values that are bit-equal, and the largest ratio, per layer, of the distance between the
/// two results to the distance of the first from the float weights (its quantization error).
fn agreement(a: &Path, b: &Path) -> (f64, f64) {
    let float = tensors(&stories260k().join("model.safetensors"));
    let (mut equal, mut total, mut worst) = (0usize, 0usize, 0f64);
    for (file, _) in safetensors_digests(a) {
        let (ta, tb) = (tensors(&a.join(&file)), tensors(&b.join(&file)));
        for (name, va) in &ta {
            if !name.ends_with("_proj.weight") {
                continue;
            }
            let vb = &tb[name];
            total += va.len();
            equal += va
                .iter()
                .zip(vb)
                .filter(|(x, y)| x.to_bits() == y.to_bits())
                .count();
            worst = worst.max(l2(va, vb) / l2(va, &float[name]));
        }
    }
    assert!(total > 0);
    (equal as f64 / total as f64, worst)
}

#[test]
fn gptq_through_the_emulated_npu_agrees_with_the_cpu_within_the_stated_tolerance() {
    // GPTQ's Hessian and every calibration forward go through the NPU GEMM. GPTQ feeds each
    // column's rounding error into the next columns, so a small change of the Hessian moves
    // codes: the result is a different quantization of the same quality, not a bit-equal one.
    // Measured (stories260K, w4 in groups of 4, 24 × 64 calibration tokens; docs/ASCEND.md):
    // - f16 inputs (the default): 11.5 % of the weights bit-equal, largest per-layer
    //   ‖npu − cpu‖ / ‖cpu − float‖ = 0.63, fake-quant perplexity 4.7345 against 4.7310
    //   (0.08 %);
    // - f32 inputs (the emulator sums sequentially, faer in blocks, so the last bits differ):
    //   45 % bit-equal, ratio 2.9e-6, perplexity equal to 4 decimals.
    // Bounds with margin: f16 ratio < 1 (the two results are closer to each other than to the
    // float weights) and perplexity within 3 %; f32 ratio < 1e-4 and perplexity within 0.1 %.
    let work = tempfile::tempdir().unwrap();
    let cpu_out = work.path().join("cpu");
    run_cpu(work.path(), &manifest("gptq", "fake", &cpu_out, ""));
    let p_cpu = fake_quant_ppl(&cpu_out);
    for (precision, max_ratio, max_rel) in [("f16", 1.0, 0.03), ("f32", 1e-4, 0.001)] {
        let npu_out = work.path().join(precision);
        let extra = format!("\n[device]\nkind = \"ascend\"\nprecision = \"{precision}\"\n");
        let m = work.path().join(format!("{precision}.toml"));
        std::fs::write(&m, manifest("gptq", "fake", &npu_out, &extra)).unwrap();
        let (o, stats) = run_on_emulator(
            work.path(),
            precision,
            &["--manifest", m.to_str().unwrap()],
            1,
        );
        assert!(o.status.success(), "{precision}: {}", stderr(&o));
        assert_balanced(&read_stats(&stats), precision);
        let (equal, ratio) = agreement(&cpu_out, &npu_out);
        let p_npu = fake_quant_ppl(&npu_out);
        let rel = (p_npu - p_cpu).abs() / p_cpu;
        println!(
            "gptq, cpu vs emulated npu ({precision} GEMM inputs): {:.1} % of the weights \
             bit-equal; largest per-layer ‖npu − cpu‖ / ‖cpu − float‖ = {ratio:.2e}; fake-quant \
             ppl {p_cpu:.4} vs {p_npu:.4} ({:.3} %)",
            100.0 * equal,
            100.0 * rel
        );
        assert!(
            ratio < max_ratio,
            "{precision}: per-layer distance ratio {ratio}"
        );
        assert!(
            rel <= max_rel,
            "{precision}: perplexity {p_cpu} on the CPU, {p_npu} on the NPU"
        );
    }
}

#[test]
fn two_emulated_npus_give_the_result_of_one_bit_for_bit() {
    // One NPU selected with --device, two with the manifest's [device]: the calibration
    // chunks are split across the two and their statistics reduced in chunk order.
    let work = tempfile::tempdir().unwrap();
    let (one_out, two_out) = (work.path().join("one"), work.path().join("two"));
    let one = write_manifest(work.path(), &manifest("gptq", "fake", &one_out, ""));
    let (o1, s1) = run_on_emulator(
        work.path(),
        "one",
        &["--manifest", one.to_str().unwrap(), "--device", "ascend:0"],
        2,
    );
    assert!(o1.status.success(), "{}", stderr(&o1));
    let two_text = manifest(
        "gptq",
        "fake",
        &two_out,
        "\n[device]\nkind = \"ascend\"\nids = [0, 1]\n",
    );
    let two = work.path().join("two.toml");
    std::fs::write(&two, two_text).unwrap();
    let (o2, s2) = run_on_emulator(
        work.path(),
        "two",
        &["--manifest", two.to_str().unwrap()],
        2,
    );
    assert!(o2.status.success(), "{}", stderr(&o2));
    let strip = |mut d: BTreeMap<PathBuf, String>| {
        // gs-run.json names the manifest file; everything else must match.
        d.remove(Path::new("gs-run.json"));
        d
    };
    let (d1, d2) = (strip(tree_digest(&one_out)), strip(tree_digest(&two_out)));
    assert!(d1.len() > 3, "{d1:?}");
    assert_eq!(d1, d2, "one NPU against two");
    // Both NPUs worked, and everything was released.
    let out2 = stdout(&o2);
    let (g0, g1) = (gemms_of(&out2, 0), gemms_of(&out2, 1));
    assert!(g0 > 0 && g1 > 0, "{out2}");
    assert_eq!((g0 + g1) as i64, read_stats(&s2)["gemms_run"], "{out2}");
    assert_eq!(
        gemms_of(&stdout(&o1), 0) as i64,
        read_stats(&s1)["gemms_run"]
    );
    assert_balanced(&read_stats(&s1), "one NPU");
    assert_balanced(&read_stats(&s2), "two NPUs");
    assert_eq!(read_stats(&s2)["devices_set"], 2);
}

#[test]
fn without_a_runtime_the_run_names_every_place_looked_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let lib = work.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let m = write_manifest(work.path(), &manifest("rtn", "fake", &out, ""));
    let o = gs_host_with_env(
        work.path(),
        &["--manifest", m.to_str().unwrap(), "--device", "ascend:0"],
        &[("LD_LIBRARY_PATH", lib.as_os_str())],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(
            "error: --device: cannot use ascend:0: no AscendCL runtime found: libascendcl.so is not in "
        ),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{} ($LD_LIBRARY_PATH)",
            lib.join("libascendcl.so").display()
        )),
        "{err}"
    );
    assert!(err.contains("$ASCEND_HOME_PATH"), "{err}");
    assert!(!out.exists());
}

#[test]
fn an_npu_hidden_by_ascend_rt_visible_devices_is_refused_before_anything_is_written() {
    // Two emulated NPUs, only one visible: ascend:1 does not exist for this process.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(work.path(), &manifest("rtn", "fake", &out, ""));
    let stats = work.path().join("stats.txt");
    let o = gs_host_with_env(
        work.path(),
        &["--manifest", m.to_str().unwrap(), "--device", "ascend:0,1"],
        &[
            ("ASCEND_HOME_PATH", emulator_home(Variant::Full).as_os_str()),
            ("GSEMU_DEVICES", OsStr::new("2")),
            ("ASCEND_RT_VISIBLE_DEVICES", OsStr::new("1")),
            ("GSEMU_STATS", stats.as_os_str()),
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(
            "error: --device: cannot use ascend:0,1: AscendDevice::open: NPU 1 requested but the \
             runtime sees 1 NPU(s) (ids 0..1, after ASCEND_RT_VISIBLE_DEVICES=1)"
        ),
        "{err}"
    );
    assert!(!out.exists());
    // NPU 0, opened first, was released again.
    assert_balanced(&read_stats(&stats), "hidden NPU");
}

#[test]
fn an_npu_run_is_never_resumed_on_the_cpu() {
    // The 200th copy fails in block 1 (about 110 per block here): block 0 is saved in the
    // checkpoint beside the output. Resuming with the CPU is refused, naming the device; the
    // NPU resumes it.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(work.path(), &manifest("gptq", "fake", &out, ""));
    let ms = m.to_str().unwrap();
    let mut failing = Command::new(gs_host_bin());
    failing
        .args(["--manifest", ms, "--device", "ascend:0"])
        .current_dir(work.path())
        .env_remove("GS_PLUGIN_PATH")
        .env_remove("GS_ASCENDCL_LIB")
        .env("RUST_LOG", "warn")
        .env("ASCEND_HOME_PATH", emulator_home(Variant::Full))
        .env("GSEMU_FAIL", "aclrtMemcpy:200");
    let o = failing.output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rerun with --resume") && err.contains("aclrtMemcpy ("),
        "{err}"
    );
    assert!(!out.exists());
    let o = gs_host(work.path(), &["--manifest", ms, "--resume"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("this checkpoint belongs to a different run (device changed)"),
        "{err}"
    );
    let (o, _) = run_on_emulator(
        work.path(),
        "resume",
        &["--manifest", ms, "--resume", "--device", "ascend:0"],
        1,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("resuming from"), "{}", stdout(&o));
}

/// Sets (or removes, for `None`) process environment variables until dropped.
struct Env(Vec<(&'static str, Option<std::ffi::OsString>)>);

impl Env {
    fn set(vars: &[(&'static str, Option<&OsStr>)]) -> Env {
        let saved = vars
            .iter()
            .map(|(k, _)| (*k, std::env::var_os(k)))
            .collect();
        for (k, v) in vars {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        Env(saved)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

/// The only test of this file that changes the process environment (the others pass theirs
/// to child processes).
#[test]
fn npu_failures_name_the_call_leave_no_output_and_a_cpu_run_in_the_same_process_works() {
    let work = tempfile::tempdir().unwrap();
    let plugins = debug_dir().to_string_lossy().into_owned();
    let out = work.path().join("out");
    let m = write_manifest(work.path(), &manifest("gptq", "fake", &out, ""));
    let stats = work.path().join("stats.txt");
    let home = emulator_home(Variant::Full);
    let hidden = emulator_lib(Variant::HideSymbol);
    let run = |device: Option<&str>| {
        let mut args = vec![
            "gs-host",
            "--manifest",
            m.to_str().unwrap(),
            "--plugin-dir",
            &plugins,
        ];
        if let Some(d) = device {
            args.extend(["--device", d]);
        }
        gs_host::cli::run_args(args)
    };
    // (GSEMU_FAIL, library override, what the error must say). The 40th copy is mid-run,
    // past the first block; the 3rd allocation is in the first GEMM.
    let cases: [(&str, Option<&OsStr>, &[&str]); 3] = [
        (
            "aclrtMalloc:3",
            None,
            &[
                "on ascend:0: aclrtMalloc (",
                "failed: ACL_ERROR_RT_MEMORY_ALLOCATION (207001)",
                "injected failure",
            ],
        ),
        (
            "aclrtMemcpy:40",
            None,
            &[
                "on ascend:0: aclrtMemcpy (",
                "failed: ACL_ERROR_RT_COPY_DATA",
                "injected failure",
            ],
        ),
        (
            "",
            Some(hidden.as_os_str()),
            &["has no symbol aclrtSynchronizeStream"],
        ),
    ];
    for (fail, lib, expected) in cases {
        {
            let _env = Env::set(&[
                ("ASCEND_HOME_PATH", Some(home.as_os_str())),
                ("GS_ASCENDCL_LIB", lib),
                ("GSEMU_FAIL", Some(OsStr::new(fail))),
                ("GSEMU_STATS", Some(stats.as_os_str())),
                ("GSEMU_DEVICES", None),
                ("ASCEND_RT_VISIBLE_DEVICES", None),
            ]);
            let _ = std::fs::remove_file(&stats);
            let e = run(Some("ascend:0")).expect_err(fail);
            let text = format!("{e:#}");
            for want in expected {
                assert!(text.contains(want), "{fail}: {want:?} not in: {text}");
            }
            assert!(!out.exists(), "{fail}: {} was written", out.display());
            // Nothing staged beside it either: the work dir holds only what the test wrote.
            let mut left: Vec<String> = std::fs::read_dir(work.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            let expected_left: &[&str] = if lib.is_some() {
                &["run.toml"]
            } else {
                &["run.toml", "stats.txt"]
            };
            assert_eq!(left, expected_left, "{fail}");
            if lib.is_none() {
                assert_released(&read_stats(&stats), fail);
            }
        }
        // The CPU, in the same process, right after.
        run(None).unwrap_or_else(|e| panic!("CPU run after {fail}: {e:#}"));
        assert!(
            !safetensors_digests(&out).is_empty(),
            "{fail}: no CPU output"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}
