//! `gs-host devices` through the real binary: without an Ascend runtime, with the AscendCL
//! emulator (a test stand-in on host memory: it proves the call protocol, not NPU numerics or
//! speed), and with a library that lacks a symbol.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;

use gs_tests::ascend_emulator::{emulator_home, emulator_lib, Variant};
use gs_tests::*;

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

#[test]
fn devices_without_a_runtime_lists_the_cpu_and_says_why_there_is_no_npu() {
    let work = tempfile::tempdir().unwrap();
    let ld = work.path().join("lib");
    std::fs::create_dir(&ld).unwrap();
    let o = gs_host_with_env(
        work.path(),
        &["devices"],
        &[("LD_LIBRARY_PATH", ld.as_os_str())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("cpu: "), "{out}");
    assert!(lines[0].contains("logical cores available"), "{out}");
    assert!(lines[1].starts_with("  simd: "), "{out}");
    #[cfg(target_arch = "x86_64")]
    assert!(
        lines[1].contains("avx2") || lines[1].contains("sse4.2"),
        "{out}"
    );
    let ascend: Vec<&&str> = lines.iter().filter(|l| l.starts_with("ascend:")).collect();
    assert_eq!(ascend.len(), 1, "{out}");
    let line = ascend[0];
    assert!(
        line.starts_with(
            "ascend: not available: no AscendCL runtime found: libascendcl.so is not in "
        ),
        "{out}"
    );
    assert!(
        line.contains(&format!(
            "{} ($LD_LIBRARY_PATH)",
            ld.join("libascendcl.so").display()
        )),
        "{out}"
    );
    assert!(line.contains("$ASCEND_HOME_PATH"), "{out}");
    assert!(
        line.contains("`source /usr/local/Ascend/ascend-toolkit/set_env.sh`"),
        "{out}"
    );
    assert!(!out.contains("npu "), "{out}");
}

#[test]
fn devices_with_the_emulator_lists_each_npu_and_releases_everything() {
    let work = tempfile::tempdir().unwrap();
    let stats = work.path().join("gsemu-stats.txt");
    let home = emulator_home(Variant::Full);
    let o = gs_host_with_env(
        work.path(),
        &["devices"],
        &[
            ("ASCEND_HOME_PATH", home.as_os_str()),
            ("GSEMU_DEVICES", OsStr::new("2")),
            ("GSEMU_DEVICE_MEMORY", OsStr::new("34359738368")),
            ("GSEMU_STATS", stats.as_os_str()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("cpu: "), "{out}");
    assert!(
        out.contains(&format!(
            "ascend: runtime {} (CANN runtime 0.0.0-emulator, AscendCL 1.0.0), 2 NPU(s) visible\n",
            home.join("lib64/libascendcl.so").display()
        )),
        "{out}"
    );
    for id in 0..2 {
        assert!(
            out.contains(&format!(
                "npu {id}: Emulated-Ascend910B4, memory 32.00 GiB free of 32.00 GiB\n"
            )),
            "{out}"
        );
    }
    // The process initialized once, finalized once, and released every device and context.
    let s = read_stats(&stats);
    for (name, want) in [
        ("init", 1),
        ("finalize", 1),
        ("devices_set", 2),
        ("devices_reset", 2),
        ("contexts_created", 2),
        ("contexts_destroyed", 2),
        ("allocs_live", 0),
        ("streams_live", 0),
        ("contexts_live", 0),
        ("devices_live", 0),
        ("protocol_errors", 0),
    ] {
        assert_eq!(s.get(name), Some(&want), "{name} in {s:?}");
    }
}

#[test]
fn devices_with_a_library_lacking_a_symbol_names_it() {
    let work = tempfile::tempdir().unwrap();
    let lib = emulator_lib(Variant::HideSymbol);
    let o = gs_host_with_env(
        work.path(),
        &["devices"],
        &[("GS_ASCENDCL_LIB", lib.as_os_str())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "ascend: not available: the AscendCL library {} has no symbol aclrtSynchronizeStream",
            lib.display()
        )),
        "{out}"
    );
}

#[test]
fn devices_reports_a_failing_runtime_call_per_npu() {
    let work = tempfile::tempdir().unwrap();
    let home = emulator_home(Variant::Full);
    // The second aclrtSetDevice fails: NPU 1's line carries the named error, NPU 0 is listed.
    let o = gs_host_with_env(
        work.path(),
        &["devices"],
        &[
            ("ASCEND_HOME_PATH", home.as_os_str()),
            ("GSEMU_DEVICES", OsStr::new("2")),
            ("GSEMU_FAIL", OsStr::new("aclrtSetDevice:2")),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("npu 0: Emulated-Ascend910B4, memory"), "{out}");
    assert!(
        out.contains("npu 1: error: aclrtSetDevice (device 1) failed: ACL_ERROR_RT_INTERNAL_ERROR (507000); runtime says: [gs-host AscendCL emulator] injected failure"),
        "{out}"
    );
}
