//! The full SmolLM2-135M GPTQ run, end to end through the real CLI and plugin `.so`: load the
//! model, embed the anchors' 32 × 128 calibration windows, GPTQ W4A16 g64 (default parameters)
//! block by block, write the compressed-tensors checkpoint. No evaluation. The issue's anchor is
//! llm-compressor's 46 s from start to quantized model (40 s in `oneshot()`).
//!
//! Opt-in: it needs the model's shards (`shared/models/SmolLM2-135M-q41dq/fetch.sh`), and
//! a sample takes most of a minute:
//!
//! ```text
//! GS_SMOLLM2_DIR=/path/to/SmolLM2-135M-q41dq cargo bench -p gs-benches --bench smollm2
//! ```
//!
//! Two variants: the default run, and `[run] output_error = false` (no float block forward for
//! the report's per-layer error).

use std::path::{Path, PathBuf};
use std::process::Command;

use divan::Bencher;

fn main() {
    if std::env::var_os("GS_SMOLLM2_DIR").is_none() {
        eprintln!("smollm2 bench skipped: set GS_SMOLLM2_DIR to the SmolLM2-135M-q41dq directory");
        return;
    }
    build_release();
    divan::main();
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("release")
}

/// The CLI and the GPTQ plugin, as users run them.
fn build_release() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "gs-host",
            "-p",
            "gs-plugin-gptq",
        ])
        .current_dir(root())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --release failed");
}

fn manifest(model: &Path, out: &Path, run: &str) -> String {
    let shared = root().join("../shared");
    format!(
        r#"[model]
path = "{model}"

[calibration]
dataset = "{calib}"
nsamples = 32
seqlen = 128

[quant]
scheme = "w4a16"
weights = {{ group_size = 64 }}

[[pipeline]]
algorithm = "gptq"

[export]
format = "compressed-tensors"
output = "{out}"
{run}"#,
        model = model.display(),
        calib = shared
            .join("reference/calib/smollm2-wikitext2-train-32x128.json")
            .display(),
        out = out.display(),
    )
}

fn bench_run(bencher: Bencher, run: &str) {
    let model = PathBuf::from(std::env::var_os("GS_SMOLLM2_DIR").expect("checked in main"));
    let bin = release_dir().join(format!("gs-host{}", std::env::consts::EXE_SUFFIX));
    bencher
        .with_inputs(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("run.toml");
            let text = manifest(&model, &dir.path().join("out"), run);
            std::fs::write(&path, text).expect("write manifest");
            (dir, path)
        })
        .bench_local_values(|(dir, path)| {
            let o = Command::new(&bin)
                .args(["--manifest", &path.to_string_lossy()])
                .env_remove("GS_PLUGIN_PATH")
                .env("RUST_LOG", "warn")
                .output()
                .expect("gs-host runs");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            dir
        });
}

/// Default settings: the report's per-layer output error is measured.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn gptq_w4a16_g64_end_to_end(bencher: Bencher) {
    bench_run(bencher, "");
}

/// `[run] output_error = false`.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn gptq_w4a16_g64_without_output_error(bencher: Bencher) {
    bench_run(bencher, "\n[run]\noutput_error = false\n");
}
