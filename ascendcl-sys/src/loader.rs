//! Where the AscendCL libraries are looked for at run time.
//!
//! Nothing links against CANN: `libascendcl.so` is opened with `dlopen` from, in order,
//! `$GS_ASCENDCL_LIB` (a file; when set, the only place looked), `$ASCEND_HOME_PATH/lib64`,
//! `$ASCEND_TOOLKIT_HOME/lib64`, every directory of `$LD_LIBRARY_PATH`, and the default
//! toolkit install. `libacl_cblas.so` is looked for beside the `libascendcl.so` that was
//! loaded first, then in the same places.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::AclError;

/// Environment variable naming the `libascendcl.so` file to load (tests point it at the
/// emulator); when set, nothing else is searched.
pub const OVERRIDE_ENV: &str = "GS_ASCENDCL_LIB";
/// The AscendCL runtime library.
pub const RUNTIME_LIB: &str = "libascendcl.so";
/// The library holding `aclblas*`.
pub const CBLAS_LIB: &str = "libacl_cblas.so";
/// Where the CANN toolkit installs by default (its `set_env.sh` sets the variables below).
pub const DEFAULT_TOOLKIT: &str = "/usr/local/Ascend/ascend-toolkit/latest";
/// The command that usually makes the runtime findable.
pub const SET_ENV_HINT: &str = "source /usr/local/Ascend/ascend-toolkit/set_env.sh";

/// One place a library was looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The file that was checked.
    pub path: PathBuf,
    /// Why it was checked, e.g. `"$ASCEND_HOME_PATH/lib64"`.
    pub origin: String,
}

/// The environment the search reads, captured once (tests build it explicitly instead of
/// changing the process environment).
#[derive(Debug, Clone, Default)]
pub struct SearchEnv {
    /// `$GS_ASCENDCL_LIB`.
    pub override_lib: Option<OsString>,
    /// `$ASCEND_HOME_PATH`.
    pub ascend_home: Option<OsString>,
    /// `$ASCEND_TOOLKIT_HOME`.
    pub toolkit_home: Option<OsString>,
    /// `$LD_LIBRARY_PATH`.
    pub ld_library_path: Option<OsString>,
    /// Also look in [`DEFAULT_TOOLKIT`] (on for the process environment).
    pub default_install: bool,
}

impl SearchEnv {
    /// The process environment.
    pub fn from_env() -> Self {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        Self {
            override_lib: var(OVERRIDE_ENV),
            ascend_home: var("ASCEND_HOME_PATH"),
            toolkit_home: var("ASCEND_TOOLKIT_HOME"),
            ld_library_path: var("LD_LIBRARY_PATH"),
            default_install: true,
        }
    }

    /// Only an explicit `libascendcl.so` file (the emulator, in tests).
    pub fn file(path: impl Into<OsString>) -> Self {
        Self {
            override_lib: Some(path.into()),
            ..Self::default()
        }
    }

    /// The variables that were not set (named in the not-found error, so a user sees that
    /// e.g. `$ASCEND_HOME_PATH` was never set rather than pointing at the wrong place).
    pub fn unset(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.override_lib.is_none() {
            out.push(OVERRIDE_ENV);
        }
        if self.ascend_home.is_none() {
            out.push("ASCEND_HOME_PATH");
        }
        if self.toolkit_home.is_none() {
            out.push("ASCEND_TOOLKIT_HOME");
        }
        if self.ld_library_path.is_none() {
            out.push("LD_LIBRARY_PATH");
        }
        out
    }

    /// Every place `file` is looked for, in order.
    pub fn candidates(&self, file: &str) -> Vec<Candidate> {
        let mut out = Vec::new();
        let mut push = |path: PathBuf, origin: String| {
            if !out.iter().any(|c: &Candidate| c.path == path) {
                out.push(Candidate { path, origin });
            }
        };
        if let Some(home) = &self.ascend_home {
            push(
                Path::new(home).join("lib64").join(file),
                "$ASCEND_HOME_PATH/lib64".into(),
            );
        }
        if let Some(home) = &self.toolkit_home {
            push(
                Path::new(home).join("lib64").join(file),
                "$ASCEND_TOOLKIT_HOME/lib64".into(),
            );
        }
        if let Some(ld) = &self.ld_library_path {
            for dir in std::env::split_paths(ld).filter(|d| !d.as_os_str().is_empty()) {
                push(dir.join(file), "$LD_LIBRARY_PATH".into());
            }
        }
        if self.default_install {
            push(
                Path::new(DEFAULT_TOOLKIT).join("lib64").join(file),
                "default CANN install".into(),
            );
        }
        out
    }

    /// The `libascendcl.so` to load.
    pub fn locate_runtime(&self) -> Result<PathBuf, AclError> {
        if let Some(file) = &self.override_lib {
            let path = PathBuf::from(file);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(AclError::NotFound {
                    file: RUNTIME_LIB,
                    looked: vec![Candidate {
                        path,
                        origin: format!("${OVERRIDE_ENV}"),
                    }],
                    unset: Vec::new(),
                })
            };
        }
        self.first_existing(RUNTIME_LIB, Vec::new())
    }

    /// The `libacl_cblas.so` to load: beside `runtime` first.
    pub fn locate_cblas(&self, runtime: &Path) -> Result<PathBuf, AclError> {
        let beside = runtime.parent().map(|dir| Candidate {
            path: dir.join(CBLAS_LIB),
            origin: format!("beside {}", runtime.display()),
        });
        self.first_existing(CBLAS_LIB, beside.into_iter().collect())
    }

    fn first_existing(
        &self,
        file: &'static str,
        mut looked: Vec<Candidate>,
    ) -> Result<PathBuf, AclError> {
        for c in self.candidates(file) {
            if !looked.iter().any(|l| l.path == c.path) {
                looked.push(c);
            }
        }
        match looked.iter().find(|c| c.path.is_file()) {
            Some(c) => Ok(c.path.clone()),
            None => Err(AclError::NotFound {
                file,
                looked,
                unset: self.unset(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_the_documented_order_without_duplicates() {
        let env = SearchEnv {
            override_lib: None,
            ascend_home: Some("/a".into()),
            toolkit_home: Some("/a".into()),
            ld_library_path: Some("/b::/c".into()),
            default_install: true,
        };
        let paths: Vec<_> = env
            .candidates(RUNTIME_LIB)
            .into_iter()
            .map(|c| c.path)
            .collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/a/lib64/libascendcl.so"),
                PathBuf::from("/b/libascendcl.so"),
                PathBuf::from("/c/libascendcl.so"),
                PathBuf::from("/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so"),
            ]
        );
    }

    #[test]
    fn the_not_found_error_lists_every_place_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let env = SearchEnv {
            ld_library_path: Some(dir.path().as_os_str().to_owned()),
            default_install: true,
            ..SearchEnv::default()
        };
        let msg = env.locate_runtime().unwrap_err().to_string();
        assert!(
            msg.contains(&dir.path().join(RUNTIME_LIB).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("$LD_LIBRARY_PATH"), "{msg}");
        assert!(msg.contains(DEFAULT_TOOLKIT), "{msg}");
        assert!(msg.contains("ASCEND_HOME_PATH"), "{msg}");
        assert!(msg.contains(SET_ENV_HINT), "{msg}");
    }

    #[test]
    fn an_explicit_file_is_the_only_place_looked() {
        let env = SearchEnv::file("/nowhere/libascendcl.so");
        let msg = env.locate_runtime().unwrap_err().to_string();
        assert!(
            msg.contains("/nowhere/libascendcl.so ($GS_ASCENDCL_LIB)"),
            "{msg}"
        );
        assert!(!msg.contains(DEFAULT_TOOLKIT), "{msg}");
    }
}
