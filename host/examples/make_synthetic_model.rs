//! Writes a random Llama checkpoint of any depth and width, for memory and speed measurements
//! (docs/RESULTS.md). Weights are uniform in ±0.02·√3 (std 0.02), norms are 1, bf16, sharded
//! like transformers (`model-0000k-of-0000N.safetensors` + index). Streams every tensor to
//! disk, so writing a 10 GB model needs only a few MB of RAM. The tokenizer of the bundled
//! stories260K is copied (vocab 512), so calibration text can be tokenized.
//!
//! cargo run --release -p gs-host --example make_synthetic_model -- OUT LAYERS [HIDDEN] [FFN]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

const VOCAB: usize = 512;
const SHARD_BYTES: usize = 2 << 30;

/// xorshift64*: fast, deterministic, good enough for weights nobody reads.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * 0.02 * 3f32.sqrt()
    }
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    norm: bool,
}

fn tensors(layers: usize, hidden: usize, ffn: usize, kv: usize) -> Vec<Tensor> {
    let t = |name: String, shape: Vec<usize>, norm| Tensor { name, shape, norm };
    let mut v = vec![
        t(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, hidden],
            false,
        ),
        t("model.norm.weight".into(), vec![hidden], true),
        t("lm_head.weight".into(), vec![VOCAB, hidden], false),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        v.push(t(format!("{p}.input_layernorm.weight"), vec![hidden], true));
        v.push(t(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            true,
        ));
        v.push(t(
            format!("{p}.self_attn.q_proj.weight"),
            vec![hidden, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.mlp.gate_proj.weight"),
            vec![ffn, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.mlp.up_proj.weight"),
            vec![ffn, hidden],
            false,
        ));
        v.push(t(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, ffn],
            false,
        ));
    }
    v
}

fn write_shard(path: &Path, tensors: &[&Tensor], rng: &mut Rng) -> Result<usize> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0;
    for t in tensors {
        let n: usize = t.shape.iter().product::<usize>() * 2;
        header.insert(
            t.name.clone(),
            json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header))?;
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut f = BufWriter::with_capacity(1 << 22, File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut buf = Vec::with_capacity(1 << 20);
    for t in tensors {
        let n: usize = t.shape.iter().product();
        for k in 0..n {
            let v = if t.norm { 1.0 } else { rng.next_f32() };
            buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            if buf.len() >= 1 << 20 || k + 1 == n {
                f.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    f.flush()?;
    Ok(off)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        bail!("usage: make_synthetic_model OUT LAYERS [HIDDEN=2048] [FFN=5632]");
    };
    let layers: usize = args.get(1).context("LAYERS missing")?.parse()?;
    let hidden: usize = args.get(2).map_or(Ok(2048), |s| s.parse())?;
    let ffn: usize = args.get(3).map_or(Ok(5632), |s| s.parse())?;
    let (heads, kv_heads) = (hidden / 64, (hidden / 64 / 4).max(1));
    std::fs::create_dir_all(&out)?;
    let all = tensors(layers, hidden, ffn, kv_heads * 64);
    // Group tensors into shards of at most SHARD_BYTES, in order.
    let mut shards: Vec<Vec<&Tensor>> = vec![vec![]];
    let mut size = 0;
    for t in &all {
        let n = t.shape.iter().product::<usize>() * 2;
        if size + n > SHARD_BYTES && !shards.last().is_some_and(|s| s.is_empty()) {
            shards.push(vec![]);
            size = 0;
        }
        size += n;
        shards.last_mut().context("no shard")?.push(t);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut weight_map = Map::new();
    let mut total = 0;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        total += write_shard(&out.join(&name), shard, &mut rng)?;
        for t in shard {
            weight_map.insert(t.name.clone(), Value::String(name.clone()));
        }
        eprintln!("wrote {name}");
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 64,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/stories260K");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(assets.join(f), out.join(f)).with_context(|| format!("copy {f}"))?;
    }
    eprintln!(
        "{} layers, hidden {hidden}, ffn {ffn}: {:.2} GB in {} shards",
        layers,
        total as f64 / 1e9,
        shards.len()
    );
    Ok(())
}
