//! The presets of `gs-host quantize`: one TOML template per preset (`presets/<name>.toml`,
//! embedded in the binary), expanded with the command's options into the text of a complete
//! manifest. That text is parsed by the manifest parser and run by the `--manifest` code path,
//! and `--print-manifest` prints it, so what is printed is exactly what runs.
//!
//! A template holds:
//! - `summary`: one line for `gs-host quantize --help` and the printed header;
//! - `calibration = "required" | "optional"`: whether the pipeline needs `--calib`
//!   (an optional one uses the data only to measure each layer's output error);
//! - `[quant]` and `[[pipeline]]`: copied into the manifest as written. A preset with
//!   `quant.weights.group_size` is a *group preset*: `--group-size` replaces that value;
//! - `[formats.<format>]`: `refuse = "why"` when the preset cannot be stored in that format,
//!   or `quant = { ... }` merged into `[quant]` for that format, with a `note` printed above it.
//!
//! The expansion writes absolute paths, so the printed manifest runs as is from any directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::manifest::ExportFormat;

/// Every preset: its name and its template (`presets/<name>.toml`).
const SOURCES: [(&str, &str); 8] = [
    ("w4a16-rtn", include_str!("presets/w4a16-rtn.toml")),
    ("w4a16-gptq", include_str!("presets/w4a16-gptq.toml")),
    ("w4a16-awq", include_str!("presets/w4a16-awq.toml")),
    (
        "w4a16-awq-gptq",
        include_str!("presets/w4a16-awq-gptq.toml"),
    ),
    (
        "w8a8-smoothquant",
        include_str!("presets/w8a8-smoothquant.toml"),
    ),
    (
        "w8a8-smoothquant-gptq",
        include_str!("presets/w8a8-smoothquant-gptq.toml"),
    ),
    (
        "w8a8-static-smoothquant",
        include_str!("presets/w8a8-static-smoothquant.toml"),
    ),
    ("w8a16-rtn", include_str!("presets/w8a16-rtn.toml")),
];

/// Why a preset cannot be expanded with the given options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset `{name}` (valid presets: {})", names().collect::<Vec<_>>().join(", "))]
    Unknown { name: String },
    /// A template that does not follow the rules above: a defect of this build.
    #[error("preset template presets/{name}.toml is invalid (a gs-host defect): {message}")]
    Template { name: String, message: String },
    #[error("preset {preset} cannot be written as --format {format}: {reason}")]
    Format {
        preset: String,
        format: &'static str,
        reason: String,
    },
    #[error("--group-size applies only to presets with per-group weights ({}); preset {preset} quantizes weights per output channel", group_presets())]
    GroupSizeOnChannelPreset { preset: String },
    #[error("preset {preset} needs calibration data: pass --calib FILE (a text file; a .jsonl file of {{\"text\": ...}} records; or pre-tokenized windows: a .json file {{\"input_ids\": [[id, ...], ...]}} or a .jsonl file with one {{\"input_ids\": [id, ...]}} per line)")]
    NeedsCalibration { preset: String },
    #[error("{option} needs --calib FILE (it sets how the calibration windows are taken)")]
    CalibrationOptionWithoutData { option: &'static str },
    #[error("{option} {value}: expected {expected}")]
    InvalidOption {
        option: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{option} {}: {reason}", path.display())]
    Path {
        option: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Whether a preset's pipeline needs calibration data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Need {
    Required,
    Optional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    summary: String,
    calibration: Need,
    quant: toml::Table,
    pipeline: Vec<Stage>,
    #[serde(default)]
    formats: BTreeMap<String, FormatRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    algorithm: String,
    #[serde(default)]
    params: toml::Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatRule {
    /// Why the preset cannot be stored in this format.
    refuse: Option<String>,
    /// A comment printed above `[quant]` when `quant` changes it for this format.
    note: Option<String>,
    /// Merged into `[quant]` for this format.
    #[serde(default)]
    quant: toml::Table,
}

/// One preset, its template parsed.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    template: Template,
}

/// The options of `gs-host quantize` that the expansion substitutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub model: PathBuf,
    pub out: PathBuf,
    pub format: ExportFormat,
    pub calib: Option<PathBuf>,
    pub nsamples: Option<usize>,
    pub seqlen: Option<usize>,
    pub seed: Option<u64>,
    pub group_size: Option<u32>,
}

/// The preset names, in the order `--help` lists them.
pub fn names() -> impl Iterator<Item = &'static str> {
    SOURCES.iter().map(|(name, _)| *name)
}

/// The group presets' names, for messages.
fn group_presets() -> String {
    catalog()
        .map(|all| {
            all.iter()
                .filter(|p| p.is_group())
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Every preset, templates parsed and checked once.
pub fn catalog() -> Result<&'static [Preset], PresetError> {
    static CATALOG: OnceLock<Result<Vec<Preset>, PresetError>> = OnceLock::new();
    CATALOG
        .get_or_init(|| SOURCES.iter().map(|(n, t)| Preset::parse(n, t)).collect())
        .as_deref()
        .map_err(Clone::clone)
}

/// The preset called `name`.
pub fn find(name: &str) -> Result<&'static Preset, PresetError> {
    catalog()?
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PresetError::Unknown {
            name: name.to_owned(),
        })
}

impl Preset {
    fn parse(name: &'static str, text: &str) -> Result<Preset, PresetError> {
        let bad = |message: String| PresetError::Template {
            name: name.to_owned(),
            message,
        };
        let template: Template = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if template.pipeline.is_empty() {
            return Err(bad("no [[pipeline]] stage".into()));
        }
        for key in template.formats.keys() {
            if !ExportFormat::ALL.iter().any(|f| f.name() == key) {
                return Err(bad(format!("[formats.{key}]: not an export format")));
            }
        }
        let preset = Preset { name, template };
        if preset.is_group() && !matches!(preset.default_group_size(), Some(g) if g > 0) {
            return Err(bad(
                "quant.weights.group_size must be a positive integer".into()
            ));
        }
        Ok(preset)
    }

    /// The one-line description.
    pub fn summary(&self) -> &str {
        &self.template.summary
    }

    /// Whether `--calib` is required.
    pub fn needs_calibration(&self) -> bool {
        self.template.calibration == Need::Required
    }

    fn weights(&self) -> Option<&toml::Table> {
        self.template.quant.get("weights")?.as_table()
    }

    /// Whether weights are quantized in groups (and `--group-size` applies).
    pub fn is_group(&self) -> bool {
        self.weights().is_some_and(|w| w.contains_key("group_size"))
    }

    /// The template's group size.
    pub fn default_group_size(&self) -> Option<i64> {
        self.weights()?.get("group_size")?.as_integer()
    }

    /// Why the preset cannot be written as `format`, if it cannot.
    pub fn refusal(&self, format: ExportFormat) -> Option<&str> {
        self.template.formats.get(format.name())?.refuse.as_deref()
    }

    /// The complete manifest text this preset runs with `opts`.
    pub fn expand(&self, opts: &Options) -> Result<String, PresetError> {
        let format = opts.format;
        if let Some(reason) = self.refusal(format) {
            return Err(PresetError::Format {
                preset: self.name.to_owned(),
                format: format.name(),
                reason: reason.to_owned(),
            });
        }
        let mut quant = self.template.quant.clone();
        if let Some(g) = opts.group_size {
            if !self.is_group() {
                return Err(PresetError::GroupSizeOnChannelPreset {
                    preset: self.name.to_owned(),
                });
            }
            if g == 0 {
                return Err(PresetError::InvalidOption {
                    option: "--group-size",
                    value: "0".into(),
                    expected: "a positive number of input columns per group",
                });
            }
            if let Some(w) = quant.get_mut("weights").and_then(|w| w.as_table_mut()) {
                w.insert("group_size".into(), toml::Value::Integer(g.into()));
            }
        }
        let rule = self.template.formats.get(format.name());
        if let Some(rule) = rule {
            merge(&mut quant, &rule.quant);
        }
        if opts.calib.is_none() {
            if self.needs_calibration() {
                return Err(PresetError::NeedsCalibration {
                    preset: self.name.to_owned(),
                });
            }
            for (option, given) in [
                ("--nsamples", opts.nsamples.is_some()),
                ("--seqlen", opts.seqlen.is_some()),
                ("--seed", opts.seed.is_some()),
            ] {
                if given {
                    return Err(PresetError::CalibrationOptionWithoutData { option });
                }
            }
        }
        for (option, value) in [("--nsamples", opts.nsamples), ("--seqlen", opts.seqlen)] {
            if value == Some(0) {
                return Err(PresetError::InvalidOption {
                    option,
                    value: "0".into(),
                    expected: "at least 1",
                });
            }
        }
        // TOML integers are i64.
        let seed = opts.seed.unwrap_or(0);
        let seed = i64::try_from(seed).map_err(|_| PresetError::InvalidOption {
            option: "--seed",
            value: seed.to_string(),
            expected: "an integer in 0..=9223372036854775807",
        })?;

        let model = toml_path("the model directory", &opts.model)?;
        let out = toml_path("--out", &opts.out)?;
        let calib = opts
            .calib
            .as_deref()
            .map(|c| toml_path("--calib", c))
            .transpose()?;

        let mut m = String::new();
        let mut line = |s: &str| {
            m.push_str(s);
            m.push('\n');
        };
        line(&format!("# {}", command_line(self.name, opts)));
        line(&format!("# Preset {}: {}.", self.name, self.summary()));
        line(
            "# The complete manifest this command runs: saved to a file, `gs-host --manifest FILE`",
        );
        line("# does the same run (paths are absolute). Every key is documented in docs/manifest.md.");
        line("");
        line("[model]");
        line(&format!("path = {model}"));
        if let Some(calib) = &calib {
            line("");
            line("[calibration]");
            if !self.needs_calibration() {
                line("# The pipeline is data-free: these windows only measure each layer's output error (report.json).");
            }
            line(&format!("dataset = {calib}"));
            line(&format!(
                "nsamples = {}",
                opts.nsamples.unwrap_or(crate::manifest::DEFAULT_NSAMPLES)
            ));
            line(&format!(
                "seqlen = {}",
                opts.seqlen.unwrap_or(crate::manifest::DEFAULT_SEQLEN)
            ));
            line(&format!("seed = {seed}"));
        }
        line("");
        if let Some(note) = rule.and_then(|r| r.note.as_deref()) {
            line(&format!("# {note}"));
        }
        line("[quant]");
        // The preset name first, then the tables refining it, as docs/manifest.md lists them
        // (a toml::Table iterates in key order).
        const ORDER: [&str; 4] = ["scheme", "weights", "activations", "kv_cache"];
        let rank = |k: &str| ORDER.iter().position(|o| *o == k).unwrap_or(ORDER.len());
        let mut keys: Vec<&String> = quant.keys().collect();
        keys.sort_by_key(|k| rank(k));
        for k in keys {
            line(&format!("{} = {}", toml_key(k), quant[k.as_str()]));
        }
        for stage in &self.template.pipeline {
            line("");
            line("[[pipeline]]");
            line(&format!(
                "algorithm = {}",
                toml::Value::String(stage.algorithm.clone())
            ));
            if !stage.params.is_empty() {
                line(&format!(
                    "params = {}",
                    toml::Value::Table(stage.params.clone())
                ));
            }
        }
        line("");
        line("[export]");
        line(&format!(
            "format = {}",
            toml::Value::String(format.name().into())
        ));
        line(&format!("output = {out}"));
        Ok(m)
    }
}

/// Merges `overlay` into `base`: tables key by key, any other value replaced.
fn merge(base: &mut toml::Table, overlay: &toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A TOML key: bare when it can be, else quoted.
fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_owned()
    } else {
        toml::Value::String(k.to_owned()).to_string()
    }
}

/// `path` made absolute (against the working directory) and folded lexically, as a TOML string.
fn toml_path(option: &'static str, path: &Path) -> Result<String, PresetError> {
    let abs = absolute(option, path)?;
    let Some(s) = abs.to_str() else {
        return Err(PresetError::Path {
            option,
            path: abs.clone(),
            reason: "not valid UTF-8, which a TOML manifest cannot hold".into(),
        });
    };
    Ok(toml::Value::String(s.to_owned()).to_string())
}

/// `path` absolute and folded lexically (`a/../b` is `b`), as the manifest parser does.
fn absolute(option: &'static str, path: &Path) -> Result<PathBuf, PresetError> {
    if path.as_os_str().is_empty() {
        return Err(PresetError::Path {
            option,
            path: path.to_path_buf(),
            reason: "a path must not be empty".into(),
        });
    }
    let abs = std::path::absolute(path).map_err(|e| PresetError::Path {
        option,
        path: path.to_path_buf(),
        reason: format!("cannot make it absolute: {e}"),
    })?;
    Ok(crate::manifest::normalize(&abs))
}

/// The command that produced an expansion, as a shell line (paths absolute).
pub fn command_line(preset: &str, opts: &Options) -> String {
    let path = |p: &Path| {
        let p = absolute("", p).unwrap_or_else(|_| p.to_path_buf());
        shell_word(&p.to_string_lossy())
    };
    let mut s = format!(
        "gs-host quantize {} --preset {preset} --out {} --format {}",
        path(&opts.model),
        path(&opts.out),
        opts.format.name()
    );
    if let Some(c) = &opts.calib {
        let _ = write!(s, " --calib {}", path(c));
    }
    for (option, value) in [
        ("--nsamples", opts.nsamples.map(|v| v.to_string())),
        ("--seqlen", opts.seqlen.map(|v| v.to_string())),
        ("--seed", opts.seed.map(|v| v.to_string())),
        ("--group-size", opts.group_size.map(|v| v.to_string())),
    ] {
        if let Some(v) = value {
            let _ = write!(s, " {option} {v}");
        }
    }
    s
}

/// `w` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_word(w: &str) -> String {
    let safe = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use gs_quant::{Granularity, QuantType, ScaleRule};

    fn opts(format: ExportFormat, calib: bool) -> Options {
        Options {
            model: PathBuf::from("/m/stories"),
            out: PathBuf::from("/o/q"),
            format,
            calib: calib.then(|| PathBuf::from("/d/calib.json")),
            nsamples: None,
            seqlen: None,
            seed: None,
            group_size: None,
        }
    }

    fn parse(text: &str) -> Manifest {
        Manifest::parse(text, Path::new("expanded.toml"))
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
    }

    #[test]
    fn every_template_parses_and_the_issue_presets_exist() {
        let all = catalog().unwrap();
        let names: Vec<_> = all.iter().map(|p| p.name).collect();
        for required in [
            "w4a16-rtn",
            "w4a16-gptq",
            "w4a16-awq",
            "w4a16-awq-gptq",
            "w8a8-smoothquant",
            "w8a8-smoothquant-gptq",
            "w8a16-rtn",
            "w8a8-static-smoothquant",
        ] {
            assert!(names.contains(&required), "{required} missing");
        }
        for p in all {
            assert!(!p.summary().contains('\n'), "{}: one-line summary", p.name);
        }
    }

    /// Every preset × format: either the template refuses the format, and the format module's
    /// own `check_scheme` refuses the expanded scheme too; or the expansion parses, with the
    /// template's stages in order, and the format accepts its scheme.
    #[test]
    fn every_preset_and_format_expands_to_a_manifest_the_format_accepts_or_is_refused() {
        for p in catalog().unwrap() {
            for format in ExportFormat::ALL {
                let o = opts(format, true);
                match p.refusal(format) {
                    Some(reason) => {
                        let err = p.expand(&o).unwrap_err();
                        let msg = err.to_string();
                        assert!(
                            msg.contains(p.name)
                                && msg.contains(format.name())
                                && msg.contains(reason),
                            "{msg}"
                        );
                        // The same preset in the fake format, checked against this format.
                        let m = parse(&p.expand(&opts(ExportFormat::Fake, true)).unwrap());
                        let scheme = m.plan.network_scheme();
                        assert!(
                            crate::export::check_scheme(format, "layer", &scheme).is_err(),
                            "{} refuses {} but the format accepts it",
                            p.name,
                            format.name()
                        );
                    }
                    None => {
                        let text = p.expand(&o).unwrap();
                        let m = parse(&text);
                        assert_eq!(m.export.format, format);
                        assert_eq!(m.export.output, Path::new("/o/q"));
                        assert_eq!(m.model.path, Path::new("/m/stories"));
                        let algos: Vec<_> =
                            m.pipeline.iter().map(|s| s.algorithm.as_str()).collect();
                        let expected: Vec<_> = p
                            .template
                            .pipeline
                            .iter()
                            .map(|s| s.algorithm.as_str())
                            .collect();
                        assert_eq!(algos, expected, "{}", p.name);
                        let scheme = m.plan.network_scheme();
                        crate::export::check_scheme(format, "layer", &scheme)
                            .unwrap_or_else(|e| panic!("{} as {}: {e}", p.name, format.name()));
                        assert!(
                            text.starts_with(&format!(
                                "# gs-host quantize /m/stories --preset {} ",
                                p.name
                            )),
                            "{text}"
                        );
                    }
                }
            }
        }
    }

    /// The expansions the issue specifies (issue 8, item 5 and the presets list of the brief).
    #[test]
    fn expansions_have_the_specified_schemes_and_stages() {
        let expand = |name: &str, format: ExportFormat| {
            parse(&find(name).unwrap().expand(&opts(format, true)).unwrap())
        };
        let ct = ExportFormat::CompressedTensors;
        // w4a16: int4 symmetric, groups of 128 (llm-compressor's W4A16), no activations.
        for name in ["w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w4a16-awq-gptq"] {
            let m = expand(name, ct);
            let s = m.plan.network_scheme();
            let w = s.weights.unwrap();
            assert_eq!(
                (w.bits, w.symmetric, w.granularity),
                (4, true, Granularity::Group(128)),
                "{name}"
            );
            assert!(s.activations.is_none(), "{name}");
        }
        let stages = |m: &Manifest| {
            m.pipeline
                .iter()
                .map(|s| format!("{} {}", s.algorithm, s.params_text().trim()))
                .collect::<Vec<_>>()
        };
        assert_eq!(stages(&expand("w4a16-rtn", ct)), ["rtn "]);
        assert_eq!(stages(&expand("w4a16-gptq", ct)), ["gptq "]);
        assert_eq!(stages(&expand("w4a16-awq", ct)), ["awq "]);
        assert_eq!(
            stages(&expand("w4a16-awq-gptq", ct)),
            [
                "awq clip = false\nduo_scaling = true\nquantize = false",
                "gptq "
            ]
        );
        assert_eq!(
            stages(&expand("w8a8-smoothquant", ct)),
            ["smoothquant alpha = 0.8", "rtn "]
        );
        assert_eq!(
            stages(&expand("w8a8-smoothquant-gptq", ct)),
            ["smoothquant alpha = 0.8", "gptq "]
        );
        assert_eq!(
            stages(&expand("w8a8-static-smoothquant", ct)),
            [
                "smoothquant alpha = 0.8\nsubsets = [\"qkv\", \"gate_up\", \"down\"]",
                "rtn "
            ]
        );
        assert_eq!(stages(&expand("w8a16-rtn", ct)), ["rtn "]);

        // w8a8 dynamic: int8 per-channel weights, int8 per-token dynamic activations; the
        // half-range rule (compressed-tensors' absmax/127.5) except on Ascend, whose
        // npu_dynamic_quant uses absmax/127 (export/ascend check_scheme).
        for (format, rule) in [
            (ct, ScaleRule::HalfRange),
            (ExportFormat::Fake, ScaleRule::HalfRange),
            (ExportFormat::Ascend, ScaleRule::Qmax),
        ] {
            for name in ["w8a8-smoothquant", "w8a8-smoothquant-gptq"] {
                let s = expand(name, format).plan.network_scheme();
                let w = s.weights.unwrap();
                assert_eq!((w.bits, w.granularity), (8, Granularity::Channel));
                let a = s.activations.unwrap();
                assert!(a.dynamic && a.args.symmetric, "{name}");
                assert_eq!(a.args.granularity, Granularity::Channel, "{name} per token");
                assert_eq!(a.args.scale_rule, rule, "{name} as {}", format.name());
            }
        }
        // w8a8 static: per-tensor asymmetric calibrated activations.
        let a = expand("w8a8-static-smoothquant", ExportFormat::Ascend)
            .plan
            .network_scheme()
            .activations
            .unwrap();
        assert!(!a.dynamic && !a.args.symmetric && a.args.granularity == Granularity::Tensor);
        // w8a16: int8 per channel, weight-only.
        let s = expand("w8a16-rtn", ExportFormat::Ascend)
            .plan
            .network_scheme();
        let w = s.weights.unwrap();
        assert_eq!(
            (w.bits, w.ty, w.granularity),
            (8, QuantType::Int, Granularity::Channel)
        );
        assert!(s.activations.is_none());
    }

    #[test]
    fn options_are_substituted() {
        let p = find("w4a16-gptq").unwrap();
        let mut o = opts(ExportFormat::Fake, true);
        o.group_size = Some(4);
        o.nsamples = Some(16);
        o.seqlen = Some(64);
        o.seed = Some(7);
        o.model = PathBuf::from("/m/a dir/../it's");
        let text = p.expand(&o).unwrap();
        let m = parse(&text);
        assert_eq!(
            m.plan.network_scheme().weights.unwrap().granularity,
            Granularity::Group(4)
        );
        let c = m.calibration.unwrap();
        assert_eq!(
            (c.dataset.as_path(), c.nsamples, c.seqlen, c.seed),
            (Path::new("/d/calib.json"), 16, 64, 7)
        );
        // Folded lexically and quoted for both TOML and the shell.
        assert_eq!(m.model.path, Path::new("/m/it's"));
        assert!(
            text.starts_with("# gs-host quantize '/m/it'\\''s' --preset w4a16-gptq --out /o/q --format fake --calib /d/calib.json --nsamples 16 --seqlen 64 --seed 7 --group-size 4\n"),
            "{text}"
        );
    }

    #[test]
    fn calibration_defaults_are_the_manifest_defaults() {
        let text = find("w4a16-gptq")
            .unwrap()
            .expand(&opts(ExportFormat::Fake, true))
            .unwrap();
        let c = parse(&text).calibration.unwrap();
        assert_eq!(
            (c.nsamples, c.seqlen, c.seed),
            (
                crate::manifest::DEFAULT_NSAMPLES,
                crate::manifest::DEFAULT_SEQLEN,
                0
            )
        );
    }

    #[test]
    fn a_data_free_preset_runs_without_calibration_and_uses_it_when_given() {
        let p = find("w4a16-rtn").unwrap();
        assert!(parse(&p.expand(&opts(ExportFormat::Fake, false)).unwrap())
            .calibration
            .is_none());
        let text = p.expand(&opts(ExportFormat::Fake, true)).unwrap();
        assert!(text.contains("data-free"), "{text}");
        assert!(parse(&text).calibration.is_some());
    }

    #[test]
    fn bad_options_are_refused_with_the_way_out() {
        // (preset, change to valid options, expected message part)
        type Case = (&'static str, fn(&mut Options), &'static str);
        let cases: [Case; 6] = [
            (
                "w4a16-gptq",
                |o| o.calib = None,
                "needs calibration data: pass --calib FILE",
            ),
            ("w8a8-smoothquant", |o| o.calib = None, "--calib"),
            (
                "w8a16-rtn",
                |o| o.group_size = Some(64),
                "--group-size applies only to presets with per-group weights \
                 (w4a16-rtn, w4a16-gptq, w4a16-awq, w4a16-awq-gptq); preset w8a16-rtn",
            ),
            (
                "w4a16-rtn",
                |o| o.group_size = Some(0),
                "--group-size 0: expected a positive",
            ),
            (
                "w4a16-rtn",
                |o| {
                    o.calib = None;
                    o.seqlen = Some(64);
                },
                "--seqlen needs --calib",
            ),
            (
                "w4a16-rtn",
                |o| o.format = ExportFormat::Ascend,
                "preset w4a16-rtn cannot be written as --format ascend: 4-bit weights",
            ),
        ];
        for (name, change, needle) in cases {
            let mut o = opts(ExportFormat::CompressedTensors, true);
            change(&mut o);
            let msg = find(name).unwrap().expand(&o).unwrap_err().to_string();
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        let msg = find("w4a16").unwrap_err().to_string();
        assert!(
            msg.contains("unknown preset `w4a16`") && msg.contains("w8a16-rtn"),
            "{msg}"
        );
    }
}
