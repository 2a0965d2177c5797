//! `config.json`: parsing, the family lookup and the tables derived from the config (RoPE).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = std::path::Path::new("fuzz/config.json");
    let Ok(cfg) = gs_host::model::ModelConfig::from_json_str(&text, path) else {
        return;
    };
    if gs_host::arch::family_for(&cfg.architectures, "fuzz/config.json").is_ok() {
        let _ = gs_host::model::forward::RopeTables::new(&cfg, 4);
    }
});
