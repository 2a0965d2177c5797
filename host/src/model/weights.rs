//! Memory-mapped safetensors weights of a checkpoint, single-file or sharded.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::{Map, Value};

use super::dtype::{dtype_bytes_to_f32, DType};
use super::error::{json_error, ModelError};
use super::header::{parse_header, Header, HeaderTensor};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a tensor lives and what it is. Obtained from [`Weights::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    shard: usize,
    shard_path: Arc<Path>,
    data_offsets: (usize, usize),
    data_start: usize,
}

impl TensorInfo {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost dimension first (row-major; a linear layer's weight is `[out, in]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        // Validated at open: the product did not overflow.
        self.shape.iter().product()
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// The shard file holding the tensor.
    pub fn shard_path(&self) -> &Path {
        &self.shard_path
    }

    /// Position of that shard in [`Weights::shards`].
    pub fn shard_index(&self) -> usize {
        self.shard
    }

    /// Byte range relative to the start of the shard's data section (as in its header).
    pub fn data_offsets(&self) -> (usize, usize) {
        self.data_offsets
    }

    /// Absolute byte range in the shard file.
    pub fn file_range(&self) -> std::ops::Range<usize> {
        self.data_start + self.data_offsets.0..self.data_start + self.data_offsets.1
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    file_name: String,
    path: Arc<Path>,
    mmap: Mmap,
    header: Header,
}

impl Shard {
    /// Drops the pages of `range` (bytes of the file) from this process's memory.
    fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        {
            // SAFETY: a read-only, shared file mapping: MADV_DONTNEED only discards the
            // process's copies of clean pages; the next access re-reads the same file bytes,
            // so every outstanding `&[u8]` keeps its contents.
            let r = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
            if let Err(e) = r {
                tracing::debug!(shard = %self.path.display(), error = %e, "madvise(DONTNEED) failed");
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }

    /// File name inside the model directory (as in the index's `weight_map`).
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Full path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }

    /// The header's `__metadata__` entries, in file order (empty if it had none).
    pub fn metadata(&self) -> &[(String, String)] {
        &self.header.metadata
    }

    /// Tensor names in the order of their data in the file.
    pub fn tensor_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.header.tensors.iter().map(|t| t.name.as_str())
    }

    /// The raw header bytes (length prefix and JSON), exactly as in the file.
    pub fn header_bytes(&self) -> &[u8] {
        &self.mmap[..self.header.data_start()]
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
    }
}

/// The safetensors weights of a model directory, memory-mapped read-only.
///
/// Opening parses and validates every shard header but reads no tensor data; data pages are
/// read by the OS when [`raw_bytes`](Weights::raw_bytes) or [`to_f32`](Weights::to_f32) touch
/// them. Guarantees after [`open`](Weights::open): every tensor name is unique across shards,
/// every byte range lies inside its file and matches dtype × shape, and for a sharded
/// checkpoint every `weight_map` entry points at the shard that holds the tensor.
///
/// The files must not be modified while a `Weights` is alive (a memory map cannot prevent
/// that; nothing in this crate writes to a source model).
#[derive(Debug)]
pub struct Weights {
    dir: PathBuf,
    index_path: Option<PathBuf>,
    index_metadata: Option<Map<String, Value>>,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Weights {
    /// Opens `dir/model.safetensors`, or else `dir/model.safetensors.index.json` and the shards
    /// it names. (Like transformers, the single file wins if both exist.)
    pub fn open(dir: &Path) -> Result<Weights, ModelError> {
        check_dir(dir)?;
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            if index.exists() {
                tracing::warn!(
                    dir = %dir.display(),
                    "both {SINGLE_FILE} and {INDEX_FILE} exist; using {SINGLE_FILE}"
                );
            }
            let shard = open_shard(dir, SINGLE_FILE)?;
            let mut weights = Weights {
                dir: dir.to_path_buf(),
                index_path: None,
                index_metadata: None,
                shards: vec![shard],
                tensors: BTreeMap::new(),
            };
            weights.build_tensor_map()?;
            tracing::debug!(dir = %dir.display(), tensors = weights.tensors.len(), "opened single-file weights");
            return Ok(weights);
        }
        if index.is_file() {
            return Weights::open_sharded(dir, index);
        }
        Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
            found: list_safetensors(dir)?,
        })
    }

    /// Opens the shards listed by the index file `index_name` inside `dir` (formats whose index
    /// is not `model.safetensors.index.json`, e.g. Ascend's `quant_model_weights.safetensors.index.json`).
    pub fn open_with_index(dir: &Path, index_name: &str) -> Result<Weights, ModelError> {
        check_dir(dir)?;
        let index = dir.join(index_name);
        if !index.is_file() {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
                found: list_safetensors(dir)?,
            });
        }
        Weights::open_sharded(dir, index)
    }

    fn open_sharded(dir: &Path, index_path: PathBuf) -> Result<Weights, ModelError> {
        let (metadata, weight_map) = read_index(&index_path)?;
        // shard file name -> tensors the index assigns to it
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &weight_map {
            by_shard.entry(shard).or_default().push(tensor);
        }
        let mut shards = Vec::with_capacity(by_shard.len());
        for (name, tensors) in &by_shard {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(ModelError::ShardMissing {
                    index: index_path.clone(),
                    shard: name.to_string(),
                    shard_path: path,
                    tensors: tensors.len(),
                    example: tensors.first().map(|t| t.to_string()).unwrap_or_default(),
                });
            }
            shards.push(open_shard(dir, name)?);
        }
        let mut weights = Weights {
            dir: dir.to_path_buf(),
            index_path: Some(index_path),
            index_metadata: Some(metadata),
            shards,
            tensors: BTreeMap::new(),
        };
        weights.build_tensor_map()?;
        weights.check_weight_map(&weight_map)?;
        tracing::debug!(
            dir = %dir.display(),
            shards = weights.shards.len(),
            tensors = weights.tensors.len(),
            "opened sharded weights"
        );
        Ok(weights)
    }

    fn build_tensor_map(&mut self) -> Result<(), ModelError> {
        for (i, shard) in self.shards.iter().enumerate() {
            for t in &shard.header.tensors {
                if let Some(prev) = self.tensors.get(&t.name) {
                    return Err(ModelError::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: prev.shard_path.to_path_buf(),
                        second: shard.path.to_path_buf(),
                    });
                }
                self.tensors
                    .insert(t.name.clone(), tensor_info(i, shard, t));
            }
        }
        Ok(())
    }

    fn check_weight_map(&self, weight_map: &BTreeMap<String, String>) -> Result<(), ModelError> {
        let index = self.index_path.clone().unwrap_or_default();
        for (tensor, shard_name) in weight_map {
            let found = self.tensors.get(tensor);
            if found.map(|info| self.shards[info.shard].file_name.as_str()) != Some(shard_name) {
                return Err(ModelError::TensorNotInShard {
                    index,
                    tensor: tensor.clone(),
                    shard: self.dir.join(shard_name),
                    found_in: found.map(|info| info.shard_path.to_path_buf()),
                });
            }
        }
        if self.tensors.len() != weight_map.len() {
            // transformers loads such tensors too, so keep them, but say so.
            let extra: Vec<&str> = self
                .tensors
                .keys()
                .filter(|k| !weight_map.contains_key(*k))
                .map(String::as_str)
                .take(5)
                .collect();
            tracing::warn!(
                index = %index.display(),
                count = self.tensors.len() - weight_map.len(),
                examples = ?extra,
                "shards contain tensors that the index does not list; they are loaded anyway"
            );
        }
        Ok(())
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted (byte order).
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Dtype, shape and location of a tensor.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::UnknownTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// `(name, info)` for every tensor, sorted by name.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The tensor's bytes as stored (little-endian), borrowed from the memory map.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8], ModelError> {
        let info = self.info(name)?;
        // In range: validated against the file length at open.
        Ok(&self.shards[info.shard].mmap[info.file_range()])
    }

    /// Drops the pages of tensor `name` from this process's memory. They stay in the OS page
    /// cache and are simply read again on the next access, so this never changes what a
    /// reader sees; it keeps peak RSS at one block's worth for models larger than RAM
    /// (file-backed pages that were touched otherwise count as resident until unmapped).
    pub fn release(&self, name: &str) -> Result<(), ModelError> {
        let info = self.info(name)?;
        self.shards[info.shard].release(info.file_range());
        Ok(())
    }

    /// The tensor's values converted to `f32` (exact for BF16/F16/F32), row-major.
    ///
    /// Errors with [`ModelError::UnsupportedDType`] for any other dtype.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if !info.dtype.converts_to_f32() {
            return Err(ModelError::UnsupportedDType {
                tensor: name.to_string(),
                dtype: info.dtype,
            });
        }
        let bytes = self.raw_bytes(name)?;
        // Cannot fail: dtype checked above and the length validated at open.
        dtype_bytes_to_f32(bytes, info.dtype).map_err(|_| ModelError::UnsupportedDType {
            tensor: name.to_string(),
            dtype: info.dtype,
        })
    }

    /// The first NaN or ±infinity of tensor `name`, as `(flat index, value)`; `None` when every
    /// value is finite or the dtype is not a float one converted by [`to_f32`](Self::to_f32)
    /// (BF16, F16, F32). Reads the data without converting it; the pages are released after.
    pub fn first_non_finite(&self, name: &str) -> Result<Option<(usize, f32)>, ModelError> {
        let info = self.info(name)?;
        let bytes = self.raw_bytes(name)?;
        // An all-ones exponent is infinity or NaN in every IEEE binary format.
        let found = match info.dtype {
            DType::BF16 | DType::F16 => {
                let exp: u16 = if info.dtype == DType::BF16 {
                    0x7F80
                } else {
                    0x7C00
                };
                bytes
                    .chunks_exact(2)
                    .position(|b| u16::from_le_bytes([b[0], b[1]]) & exp == exp)
                    .map(|i| (i, 2))
            }
            DType::F32 => bytes
                .chunks_exact(4)
                .position(|b| {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 == 0x7F80_0000
                })
                .map(|i| (i, 4)),
            _ => None,
        };
        let found = match found {
            None => None,
            Some((i, width)) => {
                let value = dtype_bytes_to_f32(&bytes[i * width..(i + 1) * width], info.dtype)
                    .ok()
                    .and_then(|v| v.first().copied())
                    .unwrap_or(f32::NAN);
                Some((i, value))
            }
        };
        self.release(name)?;
        Ok(found)
    }

    /// Checks that no floating-point tensor holds NaN or ±infinity: the first one found (in
    /// name order) is [`ModelError::NonFinite`]. Reads every tensor once (in parallel across
    /// tensors), releasing the pages as it goes.
    pub fn check_finite(&self) -> Result<(), ModelError> {
        use rayon::prelude::*;
        let names: Vec<&str> = self.names().collect();
        let first = names
            .par_iter()
            .find_map_first(|name| match self.first_non_finite(name) {
                Ok(None) => None,
                Ok(Some((index, value))) => Some(self.non_finite(name, index, value)),
                Err(e) => Some(e),
            });
        first.map_or(Ok(()), Err)
    }

    fn non_finite(&self, name: &str, index: usize, value: f32) -> ModelError {
        let (path, position) = match self.tensors.get(name) {
            Some(info) => (
                info.shard_path.to_path_buf(),
                match info.shape[..] {
                    [_, cols] if cols > 0 => {
                        format!(" (row {}, column {})", index / cols, index % cols)
                    }
                    _ => String::new(),
                },
            ),
            None => (self.dir.clone(), String::new()),
        };
        ModelError::NonFinite {
            tensor: name.to_string(),
            path,
            index,
            value,
            position,
        }
    }

    /// The shard files, in file-name order.
    pub fn shard_files(&self) -> impl ExactSizeIterator<Item = &Path> {
        self.shards.iter().map(|s| s.path())
    }

    /// The shards, in file-name order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard file holding a tensor.
    pub fn shard_of(&self, name: &str) -> Result<&Path, ModelError> {
        Ok(self.info(name)?.shard_path())
    }

    /// Whether the checkpoint was opened through `model.safetensors.index.json`.
    pub fn is_sharded(&self) -> bool {
        self.index_path.is_some()
    }

    /// The index file, if sharded.
    pub fn index_path(&self) -> Option<&Path> {
        self.index_path.as_deref()
    }

    /// The index's `metadata` object (e.g. `total_size`), if sharded; empty if the index had
    /// none.
    pub fn index_metadata(&self) -> Option<&Map<String, Value>> {
        self.index_metadata.as_ref()
    }

    /// Sum of the element counts of all tensors.
    pub fn total_params(&self) -> u64 {
        self.tensors.values().map(|t| t.numel() as u64).sum()
    }

    /// Sum of the byte sizes of all tensors (the index's `total_size`).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.byte_len() as u64).sum()
    }
}

fn tensor_info(shard_idx: usize, shard: &Shard, t: &HeaderTensor) -> TensorInfo {
    TensorInfo {
        dtype: t.dtype,
        shape: t.shape.clone(),
        shard: shard_idx,
        shard_path: Arc::clone(&shard.path),
        data_offsets: t.data_offsets,
        data_start: shard.header.data_start(),
    }
}

fn check_dir(dir: &Path) -> Result<(), ModelError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ModelError::BadDirectory {
            path: dir.to_path_buf(),
            reason: "is not a directory",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ModelError::BadDirectory {
            path: dir.to_path_buf(),
            reason: "does not exist",
        }),
        Err(e) => Err(ModelError::Io {
            action: "access",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

fn list_safetensors(dir: &Path) -> Result<Vec<String>, ModelError> {
    let io = |e| ModelError::Io {
        action: "list",
        path: dir.to_path_buf(),
        source: e,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".safetensors") {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

fn open_shard(dir: &Path, file_name: &str) -> Result<Shard, ModelError> {
    let path: Arc<Path> = Arc::from(dir.join(file_name));
    let file = File::open(&path).map_err(|e| ModelError::Io {
        action: "open",
        path: path.to_path_buf(),
        source: e,
    })?;
    // SAFETY: the map is read-only and private to this process. Mapped files must not be
    // truncated or rewritten while mapped (documented on `Weights`); this crate never writes
    // to a source model, and the export refuses an output that is or contains the source.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::Io {
        action: "memory-map",
        path: path.to_path_buf(),
        source: e,
    })?;
    let header = parse_header(&mmap, &path)?;
    Ok(Shard {
        file_name: file_name.to_string(),
        path,
        mmap,
        header,
    })
}

/// An index's `metadata` object and its `weight_map` (tensor -> shard file name).
type Index = (Map<String, Value>, BTreeMap<String, String>);

/// Reads and checks the index file.
fn read_index(path: &Path) -> Result<Index, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        action: "read",
        path: path.to_path_buf(),
        source: e,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| json_error(path, &e))?;
    let invalid = |message: String| ModelError::IndexInvalid {
        path: path.to_path_buf(),
        message,
    };
    let Value::Object(mut root) = value else {
        return Err(invalid("the index is not a JSON object".to_string()));
    };
    let metadata = match root.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid(format!(
                "\"metadata\" must be an object, found {other}"
            )))
        }
    };
    let Some(Value::Object(map)) = root.remove("weight_map") else {
        return Err(invalid("missing \"weight_map\" object".to_string()));
    };
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let Value::String(shard) = shard else {
            return Err(invalid(format!(
                "\"weight_map\" entry for \"{tensor}\" must be a file name string, found {shard}"
            )));
        };
        if !is_plain_file_name(&shard) {
            // The shard must sit in the model directory: a path could escape it (and exports
            // write the same names into their output).
            return Err(invalid(format!(
                "\"weight_map\" entry for \"{tensor}\" names \"{shard}\", which is not a plain file name in the model directory"
            )));
        }
        weight_map.insert(tensor, shard);
    }
    if weight_map.is_empty() {
        return Err(invalid("\"weight_map\" is empty".to_string()));
    }
    Ok((metadata, weight_map))
}

fn is_plain_file_name(name: &str) -> bool {
    let mut comps = Path::new(name).components();
    matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains(['/', '\\'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dtype::f32_to_dtype_bytes;
    use crate::model::testutil::{edit_index, values, write_model, Spec, STORIES};
    use crate::model::Model;

    fn open_err(dir: &Path) -> String {
        Weights::open(dir).unwrap_err().to_string()
    }

    #[test]
    fn single_file_model() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::llama(DType::F16, 1).with_raw(
            "rope.inv_freq",
            DType::I64,
            &[2],
            vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
            0,
        );
        write_model(dir.path(), &spec);
        let w = Weights::open(dir.path()).unwrap();
        assert!(!w.is_sharded());
        assert_eq!(w.index_metadata(), None);
        assert_eq!(w.len(), spec.tensors.len());
        let names: Vec<&str> = w.names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let shard_files: Vec<&Path> = w.shard_files().collect();
        assert_eq!(shard_files, [dir.path().join("model.safetensors")]);

        let q = w.info("model.layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.dtype(), DType::F16);
        assert_eq!(q.shape(), [8, 8]);
        assert_eq!(q.numel(), 64);
        assert_eq!(q.byte_len(), 128);
        assert_eq!(q.shard_path(), dir.path().join("model.safetensors"));

        for t in &spec.tensors {
            assert_eq!(w.raw_bytes(&t.name).unwrap(), &t.bytes[..], "{}", t.name);
        }
        // The F16 values were generated from f32 and read back exactly as stored.
        let spec_q = spec.tensor("model.layers.1.self_attn.q_proj.weight");
        let f = w.to_f32(&spec_q.name).unwrap();
        assert_eq!(f32_to_dtype_bytes(&f, DType::F16).unwrap(), spec_q.bytes);

        // Other dtypes are listed, sized and readable raw, but not converted.
        let inv = w.info("rope.inv_freq").unwrap();
        assert_eq!((inv.dtype(), inv.byte_len()), (DType::I64, 16));
        let err = w.to_f32("rope.inv_freq").unwrap_err();
        assert!(matches!(
            err,
            ModelError::UnsupportedDType {
                dtype: DType::I64,
                ..
            }
        ));
        assert!(err.to_string().contains("\"rope.inv_freq\"") && err.to_string().contains("I64"));

        let err = w.info("model.nope").unwrap_err().to_string();
        assert!(
            err.contains("\"model.nope\"") && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert!(w.raw_bytes("model.nope").is_err());
        assert_eq!(w.total_params(), spec.total_params());
    }

    #[test]
    fn non_finite_values_are_found_with_their_tensor_and_index_in_every_float_dtype() {
        for (dtype, bad) in [
            (DType::F32, f32::NAN),
            (DType::F16, f32::INFINITY),
            (DType::BF16, f32::NEG_INFINITY),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut spec = Spec::llama(dtype, 2);
            write_model(dir.path(), &spec);
            Weights::open(dir.path()).unwrap().check_finite().unwrap();
            // Element 13 of the 8 × 8 q_proj of layer 1 (second shard): row 1, column 5.
            let name = "model.layers.1.self_attn.q_proj.weight";
            let t = spec.tensors.iter_mut().find(|t| t.name == name).unwrap();
            let mut v = dtype_bytes_to_f32(&t.bytes, dtype).unwrap();
            v[13] = bad;
            v[20] = f32::NAN;
            t.bytes = f32_to_dtype_bytes(&v, dtype).unwrap();
            let dir = tempfile::tempdir().unwrap();
            write_model(dir.path(), &spec);
            let w = Weights::open(dir.path()).unwrap();
            let (i, found) = w.first_non_finite(name).unwrap().unwrap();
            assert_eq!(i, 13, "{dtype}");
            assert!(
                found.is_nan() == bad.is_nan() && (bad.is_nan() || found == bad),
                "{dtype}"
            );
            let e = w.check_finite().unwrap_err();
            assert!(matches!(e, ModelError::NonFinite { index: 13, .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(name)
                    && msg.contains("index 13 (row 1, column 5)")
                    && msg.contains(&format!("holds {bad}")),
                "{msg}"
            );
            assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
        }
    }

    #[test]
    fn sharded_model() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::two_shards_bf16();
        write_model(dir.path(), &spec);
        let w = Weights::open(dir.path()).unwrap();
        assert!(w.is_sharded());
        assert_eq!(w.shards().len(), 2);
        assert_eq!(
            w.shards()[0].file_name(),
            "model-00001-of-00002.safetensors"
        );
        assert_eq!(
            w.shards()[0].metadata(),
            [("format".to_string(), "pt".to_string())]
        );
        let meta = w.index_metadata().unwrap();
        assert_eq!(meta["total_size"], json_total(&spec));
        assert_eq!(
            w.shard_of("model.layers.0.mlp.up_proj.weight").unwrap(),
            dir.path().join("model-00001-of-00002.safetensors")
        );
        assert_eq!(
            w.shard_of("lm_head.weight").unwrap(),
            dir.path().join("model-00002-of-00002.safetensors")
        );
        for (i, t) in spec.tensors.iter().enumerate() {
            let got = w.to_f32(&t.name).unwrap();
            let want: Vec<f32> = values(t.shape.iter().product(), i)
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect();
            assert_eq!(got, want, "{}", t.name);
            assert_eq!(
                w.shards()[w.info(&t.name).unwrap().shard_index()].file_name(),
                spec.shard_names[t.shard]
            );
        }
        assert_eq!(
            w.total_bytes(),
            spec.tensors
                .iter()
                .map(|t| t.bytes.len() as u64)
                .sum::<u64>()
        );
    }

    fn json_total(spec: &Spec) -> Value {
        Value::from(spec.tensors.iter().map(|t| t.bytes.len()).sum::<usize>())
    }

    #[test]
    fn bad_directories() {
        let msg = open_err(Path::new("/nonexistent/model"));
        assert!(
            msg.contains("/nonexistent/model") && msg.contains("does not exist"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(open_err(&file).contains("is not a directory"));

        let msg = open_err(dir.path());
        assert!(
            msg.contains("no model.safetensors or model.safetensors.index.json"),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), b"").unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("found model-00001-of-00002.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn index_names_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::two_shards_bf16());
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let err = Weights::open(dir.path()).unwrap_err();
        assert!(matches!(err, ModelError::ShardMissing { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("model.safetensors.index.json")
                && msg.contains("model-00002-of-00002.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn index_names_tensor_absent_from_its_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::two_shards_bf16());
        // Point a tensor of shard 2 at shard 1.
        edit_index(dir.path(), |v| {
            v["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
        });
        let msg = open_err(dir.path());
        assert!(
            msg.contains("\"lm_head.weight\"") && msg.contains("model-00001-of-00002.safetensors"),
            "{msg}"
        );
        assert!(
            msg.contains("(it is in ") && msg.contains("model-00002-of-00002.safetensors"),
            "{msg}"
        );

        // A tensor that exists nowhere.
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::two_shards_bf16());
        edit_index(dir.path(), |v| {
            v["weight_map"]["model.ghost"] = "model-00002-of-00002.safetensors".into();
        });
        let msg = open_err(dir.path());
        assert!(
            msg.contains("\"model.ghost\"")
                && msg.contains("has no such tensor")
                && !msg.contains("it is in"),
            "{msg}"
        );
    }

    #[test]
    fn tensor_in_two_shards() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::two_shards_bf16();
        let dup = spec.tensor("model.norm.weight").clone();
        let spec = spec.with_raw(&dup.name, dup.dtype, &dup.shape, dup.bytes.clone(), 0);
        write_model(dir.path(), &spec);
        let err = Weights::open(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::DuplicateTensor { .. }), "{msg}");
        assert!(
            msg.contains("\"model.norm.weight\"")
                && msg.contains("model-00001-of-00002.safetensors")
                && msg.contains("model-00002-of-00002.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_index_files() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::two_shards_bf16());
        let index = dir.path().join(INDEX_FILE);
        std::fs::write(&index, "{\n \"weight_map\": {,\n}").unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("invalid JSON")
                && msg.contains("model.safetensors.index.json")
                && msg.contains("line 2"),
            "{msg}"
        );
        for (text, expected) in [
            ("{}", "missing \"weight_map\""),
            ("{\"weight_map\": {}}", "is empty"),
            ("{\"weight_map\": {\"a\": 3}}", "\"a\" must be a file name"),
            (
                "{\"metadata\": 1, \"weight_map\": {\"a\": \"x\"}}",
                "\"metadata\" must be an object",
            ),
            (
                "{\"weight_map\": {\"a\": \"../model-00001-of-00002.safetensors\"}}",
                "not a plain file name",
            ),
            (
                "{\"weight_map\": {\"a\": \"/etc/passwd\"}}",
                "not a plain file name",
            ),
        ] {
            std::fs::write(&index, text).unwrap();
            let msg = open_err(dir.path());
            assert!(
                msg.contains(expected) && msg.contains("model.safetensors.index.json"),
                "{text}: {msg}"
            );
        }
    }

    #[test]
    fn corrupt_shards_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::two_shards_bf16());
        let shard = dir.path().join("model-00002-of-00002.safetensors");
        let good = std::fs::read(&shard).unwrap();

        // Truncated data section.
        std::fs::write(&shard, &good[..good.len() - 3]).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model-00002-of-00002.safetensors") && msg.contains("bytes"),
            "{msg}"
        );
        // Truncated inside the header.
        std::fs::write(&shard, &good[..20]).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model-00002-of-00002.safetensors") && msg.contains("truncated"),
            "{msg}"
        );
        // Empty file.
        std::fs::write(&shard, b"").unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model-00002-of-00002.safetensors") && msg.contains("shorter than"),
            "{msg}"
        );
        // Trailing garbage after the last tensor.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4]);
        std::fs::write(&shard, &long).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model-00002-of-00002.safetensors") && msg.contains("tensors cover"),
            "{msg}"
        );
    }

    #[test]
    fn shape_disagreeing_with_bytes_names_tensor() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &Spec::llama(DType::BF16, 1));
        let path = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        // Same-length edit of the header text: [8, 16] -> [8, 17] for down_proj of layer 0.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
        let key = "\"model.layers.0.mlp.down_proj.weight\":{\"dtype\":\"BF16\",\"shape\":[8,16]";
        assert!(header.contains(key), "header layout changed: {header}");
        let edited = header.replacen(key, &key.replace("[8,16]", "[8,17]"), 1);
        assert_eq!(edited.len(), header.len());
        bytes[8..8 + n].copy_from_slice(edited.as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Weights::open(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::TensorSize { .. }), "{msg}");
        assert!(
            msg.contains("\"model.layers.0.mlp.down_proj.weight\"")
                && msg.contains("[8, 17]")
                && msg.contains("model.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn weights_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Weights>();
        assert_send_sync::<Model>();
    }

    #[test]
    fn bundled_stories260k() {
        let model = Model::open(Path::new(STORIES)).unwrap();
        let w = &model.weights;
        assert_eq!(model.config.num_hidden_layers, 5);
        assert_eq!(w.len(), 48);
        let q = w.info("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!((q.dtype(), q.shape()), (DType::F32, &[64usize, 64][..]));
        assert_eq!(
            w.info("model.layers.4.mlp.down_proj.weight")
                .unwrap()
                .shape(),
            [64, 172]
        );
        assert_eq!(
            w.info("model.layers.0.self_attn.k_proj.weight")
                .unwrap()
                .shape(),
            [32, 64]
        );
        assert_eq!(w.total_params(), 292_800);
        assert_eq!(w.total_bytes(), 292_800 * 4);
        let norm = w.to_f32("model.norm.weight").unwrap();
        assert_eq!(norm.len(), 64);
        assert!(norm.iter().all(|v| v.is_finite()));
        // Consistent with the raw little-endian bytes.
        let raw = w.raw_bytes("model.norm.weight").unwrap();
        assert_eq!(norm[3].to_le_bytes(), raw[12..16]);
    }
}
