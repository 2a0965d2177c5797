//! Generators of small checkpoints for tests (of this module and of `export`).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use serde_json::{json, Value};

use super::dtype::{f32_to_dtype_bytes, DType};

/// sha256 of every file under `dir`, by relative path.
pub(crate) fn digests(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    use sha2::{Digest, Sha256};
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let d = Sha256::digest(std::fs::read(&p).unwrap()).to_vec();
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), d);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A model written from `spec` into `<temp dir>/src`; keep the temp dir alive while using it.
pub(crate) fn source(spec: &Spec) -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_model(&src, spec);
    (root, src)
}

/// The bundled real model (f32, 5 layers).
/// The bundled model (in the repository, so tests never depend on where `shared/` is).
pub(crate) const STORIES: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/models/stories260K");

/// One tensor of a generated model.
#[derive(Debug, Clone)]
pub(crate) struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// Index into `Spec::shard_names`.
    pub shard: usize,
}

/// A generated model: config, tensors and their shard layout, and extra files.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub config: Value,
    pub tensors: Vec<TensorSpec>,
    /// More than one name: written with an index.
    pub shard_names: Vec<String>,
    /// `(relative path, contents)`, e.g. tokenizer files; may include sub-directories.
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// Deterministic, varied values in about [-1, 1).
pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919 + seed * 31) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

fn llama_config(layers: usize) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 16,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16"
    })
}

impl Spec {
    /// A 2-layer llama-shaped model with every tensor in `dtype`, split over `shards` files
    /// (1 → `model.safetensors`; embeddings and layer 0 in the first shard, the rest in the
    /// last).
    pub fn llama(dtype: DType, shards: usize) -> Spec {
        let mut shapes: Vec<(String, Vec<usize>, usize)> =
            vec![("model.embed_tokens.weight".into(), vec![16, 8], 0)];
        for layer in 0..2 {
            let shard = if layer == 0 { 0 } else { shards - 1 };
            for (suffix, shape) in [
                ("input_layernorm.weight", vec![8]),
                ("self_attn.q_proj.weight", vec![8, 8]),
                ("self_attn.k_proj.weight", vec![4, 8]),
                ("self_attn.v_proj.weight", vec![4, 8]),
                ("self_attn.o_proj.weight", vec![8, 8]),
                ("post_attention_layernorm.weight", vec![8]),
                ("mlp.gate_proj.weight", vec![16, 8]),
                ("mlp.up_proj.weight", vec![16, 8]),
                ("mlp.down_proj.weight", vec![8, 16]),
            ] {
                shapes.push((format!("model.layers.{layer}.{suffix}"), shape, shard));
            }
        }
        shapes.push(("model.norm.weight".into(), vec![8], shards - 1));
        shapes.push(("lm_head.weight".into(), vec![16, 8], shards - 1));
        let tensors = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape, shard))| {
                let n = shape.iter().product();
                TensorSpec {
                    name,
                    dtype,
                    shape,
                    bytes: f32_to_dtype_bytes(&values(n, i), dtype).unwrap(),
                    shard,
                }
            })
            .collect();
        let shard_names = if shards == 1 {
            vec!["model.safetensors".to_string()]
        } else {
            (1..=shards)
                .map(|i| format!("model-{i:05}-of-{shards:05}.safetensors"))
                .collect()
        };
        Spec {
            config: llama_config(2),
            tensors,
            shard_names,
            extra_files: vec![
                ("tokenizer.json".into(), b"{\"model\":{}}".to_vec()),
                (
                    "generation_config.json".into(),
                    b"{\"bos_token_id\": 1}\n".to_vec(),
                ),
                ("LICENSE".into(), b"Apache-2.0\n".to_vec()),
                ("original/params.json".into(), b"{\"dim\": 8}".to_vec()),
            ],
        }
    }

    /// [`Spec::llama`] in BF16 over two shards.
    pub fn two_shards_bf16() -> Spec {
        Spec::llama(DType::BF16, 2)
    }

    /// Adds a tensor with raw bytes (any dtype) to shard `shard`.
    pub fn with_raw(
        mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: Vec<u8>,
        shard: usize,
    ) -> Spec {
        self.tensors.push(TensorSpec {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes,
            shard,
        });
        self
    }

    pub fn total_params(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }

    pub fn tensor(&self, name: &str) -> &TensorSpec {
        self.tensors.iter().find(|t| t.name == name).unwrap()
    }
}

/// Writes `spec` into `dir` (which must exist): config.json, shards (with the safetensors
/// crate, `__metadata__ {"format":"pt"}`), the index when there is more than one shard, and the
/// extra files.
pub(crate) fn write_model(dir: &Path, spec: &Spec) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec.config).unwrap(),
    )
    .unwrap();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, shard) in spec.shard_names.iter().enumerate() {
        let views: Vec<(String, TensorView<'_>)> = spec
            .tensors
            .iter()
            .filter(|t| t.shard == i)
            .map(|t| {
                let view =
                    TensorView::new(t.dtype.to_safetensors(), t.shape.clone(), &t.bytes).unwrap();
                (t.name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, Some(meta.clone()), &dir.join(shard)).unwrap();
    }
    if spec.shard_names.len() > 1 {
        let mut map = serde_json::Map::new();
        let mut names: Vec<&TensorSpec> = spec.tensors.iter().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for t in names {
            map.insert(t.name.clone(), spec.shard_names[t.shard].clone().into());
        }
        let total: usize = spec.tensors.iter().map(|t| t.bytes.len()).sum();
        let index = json!({
            "metadata": {"total_parameters": spec.total_params(), "total_size": total},
            "weight_map": map,
        });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    for (rel, bytes) in &spec.extra_files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }
}

/// Rewrites the index JSON of a written model with `edit`.
pub(crate) fn edit_index(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}
