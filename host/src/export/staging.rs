//! Writing an output directory all-or-nothing: everything goes to a hidden sibling directory
//! that is renamed into place only when complete.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use super::error::ExportError;
use super::RUN_RECORD;

/// A staging directory for an output.
///
/// Created by [`Staging::begin`] as `<parent>/.<name>.gs-tmp-<pid>-<random>` next to the
/// output (so the final rename stays on one file system). A process killed before its commit
/// leaves its staging directory behind; the next export to the same output removes it. Write everything into [`path`](Staging::path),
/// then [`commit`](Staging::commit). Dropping a `Staging` without committing removes the
/// staging directory: the output path never holds a half-written result.
#[derive(Debug)]
pub struct Staging {
    output: PathBuf,
    temp: Option<PathBuf>,
    force: bool,
    /// Parent directories of the output that `begin` created, deepest first: removed again
    /// (when still empty) if the output is never committed.
    created: Vec<PathBuf>,
}

/// Staging directories of this process not yet committed or dropped, with the parent
/// directories created for them, for [`discard_uncommitted`].
static UNCOMMITTED: Mutex<Vec<(PathBuf, Vec<PathBuf>)>> = Mutex::new(Vec::new());

fn uncommitted() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Vec<PathBuf>)>> {
    // A panic while holding the lock leaves a valid list: keep using it.
    UNCOMMITTED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every staging directory of this process that is not committed yet. For a process
/// about to exit without unwinding (a plugin call that timed out cannot be stopped, so the
/// [`Staging`] that owns the directory is never dropped).
pub fn discard_uncommitted() {
    for (temp, created) in uncommitted().drain(..) {
        discard(&temp, &created);
    }
}

/// Removes a staging directory and then the parents created for it, deepest first, as long
/// as they are empty (something else may have been put there meanwhile).
fn discard(temp: &Path, created: &[PathBuf]) {
    if let Err(e) = fs::remove_dir_all(temp) {
        tracing::warn!(path = %temp.display(), error = %e, "could not remove staging directory");
    }
    remove_created(created);
}

/// Removes the directories `begin` created, deepest first, stopping at the first that cannot
/// be removed (not empty); missing ones (never made, when creating failed) are passed over.
fn remove_created(created: &[PathBuf]) {
    for dir in created {
        match fs::remove_dir(dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => break,
            _ => {}
        }
    }
}

impl Staging {
    /// Checks the output path against the source model and prepares a staging directory.
    ///
    /// Refused: see [`Staging::check`]. Missing parent directories of the output are created
    /// (and removed again if the output is never committed).
    pub fn begin(
        output: &Path,
        source_model_dir: &Path,
        force: bool,
    ) -> Result<Staging, ExportError> {
        let (output, name, parent) = Staging::check(output, source_model_dir, force)?;
        let created: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|d| fs::symlink_metadata(d).is_err())
            .map(Path::to_path_buf)
            .collect();
        if let Err(e) = fs::create_dir_all(&parent) {
            // create_dir_all may have made some of them before failing.
            remove_created(&created);
            return Err(ExportError::io("create", &parent)(e));
        }
        let mut prefix = OsString::from(".");
        prefix.push(&name);
        prefix.push(".gs-tmp-");
        remove_stale_staging(&parent, &prefix);
        // The pid in the name tells a later run whether the writer is still alive.
        prefix.push(format!("{}-", std::process::id()));
        let temp = match create_unique_dir(&parent, &prefix) {
            Ok(t) => t,
            Err(e) => {
                remove_created(&created);
                return Err(e);
            }
        };
        uncommitted().push((temp.clone(), created.clone()));
        tracing::debug!(output = %output.display(), staging = %temp.display(), "staging output");
        Ok(Staging {
            output,
            temp: Some(temp),
            force,
            created,
        })
    }

    /// Checks, without creating anything, that `output` may receive an export of the model in
    /// `source_model_dir`; returns the absolute output, its name and its parent.
    ///
    /// Refused: an output that is the source directory, lies inside it, or contains it
    /// (compared after resolving symlinks; a not-yet-existing output is resolved through its
    /// nearest existing ancestor); an output that exists as a file; an existing non-empty
    /// output directory unless `force`.
    pub fn check(
        output: &Path,
        source_model_dir: &Path,
        force: bool,
    ) -> Result<(PathBuf, OsString, PathBuf), ExportError> {
        let output = std::path::absolute(output).map_err(ExportError::io("resolve", output))?;
        let name = output
            .file_name()
            .ok_or_else(|| ExportError::InvalidOutput {
                path: output.clone(),
                reason: "it does not end in a directory name",
            })?
            .to_os_string();
        let parent = output
            .parent()
            .ok_or_else(|| ExportError::InvalidOutput {
                path: output.clone(),
                reason: "it has no parent directory",
            })?
            .to_path_buf();

        let source = fs::canonicalize(source_model_dir)
            .map_err(ExportError::io("resolve", source_model_dir))?;
        let resolved = resolve_nonexistent(&output)?;
        if resolved == source {
            return Err(ExportError::OutputIsSource { output });
        }
        if resolved.starts_with(&source) {
            return Err(ExportError::OutputInsideSource {
                output,
                source_dir: source,
            });
        }
        if source.starts_with(&resolved) {
            return Err(ExportError::SourceInsideOutput {
                output,
                source_dir: source,
            });
        }
        check_existing_output(&output, force)?;
        Ok((output, name, parent))
    }

    /// The staging directory to write into.
    pub fn path(&self) -> &Path {
        // Only `commit` takes it, and that consumes `self`.
        self.temp.as_deref().unwrap_or(Path::new(""))
    }

    /// The final output path (made absolute).
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Flushes everything in the staging directory to disk and moves it to the output path.
    ///
    /// If the output exists (allowed when empty, or with `force`), it is first renamed aside,
    /// then the staging directory is renamed in, then the old output is deleted; if the second
    /// rename fails the old output is put back. Returns the output path.
    pub fn commit(mut self) -> Result<PathBuf, ExportError> {
        let Some(temp) = self.temp.clone() else {
            return Err(ExportError::Verification(
                "staging already committed".into(),
            ));
        };
        sync_tree(&temp)?;
        // The output may have changed since `begin`: check again.
        check_existing_output(&self.output, self.force)?;
        let parent = self.output.parent().unwrap_or(Path::new("/")).to_path_buf();

        let old = match fs::symlink_metadata(&self.output) {
            Ok(_) => {
                let name = self.output.file_name().unwrap_or_default();
                let mut prefix = OsString::from(".");
                prefix.push(name);
                prefix.push(".gs-old-");
                let old = unused_sibling(&parent, &prefix);
                fs::rename(&self.output, &old)
                    .map_err(ExportError::io("move aside", &self.output))?;
                Some(old)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ExportError::Io {
                    action: "access",
                    path: self.output.clone(),
                    source: e,
                })
            }
        };
        if let Err(e) = fs::rename(&temp, &self.output) {
            if let Some(old) = &old {
                if let Err(back) = fs::rename(old, &self.output) {
                    tracing::error!(
                        old = %old.display(),
                        output = %self.output.display(),
                        error = %back,
                        "could not restore the previous output; it is still at the old path"
                    );
                }
            }
            return Err(ExportError::Io {
                action: "rename staging directory to",
                path: self.output.clone(),
                source: e,
            });
        }
        self.temp = None;
        uncommitted().retain(|(p, _)| *p != temp);
        sync_dir(&parent)?;
        if let Some(old) = old {
            // The new output is in place; failing to delete the old copy only wastes space.
            if let Err(e) = fs::remove_dir_all(&old).or_else(|e| {
                // A replaced symlink (or file) is not a directory.
                if e.kind() == ErrorKind::NotADirectory {
                    fs::remove_file(&old)
                } else {
                    Err(e)
                }
            }) {
                tracing::warn!(path = %old.display(), error = %e, "could not remove the previous output");
            }
        }
        tracing::info!(output = %self.output.display(), "output committed");
        Ok(self.output.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            uncommitted().retain(|(p, _)| *p != temp);
            tracing::debug!(staging = %temp.display(), "discarding uncommitted output");
            discard(&temp, &self.created);
        }
    }
}

/// Refuses an output that is a file, or a non-empty directory without `force`. Even with
/// `force`, only a directory that gs-host wrote (it holds [`RUN_RECORD`]) is replaced: a
/// mistyped output path must never delete someone's data.
fn check_existing_output(output: &Path, force: bool) -> Result<(), ExportError> {
    match fs::metadata(output) {
        Ok(m) if !m.is_dir() => Err(ExportError::OutputIsFile {
            path: output.to_path_buf(),
        }),
        Ok(_) => {
            let mut entries = fs::read_dir(output).map_err(ExportError::io("list", output))?;
            if entries.next().is_none() {
                Ok(())
            } else if !force {
                Err(ExportError::OutputNotEmpty {
                    path: output.to_path_buf(),
                })
            } else if !output.join(RUN_RECORD).is_file() {
                Err(ExportError::ForceNotOurs {
                    path: output.to_path_buf(),
                })
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ExportError::Io {
            action: "access",
            path: output.to_path_buf(),
            source: e,
        }),
    }
}

/// Canonical form of an absolute path that may not exist yet: its nearest existing ancestor
/// canonicalized, with the remaining components applied lexically (they cannot be symlinks).
fn resolve_nonexistent(path: &Path) -> Result<PathBuf, ExportError> {
    let mut existing = path;
    let mut rest: Vec<Component<'_>> = Vec::new();
    loop {
        match fs::canonicalize(existing) {
            Ok(mut resolved) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::Normal(n) => resolved.push(n),
                        _ => {}
                    }
                }
                return Ok(resolved);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let (Some(last), Some(parent)) =
                    (existing.components().next_back(), existing.parent())
                else {
                    return Err(ExportError::Io {
                        action: "resolve",
                        path: path.to_path_buf(),
                        source: e,
                    });
                };
                rest.push(last);
                existing = parent;
            }
            Err(e) => {
                return Err(ExportError::Io {
                    action: "resolve",
                    path: existing.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

fn random_suffix() -> String {
    // RandomState is seeded randomly per process and per instance: enough to avoid
    // collisions between concurrent exports, which `create_dir` detects anyway.
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:016x}", h.finish())
}

/// Creates `<parent>/<prefix><random>` (with the process umask, unlike `tempfile`'s 0700).
fn create_unique_dir(parent: &Path, prefix: &OsString) -> Result<PathBuf, ExportError> {
    let mut last_err = None;
    for _ in 0..16 {
        let mut name = prefix.clone();
        name.push(random_suffix());
        let path = parent.join(name);
        match fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(ExportError::Io {
                    action: "create staging directory in",
                    path: parent.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Err(ExportError::Io {
        action: "create staging directory in",
        path: parent.to_path_buf(),
        source: last_err.unwrap_or_else(|| ErrorKind::AlreadyExists.into()),
    })
}

/// Removes the staging directories `<parent>/<prefix><pid>-…` of processes that no longer
/// exist (killed before they committed). Linux only (`/proc`); a directory whose pid is alive,
/// or cannot be read, is left alone.
fn remove_stale_staging(parent: &Path, prefix: &OsString) {
    let proc_dir = Path::new("/proc");
    if !cfg!(target_os = "linux") || !proc_dir.join("self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let prefix = prefix.to_string_lossy();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_ref())) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || proc_dir.join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed the staging directory of an interrupted export")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the staging directory of an interrupted export")
            }
        }
    }
}

/// A path `<parent>/<prefix><random>` that does not exist at the time of the call.
fn unused_sibling(parent: &Path, prefix: &OsString) -> PathBuf {
    loop {
        let mut name = prefix.clone();
        name.push(random_suffix());
        let path = parent.join(name);
        if fs::symlink_metadata(&path).is_err() {
            return path;
        }
    }
}

/// fsyncs every file and directory under `root` (and `root` itself), so the rename that
/// publishes them cannot expose files whose data is not yet on disk.
fn sync_tree(root: &Path) -> Result<(), ExportError> {
    for entry in fs::read_dir(root).map_err(ExportError::io("list", root))? {
        let entry = entry.map_err(ExportError::io("list", root))?;
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(ExportError::io("access", &path))?;
        if ty.is_dir() {
            sync_tree(&path)?;
        } else if ty.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(ExportError::io("sync", &path))?;
        }
    }
    sync_dir(root)
}

fn sync_dir(dir: &Path) -> Result<(), ExportError> {
    // Directory fsync is how POSIX persists renames and new entries; other platforms have no
    // equivalent through std, so this is best-effort there.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ExportError::io("sync", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn siblings(parent: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("config.json"), b"{}").unwrap();
        (root, src)
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn staging_left_by_a_dead_process_is_removed_and_a_live_ones_is_not() {
        let (root, src) = setup();
        // A pid above the kernel's maximum (2^22) belongs to no process.
        let dead = root.path().join(".out.gs-tmp-4194305-0123456789abcdef");
        let alive = root.path().join(format!(".out.gs-tmp-1-{:016x}", 7)); // pid 1 (init) always runs
        let other = root.path().join(".other.gs-tmp-4194305-0123456789abcdef");
        for d in [&dead, &alive, &other] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("half-written.safetensors"), b"x").unwrap();
        }
        let st = Staging::begin(&root.path().join("out"), &src, false).unwrap();
        let name = st
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(&format!(".out.gs-tmp-{}-", std::process::id())),
            "{name}"
        );
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
    }

    #[test]
    fn commit_creates_output_with_missing_parents() {
        let (root, src) = setup();
        let out = root.path().join("a/b/out");
        let st = Staging::begin(&out, &src, false).unwrap();
        assert!(st.path().starts_with(root.path().join("a/b")));
        assert!(st
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".out.gs-tmp-"));
        fs::create_dir(st.path().join("sub")).unwrap();
        fs::write(st.path().join("sub/x.txt"), b"hi").unwrap();
        assert!(!out.exists(), "nothing at the output before commit");
        let committed = st.commit().unwrap();
        assert_eq!(committed, out);
        assert_eq!(fs::read(out.join("sub/x.txt")).unwrap(), b"hi");
        assert_eq!(siblings(&root.path().join("a/b")), ["out"]);
    }

    #[test]
    fn dropped_staging_removes_the_parents_it_created() {
        let (root, src) = setup();
        fs::create_dir(root.path().join("a")).unwrap();
        {
            let st = Staging::begin(&root.path().join("a/b/c/out"), &src, false).unwrap();
            fs::write(st.path().join("x"), b"partial").unwrap();
        }
        assert_eq!(siblings(root.path()), ["a", "src"], "b/c removed, a kept");
        assert!(siblings(&root.path().join("a")).is_empty());
        // One that gained other contents meanwhile stays.
        {
            let st = Staging::begin(&root.path().join("a/b/out"), &src, false).unwrap();
            fs::write(root.path().join("a/b/theirs"), b"keep").unwrap();
            drop(st);
        }
        assert_eq!(siblings(&root.path().join("a/b")), ["theirs"]);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let (root, src) = setup();
        let out = root.path().join("out");
        {
            let st = Staging::begin(&out, &src, false).unwrap();
            fs::write(st.path().join("model.safetensors"), b"partial").unwrap();
            assert!(st.path().exists());
        }
        assert!(!out.exists());
        assert_eq!(siblings(root.path()), ["src"]);
    }

    #[test]
    fn uncommitted_staging_directories_are_registered_until_committed_or_dropped() {
        // The registry, not `discard_uncommitted` itself: that would also remove the staging
        // directories of tests running in parallel (the corpus test `plugin taking forever`
        // covers it end to end).
        let listed = |p: &Path| uncommitted().iter().any(|(q, _)| q == p);
        let (root, src) = setup();
        let out = root.path().join("out");
        let st = Staging::begin(&out, &src, false).unwrap();
        let temp = st.path().to_path_buf();
        assert!(listed(&temp));
        drop(st);
        assert!(!listed(&temp));
        let st = Staging::begin(&out, &src, false).unwrap();
        let temp = st.path().to_path_buf();
        assert!(listed(&temp));
        st.commit().unwrap();
        assert!(!listed(&temp));
    }

    #[test]
    fn refuses_output_equal_to_inside_or_containing_source() {
        let (root, src) = setup();
        let err = Staging::begin(&src, &src, true).unwrap_err();
        assert!(matches!(err, ExportError::OutputIsSource { .. }), "{err}");
        // Spelled differently.
        let err = Staging::begin(&src.join("../src/."), &src, true).unwrap_err();
        assert!(matches!(err, ExportError::OutputIsSource { .. }), "{err}");

        let err = Staging::begin(&src.join("quantized"), &src, true).unwrap_err();
        assert!(
            matches!(err, ExportError::OutputInsideSource { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("inside the source model directory"),
            "{err}"
        );
        let err = Staging::begin(&src.join("deep/er/out"), &src, false).unwrap_err();
        assert!(
            matches!(err, ExportError::OutputInsideSource { .. }),
            "{err}"
        );
        assert!(
            !src.join("deep").exists(),
            "no parent directories created on refusal"
        );

        let err = Staging::begin(root.path(), &src, true).unwrap_err();
        assert!(
            matches!(err, ExportError::SourceInsideOutput { .. }),
            "{err}"
        );

        // Through a symlink to the source.
        #[cfg(unix)]
        {
            let link = root.path().join("link");
            std::os::unix::fs::symlink(&src, &link).unwrap();
            let err = Staging::begin(&link.join("out"), &src, true).unwrap_err();
            assert!(
                matches!(err, ExportError::OutputInsideSource { .. }),
                "{err}"
            );
            let err = Staging::begin(&link, &src, true).unwrap_err();
            assert!(matches!(err, ExportError::OutputIsSource { .. }), "{err}");
        }
        // A sibling whose name starts with the source's name is fine.
        let ok = Staging::begin(&root.path().join("src2"), &src, false).unwrap();
        drop(ok);
        assert_eq!(fs::read(src.join("config.json")).unwrap(), b"{}");
    }

    #[test]
    fn existing_outputs() {
        let (root, src) = setup();
        // A file.
        let file = root.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = Staging::begin(&file, &src, true).unwrap_err();
        assert!(matches!(err, ExportError::OutputIsFile { .. }), "{err}");

        // An empty directory is fine without force.
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let st = Staging::begin(&empty, &src, false).unwrap();
        fs::write(st.path().join("a"), b"1").unwrap();
        st.commit().unwrap();
        assert_eq!(fs::read(empty.join("a")).unwrap(), b"1");

        // Non-empty: refused without force; with force only when gs-host wrote it.
        let err = Staging::begin(&empty, &src, false).unwrap_err();
        assert!(err.to_string().contains("pass --force"), "{err}");
        let err = Staging::begin(&empty, &src, true).unwrap_err();
        assert!(matches!(err, ExportError::ForceNotOurs { .. }), "{err}");
        assert!(err.to_string().contains(RUN_RECORD), "{err}");
        fs::write(empty.join(RUN_RECORD), b"{}").unwrap();
        let st = Staging::begin(&empty, &src, true).unwrap();
        fs::write(st.path().join("b"), b"2").unwrap();
        st.commit().unwrap();
        assert!(!empty.join("a").exists(), "old contents are gone");
        assert!(!empty.join(RUN_RECORD).exists(), "old contents are gone");
        assert_eq!(fs::read(empty.join("b")).unwrap(), b"2");
        let mut names = siblings(root.path());
        names.sort();
        assert_eq!(
            names,
            ["empty", "file", "src"],
            "no temp or old directories left"
        );
    }

    #[test]
    fn commit_rechecks_the_output() {
        let (root, src) = setup();
        let out = root.path().join("out");
        let st = Staging::begin(&out, &src, false).unwrap();
        // Someone else filled the output meanwhile.
        fs::create_dir(&out).unwrap();
        fs::write(out.join("theirs"), b"keep").unwrap();
        let err = st.commit().unwrap_err();
        assert!(matches!(err, ExportError::OutputNotEmpty { .. }), "{err}");
        assert_eq!(fs::read(out.join("theirs")).unwrap(), b"keep");
        assert_eq!(siblings(root.path()), ["out", "src"]);
    }

    #[test]
    fn invalid_output_paths() {
        let (_root, src) = setup();
        let err = Staging::begin(Path::new("/"), &src, true).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::InvalidOutput { .. } | ExportError::SourceInsideOutput { .. }
            ),
            "{err}"
        );
        for p in [src.join(".."), src.join("x/..")] {
            let err = Staging::begin(&p, &src, true).unwrap_err();
            assert!(matches!(err, ExportError::InvalidOutput { .. }), "{err}");
        }
        let err =
            Staging::begin(Path::new("out"), Path::new("/nonexistent/src"), false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/src"), "{err}");
    }
}
