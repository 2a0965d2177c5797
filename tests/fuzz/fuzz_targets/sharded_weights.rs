//! `model.safetensors.index.json` and two shards. Input layout: a little-endian u16 `n`, then
//! `n` bytes of index JSON, then a little-endian u32 `m`, then `m` bytes of the first shard;
//! the rest is the second shard.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// `(head, rest)` with `head` at most `n` bytes.
fn take(data: &[u8], n: usize) -> (&[u8], &[u8]) {
    data.split_at(n.min(data.len()))
}

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(common::scratch_dir);
    let (len, rest) = take(data, 2);
    let n = len.iter().rev().fold(0usize, |a, &b| a << 8 | b as usize);
    let (index, rest) = take(rest, n);
    let (len, rest) = take(rest, 4);
    let m = len.iter().rev().fold(0usize, |a, &b| a << 8 | b as usize);
    let (first, second) = take(rest, m);
    std::fs::write(dir.join("model.safetensors.index.json"), index).expect("write the index");
    std::fs::write(dir.join(SHARDS[0]), first).expect("write shard 1");
    std::fs::write(dir.join(SHARDS[1]), second).expect("write shard 2");
    common::exercise(dir);
});
