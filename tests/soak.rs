//! Soak: the quickstart pipeline (RTN W4A16 on the bundled model, calibrated, evaluated,
//! compressed-tensors export) run 20 times in one process through the library entry point
//! `gs_host::cli::run_args`. Memory and open file descriptors must not grow, and every output
//! must be identical.

use std::path::Path;

use gs_tests::*;

/// Resident set size of this process, bytes (`/proc/self/status`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("a VmRSS line")
        * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn quickstart(out: &Path) -> String {
    let assets = root().join("assets");
    format!(
        r#"[model]
path = "{model}"

[calibration]
dataset = "{data}"
nsamples = 16
seqlen = 64

[quant]
scheme = "w4a16"
weights = {{ group_size = 64 }}

[[quant.override]]
pattern = 'mlp\.down_proj$'
scheme = "w4a16"
weights = {{ granularity = "channel" }}

[[pipeline]]
algorithm = "rtn"

[export]
format = "compressed-tensors"
output = "{out}"

[eval]
dataset = "{data}"
seqlen = 256
windows = 40
"#,
        model = assets.join("models/stories260K").display(),
        data = assets
            .join("data/tinystories/tinystories-sample.txt")
            .display(),
        out = out.display(),
    )
}

#[test]
#[cfg(target_os = "linux")]
fn the_quickstart_runs_twenty_times_in_one_process_without_growing() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let m = write_manifest(work.path(), &quickstart(&out));
    let plugins = debug_dir().to_string_lossy().into_owned();
    let args = [
        "gs-host",
        "--manifest",
        m.to_str().unwrap(),
        "--plugin-dir",
        &plugins,
        "--force",
    ];
    let mut first = None;
    let mut samples = Vec::new();
    for i in 0..20 {
        if let Err(e) = gs_host::cli::run_args(args) {
            panic!("run {i}: {e:#}");
        }
        let digest = tree_digest(&out);
        match &first {
            None => first = Some(digest),
            Some(d) => assert_eq!(&digest, d, "run {i} wrote something else"),
        }
        samples.push((rss_bytes(), open_fds()));
    }
    // The first runs warm up allocator pools and load the plugins (never unloaded, by design);
    // from the third on nothing may accumulate.
    let (rss_3, fds_3) = samples[2];
    let (rss_20, fds_20) = samples[19];
    println!("RSS, open fds after each run: {samples:?}");
    assert_eq!(fds_20, fds_3, "open file descriptors grew: {samples:?}");
    assert!(
        rss_20 <= rss_3 + 8 * 1024 * 1024,
        "resident memory grew from {rss_3} to {rss_20} bytes: {samples:?}"
    );
}
