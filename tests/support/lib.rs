//! Helpers for the end-to-end tests: build the real plugin `.so` files and the real `gs-host`
//! binary with cargo, locate fixtures and the bundled model, run the CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `lib<name>.so` (or the platform's equivalent) inside `dir`.
pub fn lib_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// Runs cargo with `args` in the workspace root; panics with cargo's output on failure.
pub fn cargo(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (once per test binary) the `gs-host` binary and the workspace's user-facing plugins
/// into the normal debug directory; returns that directory.
pub fn debug_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cargo(&[
            "build",
            "-p",
            "gs-host",
            "-p",
            "gs-plugin-rtn",
            "-p",
            "gs-plugin-template",
            "-p",
            "gs-plugin-gptq",
            "-p",
            "gs-plugin-smoothquant",
            "-p",
            "gs-plugin-awq",
        ]);
        target_dir().join("debug")
    })
}

/// The freshly built `gs-host` binary.
pub fn gs_host_bin() -> PathBuf {
    debug_dir().join(format!("gs-host{}", std::env::consts::EXE_SUFFIX))
}

/// The RTN plugin as cargo built it.
pub fn rtn_plugin() -> PathBuf {
    lib_file(debug_dir(), "gs_rtn")
}

/// The GPTQ plugin as cargo built it.
pub fn gptq_plugin() -> PathBuf {
    lib_file(debug_dir(), "gs_gptq")
}

/// The SmoothQuant plugin as cargo built it.
pub fn smoothquant_plugin() -> PathBuf {
    lib_file(debug_dir(), "gs_smoothquant")
}

/// The AWQ plugin as cargo built it.
pub fn awq_plugin() -> PathBuf {
    lib_file(debug_dir(), "gs_awq")
}

/// The template plugin as cargo built it.
pub fn template_plugin() -> PathBuf {
    lib_file(debug_dir(), "gs_plugin_template")
}

/// The test-only misbehaving plugin. Built into its own target directory so it never lands
/// beside `gs-host` (where the built-in discovery would pick it up).
pub fn misbehave_plugin() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = target_dir().join("test-plugins");
        cargo(&[
            "build",
            "-p",
            "gs-test-misbehave",
            "--target-dir",
            &dir.to_string_lossy(),
        ]);
        lib_file(&dir.join("debug"), "gs_test_misbehave")
    })
}

/// Builds `tests/fixtures/<crate_dir>` (its own workspace) and returns the directory its
/// artifacts land in.
pub fn fixture_dir(crate_dir: &str) -> PathBuf {
    let dir = target_dir().join("fixtures");
    let manifest = root()
        .join("tests/fixtures")
        .join(crate_dir)
        .join("Cargo.toml");
    cargo(&[
        "build",
        "--manifest-path",
        &manifest.to_string_lossy(),
        "--target-dir",
        &dir.to_string_lossy(),
    ]);
    dir.join("debug")
}

/// Builds `tests/fixtures/<crate_dir>` and returns its `lib<lib>.so`.
pub fn fixture(crate_dir: &str, lib: &str) -> PathBuf {
    lib_file(&fixture_dir(crate_dir), lib)
}

/// The bundled model (f32 stories260K).
pub fn stories260k() -> PathBuf {
    root().join("assets/models/stories260K")
}

/// Runs the built `gs-host` with `args` in `cwd`, with a clean plugin environment.
pub fn gs_host(cwd: &Path, args: &[&str]) -> Output {
    Command::new(gs_host_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn")
        .output()
        .expect("gs-host runs")
}

/// Builds the AscendCL emulator and lays it out as a CANN home; shared with ascendcl-sys's own
/// tests (one copy of the build logic).
#[path = "../../ascendcl-sys/tests/support/mod.rs"]
pub mod ascend_emulator;

/// Runs the built `gs-host` like [`gs_host`], with no Ascend search variable inherited from
/// the test's environment, plus `env`.
pub fn gs_host_with_env(cwd: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new(gs_host_bin());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn");
    for var in [
        "GS_ASCENDCL_LIB",
        "ASCEND_HOME_PATH",
        "ASCEND_TOOLKIT_HOME",
        "LD_LIBRARY_PATH",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("gs-host runs")
}

/// stderr of a finished command, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout of a finished command, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// sha256 of every file under `dir` (relative path → hex), to prove a directory is untouched.
pub fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readable dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("readable file");
                let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
                out.insert(rel, format!("{:x}", Sha256::digest(&bytes)));
            }
        }
    }
    out
}

/// Copies the bundled model into `dst` (tests that must not touch the real assets use it).
pub fn copy_model(dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).expect("create dir");
    for e in std::fs::read_dir(stories260k()).expect("model dir") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
    dst.to_path_buf()
}

/// Writes `text` as `run.toml` in `dir` and returns its path.
pub fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(&p, text).expect("write manifest");
    p
}

/// A manifest for the bundled model with `pipeline` (TOML `[[pipeline]]` blocks), writing to
/// `out`. Uses W4A16 per-channel so every layer shape qualifies.
pub fn manifest_text(model: &Path, out: &Path, pipeline: &str) -> String {
    format!(
        r#"[model]
path = "{}"

[quant]
scheme = "w4a16"
weights = {{ granularity = "channel" }}

{pipeline}

[export]
format = "fake"
output = "{}"
"#,
        model.display(),
        out.display()
    )
}

/// The SmolLM2-135M directory of the opt-in accuracy tests (`GS_SMOLLM2_DIR`, the shards
/// materialized by `shared/models/SmolLM2-135M-q41dq/fetch.sh`).
pub fn smollm2() -> Option<PathBuf> {
    std::env::var_os("GS_SMOLLM2_DIR").map(PathBuf::from)
}

/// The directory with the release `gs-host` and the shipped plugins, built once per test binary
/// (a debug host would take many times longer on a real model).
pub fn release_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cargo(&[
            "build",
            "--release",
            "-p",
            "gs-host",
            "-p",
            "gs-plugin-rtn",
            "-p",
            "gs-plugin-gptq",
            "-p",
            "gs-plugin-awq",
            "-p",
            "gs-plugin-smoothquant",
        ]);
        target_dir().join("release")
    })
}

/// Runs one recipe on SmolLM2-135M with the release CLI (`quant` = the `[quant]` body,
/// `pipeline` = `[[pipeline]]` blocks), calibrated on the anchors' 32 × 128 windows
/// (`shared/reference/calib`), and returns its fake-quant perplexity on WikiText-2 test,
/// 40 × 512 (the protocol of `host/src/eval/perplexity.rs`). Prints a table row with the
/// wall time. Panics without `GS_SMOLLM2_DIR`.
pub fn smollm2_fake_quant_ppl(name: &str, quant: &str, pipeline: &str) -> f64 {
    let model = smollm2().expect("set GS_SMOLLM2_DIR to the SmolLM2-135M-q41dq directory");
    let shared = root().join("../shared");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    let manifest = format!(
        r#"[model]
path = "{model}"

[calibration]
dataset = "{calib}"
nsamples = 32
seqlen = 128

[quant]
{quant}

{pipeline}

[export]
format = "compressed-tensors"
output = "{out}"

[eval]
dataset = "{test}"
seqlen = 512
windows = 40
points = ["fake_quant"]
"#,
        model = model.display(),
        calib = shared
            .join("reference/calib/smollm2-wikitext2-train-32x128.json")
            .display(),
        out = out.display(),
        test = shared.join("data/wikitext-2-raw/wiki.test.raw").display(),
    );
    let path = write_manifest(dir.path(), &manifest);
    let bin = release_dir().join(format!("gs-host{}", std::env::consts::EXE_SUFFIX));
    let start = std::time::Instant::now();
    let o = Command::new(bin)
        .args(["--manifest", &path.to_string_lossy()])
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn")
        .output()
        .expect("gs-host runs");
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report parses");
    let ppl = report["perplexity"]
        .as_array()
        .and_then(|points| points.iter().find(|p| p["point"] == "fake_quant"))
        .and_then(|p| p["ppl"].as_f64())
        .expect("a fake_quant perplexity in report.json");
    println!(
        "| {name} | {ppl:.4} | {:.0} s (with the 40-window evaluation) |",
        start.elapsed().as_secs_f64()
    );
    ppl
}
