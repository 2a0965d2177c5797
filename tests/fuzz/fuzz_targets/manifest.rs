//! The TOML manifest: syntax, keys, types, scheme and regex validation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = gs_host::manifest::Manifest::parse(&text, std::path::Path::new("fuzz/run.toml"));
});
