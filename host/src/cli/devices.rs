//! `gs-host devices`: the CPU, and the Ascend NPUs when an AscendCL runtime loads.

use std::fmt::Write as _;

use ascendcl_sys::{AclError, Runtime};

/// Prints the report; a missing runtime is a line of the report, not a failure.
pub fn run() -> anyhow::Result<()> {
    let mut out = cpu_lines();
    out.push_str(&ascend_lines(Runtime::load()));
    print!("{out}");
    Ok(())
}

fn cpu_lines() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let (have, missing) = simd_features();
    let mut out = format!(
        "cpu: {}, {cores} logical cores available",
        std::env::consts::ARCH
    );
    if let Some(model) = cpu_model() {
        let _ = write!(out, " ({model})");
    }
    out.push('\n');
    let _ = write!(out, "  simd: {}", list_or_none(&have));
    if !missing.is_empty() {
        let _ = write!(out, " (not available: {})", missing.join(" "));
    }
    out.push('\n');
    out
}

fn list_or_none(v: &[&str]) -> String {
    if v.is_empty() {
        "none detected".into()
    } else {
        v.join(" ")
    }
}

/// The SIMD extensions the forward's kernels can use: (detected, not detected).
#[cfg(target_arch = "x86_64")]
fn simd_features() -> (Vec<&'static str>, Vec<&'static str>) {
    let all = [
        ("sse4.2", std::is_x86_feature_detected!("sse4.2")),
        ("avx", std::is_x86_feature_detected!("avx")),
        ("avx2", std::is_x86_feature_detected!("avx2")),
        ("fma", std::is_x86_feature_detected!("fma")),
        ("f16c", std::is_x86_feature_detected!("f16c")),
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
        ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
        ("avx512vl", std::is_x86_feature_detected!("avx512vl")),
    ];
    split(&all)
}

/// The SIMD extensions the forward's kernels can use: (detected, not detected).
#[cfg(target_arch = "aarch64")]
fn simd_features() -> (Vec<&'static str>, Vec<&'static str>) {
    let all = [
        ("neon", std::arch::is_aarch64_feature_detected!("neon")),
        ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
        ("sve", std::arch::is_aarch64_feature_detected!("sve")),
    ];
    split(&all)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn simd_features() -> (Vec<&'static str>, Vec<&'static str>) {
    (Vec::new(), Vec::new())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn split(all: &[(&'static str, bool)]) -> (Vec<&'static str>, Vec<&'static str>) {
    let have = all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
    let missing = all.iter().filter(|(_, on)| !*on).map(|(n, _)| *n).collect();
    (have, missing)
}

/// The CPU model from /proc/cpuinfo (Linux; x86 "model name", Arm has none).
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .filter(|m| !m.is_empty())
}

fn ascend_lines(rt: Result<Runtime, AclError>) -> String {
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return format!("ascend: not available: {e}\n"),
    };
    let mut out = format!("ascend: runtime {}", rt.library_path().display());
    let mut versions = Vec::new();
    if let Some(v) = rt.cann_version() {
        versions.push(format!("CANN runtime {v}"));
    }
    if let Some((a, b, c)) = rt.acl_version() {
        versions.push(format!("AscendCL {a}.{b}.{c}"));
    }
    if !versions.is_empty() {
        let _ = write!(out, " ({})", versions.join(", "));
    }
    let count = match rt.device_count() {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(out, "\n  error: {e}");
            return out;
        }
    };
    let _ = writeln!(out, ", {count} NPU(s) visible");
    for id in 0..count {
        let _ = writeln!(out, "npu {id}: {}", npu_line(&rt, id));
    }
    out
}

fn npu_line(rt: &Runtime, id: u32) -> String {
    let dev = match rt.open_device(id) {
        Ok(d) => d,
        Err(e) => return format!("error: {e}"),
    };
    // The SoC name is asked with the device set: some runtimes answer only then.
    let soc = rt.soc_name().unwrap_or_else(|| "unknown SoC".into());
    match dev.mem_info() {
        Ok(m) => format!("{soc}, memory {} free of {}", gib(m.free), gib(m.total)),
        Err(e) => format!("{soc}, memory unknown: {e}"),
    }
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_lines_name_the_architecture_and_the_simd_features() {
        let s = cpu_lines();
        assert!(
            s.starts_with(&format!("cpu: {}, ", std::env::consts::ARCH)),
            "{s}"
        );
        assert!(s.contains("logical cores available"), "{s}");
        #[cfg(target_arch = "x86_64")]
        assert!(s.contains("avx2"), "{s}");
    }

    #[test]
    fn without_a_runtime_one_line_says_why() {
        let err = ascendcl_sys::SearchEnv::file("/nonexistent/libascendcl.so")
            .locate_runtime()
            .unwrap_err();
        let s = ascend_lines(Err(err));
        assert!(
            s.starts_with("ascend: not available: no AscendCL runtime found"),
            "{s}"
        );
        assert_eq!(s.lines().count(), 1, "{s}");
    }

    #[test]
    fn memory_in_gib() {
        assert_eq!(gib(3 << 29), "1.50 GiB");
    }
}
