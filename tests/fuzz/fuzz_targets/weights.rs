//! A single `model.safetensors`: header parsing, offsets, dtypes, shapes against config.json.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(common::scratch_dir);
    std::fs::write(dir.join("model.safetensors"), data).expect("write model.safetensors");
    common::exercise(dir);
});
