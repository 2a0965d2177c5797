//! The plugin boundary, through real `.so` files built by cargo: loading, version rules,
//! evolution, containment of misbehaving plugins, discovery clashes, pins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gs_host::plugins::{LoadedPlugin, Pin, PluginError, PluginRegistry, PluginSource, SearchPath};
use gs_tests::*;

/// A directory holding copies of the given plugin files (as a user's `plugins/` would).
fn plugin_dir(files: &[(&Path, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (src, name) in files {
        std::fs::copy(src, lib_file(d.path(), name)).unwrap();
    }
    d
}

fn search(dir: &Path) -> SearchPath {
    SearchPath {
        dirs: vec![(dir.to_path_buf(), PluginSource::Flag)],
        files: vec![],
    }
}

fn no_pins() -> BTreeMap<String, Pin> {
    BTreeMap::new()
}

#[test]
fn rtn_plugin_declares_itself() {
    let p = LoadedPlugin::load(&rtn_plugin(), PluginSource::Flag).unwrap();
    assert_eq!(p.name, "gs-rtn");
    assert_eq!(p.vendor, "gs-host");
    assert_eq!(p.abi_major, gs_plugin_api::abi::ABI_MAJOR);
    assert_eq!(p.api_version, gs_plugin_api::API_VERSION);
    assert_eq!(p.algorithms.len(), 1);
    assert_eq!(p.algorithms[0].0, "rtn");
    assert_eq!(p.sha256.len(), 64);
}

#[test]
fn bad_parameters_are_reported_with_the_plugin_and_key() {
    let d = plugin_dir(&[(&rtn_plugin(), "gs_rtn")]);
    let reg = PluginRegistry::load(&search(d.path()), &no_pins()).unwrap();
    let e = reg.create("rtn", "bitz = 4").unwrap_err().to_string();
    assert!(
        e.contains("gs-rtn") && e.contains("rtn") && e.contains("bitz"),
        "{e}"
    );
    let e = reg.create("rnt", "").unwrap_err().to_string();
    assert!(
        e.contains("unknown algorithm `rnt`") && e.contains("did you mean `rtn`"),
        "{e}"
    );
}

#[test]
fn plugin_of_another_major_version_is_refused_naming_both() {
    let so = fixture("plugin-abi2", "gs_fixture_abi2");
    let e = LoadedPlugin::load(&so, PluginSource::Flag).unwrap_err();
    assert!(
        matches!(
            e,
            PluginError::AbiMajor {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("major version 2") && msg.contains("major version 1"),
        "{msg}"
    );
    assert!(msg.contains("gs_fixture_abi2"), "{msg}");
}

#[test]
fn a_library_without_the_root_module_is_refused() {
    let so = fixture("not-a-plugin", "gs_fixture_not_a_plugin");
    let e = LoadedPlugin::load(&so, PluginSource::Flag)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a gs-host plugin") && e.contains("gs_plugin_abi_major"),
        "{e}"
    );
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let fake = lib_file(d.path(), "fake");
    std::fs::write(&fake, b"#!/bin/sh\necho not a library\n").unwrap();
    let e = PluginRegistry::load(&search(d.path()), &no_pins())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a loadable shared library") && e.contains("libfake"),
        "{e}"
    );
}

#[test]
fn duplicate_algorithm_names_are_an_error_naming_both_files() {
    let d = plugin_dir(&[(&rtn_plugin(), "rtn_a"), (&rtn_plugin(), "rtn_b")]);
    let e = PluginRegistry::load(&search(d.path()), &no_pins()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, PluginError::DuplicateAlgorithm { .. }), "{msg}");
    assert!(
        msg.contains("librtn_a") && msg.contains("librtn_b") && msg.contains("`rtn`"),
        "{msg}"
    );
}

#[test]
fn an_explicit_plugin_shadows_a_builtin_one() {
    let d = plugin_dir(&[(&rtn_plugin(), "vendor_rtn")]);
    let builtin = plugin_dir(&[(&rtn_plugin(), "gs_rtn")]);
    let sp = SearchPath {
        dirs: vec![
            (d.path().to_path_buf(), PluginSource::Flag),
            (builtin.path().to_path_buf(), PluginSource::BuiltIn),
        ],
        files: vec![],
    };
    let reg = PluginRegistry::load(&sp, &no_pins()).unwrap();
    let provider = reg.provider("rtn").unwrap();
    assert!(provider
        .path
        .ends_with(lib_file(Path::new(""), "vendor_rtn")));
}

#[test]
fn sha256_pins_are_enforced() {
    let d = plugin_dir(&[(&rtn_plugin(), "gs_rtn")]);
    let good = gs_host::plugins::sha256_file(&rtn_plugin()).unwrap();
    let pin = |sha: &str, path: Option<PathBuf>| {
        BTreeMap::from([(
            "gs-rtn".to_string(),
            Pin {
                sha256: sha.to_string(),
                path,
            },
        )])
    };
    PluginRegistry::load(&search(d.path()), &pin(&good, None)).unwrap();
    let bad = "0".repeat(64);
    let e = PluginRegistry::load(&search(d.path()), &pin(&bad, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refusing") && e.contains(&bad) && e.contains(&good),
        "{e}"
    );
    // A pinned path is checked before the library is opened.
    let empty = tempfile::tempdir().unwrap();
    let e = PluginRegistry::load(&search(empty.path()), &pin(&bad, Some(rtn_plugin())))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refusing") && e.contains("gs-rtn"), "{e}");
    let e = PluginRegistry::load(&search(empty.path()), &pin(&good, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no loaded plugin has that name"), "{e}");
}

/// The other direction: an *older* host (built against the frozen 1.0 API, whose services
/// table has no `report_metric`) loads today's RTN plugin and runs it; the plugin's 1.1 call
/// degrades to a no-op instead of failing.
#[test]
fn todays_plugin_loads_and_runs_in_a_v1_host() {
    let bin = fixture_dir("host-v1").join(format!(
        "gs-fixture-host-v1{}",
        std::env::consts::EXE_SUFFIX
    ));
    let o = std::process::Command::new(bin)
        .arg(rtn_plugin())
        .arg("rtn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("plugin gs-rtn api {}", gs_plugin_api::API_VERSION)),
        "{out}"
    );
    // The same synthetic layer and scheme the fixture host serves: w[k] = (k − 13)/10, [4, 8],
    // int4 symmetric per channel, half_range.
    let w: Vec<f32> = (0..32).map(|k| (k as f32 - 13.0) / 10.0).collect();
    let args = gs_quant::QuantArgs {
        bits: 4,
        ty: gs_quant::QuantType::Int,
        symmetric: true,
        granularity: gs_quant::Granularity::Channel,
        scale_rule: gs_quant::ScaleRule::HalfRange,
    };
    let (expected, _) = gs_quant::fake_quantize(&w, 4, 8, &args).unwrap();
    let expected: Vec<String> = expected
        .iter()
        .map(|v| format!("{:08x}", v.to_bits()))
        .collect();
    assert!(
        out.contains(&format!("weight {}", expected.join(" "))),
        "{out}"
    );
    assert!(out.contains("qparams 4"), "{out}");
}
