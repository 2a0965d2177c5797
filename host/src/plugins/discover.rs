//! Where plugins are looked for.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::PluginError;

/// Where a plugin file was found; decides precedence and how strictly oddities are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PluginSource {
    /// A `path` pinned in the manifest's `[plugins.<name>]`.
    Pinned,
    /// `plugins/` beside the manifest.
    ManifestDir,
    /// `--plugin-dir DIR`.
    Flag,
    /// `GS_PLUGIN_PATH`.
    Env,
    /// Shipped with the binary: `<exe dir>/plugins/`, or during development the directory
    /// cargo builds into (where the workspace's plugin `.so` files land).
    BuiltIn,
}

impl PluginSource {
    pub fn label(self) -> &'static str {
        match self {
            Self::Pinned => "manifest pin",
            Self::ManifestDir => "plugins/ beside the manifest",
            Self::Flag => "--plugin-dir",
            Self::Env => "GS_PLUGIN_PATH",
            Self::BuiltIn => "built-in",
        }
    }
}

/// The ordered list of directories (and pinned files) to search.
#[derive(Debug, Clone, Default)]
pub struct SearchPath {
    pub dirs: Vec<(PathBuf, PluginSource)>,
    pub files: Vec<(PathBuf, PluginSource)>,
}

impl SearchPath {
    /// The standard search path: `plugins/` beside the manifest, each `--plugin-dir`, each
    /// entry of `GS_PLUGIN_PATH` (`:`-separated), then the built-in directory.
    pub fn standard(
        manifest_dir: Option<&Path>,
        flag_dirs: &[PathBuf],
        env: Option<&OsStr>,
        builtin: bool,
    ) -> Self {
        let mut sp = SearchPath::default();
        if let Some(d) = manifest_dir {
            let p = d.join("plugins");
            if p.is_dir() {
                sp.dirs.push((p, PluginSource::ManifestDir));
            }
        }
        for d in flag_dirs {
            sp.dirs.push((d.clone(), PluginSource::Flag));
        }
        if let Some(env) = env {
            for d in std::env::split_paths(env).filter(|p| !p.as_os_str().is_empty()) {
                sp.dirs.push((d, PluginSource::Env));
            }
        }
        if builtin {
            if let Some(d) = builtin_dir() {
                sp.dirs.push((d, PluginSource::BuiltIn));
            }
        }
        sp
    }
}

/// `<exe dir>/plugins` when it exists (an installed layout), else the executable's own
/// directory (cargo's `target/<profile>/`, where workspace plugins are built).
pub fn builtin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    let installed = dir.join("plugins");
    Some(if installed.is_dir() { installed } else { dir })
}

/// Whether a file name looks like a shared library on this platform.
pub fn is_shared_library(path: &Path) -> bool {
    path.extension() == Some(OsStr::new(std::env::consts::DLL_EXTENSION))
}

/// Every shared library on the search path, in search order, each directory sorted by name.
/// A missing explicit directory is an error; a missing `GS_PLUGIN_PATH` entry is skipped.
pub fn discover(search: &SearchPath) -> Result<Vec<(PathBuf, PluginSource)>, PluginError> {
    let mut out: Vec<(PathBuf, PluginSource)> = search.files.clone();
    for (dir, source) in &search.dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if *source == PluginSource::Env && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!("GS_PLUGIN_PATH entry {} does not exist", dir.display());
                continue;
            }
            Err(e) => {
                return Err(PluginError::ReadDir {
                    dir: dir.clone(),
                    source: e,
                })
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PluginError::ReadDir {
                dir: dir.clone(),
                source: e,
            })?;
            let path = entry.path();
            if is_shared_library(&path) && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        out.extend(files.into_iter().map(|p| (p, *source)));
    }
    // The same file reached twice (a directory listed twice) is loaded once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(p, _)| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_shared_libraries_sorted_and_once() {
        let d = tempfile::tempdir().unwrap();
        let ext = std::env::consts::DLL_EXTENSION;
        for n in ["b", "a"] {
            std::fs::write(d.path().join(format!("lib{n}.{ext}")), b"x").unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
        let sp = SearchPath {
            dirs: vec![
                (d.path().to_path_buf(), PluginSource::Flag),
                (d.path().to_path_buf(), PluginSource::Env),
            ],
            files: vec![],
        };
        let found = discover(&sp).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [format!("liba.{ext}"), format!("libb.{ext}")]);
        assert!(found.iter().all(|(_, s)| *s == PluginSource::Flag));
    }

    #[test]
    fn missing_flag_dir_is_an_error_missing_env_dir_is_not() {
        let sp = SearchPath {
            dirs: vec![(PathBuf::from("/nonexistent/gs"), PluginSource::Env)],
            files: vec![],
        };
        assert!(discover(&sp).unwrap().is_empty());
        let sp = SearchPath {
            dirs: vec![(PathBuf::from("/nonexistent/gs"), PluginSource::Flag)],
            files: vec![],
        };
        let e = discover(&sp).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/gs"), "{e}");
    }
}
