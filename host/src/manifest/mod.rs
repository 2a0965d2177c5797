//! The TOML run manifest (`gs-host --manifest run.toml`); every key is documented in
//! `docs/manifest.md`.
//!
//! Parsing happens in two steps: serde structs with `deny_unknown_fields` read the text as
//! written (`raw`), then validation turns them into the typed sections below. Errors carry
//! `file:line:column` and the key path (see [`ManifestError`]).

mod error;
mod quant;
mod raw;
mod source;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod normalize_tests {
    use super::normalize;
    use std::path::Path;

    #[test]
    fn folds_dot_and_dotdot_lexically() {
        assert_eq!(
            normalize(Path::new("examples/../out/q")),
            Path::new("out/q")
        );
        assert_eq!(normalize(Path::new("./a/./b")), Path::new("a/b"));
        assert_eq!(normalize(Path::new("../a")), Path::new("../a"));
        assert_eq!(normalize(Path::new("a/..")), Path::new("."));
        assert_eq!(normalize(Path::new("/../x")), Path::new("/x"));
    }
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use crate::device::GemmPrecision;

pub use error::{Choices, Located, Location, ManifestError};
pub use quant::{
    ArgsSpec, GranularityName, OverrideSpec, Preset, QuantPlan, QuantSection, SchemeSpec,
};

use raw::{
    RawCalibration, RawDevice, RawEval, RawExport, RawManifest, RawPluginPin, RawRun, RawStage,
};
use source::{check_no_array_tables, de_error, span_of, syntax_error, Seg, Source};

/// Default `[calibration]` values.
pub const DEFAULT_NSAMPLES: usize = 128;
pub const DEFAULT_SEQLEN: usize = 512;
pub const DEFAULT_TEXT_FIELD: &str = "text";
/// Default `[eval]` window length.
pub const DEFAULT_EVAL_SEQLEN: usize = 512;

/// A parsed and validated run manifest. Relative paths are already resolved against the
/// manifest's directory.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file itself, as given.
    pub path: PathBuf,
    pub model: ModelSection,
    pub calibration: Option<CalibrationSection>,
    pub quant: QuantSection,
    /// `quant` resolved and compiled; built at load time so that bad regexes fail early.
    pub plan: QuantPlan,
    /// Never empty.
    pub pipeline: Vec<PipelineStage>,
    /// `[plugins.<name>]` pins, by plugin name.
    pub plugins: BTreeMap<String, PluginPin>,
    pub export: ExportSection,
    pub eval: Option<EvalSection>,
    /// Defaults when `[run]` is absent.
    pub run: RunSection,
    /// The CPU when `[device]` is absent.
    pub device: DeviceSection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSection {
    /// Model directory (config.json, safetensors).
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationSection {
    /// Plain text file, or JSON Lines when the name ends in `.jsonl`.
    pub dataset: PathBuf,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// Field holding the text in each `.jsonl` record.
    pub text_field: String,
}

impl CalibrationSection {
    /// Whether `dataset` is read as JSON Lines (else as plain text).
    pub fn is_jsonl(&self) -> bool {
        is_jsonl(&self.dataset)
    }
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// One `[[pipeline]]` stage.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStage {
    /// Algorithm name, resolved against the loaded plugins by the caller.
    pub algorithm: String,
    /// The algorithm's own parameters, uninterpreted.
    pub params: toml::Table,
    /// The stage's `[[pipeline]]` header, for errors the plugin reports about it.
    pub at: Location,
}

impl PipelineStage {
    /// `params` as TOML text, the form plugins receive; `""` when empty.
    pub fn params_text(&self) -> String {
        self.params.to_string()
    }
}

/// A `[plugins.<name>]` pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginPin {
    /// SHA-256 of the plugin library, 64 lowercase hex digits.
    pub sha256: String,
    /// Explicit library path instead of searching the plugin directories.
    pub path: Option<PathBuf>,
}

/// Export formats this version writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// Quantize-dequantize: float safetensors holding the quantized values, for evaluation.
    Fake,
    /// compressed-tensors (vLLM, SGLang, transformers).
    CompressedTensors,
    /// msModelSlim AscendV1 (vLLM-Ascend, MindIE).
    Ascend,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [
        ExportFormat::Fake,
        ExportFormat::CompressedTensors,
        ExportFormat::Ascend,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Fake => "fake",
            ExportFormat::CompressedTensors => "compressed-tensors",
            ExportFormat::Ascend => "ascend",
        }
    }
}

/// Where in a run perplexity is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvalPoint {
    /// The source model, before any plugin.
    Float,
    /// After the pipeline: quantized weights, activation quantization simulated.
    FakeQuant,
    /// The written checkpoint, reloaded and decoded.
    Exported,
}

impl EvalPoint {
    pub const ALL: [EvalPoint; 3] = [EvalPoint::Float, EvalPoint::FakeQuant, EvalPoint::Exported];

    pub fn name(self) -> &'static str {
        match self {
            EvalPoint::Float => "float",
            EvalPoint::FakeQuant => "fake_quant",
            EvalPoint::Exported => "exported",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSection {
    pub format: ExportFormat,
    pub output: PathBuf,
    /// Tensor bytes per output shard (quantized formats).
    pub max_shard_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSection {
    pub dataset: PathBuf,
    pub seqlen: usize,
    /// Evaluate at most this many windows; all when `None`.
    pub windows: Option<usize>,
    /// Points of the run to evaluate at, in run order, without repeats.
    pub points: Vec<EvalPoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSection {
    /// `true`: each block's calibration input is the output of the already quantized previous
    /// block; `false`: the float model's outputs.
    pub sequential: bool,
    /// Measure each quantized layer's relative output error for the report (one extra block
    /// forward per block).
    pub output_error: bool,
    /// The longest one call of a pipeline stage on one subset may take; `None`: no limit.
    pub stage_timeout: Option<std::time::Duration>,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            sequential: true,
            output_error: true,
            stage_timeout: None,
        }
    }
}

/// Compute device kinds of `[device] kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The host CPU (the default).
    Cpu,
    /// Ascend NPUs through AscendCL.
    Ascend,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Cpu, DeviceKind::Ascend];

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Ascend => "ascend",
        }
    }
}

/// `[device]`: where the forward passes and the calibration statistics run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    pub kind: DeviceKind,
    /// NPU ids as the runtime numbers them (after `ASCEND_RT_VISIBLE_DEVICES`), distinct, in
    /// the order given; empty for the CPU. The calibration chunks of a block are split across
    /// them.
    pub ids: Vec<u32>,
    /// Element type of the NPU GEMM inputs.
    pub precision: GemmPrecision,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection {
            kind: DeviceKind::Cpu,
            ids: Vec::new(),
            precision: GemmPrecision::default(),
        }
    }
}

impl Manifest {
    /// Reads and parses the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Manifest::parse(&text, path)
    }

    /// Parses manifest `text`; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let src = Source { file: path, text };
        let root = DeTable::parse(text).map_err(|e| syntax_error(&src, &e))?;
        check_no_array_tables(&src, &root)?;
        let raw = RawManifest::deserialize(toml::de::Deserializer::from(root.clone()))
            .map_err(|e| de_error(&src, &root, &e))?;
        let cx = Cx {
            src: &src,
            root: &root,
            dir: path.parent().unwrap_or(Path::new("")),
        };

        let quant = quant::section_from_raw(raw.quant, &src, &root);
        let plan = QuantPlan::new(&quant)?;
        Ok(Manifest {
            path: path.to_path_buf(),
            model: ModelSection {
                path: cx.path(&raw.model.path, "model.path")?,
            },
            calibration: raw.calibration.map(|c| cx.calibration(c)).transpose()?,
            quant,
            plan,
            pipeline: cx.pipeline(raw.pipeline)?,
            plugins: raw
                .plugins
                .into_iter()
                .map(|(name, pin)| Ok((name.clone(), cx.plugin(&name, pin)?)))
                .collect::<Result<_, ManifestError>>()?,
            export: cx.export(raw.export)?,
            eval: raw.eval.map(|e| cx.eval(e)).transpose()?,
            run: raw.run.map(|r| cx.run(r)).transpose()?.unwrap_or_default(),
            device: raw
                .device
                .map(|d| cx.device(d))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// What validation needs: the text for locations, the tree for table positions, the
/// directory for relative paths.
struct Cx<'a> {
    src: &'a Source<'a>,
    root: &'a Spanned<DeTable<'a>>,
    dir: &'a Path,
}

/// Removes `.` and folds `dir/..` lexically, so `examples/../out` reads as `out` in messages
/// (as cargo does for manifest paths). A leading `..` that cannot fold is kept.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

impl Cx<'_> {
    fn invalid<T>(&self, v: &Spanned<T>, key: &str, shown: String, reason: &str) -> ManifestError {
        ManifestError::Invalid {
            at: self.src.at(v),
            key: key.into(),
            value: shown,
            reason: reason.into(),
        }
    }

    /// A non-empty path, relative ones joined to the manifest's directory.
    fn path(&self, s: &Spanned<String>, key: &str) -> Result<PathBuf, ManifestError> {
        if s.get_ref().trim().is_empty() {
            return Err(self.invalid(s, key, "\"\"".into(), "a path must not be empty"));
        }
        Ok(normalize(&self.dir.join(s.get_ref())))
    }

    fn positive(&self, n: &Spanned<i64>, key: &str) -> Result<usize, ManifestError> {
        usize::try_from(*n.get_ref())
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                self.invalid(
                    n,
                    key,
                    n.get_ref().to_string(),
                    "expected a positive integer",
                )
            })
    }

    fn calibration(&self, c: RawCalibration) -> Result<CalibrationSection, ManifestError> {
        let dataset = self.path(&c.dataset, "calibration.dataset")?;
        let text_field = match c.text_field {
            Some(f) if !is_jsonl(&dataset) => {
                return Err(ManifestError::Conflict {
                    at: self.src.at(&f),
                    key: "calibration.text_field".into(),
                    other: "calibration.dataset".into(),
                    reason: "text_field names a field of .jsonl records; this dataset is \
                             plain text"
                        .into(),
                })
            }
            Some(f) if f.get_ref().is_empty() => {
                return Err(self.invalid(
                    &f,
                    "calibration.text_field",
                    "\"\"".into(),
                    "must not be empty",
                ))
            }
            Some(f) => f.into_inner(),
            None => DEFAULT_TEXT_FIELD.to_owned(),
        };
        let seed = match &c.seed {
            Some(s) => u64::try_from(*s.get_ref()).map_err(|_| {
                self.invalid(
                    s,
                    "calibration.seed",
                    s.get_ref().to_string(),
                    "expected an integer >= 0",
                )
            })?,
            None => 0,
        };
        Ok(CalibrationSection {
            dataset,
            nsamples: self
                .opt_positive(&c.nsamples, "calibration.nsamples")?
                .unwrap_or(DEFAULT_NSAMPLES),
            seqlen: self
                .opt_positive(&c.seqlen, "calibration.seqlen")?
                .unwrap_or(DEFAULT_SEQLEN),
            seed,
            text_field,
        })
    }

    fn opt_positive(
        &self,
        n: &Option<Spanned<i64>>,
        key: &str,
    ) -> Result<Option<usize>, ManifestError> {
        n.as_ref().map(|n| self.positive(n, key)).transpose()
    }

    fn pipeline(
        &self,
        p: Option<Spanned<Vec<RawStage>>>,
    ) -> Result<Vec<PipelineStage>, ManifestError> {
        let Some(p) = p.filter(|p| !p.get_ref().is_empty()) else {
            // `pipeline = []` is pointed at; a missing pipeline is a whole-file matter.
            let span = span_of(self.root, &[Seg::Key("pipeline".into())]);
            return Err(ManifestError::EmptyPipeline {
                at: self.src.locate(&span),
            });
        };
        p.into_inner()
            .into_iter()
            .enumerate()
            .map(|(i, stage)| {
                if stage.algorithm.get_ref().trim().is_empty() {
                    return Err(self.invalid(
                        &stage.algorithm,
                        &format!("pipeline[{i}].algorithm"),
                        "\"\"".into(),
                        "expected an algorithm name",
                    ));
                }
                let span = span_of(self.root, &[Seg::Key("pipeline".into()), Seg::Index(i)]);
                Ok(PipelineStage {
                    algorithm: stage.algorithm.into_inner(),
                    params: stage.params,
                    at: self.src.locate(&span),
                })
            })
            .collect()
    }

    fn plugin(&self, name: &str, pin: RawPluginPin) -> Result<PluginPin, ManifestError> {
        let key = source::render_path(&[Seg::Key("plugins".into()), Seg::Key(name.into())]);
        let hash = pin.sha256.get_ref();
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(self.invalid(
                &pin.sha256,
                &format!("{key}.sha256"),
                format!("{hash:?}"),
                "expected 64 hexadecimal digits (the output of `sha256sum`)",
            ));
        }
        Ok(PluginPin {
            sha256: hash.to_ascii_lowercase(),
            path: pin
                .path
                .map(|p| self.path(&p, &format!("{key}.path")))
                .transpose()?,
        })
    }

    fn export(&self, e: RawExport) -> Result<ExportSection, ManifestError> {
        let value = e.format.get_ref();
        let Some(format) = ExportFormat::ALL.into_iter().find(|f| f.name() == value) else {
            let valid: Vec<String> = ExportFormat::ALL
                .iter()
                .map(|f| f.name().to_owned())
                .collect();
            let choices = Choices::new(value, valid);
            return Err(ManifestError::UnknownValue {
                at: self.src.at(&e.format),
                key: "export.format".into(),
                value: value.clone(),
                choices,
            });
        };
        let max_shard_bytes = match &e.max_shard_size {
            None => crate::export::DEFAULT_MAX_SHARD_BYTES,
            Some(v) => parse_size(v.get_ref()).ok_or_else(|| {
                self.invalid(
                    v,
                    "export.max_shard_size",
                    format!("{:?}", v.get_ref()),
                    "expected a positive number of bytes, or a string such as \"5GB\" or \"500MiB\"",
                )
            })?,
        };
        Ok(ExportSection {
            format,
            output: self.path(&e.output, "export.output")?,
            max_shard_bytes,
        })
    }

    fn eval(&self, e: RawEval) -> Result<EvalSection, ManifestError> {
        Ok(EvalSection {
            dataset: self.path(&e.dataset, "eval.dataset")?,
            seqlen: self
                .opt_positive(&e.seqlen, "eval.seqlen")?
                .unwrap_or(DEFAULT_EVAL_SEQLEN),
            windows: self.opt_positive(&e.windows, "eval.windows")?,
            points: match &e.points {
                None => EvalPoint::ALL.to_vec(),
                Some(list) => {
                    let mut points = Vec::new();
                    for (i, p) in list.get_ref().iter().enumerate() {
                        let key = format!("eval.points[{i}]");
                        let Some(point) =
                            EvalPoint::ALL.into_iter().find(|k| k.name() == p.get_ref())
                        else {
                            return Err(ManifestError::UnknownValue {
                                at: self.src.at(p),
                                key,
                                value: p.get_ref().clone(),
                                choices: Choices::new(
                                    p.get_ref(),
                                    EvalPoint::ALL.iter().map(|k| k.name().to_owned()).collect(),
                                ),
                            });
                        };
                        if points.contains(&point) {
                            return Err(self.invalid(
                                p,
                                &key,
                                format!("{:?}", p.get_ref()),
                                "each point may be listed once",
                            ));
                        }
                        points.push(point);
                    }
                    if points.is_empty() {
                        return Err(self.invalid(list, "eval.points", "[]".into(), "list at least one of \"float\", \"fake_quant\", \"exported\" (or remove the key for all three)"));
                    }
                    points.sort();
                    points
                }
            },
        })
    }

    fn run(&self, r: RawRun) -> Result<RunSection, ManifestError> {
        let stage_timeout = match &r.stage_timeout_s {
            None => None,
            Some(v) => Some(
                std::time::Duration::try_from_secs_f64(*v.get_ref())
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        self.invalid(
                            v,
                            "run.stage_timeout_s",
                            v.get_ref().to_string(),
                            "expected a positive number of seconds",
                        )
                    })?,
            ),
        };
        Ok(RunSection {
            sequential: r.sequential.unwrap_or(true),
            output_error: r.output_error.unwrap_or(true),
            stage_timeout,
        })
    }
}

impl Cx<'_> {
    fn device(&self, d: RawDevice) -> Result<DeviceSection, ManifestError> {
        let value = d.kind.get_ref();
        let Some(kind) = DeviceKind::ALL.into_iter().find(|k| k.name() == value) else {
            return Err(ManifestError::UnknownValue {
                at: self.src.at(&d.kind),
                key: "device.kind".into(),
                value: value.clone(),
                choices: Choices::new(
                    value,
                    DeviceKind::ALL
                        .iter()
                        .map(|k| k.name().to_owned())
                        .collect(),
                ),
            });
        };
        if kind == DeviceKind::Cpu {
            let conflict = |key: &str, at: Location| ManifestError::Conflict {
                at,
                key: key.into(),
                other: "device.kind".into(),
                reason:
                    "kind = \"cpu\" takes no NPU ids or GEMM precision (kind = \"ascend\" does)"
                        .into(),
            };
            if let Some(ids) = &d.ids {
                return Err(conflict("device.ids", self.src.at(ids)));
            }
            if let Some(p) = &d.precision {
                return Err(conflict("device.precision", self.src.at(p)));
            }
            return Ok(DeviceSection::default());
        }
        let ids = match &d.ids {
            None => vec![0],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.invalid(
                        list,
                        "device.ids",
                        "[]".into(),
                        "list at least one NPU id (or remove the key for NPU 0)",
                    ));
                }
                let mut ids = Vec::new();
                for (i, id) in list.get_ref().iter().enumerate() {
                    let key = format!("device.ids[{i}]");
                    let v = u32::try_from(*id.get_ref()).map_err(|_| {
                        self.invalid(
                            id,
                            &key,
                            id.get_ref().to_string(),
                            "expected an NPU id >= 0 (as `gs-host devices` lists them)",
                        )
                    })?;
                    if ids.contains(&v) {
                        return Err(self.invalid(
                            id,
                            &key,
                            v.to_string(),
                            "each NPU may be listed once",
                        ));
                    }
                    ids.push(v);
                }
                ids
            }
        };
        let precision = match &d.precision {
            None => GemmPrecision::default(),
            Some(p) => GemmPrecision::ALL
                .into_iter()
                .find(|g| g.name() == p.get_ref())
                .ok_or_else(|| ManifestError::UnknownValue {
                    at: self.src.at(p),
                    key: "device.precision".into(),
                    value: p.get_ref().clone(),
                    choices: Choices::new(
                        p.get_ref(),
                        GemmPrecision::ALL
                            .iter()
                            .map(|g| g.name().to_owned())
                            .collect(),
                    ),
                })?,
        };
        Ok(DeviceSection {
            kind,
            ids,
            precision,
        })
    }
}

/// Bytes of `"5GB"`, `"500MiB"`, `"1000"` or an integer; `None` if not a positive size.
fn parse_size(v: &raw::RawSize) -> Option<usize> {
    let n = match v {
        raw::RawSize::Bytes(n) => u64::try_from(*n).ok()?,
        raw::RawSize::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (digits, unit) = t.split_at(split);
            let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "kb" => 1_000,
                "mb" => 1_000_000,
                "gb" => 1_000_000_000,
                "kib" => 1 << 10,
                "mib" => 1 << 20,
                "gib" => 1 << 30,
                _ => return None,
            };
            digits.parse::<u64>().ok()?.checked_mul(mult)?
        }
    };
    usize::try_from(n).ok().filter(|n| *n > 0)
}
