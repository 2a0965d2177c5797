//! Builds the AscendCL emulator (`ascendcl-sys/emulator`) with cargo and lays it out like a
//! CANN install: `<home>/lib64/libascendcl.so` and `libacl_cblas.so`, both links to the one
//! emulator library (so they share its state, as the real libraries share the device).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ascendcl-sys has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Which emulator build.
#[derive(Clone, Copy)]
pub enum Variant {
    /// Every symbol.
    Full,
    /// Without `aclrtSynchronizeStream`.
    HideSymbol,
    /// Only `libascendcl.so` in the install (no `libacl_cblas.so`).
    NoCblas,
}

/// An emulated CANN home (`ASCEND_HOME_PATH`) for `variant`.
pub fn emulator_home(variant: Variant) -> &'static Path {
    static FULL: OnceLock<PathBuf> = OnceLock::new();
    static HIDE: OnceLock<PathBuf> = OnceLock::new();
    static NO_CBLAS: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name, features, cblas) = match variant {
        Variant::Full => (&FULL, "full", None, true),
        Variant::HideSymbol => (&HIDE, "hide-symbol", Some("hide-symbol"), true),
        Variant::NoCblas => (&NO_CBLAS, "no-cblas", None, false),
    };
    cell.get_or_init(|| {
        // Separate target directories: one feature set each, never beside gs-host.
        let build = match features {
            Some(_) => target_dir().join("ascendcl-emulator").join(name),
            None => target_dir().join("ascendcl-emulator").join("plain"),
        };
        let mut args = vec![
            "build".to_string(),
            "-p".into(),
            "gs-ascendcl-emulator".into(),
            "--target-dir".into(),
            build.display().to_string(),
        ];
        if let Some(f) = features {
            args.push("--features".into());
            args.push(f.into());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(&args)
            .current_dir(root())
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building the emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let so = build.join("debug/libgs_ascendcl_emulator.so");
        let home = target_dir()
            .join("ascendcl-emulator")
            .join(format!("home-{name}"));
        let lib64 = home.join("lib64");
        std::fs::create_dir_all(&lib64).expect("create lib64");
        let mut names = vec!["libascendcl.so"];
        if cblas {
            names.push("libacl_cblas.so");
        }
        for n in names {
            // Link under a private name, then rename: atomic if another test process races.
            let tmp = lib64.join(format!("{n}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&so, &tmp).expect("symlink");
            std::fs::rename(&tmp, lib64.join(n)).expect("rename");
        }
        home
    })
}

/// `libascendcl.so` of an emulated home.
pub fn emulator_lib(variant: Variant) -> PathBuf {
    emulator_home(variant).join("lib64/libascendcl.so")
}

/// Tests sharing the process-wide emulator state (and the environment it reads at aclInit)
/// run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets emulator variables for the guard's lifetime (under [`serial`]).
pub struct EnvGuard(Vec<&'static str>);

impl EnvGuard {
    pub fn set(vars: &[(&'static str, &str)]) -> EnvGuard {
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        EnvGuard(vars.iter().map(|(k, _)| *k).collect())
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for k in &self.0 {
            std::env::remove_var(k);
        }
    }
}

/// The emulator's counters, read through its `gsemu_counter` export.
pub struct Counters {
    lib: libloading::Library,
}

impl Counters {
    pub fn open(variant: Variant) -> Counters {
        // SAFETY: the emulator has no initializers; the same file the runtime opens, so the
        // same instance.
        let lib = unsafe { libloading::Library::new(emulator_lib(variant)) }.expect("emulator");
        Counters { lib }
    }

    pub fn get(&self, name: &str) -> i64 {
        let c = std::ffi::CString::new(name).expect("name");
        // SAFETY: the emulator's documented signature.
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char) -> i64> =
                self.lib.get(b"gsemu_counter\0").expect("gsemu_counter");
            let v = f(c.as_ptr());
            assert!(v >= 0, "unknown emulator counter {name}");
            v
        }
    }

    /// The cumulative counters, to compare before and after a test.
    pub fn snapshot(&self) -> Snapshot {
        let names = [
            "init",
            "finalize",
            "mallocs",
            "frees",
            "streams_created",
            "streams_destroyed",
            "contexts_created",
            "contexts_destroyed",
            "devices_set",
            "devices_reset",
            "protocol_errors",
            "gemms_enqueued",
            "gemms_run",
        ];
        Snapshot(names.iter().map(|n| (*n, self.get(n))).collect())
    }

    /// Asserts that everything made since `before` was released, init and finalize balanced,
    /// and the emulator saw no protocol error; returns the deltas.
    pub fn assert_balanced(&self, before: &Snapshot) -> Snapshot {
        let now = self.snapshot();
        let d = now.minus(before);
        assert_eq!(d.get("init"), d.get("finalize"), "init/finalize: {d:?}");
        assert_eq!(d.get("mallocs"), d.get("frees"), "malloc/free: {d:?}");
        assert_eq!(
            d.get("streams_created"),
            d.get("streams_destroyed"),
            "streams: {d:?}"
        );
        assert_eq!(
            d.get("contexts_created"),
            d.get("contexts_destroyed"),
            "contexts: {d:?}"
        );
        assert_eq!(
            d.get("devices_set"),
            d.get("devices_reset"),
            "devices: {d:?}"
        );
        assert_eq!(d.get("protocol_errors"), 0, "protocol errors: {d:?}");
        assert_eq!(d.get("gemms_enqueued"), d.get("gemms_run"), "gemms: {d:?}");
        for live in [
            "allocs_live",
            "streams_live",
            "contexts_live",
            "devices_live",
        ] {
            assert_eq!(self.get(live), 0, "{live}");
        }
        assert_eq!(self.get("initialized"), 0, "still initialized");
        d
    }
}

#[derive(Debug)]
pub struct Snapshot(Vec<(&'static str, i64)>);

impl Snapshot {
    pub fn get(&self, name: &str) -> i64 {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no counter {name} in the snapshot"))
    }

    fn minus(&self, other: &Snapshot) -> Snapshot {
        Snapshot(self.0.iter().map(|(n, v)| (*n, v - other.get(n))).collect())
    }
}
