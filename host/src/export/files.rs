//! Files of an output checkpoint other than its weights: copies of the source's other files
//! (tokenizer, generation config, …) and files the export adds (config.json, provenance).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use super::error::ExportError;
use crate::model::{f32_to_dtype_bytes, Model, TensorInfo, INDEX_FILE};

/// Entries of the source directory that are never copied: version-control data is not part
/// of a checkpoint (and for LFS repositories would duplicate the weights).
const SKIPPED_ENTRIES: &[&str] = &[".git"];

/// `values` of the source tensor `name` converted to its source dtype (BF16/F16 rounded to
/// nearest even), after checking the tensor exists, has a float dtype and `values` has its
/// element count. Non-finite values are written, with a warning.
pub(crate) fn source_dtype_bytes<'m>(
    model: &'m Model,
    name: &str,
    values: &[f32],
) -> Result<(&'m TensorInfo, Vec<u8>), ExportError> {
    let info = model
        .weights
        .info(name)
        .map_err(|_| ExportError::UnknownTensor {
            tensor: name.to_string(),
            model_dir: model.dir.clone(),
        })?;
    let unsupported = || ExportError::UnsupportedDType {
        tensor: name.to_string(),
        dtype: info.dtype(),
    };
    if !info.dtype().converts_to_f32() {
        return Err(unsupported());
    }
    if values.len() != info.numel() {
        return Err(ExportError::LengthMismatch {
            tensor: name.to_string(),
            shape: info.shape().to_vec(),
            expected: info.numel(),
            found: values.len(),
        });
    }
    let non_finite = values.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        tracing::warn!(
            tensor = name,
            count = non_finite,
            "replacement values include NaN or infinity"
        );
    }
    let bytes = f32_to_dtype_bytes(values, info.dtype()).map_err(|_| unsupported())?;
    Ok((info, bytes))
}

/// Writes an extra file into the staging directory `staging` (e.g. a provenance JSON).
/// `name` is a relative path (sub-directories allowed, created as needed). It takes precedence
/// over a source file of the same path, which is then not copied. Refused: absolute paths,
/// `..`, the index and any `*.safetensors` name at the top level, and a name added twice.
pub(crate) fn add_extra_file(
    staging: &Path,
    added: &mut BTreeSet<PathBuf>,
    name: &str,
    bytes: &[u8],
) -> Result<(), ExportError> {
    let invalid = |reason| ExportError::InvalidExtraFile {
        name: name.to_string(),
        reason,
    };
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid("it must be a relative path without \"..\""));
    }
    let rel = rel.components().collect::<PathBuf>();
    // Top-level weights files are the export's own (and stray ones would be taken for
    // shards by loaders).
    if rel.components().count() == 1
        && (name.ends_with("index.json") || name.ends_with(".safetensors"))
    {
        return Err(invalid(
            "top-level *.safetensors and index files are written by the export itself",
        ));
    }
    if added.contains(&rel) {
        return Err(invalid("it was already added"));
    }
    let path = staging.join(&rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(ExportError::io("create", parent))?;
    }
    fs::write(&path, bytes).map_err(ExportError::io("write", &path))?;
    added.insert(rel);
    Ok(())
}

/// Copies every file of the model directory into `staging` (recursively), except the weights
/// (the shards, the index, other `*.safetensors` files at the top level), `.git`, and the
/// paths in `added`. Returns the copied paths, relative to the output.
pub(crate) fn copy_source_files(
    model: &Model,
    staging: &Path,
    added: &BTreeSet<PathBuf>,
) -> Result<Vec<PathBuf>, ExportError> {
    let mut copied = Vec::new();
    copy_dir(
        model,
        staging,
        added,
        &model.dir,
        Path::new(""),
        0,
        &mut copied,
    )?;
    Ok(copied)
}

/// Copies `src_dir` (at `rel` below the model directory) into the staging directory.
#[allow(clippy::too_many_arguments)]
fn copy_dir(
    model: &Model,
    staging: &Path,
    added: &BTreeSet<PathBuf>,
    src_dir: &Path,
    rel: &Path,
    depth: usize,
    copied: &mut Vec<PathBuf>,
) -> Result<(), ExportError> {
    // Guards against symlink cycles; real checkpoints are a level or two deep.
    const MAX_DEPTH: usize = 32;
    if depth > MAX_DEPTH {
        return Err(ExportError::Io {
            action: "copy",
            path: src_dir.to_path_buf(),
            source: std::io::Error::other(format!(
                "directories nested more than {MAX_DEPTH} deep (symlink loop?)"
            )),
        });
    }
    let mut entries: Vec<_> = fs::read_dir(src_dir)
        .map_err(ExportError::io("list", src_dir))?
        .collect::<Result<_, _>>()
        .map_err(ExportError::io("list", src_dir))?;
    entries.sort_by_key(|e| e.file_name());
    let shard_names: BTreeSet<&str> = model
        .weights
        .shards()
        .iter()
        .map(|s| s.file_name())
        .collect();
    for entry in entries {
        let file_name = entry.file_name();
        let name = file_name.to_string_lossy();
        let src = entry.path();
        let rel_path = rel.join(&file_name);
        if depth == 0 {
            if shard_names.contains(name.as_ref()) || name == INDEX_FILE {
                continue;
            }
            if name.ends_with(".safetensors") {
                tracing::warn!(file = %src.display(), "not copying a safetensors file that is not part of the loaded checkpoint");
                continue;
            }
            if SKIPPED_ENTRIES.contains(&name.as_ref()) {
                tracing::info!(path = %src.display(), "not copying");
                continue;
            }
        }
        if added.contains(&rel_path) {
            tracing::info!(file = %rel_path.display(), "source file replaced by an added file");
            continue;
        }
        // Follows symlinks: Hugging Face cache snapshots are symlinks into a blob store.
        let meta = fs::metadata(&src).map_err(ExportError::io("access", &src))?;
        let dst = staging.join(&rel_path);
        if meta.is_dir() {
            fs::create_dir_all(&dst).map_err(ExportError::io("create", &dst))?;
            copy_dir(model, staging, added, &src, &rel_path, depth + 1, copied)?;
        } else if meta.is_file() {
            copy_contents(&src, &dst)?;
            copied.push(rel_path);
        } else {
            tracing::warn!(path = %src.display(), "not copying a special file");
        }
    }
    Ok(())
}

fn copy_contents(src: &Path, dst: &Path) -> Result<(), ExportError> {
    let mut input = File::open(src).map_err(ExportError::io("open", src))?;
    let mut output = File::create(dst).map_err(ExportError::io("create", dst))?;
    std::io::copy(&mut input, &mut output).map_err(ExportError::io("copy to", dst))?;
    Ok(())
}
