//! Crash safety: `gs-host` killed with SIGKILL at any point of a run never leaves a partial
//! checkpoint at the output path, and `--resume` then finishes the run with output
//! byte-identical to an uninterrupted run, replaying the blocks the killed run saved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gs_tests::*;

fn calib() -> PathBuf {
    root().join("../shared/reference/calib/stories260K-tinystories-16x64.json")
}

/// GPTQ W4A16 g4 on the bundled model, compressed-tensors: every block has real stage work.
fn manifest(work: &Path) -> PathBuf {
    let text = format!(
        "[model]\npath = \"{model}\"\n\n[calibration]\ndataset = \"{calib}\"\nnsamples = 16\n\
         seqlen = 64\n\n[quant]\nscheme = \"w4a16\"\nweights = {{ group_size = 4 }}\n\n\
         [[pipeline]]\nalgorithm = \"gptq\"\n\n[export]\nformat = \"compressed-tensors\"\n\
         output = \"out\"\n",
        model = stories260k().display(),
        calib = calib().display(),
    );
    write_manifest(work, &text)
}

fn command(work: &Path, manifest: &Path, resume: bool) -> Command {
    let mut c = Command::new(gs_host_bin());
    c.args(["--manifest", &manifest.to_string_lossy()])
        .current_dir(work)
        .env_remove("GS_PLUGIN_PATH")
        .env("RUST_LOG", "warn");
    if resume {
        c.arg("--resume");
    }
    c
}

fn finish(work: &Path, manifest: &Path) -> String {
    let o = command(work, manifest, true)
        .output()
        .expect("gs-host runs");
    assert!(o.status.success(), "--resume failed: {}", stderr(&o));
    stdout(&o)
}

/// Names in `work` other than the manifest: the output, staging or checkpoint directories.
fn litter(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work)
        .expect("list work dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != "run.toml")
        .collect();
    v.sort();
    v
}

/// Kills `child` with SIGKILL (std's `kill` on Unix) and reaps it.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// After a kill: the output path holds nothing, or the complete output (the kill came after
/// the commit), never part of one.
fn assert_no_partial_output(out: &Path, reference: &BTreeMap<PathBuf, String>, when: &str) {
    if out.exists() {
        assert_eq!(
            &tree_digest(out),
            reference,
            "{when}: partial output at {}",
            out.display()
        );
    }
}

#[test]
fn a_killed_run_leaves_no_partial_output_and_resume_finishes_it_identically() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let m = manifest(work);
    let out = work.join("out");

    let started = Instant::now();
    let o = command(work, &m, false).output().expect("gs-host runs");
    let full = started.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = tree_digest(&out);
    assert_eq!(
        litter(work),
        ["out"],
        "an uninterrupted run leaves only its output"
    );
    std::fs::remove_dir_all(&out).unwrap();

    // Killed right after block k's stage result is saved: the rerun replays blocks 0..=k.
    let ckpt = work.join(".out.gs-checkpoint");
    let mut resumed = Vec::new();
    for k in [0usize, 3] {
        let child = command(work, &m, false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let marker = ckpt.join(format!("block-{k:05}.sha256"));
        let deadline = Instant::now() + full * 20 + Duration::from_secs(30);
        while !marker.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        kill(child);
        assert!(marker.exists(), "block {k} was never saved");
        assert_no_partial_output(&out, &reference, &format!("killed after block {k}"));

        // Without --resume the run refuses to drop the saved work.
        let o = command(work, &m, false).output().unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));

        let said = finish(work, &m);
        assert!(said.contains("resuming from"), "{said}");
        resumed.push(said);
        assert_eq!(tree_digest(&out), reference, "resumed after block {k}");
        assert_eq!(litter(work), ["out"], "the checkpoint and staging are gone");
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(resumed[1].contains("blocks 0..4"), "{}", resumed[1]);

    // Killed at points spread over a whole run (start-up, blocks, export, commit).
    for i in 0..8u32 {
        let delay = full.mul_f64((f64::from(i) + 0.5) / 8.0);
        let child = command(work, &m, false)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        kill(child);
        let when = format!("killed after {delay:?} of {full:?}");
        assert_no_partial_output(&out, &reference, &when);
        if out.exists() {
            // Killed after the commit, maybe before the checkpoint was removed: the next
            // (plain) run must not be refused for it.
            std::fs::remove_dir_all(&out).unwrap();
            let o = command(work, &m, false).output().unwrap();
            assert!(
                o.status.success(),
                "{when}, then a plain run: {}",
                stderr(&o)
            );
        } else {
            finish(work, &m);
        }
        assert_eq!(tree_digest(&out), reference, "{when}, then a rerun");
        assert_eq!(litter(work), ["out"], "{when}: leftovers");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn a_failed_run_keeps_its_finished_blocks_for_resume_and_nothing_else() {
    let plugins = misbehave_plugin().parent().unwrap().to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let m = manifest(work);
    let text = std::fs::read_to_string(&m).unwrap();
    let failing = |from_block: usize| {
        text.replace(
            "[export]",
            &format!("[[pipeline]]\nalgorithm = \"test_panic\"\nparams = {{ from_block = {from_block} }}\n\n[export]"),
        )
    };
    let run = |text: &str| {
        std::fs::write(&m, text).unwrap();
        command(work, &m, false)
            .args(["--plugin-dir", &plugins.to_string_lossy()])
            .output()
            .unwrap()
    };

    // A failure in block 0: nothing finished, nothing kept.
    let o = run(&failing(0));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("deliberate panic in block 0"),
        "{}",
        stderr(&o)
    );
    assert!(litter(work).is_empty(), "{:?}", litter(work));

    // A failure in block 2: blocks 0 and 1 are kept, and the error says how to continue.
    let o = run(&failing(2));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("deliberate panic in block 2"), "{err}");
    assert!(
        err.contains("blocks 0..2 are saved in") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(litter(work), [".out.gs-checkpoint"]);
    // The same run with the cause fixed is another run (the manifest changed): it starts over.
    let o = run(&text);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(litter(work), ["out"]);
}
