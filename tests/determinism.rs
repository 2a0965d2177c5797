//! Determinism: the same manifest gives byte-identical output directories — checkpoint,
//! `gs-run.json` and the report — whatever the number of threads (`RAYON_NUM_THREADS`, which
//! sizes the pool every parallel loop and faer GEMM of the host and the plugins runs on), for
//! each algorithm and each format that can store its scheme.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gs_tests::*;

/// The stories260K calibration windows of the CI-sized tests.
fn calib() -> PathBuf {
    root().join("../shared/reference/calib/stories260K-tinystories-16x64.json")
}

/// Runs `manifest` (always the same text at the same path, so `gs-run.json` can match) with
/// `threads` threads and returns the digest of every output file.
fn run(work: &Path, manifest: &Path, threads: usize) -> BTreeMap<PathBuf, String> {
    let out = work.join("out");
    let o = Command::new(gs_host_bin())
        .args(["--manifest", &manifest.to_string_lossy()])
        .current_dir(work)
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("gs-host runs");
    assert!(o.status.success(), "{}", stderr(&o));
    let digest = tree_digest(&out);
    std::fs::remove_dir_all(&out).expect("remove output");
    digest
}

fn assert_deterministic(name: &str, quant: &str, pipeline: &str, formats: &[&str]) {
    for format in formats {
        let work = tempfile::tempdir().unwrap();
        let text = format!(
            "[model]\npath = \"{model}\"\n\n[calibration]\ndataset = \"{calib}\"\nnsamples = 16\n\
             seqlen = 64\n\n[quant]\n{quant}\n\n{pipeline}\n\n[export]\nformat = \"{format}\"\n\
             output = \"out\"\n",
            model = stories260k().display(),
            calib = calib().display(),
        );
        let m = write_manifest(work.path(), &text);
        let one = run(work.path(), &m, 1);
        let two = run(work.path(), &m, 2);
        let again = run(work.path(), &m, 2);
        assert!(one.len() > 5, "{name} {format}: {one:?}");
        assert_eq!(one, two, "{name} ({format}): 1 thread against 2");
        assert_eq!(two, again, "{name} ({format}): two runs with 2 threads");
    }
}

const W4_G4: &str = "scheme = \"w4a16\"\nweights = { group_size = 4 }";

#[test]
fn rtn_is_deterministic() {
    assert_deterministic(
        "rtn",
        W4_G4,
        "[[pipeline]]\nalgorithm = \"rtn\"",
        &["fake", "compressed-tensors"],
    );
}

#[test]
fn gptq_is_deterministic() {
    assert_deterministic(
        "gptq",
        W4_G4,
        "[[pipeline]]\nalgorithm = \"gptq\"",
        &["fake", "compressed-tensors"],
    );
}

#[test]
fn awq_is_deterministic() {
    assert_deterministic(
        "awq",
        W4_G4,
        "[[pipeline]]\nalgorithm = \"awq\"",
        &["fake", "compressed-tensors"],
    );
}

#[test]
fn smoothquant_is_deterministic() {
    // Static per-tensor W8A8 (MindIE's W8A8, the Ascend format's scheme) and token-dynamic.
    assert_deterministic(
        "smoothquant → rtn, static",
        "scheme = \"w8a8\"",
        "[[pipeline]]\nalgorithm = \"smoothquant\"\n\n[[pipeline]]\nalgorithm = \"rtn\"",
        &["fake", "ascend"],
    );
    let sq_gptq = "[[pipeline]]\nalgorithm = \"smoothquant\"\n\n[[pipeline]]\nalgorithm = \"gptq\"";
    assert_deterministic(
        "smoothquant → gptq, dynamic",
        "scheme = \"w8a8_dynamic\"",
        sq_gptq,
        &["compressed-tensors"],
    );
    // Ascend's dynamic quantization scales by absmax / 127.
    assert_deterministic(
        "smoothquant → gptq, dynamic (qmax rule)",
        "scheme = \"w8a8_dynamic\"\nactivations = { scale_rule = \"qmax\" }",
        sq_gptq,
        &["ascend"],
    );
}
