//! Manifest tests: whole documents in, exact values or messages out.

use std::path::{Path, PathBuf};

use gs_quant::{ActArgs, Granularity, QuantArgs, QuantType, ScaleRule, Scheme};

use super::*;

/// Sections every manifest needs, to append the section under test to.
const BASE: &str = r#"[model]
path = "models/llama"

[quant]
scheme = "w4a16"

[[pipeline]]
algorithm = "rtn"

[export]
format = "fake"
output = "out"
"#;

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("run.toml"))
}

fn ok(text: &str) -> Manifest {
    match parse(text) {
        Ok(m) => m,
        Err(e) => panic!("expected a valid manifest, got: {e}"),
    }
}

fn err(text: &str) -> ManifestError {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

fn msg(text: &str) -> String {
    err(text).to_string()
}

/// `BASE` with its `[quant]` replaced by `quant`.
fn with_quant(quant: &str) -> String {
    BASE.replace("[quant]\nscheme = \"w4a16\"\n", quant)
}

fn args(bits: u8, ty: QuantType, symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits,
        ty,
        symmetric,
        granularity,
        scale_rule: ScaleRule::HalfRange,
    }
}

const INT4_G128: QuantArgs = QuantArgs {
    bits: 4,
    ty: QuantType::Int,
    symmetric: true,
    granularity: Granularity::Group(128),
    scale_rule: ScaleRule::HalfRange,
};
const INT8_CHANNEL: QuantArgs = QuantArgs {
    bits: 8,
    ty: QuantType::Int,
    symmetric: true,
    granularity: Granularity::Channel,
    scale_rule: ScaleRule::HalfRange,
};

// ---- valid manifests -----------------------------------------------------------------------

const FULL: &str = r#"
[model]
path = "/models/llama-3-8b"

[calibration]
dataset = "data/calib.jsonl"
nsamples = 64
seqlen = 2048
seed = 7
text_field = "content"

[quant]
scheme = "w8a8_dynamic"

[quant.weights]
scale_rule = "qmax"

[quant.kv_cache]
bits = 8

[[quant.override]]
pattern = "lm_head"
skip = true

[[pipeline]]
algorithm = "smoothquant"
params = { alpha = 0.5 }

[[pipeline]]
algorithm = "gptq"

[pipeline.params]
damp = 0.01
blocks = { size = 128, order = ["act", "static"] }

[plugins.gptq]
sha256 = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789"
path = "plugins/libgs_gptq.so"

[export]
format = "fake"
output = "/out/llama-w8a8"

[eval]
dataset = "/data/wiki.txt"
seqlen = 1024
windows = 40

[run]
sequential = false
output_error = false
stage_timeout_s = 90
"#;

#[test]
fn full_manifest_parses_every_section() {
    let m = match Manifest::parse(FULL, Path::new("/proj/run.toml")) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(m.model.path, PathBuf::from("/models/llama-3-8b"));
    assert_eq!(
        m.calibration,
        Some(CalibrationSection {
            dataset: PathBuf::from("/proj/data/calib.jsonl"),
            nsamples: 64,
            seqlen: 2048,
            seed: 7,
            text_field: "content".into(),
        })
    );
    assert!(m.calibration.as_ref().is_some_and(|c| c.is_jsonl()));

    let qmax_channel = QuantArgs {
        scale_rule: ScaleRule::Qmax,
        ..INT8_CHANNEL
    };
    let network = m.plan.network_scheme();
    assert_eq!(network.weights, Some(qmax_channel));
    assert_eq!(
        network.activations,
        Some(ActArgs {
            args: INT8_CHANNEL,
            dynamic: true
        }),
        "the preset's activations are kept when only [quant.weights] is given"
    );
    assert_eq!(
        network.kv_cache,
        Some(args(8, QuantType::Int, true, Granularity::Tensor))
    );
    assert_eq!(m.plan.scheme_for("lm_head"), Scheme::default());
    assert_eq!(m.plan.scheme_for("model.layers.0.mlp.up_proj"), network);

    let names: Vec<_> = m.pipeline.iter().map(|s| s.algorithm.as_str()).collect();
    assert_eq!(names, ["smoothquant", "gptq"]);
    assert_eq!(
        m.pipeline[0].params.get("alpha").and_then(|v| v.as_float()),
        Some(0.5)
    );
    assert_eq!((m.pipeline[1].at.line, m.pipeline[1].at.column), (29, 1));

    let pin = &m.plugins["gptq"];
    assert_eq!(
        pin.sha256,
        "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    );
    assert_eq!(pin.path, Some(PathBuf::from("/proj/plugins/libgs_gptq.so")));
    assert_eq!(
        m.export,
        ExportSection {
            format: ExportFormat::Fake,
            output: PathBuf::from("/out/llama-w8a8"),
            max_shard_bytes: crate::export::DEFAULT_MAX_SHARD_BYTES,
        }
    );
    assert_eq!(
        m.eval,
        Some(EvalSection {
            dataset: PathBuf::from("/data/wiki.txt"),
            seqlen: 1024,
            windows: Some(40),
            points: EvalPoint::ALL.to_vec(),
        })
    );
    assert_eq!(
        m.run,
        RunSection {
            sequential: false,
            output_error: false,
            stage_timeout: Some(std::time::Duration::from_secs(90)),
        }
    );
}

#[test]
fn optional_sections_take_their_defaults() {
    let m = ok(&format!(
        "{BASE}\n[calibration]\ndataset = \"c.txt\"\n\n[eval]\ndataset = \"e.txt\"\n"
    ));
    let c = m
        .calibration
        .as_ref()
        .map(|c| (c.nsamples, c.seqlen, c.seed, c.text_field.as_str()));
    assert_eq!(c, Some((128, 512, 0, "text")));
    assert_eq!(
        m.eval.as_ref().map(|e| (e.seqlen, e.windows)),
        Some((512, None))
    );
    assert_eq!(m.run, RunSection::default());
    assert!(m.run.sequential && m.run.output_error);
    assert!(m.plugins.is_empty());

    let m = ok(BASE);
    assert_eq!(m.calibration, None);
    assert_eq!(m.eval, None);
    assert_eq!(m.pipeline[0].params_text(), "");
}

#[test]
fn relative_paths_resolve_against_the_manifest_directory() {
    let text = format!(
        "{BASE}\n[calibration]\ndataset = \"../data/c.txt\"\n[plugins.rtn]\nsha256 = \"{}\"\npath = \"lib/librtn.so\"\n",
        "0".repeat(64)
    );
    let m = match Manifest::parse(&text, Path::new("/proj/cfg/run.toml")) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(m.model.path, PathBuf::from("/proj/cfg/models/llama"));
    assert_eq!(m.export.output, PathBuf::from("/proj/cfg/out"));
    assert_eq!(
        m.calibration.map(|c| c.dataset),
        Some(PathBuf::from("/proj/data/c.txt")) // `..` folded lexically
    );
    assert_eq!(
        m.plugins["rtn"].path,
        Some(PathBuf::from("/proj/cfg/lib/librtn.so"))
    );

    // A bare file name has an empty directory: paths stay relative to the working directory.
    assert_eq!(ok(BASE).model.path, PathBuf::from("models/llama"));
}

#[test]
fn load_reads_the_file_and_names_it_when_missing() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("run.toml");
    if let Err(e) = std::fs::write(&path, BASE) {
        panic!("write: {e}");
    }
    let m = match Manifest::load(&path) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(m.model.path, dir.path().join("models/llama"));

    let missing = dir.path().join("nope.toml");
    let e = Manifest::load(&missing)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with(&format!("cannot read manifest {}: ", missing.display())),
        "{e}"
    );
}

#[test]
fn params_text_round_trips_a_nested_table() {
    let m = ok(&BASE.replace(
        "algorithm = \"rtn\"\n",
        "algorithm = \"rtn\"\n[pipeline.params]\nalpha = 0.5\nname = \"x\"\nlayers = [1, 2, 3]\n\
         [pipeline.params.search]\ngrid = 20\nranges = [{ lo = 0.1, hi = 1.0 }]\n",
    ));
    let stage = &m.pipeline[0];
    let text = stage.params_text();
    let back: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => panic!("params_text is not TOML: {e}\n{text}"),
    };
    assert_eq!(back, stage.params);
    let grid = back
        .get("search")
        .and_then(|s| s.get("grid"))
        .and_then(|g| g.as_integer());
    assert_eq!(grid, Some(20));
}

// ---- quant plan ----------------------------------------------------------------------------

const LAYERS: [&str; 7] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
];

#[test]
fn overrides_skip_and_switch_layers() {
    let m = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"

[[quant.override]]
pattern = "mlp\\.down_proj$"
skip = true

[[quant.override]]
pattern = "o_proj"
scheme = "w8a16"
"#,
    ));
    let w4a16 = Scheme {
        weights: Some(INT4_G128),
        activations: None,
        kv_cache: None,
    };
    let w8a16 = Scheme {
        weights: Some(INT8_CHANNEL),
        ..w4a16
    };
    assert_eq!(
        m.plan.scheme_for("model.layers.3.mlp.down_proj"),
        Scheme::default()
    );
    assert!(m.plan.scheme_for("model.layers.3.mlp.down_proj").is_skip());
    assert_eq!(m.plan.scheme_for("model.layers.3.self_attn.o_proj"), w8a16);
    assert_eq!(m.plan.scheme_for("model.layers.3.self_attn.q_proj"), w4a16);
    assert_eq!(m.plan.scheme_for("model.layers.3.mlp.up_proj"), w4a16);
}

#[test]
fn the_last_matching_override_wins() {
    let first_broad = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"
[[quant.override]]
pattern = "self_attn"
scheme = "w8a16"
[[quant.override]]
pattern = "self_attn\\.o_proj"
skip = true
"#,
    ));
    assert!(first_broad
        .plan
        .scheme_for("model.layers.1.self_attn.o_proj")
        .is_skip());
    assert_eq!(
        first_broad
            .plan
            .scheme_for("model.layers.1.self_attn.q_proj")
            .weights,
        Some(INT8_CHANNEL)
    );

    // Same two patterns in the other order: the broad one now covers o_proj too.
    let last_broad = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"
[[quant.override]]
pattern = "self_attn\\.o_proj"
skip = true
[[quant.override]]
pattern = "self_attn"
scheme = "w8a16"
"#,
    ));
    assert_eq!(
        last_broad
            .plan
            .scheme_for("model.layers.1.self_attn.o_proj")
            .weights,
        Some(INT8_CHANNEL)
    );
}

#[test]
fn patterns_search_unanchored_unless_anchored() {
    let m = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"
[[quant.override]]
pattern = "layers\\.1\\."
skip = true
[[quant.override]]
pattern = "^proj$"
skip = true
"#,
    ));
    assert!(m.plan.scheme_for("model.layers.1.mlp.up_proj").is_skip());
    assert!(!m.plan.scheme_for("model.layers.11.mlp.up_proj").is_skip());
    assert!(
        !m.plan.scheme_for("model.layers.0.mlp.up_proj").is_skip(),
        "^proj$ is anchored"
    );
}

#[test]
fn override_fields_apply_on_top_of_the_network_scheme_or_their_preset() {
    let m = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"
[quant.kv_cache]
bits = 8

[[quant.override]]
pattern = "q_proj"
weights = { group_size = 32 }

[[quant.override]]
pattern = "k_proj"
scheme = "w8a8_dynamic"
activations = { enabled = false }

[[quant.override]]
pattern = "v_proj"
weights.symmetric = false
kv_cache.enabled = false
"#,
    ));
    let kv = Some(args(8, QuantType::Int, true, Granularity::Tensor));
    let q = m.plan.scheme_for("model.layers.0.self_attn.q_proj");
    assert_eq!(
        q.weights,
        Some(QuantArgs {
            granularity: Granularity::Group(32),
            ..INT4_G128
        })
    );
    assert_eq!(
        q.kv_cache, kv,
        "fields not overridden come from the network scheme"
    );

    let k = m.plan.scheme_for("model.layers.0.self_attn.k_proj");
    assert_eq!(
        k,
        Scheme {
            weights: Some(INT8_CHANNEL),
            activations: None,
            kv_cache: None
        }
    );

    let v = m.plan.scheme_for("model.layers.0.self_attn.v_proj");
    assert_eq!(
        v.weights,
        Some(QuantArgs {
            symmetric: false,
            ..INT4_G128
        })
    );
    assert_eq!(v.kv_cache, None);
}

#[test]
fn unused_overrides_are_reported_with_their_index() {
    let m = ok(&with_quant(
        r#"[quant]
scheme = "w4a16"
[[quant.override]]
pattern = "down_proj"
skip = true
[[quant.override]]
pattern = "dense_4h_to_h"
skip = true
[[quant.override]]
pattern = "o_proj"
scheme = "w8a16"
"#,
    ));
    assert_eq!(
        m.plan.unused_overrides(LAYERS),
        vec![(1, "dense_4h_to_h".to_owned())]
    );
    assert_eq!(
        m.plan.unused_overrides(LAYERS[..3].iter().copied()).len(),
        3
    );
}

#[test]
fn explicit_tables_without_preset() {
    let m = ok(&with_quant(
        r#"[quant.weights]
bits = 4
group_size = 64
symmetric = false
[quant.activations]
bits = 8
dynamic = true
"#,
    ));
    let s = m.plan.network_scheme();
    assert_eq!(
        s.weights,
        Some(args(4, QuantType::Int, false, Granularity::Group(64)))
    );
    assert_eq!(
        s.activations,
        Some(ActArgs {
            args: args(8, QuantType::Int, true, Granularity::Channel),
            dynamic: true
        }),
        "dynamic activations default to per-token"
    );

    let m = ok(&with_quant(
        "[quant.weights]\nbits = 8\n[quant.activations]\nbits = 8\n",
    ));
    let act = m.plan.network_scheme().activations;
    assert_eq!(
        act.map(|a| (a.dynamic, a.args.granularity)),
        Some((false, Granularity::Tensor))
    );
}

#[test]
fn quant_plan_can_be_built_from_the_section_again() {
    let m = ok(FULL);
    let plan = match QuantPlan::new(&m.quant) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(plan.network_scheme(), m.plan.network_scheme());
    assert_eq!(m.quant.overrides[0].pattern.value, "lm_head");
    assert_eq!(
        m.quant.scheme.preset.as_ref().map(|p| p.value),
        Some(Preset::W8A8Dynamic)
    );
}

// ---- unknown keys and values ---------------------------------------------------------------

#[test]
fn typo_in_key_names_line_column_and_suggestion() {
    let text = format!("{BASE}\n[calibration]\ndataset = \"c.txt\"\nnsample = 3\n");
    assert_eq!(
        msg(&text),
        "run.toml:16:1: unknown key `nsample` in [calibration]; did you mean `nsamples`? \
         (valid keys: dataset, nsamples, seqlen, seed, text_field)"
    );
    match err(&text) {
        ManifestError::UnknownKey {
            table,
            key,
            choices,
            ..
        } => {
            assert_eq!((table.as_str(), key.as_str()), ("calibration", "nsample"));
            assert_eq!(choices.suggestion.as_deref(), Some("nsamples"));
            assert_eq!(choices.valid.len(), 5);
        }
        e => panic!("wrong variant: {e:?}"),
    }
}

#[test]
fn unknown_key_without_a_close_match_lists_valid_keys_only() {
    let text = BASE.replace("path = \"models/llama\"\n", "path = \"m\"\n  colour = 1\n");
    assert_eq!(
        msg(&text),
        "run.toml:3:3: unknown key `colour` in [model] (valid keys: path)"
    );
}

#[test]
fn unknown_key_in_nested_and_array_tables() {
    let text = with_quant(
        "[quant]\nscheme = \"w4a16\"\n[[quant.override]]\npattern = \"x\"\nweights = { bits = 4, grup_size = 64 }\n",
    );
    assert_eq!(
        msg(&text),
        "run.toml:8:23: unknown key `grup_size` in `quant.override[0].weights`; did you mean \
         `group_size`? (valid keys: bits, type, symmetric, granularity, group_size, scale_rule)"
    );

    let text = with_quant("[quant]\nscheme = \"w4a16\"\n[quant.weights]\nbitz = 4\n");
    let e = msg(&text);
    assert!(
        e.starts_with("run.toml:7:1: unknown key `bitz` in [quant.weights]; did you mean `bits`?"),
        "{e}"
    );

    let text = format!("{BASE}[plugins.rtn]\nsha = \"x\"\n");
    assert_eq!(
        msg(&text),
        "run.toml:14:1: unknown key `sha` in [plugins.rtn] (valid keys: sha256, path)"
    );
}

#[test]
fn unknown_section_suggests_the_closest() {
    let text = format!("{BASE}\n[calibrate]\ndataset = \"c.txt\"\n");
    assert_eq!(
        msg(&text),
        "run.toml:14:2: unknown section [calibrate]; did you mean [calibration]? (valid sections: \
         model, calibration, quant, pipeline, plugins, export, eval, run, device)"
    );
    let e = msg(&format!("verbose = true\n{BASE}"));
    assert!(
        e.starts_with("run.toml:1:1: unknown key `verbose` at the top level (valid keys: model,"),
        "{e}"
    );
}

#[test]
fn unknown_preset_suggests_the_closest() {
    let text = with_quant("[quant]\nscheme = \"w4a61\"\n");
    assert_eq!(
        msg(&text),
        "run.toml:5:10: unknown value `w4a61` for `quant.scheme`; did you mean `w4a16`? (valid \
         values: w8a16, w4a16, w8a8, w8a8_dynamic, w4a8, fp8, fp8_dynamic)"
    );
    let e = msg(&with_quant("[quant]\nscheme = \"W8A8\"\n"));
    assert!(e.contains("did you mean `w8a8`?"), "{e}");
}

#[test]
fn unknown_enum_value_in_a_table() {
    let text = with_quant("[quant]\nscheme = \"w4a16\"\n[quant.weights]\ngranularity = \"grop\"\n");
    let e = msg(&text);
    assert!(
        e.starts_with("run.toml:7:15: unknown value `grop` for `quant.weights.granularity`; did you mean `group`?"),
        "{e}"
    );
    assert!(
        e.ends_with("(valid values: tensor, channel, group, token)"),
        "{e}"
    );
}

#[test]
fn unknown_export_format_lists_valid_ones() {
    let text = BASE.replace("format = \"fake\"", "format = \"ascnd\"");
    assert_eq!(
        msg(&text),
        "run.toml:11:10: unknown value `ascnd` for `export.format`; did you mean `ascend`? \
         (valid values: fake, compressed-tensors, ascend)"
    );
    let text = BASE.replace("format = \"fake\"", "format = \"fkae\"");
    assert!(msg(&text).contains("did you mean `fake`?"));
    for f in ["compressed-tensors", "ascend"] {
        let text = BASE.replace("format = \"fake\"", &format!("format = \"{f}\""));
        let m = Manifest::parse(&text, Path::new("run.toml")).unwrap();
        assert_eq!(m.export.format.name(), f);
    }
}

#[test]
fn max_shard_size_takes_bytes_or_units() {
    for (v, bytes) in [
        ("1000", 1000),
        ("\"5GB\"", 5_000_000_000),
        ("\"2MiB\"", 2 << 20),
    ] {
        let text = BASE.replace(
            "format = \"fake\"",
            &format!("format = \"fake\"\nmax_shard_size = {v}"),
        );
        let m = Manifest::parse(&text, Path::new("run.toml")).unwrap();
        assert_eq!(m.export.max_shard_bytes, bytes, "{v}");
    }
    let text = BASE.replace(
        "format = \"fake\"",
        "format = \"fake\"\nmax_shard_size = \"5 parsecs\"",
    );
    assert!(
        msg(&text).contains("export.max_shard_size"),
        "{}",
        msg(&text)
    );
}

#[test]
fn eval_points_are_checked_and_ordered() {
    let text = format!("{BASE}[eval]\ndataset = \"w.txt\"\npoints = [\"exported\", \"float\"]\n");
    let m = Manifest::parse(&text, Path::new("run.toml")).unwrap();
    assert_eq!(
        m.eval.unwrap().points,
        vec![EvalPoint::Float, EvalPoint::Exported]
    );
    let text = format!("{BASE}[eval]\ndataset = \"w.txt\"\npoints = [\"fake\"]\n");
    let e = msg(&text);
    assert!(
        e.contains("eval.points[0]") && e.contains("fake_quant"),
        "{e}"
    );
    let text = format!("{BASE}[eval]\ndataset = \"w.txt\"\npoints = []\n");
    assert!(msg(&text).contains("at least one"), "{}", msg(&text));
}

// ---- types, missing keys, syntax ------------------------------------------------------------

#[test]
fn wrong_type_names_key_expected_and_found() {
    let text = format!("{BASE}[calibration]\ndataset = \"c.txt\"\nnsamples = \"many\"\n");
    assert_eq!(
        msg(&text),
        "run.toml:15:12: wrong type for `calibration.nsamples`: expected an integer, found string \"many\""
    );
    let text = format!("{BASE}[run]\nsequential = 1\n");
    assert_eq!(
        msg(&text),
        "run.toml:14:14: wrong type for `run.sequential`: expected a boolean, found integer `1`"
    );
    let text = with_quant("[quant]\nscheme = 4\n");
    assert_eq!(
        msg(&text),
        "run.toml:5:10: wrong type for `quant.scheme`: expected a string, found an integer"
    );
}

#[test]
fn single_table_where_an_array_of_tables_is_needed() {
    let text = BASE.replace("[[pipeline]]", "[pipeline]");
    assert_eq!(
        msg(&text),
        "run.toml:7:1: wrong type for `pipeline`: expected an array of tables ([[pipeline]]), found a table"
    );
}

#[test]
fn missing_sections_and_keys() {
    let text = BASE.replace("[export]\nformat = \"fake\"\noutput = \"out\"\n", "");
    assert_eq!(
        msg(&text),
        "run.toml:1:1: missing required section [export]"
    );
    let text = BASE.replace("output = \"out\"\n", "");
    assert_eq!(
        msg(&text),
        "run.toml:10:1: missing required key `output` in [export]"
    );
    let text = with_quant("[quant]\nscheme = \"w4a16\"\n[[quant.override]]\nskip = true\n");
    assert_eq!(
        msg(&text),
        "run.toml:6:1: missing required key `pattern` in `quant.override[0]`"
    );
}

#[test]
fn empty_pipeline_is_an_error() {
    let text = BASE.replace("[[pipeline]]\nalgorithm = \"rtn\"\n", "");
    match err(&text) {
        ManifestError::EmptyPipeline { at } => assert_eq!((at.line, at.column), (1, 1)),
        e => panic!("wrong variant: {e:?}"),
    }
    let text = format!(
        "pipeline = []\n{}",
        BASE.replace("[[pipeline]]\nalgorithm = \"rtn\"\n", "")
    );
    let e = msg(&text);
    assert!(
        e.starts_with("run.toml:1:12: the manifest has no [[pipeline]] stages"),
        "{e}"
    );
}

#[test]
fn syntax_errors_carry_position_and_toml_message() {
    assert_eq!(
        msg("[model]\npath = \"x\nnext = 1\n"),
        "run.toml:2:10: TOML syntax error: invalid basic string, expected `\"`"
    );
    let e = msg("[model\npath = 'x'\n");
    assert!(e.starts_with("run.toml:1:7: TOML syntax error: "), "{e}");
    let e = msg(&format!("{BASE}[model]\npath = 'y'\n"));
    assert!(
        e.starts_with("run.toml:13:2: TOML syntax error: duplicate key"),
        "{e}"
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = BASE.replace("path = \"models/llama\"\n", "path = \"modèles/λ\" ; 1\n");
    let e = err(&text);
    assert_eq!(
        e.location().map(|l| (l.line, l.column)),
        Some((2, 20)),
        "{e}"
    );
}

// ---- semantic validation -------------------------------------------------------------------

#[test]
fn quant_without_scheme_or_weights() {
    let text = with_quant("[quant]\n[quant.activations]\nbits = 8\n");
    assert_eq!(
        msg(&text),
        "run.toml:4:1: [quant] needs `scheme` or a [quant.weights] table"
    );
}

#[test]
fn bits_out_of_range() {
    let text = with_quant("[quant]\nscheme = \"w4a16\"\n[quant.weights]\nbits = 9\n");
    assert_eq!(
        msg(&text),
        "run.toml:7:8: `quant.weights.bits` = 9 is invalid: int bits must be in 1..=8"
    );
    let e = msg(&with_quant("[quant.weights]\nbits = 0\n"));
    assert!(e.contains("`quant.weights.bits` = 0 is invalid"), "{e}");
}

#[test]
fn float_needs_eight_bits() {
    // bits come from the preset, so the key the user wrote is blamed.
    let text = with_quant("[quant]\nscheme = \"w4a16\"\n[quant.weights]\ntype = \"float\"\n");
    assert_eq!(
        msg(&text),
        "run.toml:7:8: `quant.weights.type` = \"float\" is invalid: type = \"float\" is FP8 E4M3 and needs bits = 8"
    );
    let e = msg(&with_quant("[quant.weights]\nbits = 4\ntype = \"float\"\n"));
    assert!(
        e.starts_with("run.toml:5:8: `quant.weights.bits` = 4 is invalid"),
        "{e}"
    );
    let e = msg(&with_quant(
        "[quant]\nscheme = \"fp8\"\n[quant.weights]\nsymmetric = false\n",
    ));
    assert!(
        e.contains(
            "`quant.weights.symmetric` = false is invalid: FP8 quantization is symmetric only"
        ),
        "{e}"
    );
}

#[test]
fn group_size_must_be_positive_and_needed_for_group() {
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w4a16\"\n[quant.weights]\ngroup_size = 0\n",
    ));
    assert_eq!(e, "run.toml:7:14: `quant.weights.group_size` = 0 is invalid: group_size must be a positive integer");
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a16\"\n[quant.weights]\ngranularity = \"group\"\n",
    ));
    assert_eq!(
        e,
        "run.toml:7:15: `quant.weights.granularity` = \"group\" is invalid: granularity = \"group\" needs `group_size`"
    );
    // On top of a group preset, the preset's group size is kept.
    let m = ok(&with_quant(
        "[quant]\nscheme = \"w4a8\"\n[quant.weights]\ngranularity = \"group\"\n",
    ));
    assert_eq!(
        m.plan.network_scheme().weights.map(|w| w.granularity),
        Some(Granularity::Group(128))
    );
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w4a16\"\n[quant.weights]\ngranularity = \"channel\"\ngroup_size = 64\n",
    ));
    assert_eq!(
        e,
        "run.toml:8:14: `quant.weights.group_size` cannot be combined with `quant.weights.granularity`: \
         group_size only applies to granularity = \"group\""
    );
}

#[test]
fn token_granularity_is_for_dynamic_activations_only() {
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a16\"\n[quant.weights]\ngranularity = \"token\"\n",
    ));
    assert!(
        e.starts_with("run.toml:7:15: `quant.weights.granularity` = \"token\" is invalid"),
        "{e}"
    );

    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a16\"\n[quant.activations]\nbits = 8\ngranularity = \"token\"\n",
    ));
    assert!(
        e.starts_with(
            "run.toml:8:15: `quant.activations.granularity` = \"token\" is invalid: static"
        ),
        "{e}"
    );

    // Turning a per-token preset static without choosing per-tensor blames `dynamic`.
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a8_dynamic\"\n[quant.activations]\ndynamic = false\n",
    ));
    assert!(
        e.starts_with("run.toml:7:11: `quant.activations.dynamic` = false is invalid"),
        "{e}"
    );

    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a8\"\n[quant.activations]\ngroup_size = 16\n",
    ));
    assert!(
        e.contains("`quant.activations.group_size` = 16 is invalid"),
        "{e}"
    );
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a8\"\n[quant.activations]\ngranularity = \"channel\"\n",
    ));
    assert!(
        e.contains("activations use granularity \"tensor\" or \"token\""),
        "{e}"
    );
}

#[test]
fn disabling_activations_drops_them_and_stands_alone() {
    let m = ok(&with_quant(
        "[quant]\nscheme = \"w8a8\"\n[quant.activations]\nenabled = false\n",
    ));
    assert_eq!(
        m.plan.network_scheme(),
        Scheme {
            weights: Some(INT8_CHANNEL),
            activations: None,
            kv_cache: None
        }
    );
    let e = msg(&with_quant(
        "[quant]\nscheme = \"w8a8\"\n[quant.activations]\nenabled = false\nbits = 4\n",
    ));
    assert_eq!(
        e,
        "run.toml:8:8: `quant.activations.bits` cannot be combined with `quant.activations.enabled`: \
         `enabled = false` turns this quantization off"
    );
}

#[test]
fn weights_table_without_preset_needs_bits() {
    let e = msg(&with_quant("[quant.weights]\ngroup_size = 128\n"));
    assert_eq!(
        e,
        "run.toml:4:1: `bits` is required in [quant.weights] (no `scheme` preset or network scheme gives it)"
    );
}

#[test]
fn bad_regex_names_pattern_and_regex_error() {
    let text = with_quant(
        "[quant]\nscheme = \"w4a16\"\n[[quant.override]]\npattern = \"layers.(0|1\"\nskip = true\n",
    );
    let e = err(&text);
    assert!(matches!(e, ManifestError::BadRegex { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.starts_with(
            "run.toml:7:11: invalid regex in `quant.override[0].pattern` = \"layers.(0|1\": "
        ),
        "{e}"
    );
    assert!(e.contains("unclosed group"), "{e}");
}

#[test]
fn skip_with_scheme_fields_is_a_conflict() {
    let text = with_quant(
        "[quant]\nscheme = \"w4a16\"\n[[quant.override]]\npattern = \"o_proj\"\nskip = true\nscheme = \"w8a16\"\n",
    );
    assert_eq!(
        msg(&text),
        "run.toml:8:8: `quant.override[0].skip` cannot be combined with `quant.override[0].scheme`: \
         a skipped layer stays in float, so it has no scheme"
    );
    let text = with_quant(
        "[quant]\nscheme = \"w4a16\"\n[[quant.override]]\npattern = \"o_proj\"\nskip = false\n",
    );
    assert_eq!(
        msg(&text),
        "run.toml:6:1: `quant.override[0]` needs `skip = true`, `scheme`, or a weights/activations/kv_cache table"
    );
}

#[test]
fn sha256_pins_are_checked_and_lowercased() {
    let e = msg(&format!("{BASE}[plugins.gptq]\nsha256 = \"abc123\"\n"));
    assert_eq!(
        e,
        "run.toml:14:10: `plugins.gptq.sha256` = \"abc123\" is invalid: expected 64 hexadecimal digits \
         (the output of `sha256sum`)"
    );
    let bad = format!("{}zz", "a".repeat(62));
    assert!(msg(&format!("{BASE}[plugins.gptq]\nsha256 = \"{bad}\"\n"))
        .contains("64 hexadecimal digits"));
    let m = ok(&format!(
        "{BASE}[plugins.\"my.plugin\"]\nsha256 = \"{}\"\n",
        "AB".repeat(32)
    ));
    assert_eq!(m.plugins["my.plugin"].sha256, "ab".repeat(32));
    assert_eq!(m.plugins["my.plugin"].path, None);
}

#[test]
fn numbers_must_be_positive() {
    let cal = |kv: &str| format!("{BASE}[calibration]\ndataset = \"c.txt\"\n{kv}\n");
    assert_eq!(
        msg(&cal("nsamples = 0")),
        "run.toml:15:12: `calibration.nsamples` = 0 is invalid: expected a positive integer"
    );
    assert!(msg(&cal("seqlen = -5")).contains("`calibration.seqlen` = -5 is invalid"));
    assert!(msg(&cal("seed = -1"))
        .contains("`calibration.seed` = -1 is invalid: expected an integer >= 0"));
    assert!(
        msg(&format!("{BASE}[eval]\ndataset = \"e\"\nwindows = 0\n"))
            .contains("`eval.windows` = 0")
    );
}

#[test]
fn the_stage_timeout_is_a_positive_number_of_seconds() {
    let run = |v: &str| format!("{BASE}[run]\nstage_timeout_s = {v}\n");
    assert_eq!(
        ok(&run("2.5")).run.stage_timeout,
        Some(std::time::Duration::from_millis(2500))
    );
    for bad in ["0", "-1", "nan", "inf"] {
        let e = msg(&run(bad));
        assert!(
            e.contains("`run.stage_timeout_s`")
                && e.contains("expected a positive number of seconds"),
            "{bad}: {e}"
        );
    }
    assert!(msg(&run("\"1m\"")).contains("run.stage_timeout_s"));
    assert_eq!(ok(BASE).run.stage_timeout, None);
}

#[test]
fn text_field_only_for_jsonl_datasets() {
    let e = msg(&format!(
        "{BASE}[calibration]\ndataset = \"c.txt\"\ntext_field = \"body\"\n"
    ));
    assert_eq!(
        e,
        "run.toml:15:14: `calibration.text_field` cannot be combined with `calibration.dataset`: \
         text_field names a field of .jsonl records; this dataset is plain text"
    );
    let m = ok(&format!(
        "{BASE}[calibration]\ndataset = \"c.JSONL\"\ntext_field = \"body\"\n"
    ));
    assert_eq!(m.calibration.map(|c| c.text_field), Some("body".to_owned()));
}

#[test]
fn empty_paths_and_algorithm_names_are_rejected() {
    let e = msg(&BASE.replace("path = \"models/llama\"", "path = \"\""));
    assert_eq!(
        e,
        "run.toml:2:8: `model.path` = \"\" is invalid: a path must not be empty"
    );
    let e = msg(&BASE.replace("algorithm = \"rtn\"", "algorithm = \" \""));
    assert!(
        e.starts_with("run.toml:8:13: `pipeline[0].algorithm` = \"\" is invalid"),
        "{e}"
    );
}

#[test]
fn the_documented_example_parses() {
    let doc = include_str!("../../../docs/manifest.md");
    // The first toml block after the "## Example" heading.
    let example = doc
        .split("\n## Example\n")
        .nth(1)
        .and_then(|section| section.split("```toml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_default();
    let m = match Manifest::parse(example, Path::new("/proj/run.toml")) {
        Ok(m) => m,
        Err(e) => panic!("docs/manifest.md example: {e}"),
    };
    let g64 = QuantArgs {
        granularity: Granularity::Group(64),
        ..INT4_G128
    };
    assert_eq!(
        m.plan.scheme_for("model.layers.5.mlp.down_proj").weights,
        Some(g64)
    );
    assert_eq!(
        m.plan.scheme_for("model.layers.31.mlp.up_proj").weights,
        Some(INT8_CHANNEL)
    );
    assert!(m.plan.scheme_for("model.layers.0.mlp.down_proj").is_skip());
    assert!(!m.plan.scheme_for("model.layers.10.mlp.down_proj").is_skip());
    assert_eq!(
        m.pipeline[0].params.get("damp").and_then(|v| v.as_float()),
        Some(0.01)
    );
}

#[test]
fn one_bit_symmetric_needs_the_half_range_rule() {
    let e = msg(&with_quant(
        "[quant.weights]\nbits = 1\nscale_rule = \"qmax\"\n",
    ));
    assert!(
        e.starts_with(
            "run.toml:6:14: `quant.weights.scale_rule` = \"qmax\" is invalid: symmetric 1-bit"
        ),
        "{e}"
    );
    let m = ok(&with_quant("[quant.weights]\nbits = 1\n"));
    assert_eq!(m.plan.network_scheme().weights.map(|w| w.bits), Some(1));
}

#[test]
fn array_of_tables_where_a_table_is_needed() {
    let text = BASE.replace("[model]", "[[model]]");
    assert_eq!(
        msg(&text),
        "run.toml:1:1: wrong type for `model`: expected a table, found an array"
    );
    // serde would read a struct from an array of its fields; the manifest does not.
    let text = BASE.replace(
        "[model]\npath = \"models/llama\"",
        "model = [\"models/llama\"]",
    );
    assert_eq!(
        msg(&text),
        "run.toml:1:9: wrong type for `model`: expected a table, found an array"
    );
    let text = with_quant(
        "[quant]\nscheme = \"w4a16\"\n[[quant.override]]\npattern = \"x\"\nweights = [4]\n",
    );
    assert_eq!(
        msg(&text),
        "run.toml:8:11: wrong type for `quant.override[0].weights`: expected a table, found an array"
    );
    let text = format!("{BASE}[[plugins.rtn]]\nsha256 = \"x\"\n");
    assert!(msg(&text).starts_with("run.toml:13:1: wrong type for `plugins.rtn`: expected a table"));
    let text = format!(
        "pipeline = [[\"rtn\"]]\n{}",
        BASE.replace("[[pipeline]]\nalgorithm = \"rtn\"\n", "")
    );
    assert!(msg(&text).starts_with("run.toml:1:13: wrong type for `pipeline[0]`: expected a table"));
}

#[test]
fn device_defaults_to_the_cpu_and_ascend_to_npu_0_in_f16() {
    assert_eq!(ok(BASE).device, DeviceSection::default());
    assert_eq!(ok(BASE).device.kind, DeviceKind::Cpu);
    let m = ok(&format!("{BASE}\n[device]\nkind = \"ascend\"\n"));
    assert_eq!(m.device.kind, DeviceKind::Ascend);
    assert_eq!(m.device.ids, [0]);
    assert_eq!(m.device.precision, GemmPrecision::F16);
    let m = ok(&format!(
        "{BASE}\n[device]\nkind = \"ascend\"\nids = [1, 0]\nprecision = \"bf16\"\n"
    ));
    assert_eq!(m.device.ids, [1, 0]);
    assert_eq!(m.device.precision, GemmPrecision::Bf16);
}

#[test]
fn bad_device_sections_name_the_key() {
    let dev = |body: &str| msg(&format!("{BASE}\n[device]\n{body}\n"));
    assert_eq!(
        dev("kind = \"npu\""),
        "run.toml:15:8: unknown value `npu` for `device.kind`; did you mean `cpu`? (valid values: cpu, \
         ascend)"
    );
    assert_eq!(
        dev("kind = \"ascend\"\nids = []"),
        "run.toml:16:7: `device.ids` = [] is invalid: list at least one NPU id (or remove the \
         key for NPU 0)"
    );
    assert_eq!(
        dev("kind = \"ascend\"\nids = [0, 1, 0]"),
        "run.toml:16:14: `device.ids[2]` = 0 is invalid: each NPU may be listed once"
    );
    assert_eq!(
        dev("kind = \"ascend\"\nids = [-1]"),
        "run.toml:16:8: `device.ids[0]` = -1 is invalid: expected an NPU id >= 0 (as \
         `gs-host devices` lists them)"
    );
    assert!(dev("kind = \"cpu\"\nids = [0]").starts_with(
        "run.toml:16:7: `device.ids` cannot be combined with `device.kind`: kind = \"cpu\""
    ));
    assert!(dev("kind = \"ascend\"\nprecision = \"f8\"")
        .contains("unknown value `f8` for `device.precision` (valid values: f16, bf16, f32)"));
    assert!(dev("kind = \"ascend\"\nid = 0").contains("unknown key `id` in [device]"));
}
