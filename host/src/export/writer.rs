//! Sharded safetensors output written by the reference writer itself.
//!
//! Tensors arrive block by block. Each goes to a spill file of the current shard; when the shard
//! reaches its size limit it is written out with `safetensors::serialize_to_file`, the same Rust
//! code Python's `safetensors.torch.save_file` calls, so the header (tensor order: dtype
//! descending, then name; padding) is byte-for-byte what the engines' own tools write. Shards
//! get their final `-0000k-of-0000N` names in [`ShardedWriter::finish`], once `N` is known.
//! Memory stays bounded by one shard's header; disk by one extra shard.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::ExportError;
use crate::model::DType;

/// How a format names its weight files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardNaming {
    /// Shards are `<stem>-0000k-of-0000N.safetensors`.
    pub stem: &'static str,
    /// The index file, `{"metadata": {"total_size": …}, "weight_map": {…}}`.
    pub index: &'static str,
    /// `__metadata__` of every shard (`None`: no `__metadata__`).
    pub metadata: Option<&'static [(&'static str, &'static str)]>,
}

/// One tensor of a shard, in its spill file.
#[derive(Debug)]
struct Spilled {
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

#[derive(Debug, Default)]
struct OpenShard {
    tensors: BTreeMap<String, Spilled>,
    bytes: usize,
    spill: Option<BufWriter<File>>,
}

/// What [`ShardedWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShards {
    /// Shard file names, in order.
    pub files: Vec<String>,
    /// Tensor name → shard file name.
    pub weight_map: BTreeMap<String, String>,
    /// Sum of tensor bytes (the index's `total_size`).
    pub total_size: u64,
}

/// Writes tensors into size-limited safetensors shards inside `dir` (a staging directory).
#[derive(Debug)]
pub struct ShardedWriter {
    dir: PathBuf,
    naming: ShardNaming,
    max_shard_bytes: usize,
    current: OpenShard,
    /// Shards written so far, under temporary names, with their tensor names.
    done: Vec<(PathBuf, Vec<String>)>,
    names: BTreeMap<String, usize>,
    total: u64,
}

struct SpillView<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl safetensors::View for SpillView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl ShardedWriter {
    /// A writer of shards of at most `max_shard_bytes` of tensor data (a larger tensor gets a
    /// shard of its own).
    pub fn new(dir: &Path, naming: ShardNaming, max_shard_bytes: usize) -> ShardedWriter {
        ShardedWriter {
            dir: dir.to_path_buf(),
            naming,
            max_shard_bytes: max_shard_bytes.max(1),
            current: OpenShard::default(),
            done: Vec::new(),
            names: BTreeMap::new(),
            total: 0,
        }
    }

    /// Whether tensor `name` has been added.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Adds a tensor; `bytes` is its little-endian C-order data (length checked).
    pub fn add(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), ExportError> {
        let numel: usize = shape.iter().product();
        if dtype.byte_len(numel) != Some(bytes.len()) {
            return Err(ExportError::Verification(format!(
                "tensor \"{name}\": {} bytes for {dtype} {shape:?}",
                bytes.len()
            )));
        }
        if self.names.contains_key(name) {
            return Err(ExportError::Verification(format!(
                "tensor \"{name}\" written twice"
            )));
        }
        if self.current.bytes > 0 && self.current.bytes + bytes.len() > self.max_shard_bytes {
            self.close_shard()?;
        }
        let spill_path = self.spill_path(self.done.len());
        if self.current.spill.is_none() {
            let f = File::create(&spill_path).map_err(ExportError::io("create", &spill_path))?;
            self.current.spill = Some(BufWriter::with_capacity(4 << 20, f));
        }
        if let Some(spill) = self.current.spill.as_mut() {
            spill
                .write_all(bytes)
                .map_err(ExportError::io("write", &spill_path))?;
        }
        self.current.tensors.insert(
            name.to_string(),
            Spilled {
                dtype,
                shape: shape.to_vec(),
                offset: self.current.bytes,
                len: bytes.len(),
            },
        );
        self.current.bytes += bytes.len();
        self.names.insert(name.to_string(), self.done.len());
        self.total += bytes.len() as u64;
        Ok(())
    }

    fn spill_path(&self, k: usize) -> PathBuf {
        self.dir.join(format!(".shard-{k}.spill"))
    }

    /// Writes the current shard with the reference serializer and removes its spill file.
    fn close_shard(&mut self) -> Result<(), ExportError> {
        let k = self.done.len();
        let shard = std::mem::take(&mut self.current);
        let spill_path = self.spill_path(k);
        let out = self.dir.join(format!(".shard-{k}.safetensors"));
        let Some(spill) = shard.spill else {
            return Ok(());
        };
        spill
            .into_inner()
            .map_err(|e| ExportError::io("write", &spill_path)(e.into_error()))?
            .sync_all()
            .map_err(ExportError::io("write", &spill_path))?;
        let data = fs::read(&spill_path).map_err(ExportError::io("read", &spill_path))?;
        let views: Vec<(String, SpillView<'_>)> = shard
            .tensors
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    SpillView {
                        dtype: t.dtype.to_safetensors(),
                        shape: &t.shape,
                        data: &data[t.offset..t.offset + t.len],
                    },
                )
            })
            .collect();
        let metadata = self.naming.metadata.map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        });
        safetensors::serialize_to_file(views, metadata, &out)
            .map_err(|e| ExportError::io("write", &out)(std::io::Error::other(e.to_string())))?;
        drop(data);
        fs::remove_file(&spill_path).map_err(ExportError::io("remove", &spill_path))?;
        self.done
            .push((out, shard.tensors.into_keys().collect::<Vec<_>>()));
        Ok(())
    }

    /// Writes the last shard, renames all to `<stem>-0000k-of-0000N.safetensors` and writes the
    /// index. At least one shard is written (empty if no tensor was added).
    pub fn finish(mut self) -> Result<WrittenShards, ExportError> {
        if self.current.bytes > 0 || self.done.is_empty() {
            if self.current.spill.is_none() {
                let p = self.spill_path(self.done.len());
                let f = File::create(&p).map_err(ExportError::io("create", &p))?;
                self.current.spill = Some(BufWriter::new(f));
            }
            self.close_shard()?;
        }
        let n = self.done.len();
        let mut files = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        for (k, (tmp, names)) in self.done.iter().enumerate() {
            let file = format!("{}-{:05}-of-{:05}.safetensors", self.naming.stem, k + 1, n);
            let dst = self.dir.join(&file);
            fs::rename(tmp, &dst).map_err(ExportError::io("rename", tmp))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone());
            }
            files.push(file);
        }
        let mut root = Map::new();
        let mut meta = Map::new();
        meta.insert("total_size".into(), Value::from(self.total));
        root.insert("metadata".into(), Value::Object(meta));
        root.insert(
            "weight_map".into(),
            Value::Object(
                weight_map
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                    .collect(),
            ),
        );
        let mut text = serde_json::to_string_pretty(&Value::Object(root))
            .map_err(|e| ExportError::Verification(format!("cannot serialize the index: {e}")))?;
        text.push('\n');
        let index = self.dir.join(self.naming.index);
        fs::write(&index, text).map_err(ExportError::io("write", &index))?;
        Ok(WrittenShards {
            files,
            weight_map,
            total_size: self.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMING: ShardNaming = ShardNaming {
        stem: "model",
        index: "model.safetensors.index.json",
        metadata: Some(&[("format", "pt")]),
    };

    #[test]
    fn header_order_is_the_reference_writers_dtype_descending_then_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardedWriter::new(dir.path(), NAMING, 1 << 20);
        // Added in module order; safetensors ≥ 0.6 sorts by dtype (descending enum order
        // I8 < … < F16 < BF16 < I32 < … < F32 < … < I64, safetensors/src/tensor.rs `Dtype`),
        // then by name.
        w.add("a.weight_packed", DType::I32, &[1], &[1, 0, 0, 0])
            .unwrap();
        w.add("a.weight_scale", DType::BF16, &[1], &[0x80, 0x3f])
            .unwrap();
        w.add("a.weight_shape", DType::I64, &[2], &[0; 16]).unwrap();
        w.add("b.weight", DType::I8, &[2], &[1, 2]).unwrap();
        w.add("a.input_scale", DType::F32, &[1], &[0; 4]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.files, vec!["model-00001-of-00001.safetensors"]);
        let bytes = fs::read(dir.path().join(&out.files[0])).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert_eq!(n % 8, 0, "header padded to 8 bytes");
        let pos = |k: &str| header.find(&format!("\"{k}\"")).unwrap();
        assert!(pos("__metadata__") < pos("a.weight_shape"));
        assert!(pos("a.weight_shape") < pos("a.input_scale"));
        assert!(pos("a.input_scale") < pos("a.weight_packed"));
        assert!(pos("a.weight_packed") < pos("a.weight_scale"));
        assert!(pos("a.weight_scale") < pos("b.weight"));
        assert_eq!(out.total_size, 4 + 2 + 16 + 2 + 4);
        let index: Value =
            serde_json::from_slice(&fs::read(dir.path().join(NAMING.index)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 28);
        assert_eq!(
            index["weight_map"]["b.weight"],
            "model-00001-of-00001.safetensors"
        );
        assert!(!dir.path().join(".shard-0.spill").exists());
    }

    #[test]
    fn shards_split_at_the_size_limit_and_are_numbered_of_n() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardedWriter::new(dir.path(), NAMING, 8);
        for i in 0..3 {
            w.add(&format!("t{i}"), DType::F32, &[2], &[0; 8]).unwrap();
        }
        let out = w.finish().unwrap();
        assert_eq!(out.files.len(), 3);
        assert_eq!(out.weight_map["t2"], "model-00003-of-00003.safetensors");
        let st = safetensors::SafeTensors::deserialize(
            &fs::read(dir.path().join("model-00002-of-00003.safetensors")).unwrap(),
        )
        .unwrap()
        .names()
        .len();
        assert_eq!(st, 1);
    }
}
