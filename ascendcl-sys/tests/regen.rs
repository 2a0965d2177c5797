//! `regen.sh` reproduces the committed bindings byte for byte. Opt-in (`--ignored`): it needs
//! pip with access to PyPI, python3, libclang and cargo (it installs the pinned bindgen-cli
//! into a cache directory on first use).
//!
//! `cargo test -p ascendcl-sys --test regen -- --ignored`

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs pip (PyPI), libclang and bindgen-cli; run with --ignored"]
fn regen_reproduces_the_committed_bindings() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(crate_dir.join("regen.sh"))
        .arg(out.path())
        .status()
        .expect("bash runs");
    assert!(status.success(), "regen.sh failed");
    for file in ["bindings.rs", "error_names.rs"] {
        let committed = std::fs::read(crate_dir.join("src").join(file)).unwrap();
        let fresh = std::fs::read(out.path().join(file)).unwrap();
        assert!(
            committed == fresh,
            "src/{file} differs from what regen.sh generates now; run ascendcl-sys/regen.sh and review the diff"
        );
    }
}
