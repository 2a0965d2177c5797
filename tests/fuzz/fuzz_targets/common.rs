//! A scratch model directory per fuzz process (in /dev/shm when present: the loader maps
//! files, so every input is written to disk first).

use std::path::PathBuf;

/// config.json of a one-block Llama small enough for fuzzed weights to match it.
pub const TINY_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 8,
  "intermediate_size": 16,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "head_dim": 4,
  "num_hidden_layers": 1,
  "vocab_size": 16,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false
}"#;

/// An empty directory private to this process, holding `config.json` = [`TINY_CONFIG`].
pub fn scratch_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("gs-host-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
    std::fs::write(dir.join("config.json"), TINY_CONFIG).expect("write config.json");
    dir
}

/// Everything the host does with an opened model short of quantizing it: the summary, every
/// tensor in f32, and a forward pass (which checks every shape against the config).
pub fn exercise(dir: &std::path::Path) {
    let Ok(model) = gs_host::model::Model::open(dir) else {
        return;
    };
    let _ = model.summary();
    let names: Vec<String> = model.weights.names().map(str::to_string).collect();
    for n in &names {
        let _ = model.weights.to_f32(n);
    }
    if let Ok(dec) = gs_host::model::forward::Decoder::new(&model) {
        let _ = dec.logits(&gs_host::device::CpuDevice::new(), &[1, 2, 3], 1, 3);
    }
}
