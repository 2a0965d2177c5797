//! The summary printed by `gs-host inspect <dir>`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::dtype::DType;
use super::Model;

/// Per-dtype totals of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DTypeTotals {
    /// The dtype.
    pub dtype: DType,
    /// Tensors of that dtype.
    pub tensors: usize,
    /// Their element count.
    pub params: u64,
    /// Their size in bytes.
    pub bytes: u64,
}

/// One tensor line of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSummary {
    /// Tensor name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// File name of its shard.
    pub shard: String,
}

/// What `gs-host inspect` shows about a model: the main config values, storage totals, and
/// every tensor sorted by name. Build with [`ModelSummary::new`], print with `Display`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    /// Model directory.
    pub dir: PathBuf,
    /// `architectures` from the config.
    pub architectures: Vec<String>,
    /// `model_type`.
    pub model_type: String,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// `dtype`/`torch_dtype` from the config, if given.
    pub config_dtype: Option<String>,
    /// Totals per stored dtype, in dtype order.
    pub dtypes: Vec<DTypeTotals>,
    /// Shard file names, in order.
    pub shard_files: Vec<String>,
    /// Whether the checkpoint has an index file.
    pub sharded: bool,
    /// Total element count.
    pub total_params: u64,
    /// Total tensor bytes.
    pub total_bytes: u64,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorSummary>,
}

impl ModelSummary {
    /// Summarizes an opened model (reads headers only, no tensor data).
    pub fn new(model: &Model) -> ModelSummary {
        let c = &model.config;
        let w = &model.weights;
        let mut dtypes: BTreeMap<DType, DTypeTotals> = BTreeMap::new();
        let mut tensors = Vec::with_capacity(w.len());
        for (name, info) in w.iter() {
            let e = dtypes.entry(info.dtype()).or_insert(DTypeTotals {
                dtype: info.dtype(),
                tensors: 0,
                params: 0,
                bytes: 0,
            });
            e.tensors += 1;
            e.params += info.numel() as u64;
            e.bytes += info.byte_len() as u64;
            tensors.push(TensorSummary {
                name: name.to_string(),
                dtype: info.dtype(),
                shape: info.shape().to_vec(),
                shard: w.shards()[info.shard_index()].file_name().to_string(),
            });
        }
        ModelSummary {
            dir: model.dir.clone(),
            architectures: c.architectures.clone(),
            model_type: c.model_type.clone(),
            num_hidden_layers: c.num_hidden_layers,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab_size: c.vocab_size,
            config_dtype: c.dtype.clone(),
            dtypes: dtypes.into_values().collect(),
            shard_files: w
                .shards()
                .iter()
                .map(|s| s.file_name().to_string())
                .collect(),
            sharded: w.is_sharded(),
            total_params: w.total_params(),
            total_bytes: w.total_bytes(),
            tensors,
        }
    }
}

/// `1234567` → `"1,234,567"`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary units, e.g. `"256.6 MiB"`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model:          {}", self.dir.display())?;
        writeln!(
            f,
            "architecture:   {} (model_type {})",
            self.architectures.join(", "),
            self.model_type
        )?;
        writeln!(f, "layers:         {}", self.num_hidden_layers)?;
        writeln!(
            f,
            "hidden size:    {} (intermediate {})",
            self.hidden_size, self.intermediate_size
        )?;
        writeln!(
            f,
            "heads:          {} attention, {} key/value, head_dim {}",
            self.num_attention_heads, self.num_key_value_heads, self.head_dim
        )?;
        writeln!(f, "vocab:          {}", self.vocab_size)?;
        writeln!(
            f,
            "config dtype:   {}",
            self.config_dtype.as_deref().unwrap_or("(not set)")
        )?;
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|d| {
                format!(
                    "{} ({} tensors, {} params)",
                    d.dtype,
                    d.tensors,
                    grouped(d.params)
                )
            })
            .collect();
        writeln!(f, "tensor dtypes:  {}", dtypes.join("; "))?;
        writeln!(
            f,
            "shards:         {}{}",
            self.shard_files.len(),
            if self.sharded { " (indexed)" } else { "" }
        )?;
        writeln!(f, "parameters:     {}", grouped(self.total_params))?;
        writeln!(
            f,
            "bytes:          {} ({})",
            grouped(self.total_bytes),
            human_bytes(self.total_bytes)
        )?;
        writeln!(f, "tensors:        {}", self.tensors.len())?;
        let width = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4);
        writeln!(f)?;
        write!(f, "  {:<width$}  {:<11}  shape", "name", "dtype")?;
        if self.sharded {
            write!(f, "  shard")?;
        }
        writeln!(f)?;
        for t in &self.tensors {
            let shape = shape_str(&t.shape);
            if self.sharded {
                writeln!(
                    f,
                    "  {:<width$}  {:<11}  {:<16}  {}",
                    t.name, t.dtype, shape, t.shard
                )?;
            } else {
                writeln!(f, "  {:<width$}  {:<11}  {}", t.name, t.dtype, shape)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{write_model, Spec};

    #[test]
    fn helpers() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(134515008), "134,515,008");
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(shape_str(&[]), "[]");
        assert_eq!(shape_str(&[2, 3]), "[2, 3]");
    }

    #[test]
    fn summary_of_stories260k() {
        let model = Model::open(std::path::Path::new(crate::model::testutil::STORIES)).unwrap();
        let s = ModelSummary::new(&model);
        assert_eq!(s.total_params, 292_800);
        assert_eq!(s.total_bytes, 292_800 * 4);
        assert_eq!(s.tensors.len(), 48);
        assert_eq!(s.dtypes.len(), 1);
        assert_eq!(s.dtypes[0].dtype, DType::F32);
        assert!(!s.sharded);
        let text = s.to_string();
        assert!(
            text.contains("architecture:   LlamaForCausalLM (model_type llama)"),
            "{text}"
        );
        assert!(
            text.contains("heads:          8 attention, 4 key/value, head_dim 8"),
            "{text}"
        );
        assert!(text.contains("parameters:     292,800"), "{text}");
        let q = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with("model.layers.0.self_attn.q_proj.weight ")
            })
            .unwrap();
        assert!(q.contains("F32") && q.ends_with("[64, 64]"), "{q}");
        // Tensor lines are sorted by name.
        let names: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("name"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(names.len(), 48);
        assert!(names.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn summary_of_sharded_mixed_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::two_shards_bf16();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let s = ModelSummary::new(&model);
        assert!(s.sharded);
        assert_eq!(s.shard_files.len(), 2);
        let text = s.to_string();
        assert!(text.contains("shards:         2 (indexed)"), "{text}");
        assert!(text.contains("BF16"), "{text}");
        assert!(text.contains("model-00002-of-00002.safetensors"), "{text}");
        assert_eq!(s.total_params, spec.total_params());
    }
}
